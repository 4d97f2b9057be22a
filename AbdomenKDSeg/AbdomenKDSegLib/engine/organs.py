"""The organ table: the single source of truth for label values, names, colors and terminology.

Label values follow the FLARE22 files (and the official FLARE22 evaluation script); 0 is
background. Colors (RGB, 0..255) are the recommended display colors of Slicer's General Anatomy
terminology, except the stomach's: Slicer's (216, 132, 105) is almost the liver's (221, 130, 101) and the
two organs touch, so the stomach is teal. Terminology codes are
SNOMED CT (coding scheme designator ``SCT``), category "Anatomical Structure".
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

from ..errors import UsageError

#: SNOMED CT category code of every organ in the table.
CATEGORY = ("SCT", "123037004", "Anatomical Structure")
RIGHT = ("SCT", "24028007", "Right")
LEFT = ("SCT", "7771000", "Left")


@dataclass(frozen=True)
class Organ:
    """One segmented structure.

    ``value`` is the label value in label maps; ``color`` is RGB in 0..255; ``snomed_type`` and the
    optional ``snomed_modifier`` are (scheme, code, meaning) triplets; ``nsd_tolerance_mm`` is the
    FLARE22 normalized-surface-dice tolerance in millimetres.
    """

    value: int
    key: str
    name: str
    color: tuple[int, int, int]
    snomed_type: tuple[str, str, str]
    snomed_modifier: tuple[str, str, str] | None
    nsd_tolerance_mm: float
    tubular: bool = False

    @property
    def color_float(self) -> tuple[float, float, float]:
        """Color as RGB floats in 0..1 (what vtkSegment.SetColor takes)."""
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]

    def terminology_entry(self) -> str:
        """Slicer's terminology tag string (vtkSegment tag ``TerminologyEntry``)."""
        cat = "^".join(CATEGORY)
        typ = "^".join(self.snomed_type)
        mod = "^".join(self.snomed_modifier) if self.snomed_modifier else "^^"
        return (
            "Segmentation category and type - 3D Slicer General Anatomy list"
            f"~{cat}~{typ}~{mod}~Anatomic codes - DICOM master list~^^~^^"
        )


ORGANS: tuple[Organ, ...] = (
    Organ(1, "liver", "Liver", (221, 130, 101), ("SCT", "10200004", "Liver"), None, 5.0),
    Organ(2, "right_kidney", "Right kidney", (185, 102, 83), ("SCT", "64033007", "Kidney"), RIGHT, 3.0),
    Organ(3, "spleen", "Spleen", (157, 108, 162), ("SCT", "78961009", "Spleen"), None, 3.0),
    Organ(4, "pancreas", "Pancreas", (249, 180, 111), ("SCT", "15776009", "Pancreas"), None, 5.0),
    Organ(5, "aorta", "Aorta", (224, 97, 76), ("SCT", "15825003", "Aorta"), None, 2.0, tubular=True),
    Organ(6, "inferior_vena_cava", "Inferior vena cava", (0, 151, 206),
          ("SCT", "64131007", "Inferior vena cava"), None, 2.0, tubular=True),
    Organ(7, "right_adrenal_gland", "Right adrenal gland", (249, 186, 150),
          ("SCT", "23451007", "Adrenal gland"), RIGHT, 2.0),
    Organ(8, "left_adrenal_gland", "Left adrenal gland", (249, 186, 150),
          ("SCT", "23451007", "Adrenal gland"), LEFT, 2.0),
    Organ(9, "gallbladder", "Gallbladder", (139, 150, 98), ("SCT", "28231008", "Gallbladder"), None, 2.0),
    Organ(10, "esophagus", "Esophagus", (211, 171, 143), ("SCT", "32849002", "Esophagus"), None, 3.0,
          tubular=True),
    Organ(11, "stomach", "Stomach", (60, 180, 150), ("SCT", "69695003", "Stomach"), None, 5.0),
    Organ(12, "duodenum", "Duodenum", (255, 253, 229), ("SCT", "38848004", "Duodenum"), None, 7.0),
    Organ(13, "left_kidney", "Left kidney", (185, 102, 83), ("SCT", "64033007", "Kidney"), LEFT, 3.0),
)

#: Number of network output channels: background + 13 organs.
NUM_CLASSES = len(ORGANS) + 1
BY_VALUE: dict[int, Organ] = {o.value: o for o in ORGANS}
BY_KEY: dict[str, Organ] = {o.key: o for o in ORGANS}


def resolve_organs(selection: list[str | int] | None) -> list[Organ]:
    """Organs named by key (``"liver"``), display name (``"Left kidney"``) or label value, sorted
    by value; a string may hold a comma-separated list (``"liver,spleen"``).

    ``None`` means all 13; an empty selection gives an empty list (the caller decides whether that
    is allowed). Raises :class:`errors.UsageError` (a ``ValueError``) naming any unknown entry and
    listing the known keys.
    """
    if selection is None:
        return list(ORGANS)
    by_name = {o.name.lower(): o for o in ORGANS}
    items: list[str | int] = []
    for item in selection:
        if isinstance(item, str):
            items.extend(part for part in item.split(",") if part.strip())
        else:
            items.append(item)
    known = ", ".join(o.key for o in ORGANS)
    out: list[Organ] = []
    for item in items:
        if isinstance(item, Integral) or (isinstance(item, str) and item.strip().isdigit()):
            organ = BY_VALUE.get(int(item))
        else:
            text = str(item).strip().lower()
            organ = BY_KEY.get(text.replace(" ", "_")) or by_name.get(text)
        if organ is None:
            raise UsageError(f"unknown organ {str(item).strip()!r}; known organs: {known} (or their label values 1-13)")
        if organ not in out:
            out.append(organ)
    return sorted(out, key=lambda o: o.value)
