"""Training data: discovery and validation of the data folder, and the per-stage preprocessing cache.

Data folder (nnU-Net / FLARE style)::

    imagesTr/<case>_0000.nii.gz    labelsTr/<case>.nii.gz    unlabeled/<case>_0000.nii.gz

(also .nii, .nrrd, .mha, .mhd). Labels hold FLARE22 values 0..13 on the image's exact voxel grid.

Cache (one folder per stage, written once and reused; no pickles)::

    <cache>/<stage>/<case>.image.npy   (Z, Y, X) raw HU, int16 (integer sources) or float32
    <cache>/<stage>/<case>.label.npy   (Z, Y, X) uint8 labels (labeled cases only)
    <cache>/<stage>/<case>.json        provenance: source files, canonical geometry, crop box, key

Coarse stage: the whole canonical volume resized to ``coarse_size``. Fine stage: the organs' bounding
box enlarged by the crop padding (from the ground truth for labeled cases, from the coarse student's
prediction for unlabeled cases) on the full-resolution canonical volume, resized to ``fine_size``. Images are resized
trilinearly (align_corners=True); labels as one-hot maps, trilinearly, then argmax (order 1). A scan, and a
fine crop, shorter than the recipe's ``min_z_extent_mm`` is first padded to it by repeating its end slices
(image and labels), as the predictor does; ``canonical_shape`` in the provenance is then the padded shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..atomic_files import atomic_path, atomic_write_text
from ..engine.geometry import CanonicalGeometry, crop_box, to_canonical
from ..engine.image_io import read_image, strip_image_suffix
from ..engine.organs import NUM_CLASSES
from ..engine.preprocess import pad_z_to_extent, resize_volume
from ..errors import InputError
from .recipe import Recipe

CACHE_VERSION = 1
Progress = Optional[Callable[[str, int, int], None]]


@dataclass(frozen=True)
class CaseFiles:
    """One case of the data folder; ``label`` is None for unlabeled cases."""

    case_id: str
    image: Path
    label: Optional[Path] = None

    @property
    def kind(self) -> str:
        return "labeled" if self.label is not None else "unlabeled"


@dataclass(frozen=True)
class DataFiles:
    """All cases of a data folder, sorted by case id."""

    root: Path
    labeled: Tuple[CaseFiles, ...]
    unlabeled: Tuple[CaseFiles, ...]


def _images_by_case(folder: Path) -> Dict[str, Path]:
    out: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = strip_image_suffix(path.name)
        if stem is None or not path.is_file() or path.name.startswith("."):
            continue
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            raise InputError(f"{path}: image names must end in _0000 (nnU-Net channel tag), "
                             f"e.g. {stem}_0000.nii.gz")
        if stem[-4:] != "0000":
            raise InputError(f"{path}: only single-channel CT (_0000) is supported, "
                             f"found channel {stem[-4:]}")
        case = stem[:-5]
        if case in out:
            raise InputError(f"case {case!r} has two images in {folder}: {out[case].name} and {path.name}")
        out[case] = path
    return out


def find_cases(data_dir: str | Path) -> DataFiles:
    """Discover cases; raises :class:`InputError` for missing folders or image/label pairs."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"training data folder not found: {root}")
    images_dir, labels_dir, unlabeled_dir = root / "imagesTr", root / "labelsTr", root / "unlabeled"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise InputError(f"training data folder {root} has no {folder.name}/ sub-folder "
                             "(expected imagesTr/<case>_0000.nii.gz and labelsTr/<case>.nii.gz)")
    images = _images_by_case(images_dir)
    labels: Dict[str, Path] = {}
    for path in sorted(labels_dir.iterdir()):
        stem = strip_image_suffix(path.name)
        if stem is not None and path.is_file() and not path.name.startswith("."):
            labels[stem] = path
    no_label = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    if no_label:
        raise InputError(f"{len(no_label)} image(s) in {images_dir} have no label in {labels_dir}: "
                         f"{', '.join(no_label[:10])}")
    if no_image:
        raise InputError(f"{len(no_image)} label(s) in {labels_dir} have no image in {images_dir} "
                         f"(expected <case>_0000.nii.gz): {', '.join(no_image[:10])}")
    if not images:
        raise InputError(f"no labeled cases in {images_dir}")
    unlabeled = _images_by_case(unlabeled_dir) if unlabeled_dir.is_dir() else {}
    both = sorted(set(unlabeled) & set(images))
    if both:
        raise InputError(f"case id(s) both labeled and unlabeled: {', '.join(both[:10])}")
    return DataFiles(
        root=root,
        labeled=tuple(CaseFiles(c, images[c], labels[c]) for c in sorted(images)),
        unlabeled=tuple(CaseFiles(c, unlabeled[c]) for c in sorted(unlabeled)),
    )


