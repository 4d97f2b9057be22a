"""The patient's body on a CT, to keep organs out of the air and off the scanner table.

:func:`body_mask` works on a (Z, Y, X) HU array (any orientation; the predictor passes the
canonical one) with its voxel spacing in mm: voxels above :data:`BODY_HU` on a subsample of about
:data:`SAMPLE_MM` (at most :data:`MAX_GRID` samples per axis), their largest 26-connected
component, holes filled in every axial (Z) slice (lungs, bowel gas, the airway), dilated by one
subsample voxel. The table and the cushions under the patient are separate components and drop
out. :class:`BodyMask` maps the result to the full grid (nearest sample) or to another grid of the
same field of view. :func:`check_has_body` refuses, with :class:`InputError`, images with nothing
to segment (a constant image, no body, no soft tissue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import cc3d
import numpy as np

from ..errors import InputError

#: Voxels above this value (HU) are the body's tissue (fat is about -100, lung about -850).
BODY_HU = -500.0
#: Soft tissue (fat to contrast-enhanced organs), HU.
SOFT_TISSUE_HU = (-150.0, 250.0)
#: Target spacing of the subsample the mask is computed on, mm.
SAMPLE_MM = 2.0
#: At most this many samples along each axis (so the grid is at most 128^3).
MAX_GRID = 128
#: A body needs at least this fraction of its (hole-filled) voxels in :data:`SOFT_TISSUE_HU`.
#: A real CT has 40-90 % there; a bone-only or binary (air/metal) image has none.
MIN_SOFT_TISSUE_FRACTION = 0.005
#: ... and at least this volume of soft tissue, mL (noise specks in air have less; a real body
#: has litres, the smallest synthetic phantoms of the tests ~100 mL).
MIN_SOFT_TISSUE_ML = 1.0

Box = tuple[slice, slice, slice]


@dataclass
class BodyMask:
    """The body on a subsample of a (Z, Y, X) volume.

    ``sub`` is the boolean mask on the samples ``volume[::sz, ::sy, ::sx]`` (``strides``);
    ``shape`` the full volume's shape; ``spacing_zyx`` its voxel spacing (mm).
    """

    sub: np.ndarray
    strides: tuple[int, int, int]
    shape: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]

    @property
    def volume_ml(self) -> float:
        """Volume of the body, mL (from the subsample)."""
        sample_ml = float(np.prod([s * d for s, d in zip(self.strides, self.spacing_zyx)])) / 1000.0
        return float(np.count_nonzero(self.sub)) * sample_ml

    def full(self, box: Optional[Box] = None) -> np.ndarray:
        """The mask at full resolution (bool), or over ``box`` of the full grid only (its shape)."""
        box = box or tuple(slice(0, n) for n in self.shape)
        out = self.sub
        for axis, (n, s, sl) in enumerate(zip(self.shape, self.strides, box)):
            full_index = np.arange(*sl.indices(n))
            nearest = np.minimum(np.rint(full_index / s).astype(np.int64), self.sub.shape[axis] - 1)
            counts = np.bincount(nearest, minlength=self.sub.shape[axis])  # runs: nearest is monotonic
            out = np.repeat(out, counts, axis=axis)
        return out

    def on_grid(self, shape: Sequence[int]) -> np.ndarray:
        """The mask (bool) on a grid of ``shape`` covering the same field of view, as the
        trilinear ``align_corners=True`` resize of :mod:`preprocess` maps it (e.g. the 96^3 coarse grid)."""
        out = self.sub
        for axis, (n, s, m) in enumerate(zip(self.shape, self.strides, shape)):
            pos = np.arange(m) * ((n - 1) / (m - 1)) if m > 1 else np.zeros(1)
            nearest = np.minimum(np.rint(pos / s).astype(np.int64), self.sub.shape[axis] - 1)
            out = np.take(out, nearest, axis=axis)
        return out

    def apply(self, labels: np.ndarray, box: Optional[Box] = None) -> np.ndarray:
        """Set ``labels`` (full (Z, Y, X) shape) to 0 outside the body, in place (within ``box`` only
        when given, e.g. where labels can be non-zero); returns ``labels``."""
        if labels.shape != self.shape:
            raise ValueError(f"labels of shape {labels.shape} do not match the body mask's {self.shape}")
        box = box or tuple(slice(0, n) for n in self.shape)
        region = labels[box]
        region[~self.full(box)] = 0
        return labels


def sample_strides(shape: Sequence[int], spacing_zyx: Sequence[float]) -> tuple[int, int, int]:
    """Subsample step per axis: about :data:`SAMPLE_MM`, at most :data:`MAX_GRID` samples."""
    return tuple(max(1, int(round(SAMPLE_MM / float(d))), math.ceil(n / MAX_GRID))  # type: ignore[return-value]
                 for n, d in zip(shape, spacing_zyx))


def body_mask(volume_zyx: np.ndarray, spacing_zyx: Sequence[float]) -> BodyMask:
    """The body of a (Z, Y, X) HU volume (axis 0 head-foot, spacing in mm); see the module docstring.

    Empty (no voxel above :data:`BODY_HU` on the subsample) for an image of air.
    """
    if volume_zyx.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {volume_zyx.shape}")
    strides = sample_strides(volume_zyx.shape, spacing_zyx)
    sample = volume_zyx[:: strides[0], :: strides[1], :: strides[2]]
    tissue = np.ascontiguousarray(sample > BODY_HU)
    if tissue.any():
        tissue = cc3d.largest_k(tissue, k=1, connectivity=26) > 0
        tissue = _dilate(_fill_holes_per_slice(tissue))
    return BodyMask(tissue, strides, tuple(volume_zyx.shape), tuple(float(d) for d in spacing_zyx))


def check_has_body(volume_zyx: np.ndarray, spacing_zyx: Sequence[float], name: str = "input") -> BodyMask:
    """:func:`body_mask` of a (Z, Y, X) HU volume, raising :class:`InputError` first when there is
    nothing to segment: every voxel the same value, no body, or no soft tissue in it (fewer than
    :data:`MIN_SOFT_TISSUE_FRACTION` of its voxels or :data:`MIN_SOFT_TISSUE_ML` in
    :data:`SOFT_TISSUE_HU`). An image without air (nothing under :data:`BODY_HU`: not in HU, such as
    an MR, or a crop inside the body) is not judged by HU: its mask is the whole volume. ``name``
    (the file) starts the message.
    """
    strides = sample_strides(volume_zyx.shape, spacing_zyx)
    sample = volume_zyx[:: strides[0], :: strides[1], :: strides[2]]
    if sample.min() == sample.max():
        low, high = volume_zyx.min(), volume_zyx.max()  # the whole volume only when the samples agree
        if low == high:
            raise InputError(f"{name}: every voxel has the value {_number(low)}: there is no image to segment")
    mask = body_mask(volume_zyx, spacing_zyx)
    if not (sample <= BODY_HU).any():
        return mask  # no air at all: not HU (an MR, a shifted scale) or a crop inside the body; validate_ct warns
    lo, hi = SOFT_TISSUE_HU
    soft = np.count_nonzero((sample >= lo) & (sample <= hi) & mask.sub)
    sample_ml = float(np.prod([s * d for s, d in zip(strides, spacing_zyx)])) / 1000.0
    n_body = np.count_nonzero(mask.sub)
    if n_body == 0 or soft < MIN_SOFT_TISSUE_FRACTION * n_body or soft * sample_ml < MIN_SOFT_TISSUE_ML:
        found = "no voxels" if soft == 0 else f"only {soft * sample_ml:.2g} mL"
        raise InputError(f"{name}: no body found: {found} of soft tissue ({lo:.0f} to {hi:.0f} HU); "
                         "is this a CT of a patient?")
    return mask


def _number(value) -> str:  # noqa: ANN001 (a numpy scalar)
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every Z slice of a boolean (Z, Y, X) mask (background: 4-connected to the
    slice border). All slices in one 2D labelling: each is padded with a ring of background and
    they are stacked into one tall image, so every ring joins one background component."""
    z, y, x = mask.shape
    tall = np.ones((z, y + 2, x + 2), dtype=bool)
    tall[:, 1:-1, 1:-1] = ~mask
    tall = tall.reshape(z * (y + 2), x + 2)
    labels = cc3d.connected_components(tall, connectivity=4)
    outside = labels[0, 0]
    holes = (labels != outside) & tall
    return mask | holes.reshape(z, y + 2, x + 2)[:, 1:-1, 1:-1]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Dilation of a boolean 3D mask by its 26-neighbourhood (a 3x3x3 box, separable)."""
    out = mask.copy()
    for axis in range(mask.ndim):
        src = out.copy()
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        out[tuple(hi)] |= src[tuple(lo)]
        out[tuple(lo)] |= src[tuple(hi)]
    return out
