"""Orientation to the canonical frame and back, and crop boxes for the fine stage.

Canonical frame: the voxel axes permuted and flipped so that the direction matrix is the nearest
to identity in ITK's LPS world (index i -> patient Left, j -> Posterior, k -> Superior). As numpy
(Z, Y, X) arrays: axis 0 runs inferior->superior, axis 1 anterior->posterior, axis 2 right->left.
For axis-aligned scans this is what the reference code's flips give; permuting as well makes
sagittal and coronal acquisitions work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

CANONICAL_CODE = "LPS"


@dataclass(frozen=True)
class CanonicalGeometry:
    """What is needed to put a canonical-frame array back on the original voxel grid.

    Sizes and spacings are in ITK (x, y, z) order; spacing in mm; origin in LPS mm.
    """

    original_code: str
    original_size: tuple[int, int, int]
    original_spacing: tuple[float, float, float]
    original_origin: tuple[float, float, float]
    original_direction: tuple[float, ...]
    canonical_spacing: tuple[float, float, float]
    canonical_origin: tuple[float, float, float]
    canonical_direction: tuple[float, ...]

    @property
    def canonical_spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel spacing in mm along the canonical numpy axes (Z, Y, X)."""
        return tuple(reversed(self.canonical_spacing))  # type: ignore[return-value]


def orientation_code(image: sitk.Image) -> str:
    """Three-letter orientation (e.g. ``"LPS"``, ``"RAS"``) nearest to the image's direction."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def to_canonical(image: sitk.Image) -> tuple[sitk.Image, CanonicalGeometry]:
    """Reorient ``image`` to the canonical frame (no resampling: only axis permutes and flips).

    Returns the canonical image (``sitk.GetArrayViewFromImage`` of it is (Z, Y, X) = (S, P, L))
    and the geometry needed by :func:`from_canonical`.
    """
    code = orientation_code(image)
    canonical = image if code == CANONICAL_CODE else sitk.DICOMOrient(image, CANONICAL_CODE)
    geom = CanonicalGeometry(
        original_code=code,
        original_size=tuple(image.GetSize()),
        original_spacing=tuple(image.GetSpacing()),
        original_origin=tuple(image.GetOrigin()),
        original_direction=tuple(image.GetDirection()),
        canonical_spacing=tuple(canonical.GetSpacing()),
        canonical_origin=tuple(canonical.GetOrigin()),
        canonical_direction=tuple(canonical.GetDirection()),
    )
    return canonical, geom


def from_canonical(array_zyx: np.ndarray, geom: CanonicalGeometry) -> sitk.Image:
    """Put a canonical-frame array (Z, Y, X) back on the original grid with the original geometry.

    The result has exactly the original size, spacing, origin and direction.
    """
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(geom.canonical_spacing)
    image.SetOrigin(geom.canonical_origin)
    image.SetDirection(geom.canonical_direction)
    if geom.original_code != CANONICAL_CODE:
        image = sitk.DICOMOrient(image, geom.original_code)
    if tuple(image.GetSize()) != geom.original_size:
        raise RuntimeError(f"reorientation gave size {image.GetSize()}, expected {geom.original_size}")
    image.SetSpacing(geom.original_spacing)
    image.SetOrigin(geom.original_origin)
    image.SetDirection(geom.original_direction)
    return image


def crop_box(
    mask: np.ndarray,
    full_shape: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    padding: float,
    fallback_mm: tuple[float, float, float],
) -> tuple[slice, slice, slice]:
    """Fine-stage crop box on the full-resolution grid from a foreground mask at any resolution.

    ``mask`` (Z, Y, X) covers the same field of view as the full volume of ``full_shape``. Its
    foreground bounding box, in normalised [0, 1] coordinates (voxel ``i`` spans [i/m, (i+1)/m]),
    is scaled by ``padding`` about its centre (e.g. 1.1 = 5 % of the extent on each side), clipped to
    [0, 1] and mapped outward to whole voxels of the full grid. An empty mask gives a box of
    ``fallback_mm`` (Z, Y, X, mm) centred in the volume, clipped. Boxes are never empty.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3 or len(full_shape) != 3:
        raise ValueError(f"crop_box needs 3D shapes, got mask {mask.shape} and volume {full_shape}")
    if not mask.any():
        return centered_box(full_shape, spacing_zyx, fallback_mm)
    box = []
    for axis, (m, n) in enumerate(zip(mask.shape, full_shape)):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        lo, hi = nz[0] / m, (nz[-1] + 1) / m
        centre, half = (lo + hi) / 2.0, (hi - lo) / 2.0 * padding
        lo, hi = max(0.0, centre - half), min(1.0, centre + half)
        start = min(max(0, math.floor(lo * n + 1e-9)), n - 1)
        stop = max(start + 1, min(n, math.ceil(hi * n - 1e-9)))
        box.append(slice(start, stop))
    return tuple(box)  # type: ignore[return-value]


def centered_box(
    full_shape: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    size_mm: tuple[float, float, float],
) -> tuple[slice, slice, slice]:
    """A box of ``size_mm`` (Z, Y, X) centred in a volume of ``full_shape``, clipped to it."""
    box = []
    for n, sp, mm in zip(full_shape, spacing_zyx, size_mm):
        size = min(n, max(1, round(mm / sp)))
        start = (n - size) // 2
        box.append(slice(start, start + size))
    return tuple(box)  # type: ignore[return-value]