def kfold_train_indices(n: int, n_folds: int, fold: int, seed: int = 12345) -> List[int]:
    """Training indices of ``fold`` of a shuffled KFold over ``n`` cases (sklearn KFold semantics).

    ``fold = -1``: all cases. Matches ``KFold(n_folds, shuffle=True, random_state=seed)``.
    """
    if fold < 0:
        return list(range(n))
    if n < n_folds:
        raise InputError(f"{n} labeled cases cannot be split into {n_folds} folds")
    order = np.random.RandomState(seed).permutation(n)
    sizes = np.full(n_folds, n // n_folds, dtype=int)
    sizes[: n % n_folds] += 1
    start = int(sizes[:fold].sum())
    val = set(order[start:start + sizes[fold]].tolist())
    return [i for i in range(n) if i not in val]


# ---------------------------------------------------------------------------- reading and validation
def _geometry_mismatch(image: sitk.Image, label: sitk.Image) -> Optional[str]:
    if image.GetSize() != label.GetSize():
        return f"size {label.GetSize()} != image size {image.GetSize()}"
    if not np.allclose(image.GetSpacing(), label.GetSpacing(), rtol=1e-4, atol=1e-5):
        return f"spacing {label.GetSpacing()} != image spacing {image.GetSpacing()}"
    if not np.allclose(image.GetOrigin(), label.GetOrigin(), rtol=0, atol=1e-3 * max(image.GetSpacing())):
        return f"origin {label.GetOrigin()} != image origin {image.GetOrigin()}"
    if not np.allclose(image.GetDirection(), label.GetDirection(), atol=1e-4):
        return f"direction {label.GetDirection()} != image direction {image.GetDirection()}"
    return None


def validate_label_values(array: np.ndarray, name: str) -> np.ndarray:
    """Return ``array`` as uint8 after checking it holds integers 0..13; else :class:`InputError`."""
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"label {name}: contains NaN or infinite values")
        if not np.array_equal(array, np.round(array)):
            examples = array[array != np.round(array)][:3]
            raise InputError(f"label {name}: non-integer label values (e.g. {examples})")
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise InputError(f"label {name}: unsupported voxel type {array.dtype}")
    lo, hi = array.min(), array.max()
    if lo < 0 or hi > NUM_CLASSES - 1:
        values = np.unique(array)
        bad = values[(values < 0) | (values > NUM_CLASSES - 1)]
        raise InputError(f"label {name}: values outside 0..{NUM_CLASSES - 1} (FLARE22 label order): "
                         f"{[v.item() for v in bad[:10]]}")
    return array.astype(np.uint8)


def read_case(case: CaseFiles) -> Tuple[np.ndarray, Optional[np.ndarray], CanonicalGeometry]:
    """Canonical (Z, Y, X) image (HU, source dtype), label (uint8) or None, and geometry."""
    image = read_image(case.image)
    canon, geom = to_canonical(image)
    array = sitk.GetArrayFromImage(canon)
    if case.label is None:
        return array, None, geom
    label = read_image(case.label, check=False)
    if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"label {case.label}: expected a 3D scalar label map")
    problem = _geometry_mismatch(image, label)
    if problem:
        raise InputError(f"label {case.label} does not match image {case.image}: {problem}")
    label.CopyInformation(image)  # tolerances above passed: use the image's exact geometry
    label_canon, _ = to_canonical(label)
    values = validate_label_values(sitk.GetArrayViewFromImage(label_canon), str(case.label))
    return array, values, geom


