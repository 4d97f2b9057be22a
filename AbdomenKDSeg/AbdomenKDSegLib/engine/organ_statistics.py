"""Organ volumes against the 50 FLARE22 reference label maps: the one organ table of every front end.

The reference statistics (per organ: percentiles of the volume in mL and of the craniocaudal
extent in mm) were computed once by ``benchmarks/organ_volume_statistics.py`` from the FLARE22
training labels and are shipped as ``Resources/Statistics/flare22-organ-volumes.json``.

A volume is flagged when it falls below the 1st or above the 99th percentile, with the range
scaled by the scan's field of view (its craniocaudal extent, :func:`craniocaudal_extent_mm`):

- the lower bound is multiplied by ``min(1, fov / p99 extent)``: a scan shorter than the longest
  reference organs may cut the organ (a 40 mm slab holds a fraction of a liver);
- for tubular organs (aorta, vena cava, esophagus) the upper bound is multiplied by
  ``max(1, fov / median extent)``: a longer scan holds more of the vessel.

The CLI summary, the Slicer panel and the web app all show :func:`organ_table` rows.
Standard library only (no numpy), so the Slicer module can use it before the engine is installed.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..resources import MODULE_RESOURCES
from .organs import BY_KEY, ORGANS, Organ

#: Percentiles stored for every organ (volume and extent).
PERCENTILES = (1, 5, 50, 95, 99)
#: The shipped reference statistics.
STATISTICS_PATH = MODULE_RESOURCES / "Statistics" / "flare22-organ-volumes.json"
#: Status of a row: the volume is inside the reference range, below it, above it, or the organ is absent.
OK, LOW, HIGH, NOT_FOUND = "ok", "low", "high", "not found"


@functools.lru_cache(maxsize=4)
def load_statistics(path: str | None = None) -> dict[str, Any]:
    """The reference statistics (the shipped file unless ``path``); cached."""
    return json.loads(Path(path or STATISTICS_PATH).read_text(encoding="utf-8"))


def superior_axis(direction: Sequence[float]) -> int:
    """Index axis (0, 1, 2) most aligned with the patient's superior axis.

    ``direction``: 9 numbers, row-major, column j = index axis j in patient coordinates (ITK's
    ``GetDirection()`` in LPS, or a MRML IJK-to-RAS direction matrix: S is the third row in both).
    """
    d = [float(v) for v in direction]
    if len(d) != 9:
        return 2
    return max(range(3), key=lambda j: abs(d[6 + j]))


def craniocaudal_extent_mm(size: Sequence[int], spacing: Sequence[float],
                           direction: Sequence[float] | None = None) -> float:
    """The scan's field of view along the patient's superior axis, mm (voxels x spacing)."""
    axis = superior_axis(direction) if direction is not None else 2
    return float(size[axis]) * float(spacing[axis])


@dataclass(frozen=True)
class OrganRow:
    """One organ of the table: its volume (None: not found), the scaled reference range, the status."""

    organ: Organ
    volume_ml: float | None
    low_ml: float | None
    high_ml: float | None
    status: str

    @property
    def flagged(self) -> bool:
        """True when the volume is outside the reference range."""
        return self.status in (LOW, HIGH)

    @property
    def volume_text(self) -> str:
        """``"1523.4"``, or ``"not found"``."""
        return "not found" if self.volume_ml is None else f"{self.volume_ml:.1f}"

    @property
    def range_text(self) -> str:
        """The reference range, e.g. ``"1012-2702"`` (mL), or ``""`` without statistics."""
        if self.low_ml is None or self.high_ml is None:
            return ""
        return f"{_round(self.low_ml)}-{_round(self.high_ml)}"

    @property
    def flag_text(self) -> str:
        """``""`` when unremarkable, else why, e.g. ``"below the FLARE22 range (1012-2702 mL)"``."""
        if self.status == LOW:
            return f"below the FLARE22 range ({self.range_text} mL)"
        if self.status == HIGH:
            return f"above the FLARE22 range ({self.range_text} mL)"
        return ""


def _round(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def reference_range(organ: Organ, fov_mm: float | None = None,
                    statistics: Mapping[str, Any] | None = None) -> tuple[float, float] | None:
    """(low, high) mL: the 1st-99th percentile range of ``organ``, scaled by the field of view ``fov_mm``
    (None: not scaled); None when the statistics do not cover the organ."""
    entry = (statistics or load_statistics())["organs"].get(organ.key)
    if entry is None:
        return None
    low, high = float(entry["volume_ml"]["p1"]), float(entry["volume_ml"]["p99"])
    if fov_mm is not None and fov_mm > 0:
        low *= min(1.0, fov_mm / float(entry["extent_mm"]["p99"]))
        if organ.tubular:
            high *= max(1.0, fov_mm / float(entry["extent_mm"]["p50"]))
    return low, high


def check_volume(organ: Organ, volume_ml: float | None, fov_mm: float | None = None,
                 statistics: Mapping[str, Any] | None = None) -> OrganRow:
    """The table row of one organ: ``volume_ml`` (None or 0: not found) against its scaled range."""
    found = volume_ml is not None and volume_ml > 0
    limits = reference_range(organ, fov_mm, statistics)
    low, high = limits if limits is not None else (None, None)
    if not found:
        status = NOT_FOUND
    elif low is not None and volume_ml < low:  # type: ignore[operator]
        status = LOW
    elif high is not None and volume_ml > high:  # type: ignore[operator]
        status = HIGH
    else:
        status = OK
    return OrganRow(organ, float(volume_ml) if found else None, low, high, status)  # type: ignore[arg-type]


def organ_table(volumes_ml: Mapping[Any, float], fov_mm: float | None = None,
                organs: Iterable[Organ] | None = None) -> list[OrganRow]:
    """One row per organ of ``organs`` (default all 13, in label order); ``volumes_ml`` is keyed by
    label value, organ key or organ name (organs absent from it are "not found")."""
    by_any: dict[Any, float] = {}
    for key, ml in volumes_ml.items():
        organ = key if isinstance(key, Organ) else _find_organ(key)
        if organ is not None:
            by_any[organ.value] = float(ml)
    chosen = list(ORGANS) if organs is None else list(organs)
    return [check_volume(o, by_any.get(o.value), fov_mm) for o in chosen]


def _find_organ(key: Any) -> Organ | None:
    if isinstance(key, int):
        return next((o for o in ORGANS if o.value == key), None)
    text = str(key)
    return BY_KEY.get(text) or next((o for o in ORGANS if o.name == text), None)


def format_table(rows: Sequence[OrganRow], voxel_counts: Mapping[int, int] | None = None) -> list[str]:
    """The table as text lines (the CLI summary): label, organ, [voxels,] mL, FLARE22 range, flag."""
    counts = voxel_counts is not None
    head = f"{'label':>5}  {'organ':<22}" + (f"{'voxels':>12}" if counts else "") + f"{'volume mL':>12}"
    lines = [head + f"  {'FLARE22 1-99% mL':<18}flag"]
    for row in rows:
        line = f"{row.organ.value:>5}  {row.organ.name:<22}"
        if counts:
            line += f"{int(voxel_counts.get(row.organ.value, 0)):>12d}"  # type: ignore[union-attr]
        volume = f"{row.volume_ml:.1f}" if row.volume_ml is not None else "0.0"
        flag = row.status.upper() if row.flagged else ("not found" if row.status == NOT_FOUND else "")
        lines.append((line + f"{volume:>12}  {row.range_text:<18}{flag}").rstrip())
    return lines