# ---------------------------------------------------------------------------- resizing
def resize_image(array: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """Trilinear resize of a (Z, Y, X) HU array; int16 if the source is integer-typed, else float32."""
    out = resize_volume(array, tuple(int(s) for s in out_shape))
    if np.issubdtype(array.dtype, np.integer):
        rounded = np.round(out)
        if rounded.min() >= np.iinfo(np.int16).min and rounded.max() <= np.iinfo(np.int16).max:
            return rounded.astype(np.int16)
    return out.astype(np.float32)


def resize_labels(labels: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """Order-1 label resize: each class's one-hot map resized trilinearly, then argmax (uint8).

    Classes are processed one at a time, so no full-resolution multi-channel array is built.
    """
    shape = tuple(int(s) for s in out_shape)
    best = np.full(shape, -1.0, dtype=np.float32)
    out = np.zeros(shape, dtype=np.uint8)
    for value in np.unique(labels):  # ascending: ties keep the lower class, like argmax
        prob = resize_volume((labels == value), shape)
        better = prob > best
        out[better] = value
        best[better] = prob[better]
    return out


# ---------------------------------------------------------------------------- cache
@dataclass(frozen=True)
class CachedCase:
    """A preprocessed case on disk."""

    case_id: str
    kind: str
    image_path: Path
    label_path: Optional[Path]
    meta_path: Path

    def load(self) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(Z, Y, X) image (raw HU) and uint8 labels or None."""
        image = np.load(self.image_path, allow_pickle=False)
        label = np.load(self.label_path, allow_pickle=False) if self.label_path is not None else None
        return image, label

    def meta(self) -> Dict:
        return json.loads(self.meta_path.read_text())


def _file_signature(path: Path) -> Dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _cached(folder: Path, case: CaseFiles, key: Dict) -> Optional[CachedCase]:
    entry = _entry(folder, case)
    if not entry.meta_path.is_file() or not entry.image_path.is_file():
        return None
    if entry.label_path is not None and not entry.label_path.is_file():
        return None
    try:
        meta = json.loads(entry.meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return entry if meta.get("key") == key else None


def _entry(folder: Path, case: CaseFiles) -> CachedCase:
    return CachedCase(case.case_id, case.kind, folder / f"{case.case_id}.image.npy",
                      folder / f"{case.case_id}.label.npy" if case.label is not None else None,
                      folder / f"{case.case_id}.json")


def _write_entry(folder: Path, case: CaseFiles, image: np.ndarray, label: Optional[np.ndarray],
                 meta: Dict) -> CachedCase:
    entry = _entry(folder, case)
    _atomic_save_npy(entry.image_path, image)
    if label is not None:
        _atomic_save_npy(entry.label_path, label)
    atomic_write_text(entry.meta_path, json.dumps(meta, indent=1, sort_keys=True))  # last: marks complete
    return entry


def _case_key(case: CaseFiles, stage: str, params: Dict, extra: Optional[Dict] = None) -> Dict:
    key = {"version": CACHE_VERSION, "stage": stage, "params": params, "image": _file_signature(case.image)}
    if case.label is not None:
        key["label"] = _file_signature(case.label)
    if extra:
        key.update(extra)
    return key


def _read_padded(case: CaseFiles, recipe: Recipe) -> Tuple[np.ndarray, Optional[np.ndarray], CanonicalGeometry]:
    """:func:`read_case`, with a scan shorter than ``recipe.min_z_extent_mm`` padded by repeats of its
    end slices (image and labels alike), as the predictor pads it (:func:`pad_z_to_extent`)."""
    image, label, geom = read_case(case)
    dz = geom.canonical_spacing_zyx[0]
    image = pad_z_to_extent(image, dz, recipe.min_z_extent_mm)[0]
    label = None if label is None else pad_z_to_extent(label, dz, recipe.min_z_extent_mm)[0]
    return image, label, geom


def _geometry_dict(geom: CanonicalGeometry) -> Dict:
    return json.loads(json.dumps(dataclasses.asdict(geom)))


def build_coarse_cache(cases: Sequence[CaseFiles], cache_dir: str | Path, recipe: Recipe,
                       progress: Progress = None) -> List[CachedCase]:
    """Whole canonical volumes resized to ``recipe.coarse_size`` (labels order-1); reuses valid entries."""
    folder = Path(cache_dir) / "coarse"
    folder.mkdir(parents=True, exist_ok=True)
    params = {"coarse_size": list(recipe.coarse_size), "min_z_extent_mm": recipe.min_z_extent_mm}
    out = []
    for i, case in enumerate(cases):
        key = _case_key(case, "coarse", params)
        entry = _cached(folder, case, key)
        if entry is None:
            image, label, geom = _read_padded(case, recipe)
            small = resize_image(image, recipe.coarse_size)
            small_label = resize_labels(label, recipe.coarse_size) if label is not None else None
            meta = {"key": key, "case_id": case.case_id, "kind": case.kind,
                    "canonical_shape": list(image.shape),
                    "geometry": _geometry_dict(geom), "shape": list(small.shape), "dtype": str(small.dtype)}
            entry = _write_entry(folder, case, small, small_label, meta)
        out.append(entry)
        if progress:
            progress("coarse cache", i + 1, len(cases))
    return out


def mask_digest(mask: np.ndarray) -> str:
    """SHA-256 of a mask's shape and bytes (part of the fine-cache key of unlabeled cases)."""
    h = hashlib.sha256(str(mask.shape).encode())
    h.update(np.ascontiguousarray(mask).tobytes())
    return h.hexdigest()


def build_fine_cache(cases: Sequence[CaseFiles], cache_dir: str | Path, recipe: Recipe,
                     masks: Optional[Dict[str, Path]] = None, progress: Progress = None) -> List[CachedCase]:
    """Crops around the organs resized to ``recipe.fine_size``.

    Labeled cases: box from the ground truth (label > 0). Unlabeled cases: box from ``masks[case_id]``,
    a .npy (Z, Y, X) label map of the coarse student at any resolution (foreground = value > 0).
    """
    folder = Path(cache_dir) / "fine"
    folder.mkdir(parents=True, exist_ok=True)
    masks = masks or {}
    params = {"fine_size": list(recipe.fine_size), "padding": recipe.fine_padding,
              "fallback_mm": list(recipe.fine_fallback_mm), "min_z_extent_mm": recipe.min_z_extent_mm}
    out = []
    for i, case in enumerate(cases):
        prior = None
        extra = None
        if case.label is None:
            if case.case_id not in masks:
                raise InputError(f"no coarse prediction for unlabeled case {case.case_id}")
            prior = np.load(masks[case.case_id], allow_pickle=False)
            extra = {"mask_sha256": mask_digest(prior)}
        key = _case_key(case, "fine", params, extra)
        entry = _cached(folder, case, key)
        if entry is None:
            image, label, geom = _read_padded(case, recipe)
            source = label if label is not None else prior
            fg = source > 0
            if not fg.any():
                warnings.warn(f"{case.case_id}: empty {'label' if label is not None else 'coarse mask'}; "
                              "using the centred fallback box", stacklevel=2)
            pre = recipe.preprocessing
            box = crop_box(fg, image.shape, geom.canonical_spacing_zyx, pre.crop_padding, pre.fallback_box_mm_zyx)
            dz = geom.canonical_spacing_zyx[0]
            crop = pad_z_to_extent(image[box], dz, recipe.min_z_extent_mm)[0]
            small = resize_image(crop, recipe.fine_size)
            small_label = (resize_labels(pad_z_to_extent(label[box], dz, recipe.min_z_extent_mm)[0], recipe.fine_size)
                           if label is not None else None)
            meta = {"key": key, "case_id": case.case_id, "kind": case.kind,
                    "canonical_shape": list(image.shape),
                    "geometry": _geometry_dict(geom), "box": [[s.start, s.stop] for s in box],
                    "shape": list(small.shape), "dtype": str(small.dtype)}
            entry = _write_entry(folder, case, small, small_label, meta)
        out.append(entry)
        if progress:
            progress("fine cache", i + 1, len(cases))
    return out
