"""Anatomy transfer: fit a smooth map that moves a labeled source CT's organs onto a target label map.

All volumes are canonical-frame (Z, Y, X) arrays (see :mod:`AbdomenKDSegLib.engine.geometry`) on axis-aligned
grids; positions are LPS millimetres in (z, y, x) order. The fitted map ``phi`` sends a point ``p`` of
the *target* space to the source point ``A p + b + u(p)``: an affine part (initialised from organ
centroids, restricted to a rotation and per-axis stretches within :data:`STRETCH_RANGE`) plus a dense
displacement ``u`` (mm) on a control grid, fitted with 1 - mean soft Dice over the organ channels plus a
smoothness penalty, coarse to fine (6 mm, then 3 mm), in torch on the CPU.

Away from the organs no label constrains ``u``, and a large displacement there bends the body outline
and the spine. :meth:`Transfer.displacement_weight` therefore fades ``u`` to zero between
``fade_start_mm`` and ``fade_start_mm + fade_width_mm`` from the target's organs: far from them only
the affine part moves the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..engine.geometry import to_canonical
from ..engine.image_io import read_image
from ..errors import InputError

#: Per-axis stretch factors allowed in the affine part (the rest of the shape change is dense).
STRETCH_RANGE = (0.8, 1.25)


@dataclass
class GridVolume:
    """A canonical (Z, Y, X) array on an axis-aligned grid: voxel ``i`` of axis ``a`` is at
    ``origin[a] + i * spacing[a]`` mm (LPS, (z, y, x) order)."""

    array: np.ndarray
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    def axis_positions(self, axis: int) -> np.ndarray:
        """Positions (mm) of the voxel centres along ``axis``."""
        return self.origin[axis] + self.spacing[axis] * np.arange(self.shape[axis])

    def extent(self) -> np.ndarray:
        """(3, 2) first and last voxel-centre positions per axis (mm)."""
        return np.array([[self.origin[a], self.origin[a] + self.spacing[a] * (self.shape[a] - 1)]
                         for a in range(3)])


def read_grid_volume(path, check: bool = True) -> GridVolume:  # noqa: ANN001
    """Read an image, reorient it to the canonical frame; raise if its axes are oblique."""
    image = read_image(path, check=check)
    canon, _ = to_canonical(image)
    direction = np.array(canon.GetDirection()).reshape(3, 3)
    if not np.allclose(direction, np.eye(3), atol=1e-3):
        raise InputError(f"{path}: oblique image axes are not supported by the training-set generator")
    return GridVolume(sitk.GetArrayFromImage(canon), tuple(reversed(canon.GetSpacing())),
                      tuple(reversed(canon.GetOrigin())))


def nearest_on_grid(volume: GridVolume, spacing: Sequence[float],
                    extent: Optional[np.ndarray] = None) -> GridVolume:
    """Nearest-neighbour resampling of a label volume onto a grid of ``spacing`` covering ``extent``
    ((3, 2) first/last centre positions; default: the volume's own field of view). Exact and separable
    (axis-aligned grids): each output axis picks its nearest input index; outside the input, label 0."""
    if extent is None:
        lo = np.array(volume.origin) - 0.5 * np.array(volume.spacing)
        hi = lo + np.array(volume.shape) * np.array(volume.spacing)
        spacing = np.asarray(spacing, dtype=float)
        n = np.maximum(1, np.round((hi - lo) / spacing).astype(int))
        start = lo + 0.5 * spacing
        extent = np.stack([start, start + (n - 1) * spacing], axis=1)
    spacing = np.asarray(spacing, dtype=float)
    n = np.round((extent[:, 1] - extent[:, 0]) / spacing).astype(int) + 1
    index, inside = [], []
    for a in range(3):
        pos = extent[a, 0] + spacing[a] * np.arange(n[a])
        i = np.round((pos - volume.origin[a]) / volume.spacing[a]).astype(int)
        inside.append((i >= 0) & (i < volume.shape[a]))
        index.append(np.clip(i, 0, volume.shape[a] - 1))
    out = volume.array[np.ix_(*index)].copy()
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    out[~mask] = 0
    return GridVolume(out, tuple(float(s) for s in spacing), tuple(float(v) for v in extent[:, 0]))


def grid_points(shape: Sequence[int], spacing: Sequence[float], origin: Sequence[float]) -> torch.Tensor:
    """(Z, Y, X, 3) positions (mm, (z, y, x)) of a grid's voxel centres."""
    axes = [torch.as_tensor(origin[a] + spacing[a] * np.arange(shape[a]), dtype=torch.float32) for a in range(3)]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([zz, yy, xx], dim=-1)


def to_sampling_grid(points: torch.Tensor, volume: GridVolume) -> torch.Tensor:
    """(..., 3) mm positions (z, y, x) -> grid_sample coordinates (x, y, z) in [-1, 1] of ``volume``
    (align_corners=True)."""
    origin = torch.as_tensor(volume.origin, dtype=points.dtype)
    span = torch.as_tensor([s * max(n - 1, 1) for s, n in zip(volume.spacing, volume.shape)], dtype=points.dtype)
    normalised = 2.0 * (points - origin) / span - 1.0
    return normalised.flip(-1)


def organ_centroids(labels: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
                    organs: Sequence[int]) -> Dict[int, np.ndarray]:
    """Centroid (mm, (z, y, x)) of each organ value present in ``labels``."""
    out = {}
    for value in organs:
        idx = np.argwhere(labels == value)
        if len(idx):
            out[int(value)] = np.asarray(origin) + idx.mean(0) * np.asarray(spacing)
    return out


def project_affine(matrix: np.ndarray) -> np.ndarray:
    """The nearest rotation times per-axis stretches clamped to :data:`STRETCH_RANGE` (SVD)."""
    u, s, vt = np.linalg.svd(matrix)
    if np.linalg.det(u @ vt) < 0:  # keep a proper rotation (no mirroring)
        u[:, -1] *= -1
        s[-1] *= -1
    s = np.clip(np.abs(s), *STRETCH_RANGE)
    return u @ np.diag(s) @ vt


def fit_centroid_affine(target: Dict[int, np.ndarray], source: Dict[int, np.ndarray]
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """Least-squares affine (A, b) with source ~ A target + b over shared organs, then projected."""
    shared = sorted(set(target) & set(source))
    if len(shared) < 4:
        raise InputError(f"anatomy transfer needs at least 4 organs in both label maps, found {len(shared)}")
    t = np.stack([target[k] for k in shared])
    s = np.stack([source[k] for k in shared])
    design = np.concatenate([t, np.ones((len(t), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, s, rcond=None)
    a = project_affine(solution[:3].T)
    b = (s - t @ a.T).mean(0)
    return a, b


def soft_one_hot(labels: np.ndarray, organs: Sequence[int], smooth: bool = True) -> torch.Tensor:
    """(1, C, Z, Y, X) float one-hot of ``organs``; ``smooth`` averages over 3x3x3 (soft edges)."""
    lab = torch.as_tensor(labels.astype(np.int64))
    channels = torch.stack([(lab == v).float() for v in organs])[None]
    if smooth:
        channels = F.avg_pool3d(channels, 3, stride=1, padding=1, count_include_pad=False)
    return channels


@dataclass
class FitSettings:
    """Registration schedule. Spacings in mm; ``smoothness`` weighs the mean squared gradient of u."""

    levels: Tuple[Tuple[float, float, int], ...] = ((6.0, 12.0, 80), (3.0, 6.0, 50))  # eval mm, control mm, its
    affine_iterations: int = 40
    lr_displacement: float = 0.5  # mm per Adam step
    lr_affine: float = 2e-3
    smoothness: float = 0.5
    fade_start_mm: float = 10.0
    fade_width_mm: float = 40.0


@dataclass
class Transfer:
    """A fitted target -> source map. ``control`` is (1, 3, cz, cy, cx) displacement (mm, (z, y, x))
    on a grid spanning the target's registration field of view ``extent`` ((3, 2) mm)."""

    affine: np.ndarray
    offset: np.ndarray
    control: torch.Tensor
    extent: np.ndarray
    weight: Optional[GridVolume] = None  # displacement fade (1 near organs, 0 far), target space
    dice: Dict[int, float] = field(default_factory=dict)
    dice_affine: Dict[int, float] = field(default_factory=dict)

    def _control_volume(self) -> GridVolume:
        shape = self.control.shape[2:]
        spacing = tuple(float((self.extent[a, 1] - self.extent[a, 0]) / max(shape[a] - 1, 1)) for a in range(3))
        return GridVolume(np.zeros(shape, np.uint8), spacing, tuple(float(v) for v in self.extent[:, 0]))

    def displacement(self, points: torch.Tensor, faded: bool = True) -> torch.Tensor:
        """u(points) (..., 3) mm; outside the control grid the border value; ``faded`` applies the
        organ-distance fade of :class:`FitSettings`."""
        grid = to_sampling_grid(points, self._control_volume())
        shape = points.shape[:-1]
        flat = grid.reshape(1, -1, 1, 1, 3)
        u = F.grid_sample(self.control, flat, mode="bilinear", padding_mode="border", align_corners=True)
        u = u.reshape(3, -1).t().reshape(*shape, 3)
        if faded and self.weight is not None:
            w = F.grid_sample(torch.as_tensor(self.weight.array, dtype=torch.float32)[None, None],
                              to_sampling_grid(points, self.weight).reshape(1, -1, 1, 1, 3),
                              mode="bilinear", padding_mode="zeros", align_corners=True)
            u = u * w.reshape(*shape, 1)
        return u

    def map_points(self, points: torch.Tensor, faded: bool = True) -> torch.Tensor:
        """phi(points): target-space mm (..., 3) -> source-space mm (..., 3)."""
        a = torch.as_tensor(self.affine, dtype=torch.float32)
        b = torch.as_tensor(self.offset, dtype=torch.float32)
        return points @ a.t() + b + self.displacement(points, faded)


def _warp_channels(channels: torch.Tensor, grid_of: GridVolume, points: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor, control: Optional[torch.Tensor], extent: np.ndarray) -> torch.Tensor:
    """Source channels (1, C, ...) sampled at ``A p + b (+ u(p))`` for target points (Z, Y, X, 3) mm."""
    mapped = points @ a.t() + b
    if control is not None:
        mapped = mapped + Transfer(np.eye(3), np.zeros(3), control, extent).displacement(points, faded=False)
    grid = to_sampling_grid(mapped, grid_of)[None]
    return F.grid_sample(channels, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _soft_dice(warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dims = (0, 2, 3, 4)
    inter = (warped * target).sum(dims)
    return 2.0 * inter / (warped.sum(dims) + target.sum(dims) + 1e-5)


def _hard_dice(warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _soft_dice((warped > 0.5).float(), (target > 0.5).float())


def _gradient_penalty(control: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Mean squared finite differences of u (mm) per mm of control spacing (dimensionless)."""
    total = control.new_zeros(())
    for axis, h in zip((2, 3, 4), spacing):
        if control.shape[axis] > 1:
            total = total + (control.diff(dim=axis) / h).pow(2).mean()
    return total


def fade_weight(target_labels: GridVolume, start_mm: float, width_mm: float) -> GridVolume:
    """1 within ``start_mm`` of any organ, linearly down to 0 at ``start_mm + width_mm`` (target grid)."""
    mask = sitk.GetImageFromArray((target_labels.array > 0).astype(np.uint8))
    mask.SetSpacing(tuple(reversed(target_labels.spacing)))
    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False,
                                                               squaredDistance=False, useImageSpacing=True))
    weight = np.clip(1.0 - (dist - start_mm) / width_mm, 0.0, 1.0).astype(np.float32)
    return GridVolume(weight, target_labels.spacing, target_labels.origin)


def fit_transfer(source_labels: GridVolume, target_labels: GridVolume, organs: Sequence[int],
                 settings: Optional[FitSettings] = None) -> Transfer:
    """Fit the target -> source map (affine from centroids, then dense, coarse to fine).

    ``organs``: label values fitted (those present in both maps). Returns a :class:`Transfer` with the
    hard DSC per organ after the affine step and at the end (on the finest registration grid).
    """
    cfg = settings or FitSettings()
    organs = [int(v) for v in organs]
    src_cent = organ_centroids(source_labels.array, source_labels.spacing, source_labels.origin, organs)
    tgt_cent = organ_centroids(target_labels.array, target_labels.spacing, target_labels.origin, organs)
    organs = [v for v in organs if v in src_cent and v in tgt_cent]
    a0, b0 = fit_centroid_affine(tgt_cent, src_cent)
    source_soft = soft_one_hot(source_labels.array, organs)
    extent = target_labels.extent()
    a_param = torch.tensor(a0, dtype=torch.float32, requires_grad=True)
    b_param = torch.tensor(b0, dtype=torch.float32, requires_grad=True)
    control: Optional[torch.Tensor] = None
    dice_affine: Dict[int, float] = {}
    last: Tuple[torch.Tensor, torch.Tensor] = (torch.zeros(0), torch.zeros(0))
    for level, (eval_mm, control_mm, iterations) in enumerate(cfg.levels):
        grid_labels = nearest_on_grid(target_labels, (eval_mm,) * 3)
        target_soft = soft_one_hot(grid_labels.array, organs, smooth=False)
        points = grid_points(grid_labels.shape, grid_labels.spacing, grid_labels.origin)
        n_ctrl = [max(2, int(round((extent[a, 1] - extent[a, 0]) / control_mm)) + 1) for a in range(3)]
        if control is None:
            control = torch.zeros((1, 3, *n_ctrl))
        else:
            control = F.interpolate(control.detach(), size=tuple(n_ctrl), mode="trilinear", align_corners=True)
        control.requires_grad_(True)
        ctrl_spacing = [(extent[a, 1] - extent[a, 0]) / max(n_ctrl[a] - 1, 1) for a in range(3)]

        def warp(use_dense: bool, points=points, control=control) -> torch.Tensor:  # noqa: ANN001
            return _warp_channels(source_soft, source_labels, points, a_param, b_param,
                                  control if use_dense else None, extent)

        if level == 0 and cfg.affine_iterations:
            opt = torch.optim.Adam([{"params": [a_param], "lr": cfg.lr_affine}, {"params": [b_param], "lr": 1.0}])
            for _ in range(cfg.affine_iterations):
                opt.zero_grad()
                loss = 1.0 - _soft_dice(warp(False), target_soft).mean()
                loss.backward()
                opt.step()
            with torch.no_grad():
                a_param.copy_(torch.as_tensor(project_affine(a_param.detach().numpy().astype(np.float64))))
                dice_affine = dict(zip(organs, _hard_dice(warp(False), target_soft).tolist()))
        opt = torch.optim.Adam([control], lr=cfg.lr_displacement)
        for _ in range(iterations):
            opt.zero_grad()
            loss = (1.0 - _soft_dice(warp(True), target_soft).mean()
                    + cfg.smoothness * _gradient_penalty(control, ctrl_spacing))
            loss.backward()
            opt.step()
        last = (warp(True).detach(), target_soft)
    dice = dict(zip(organs, _hard_dice(*last).tolist()))
    result = Transfer(a_param.detach().numpy().astype(np.float64), b_param.detach().numpy().astype(np.float64),
                      control.detach(), extent, dice=dice, dice_affine=dice_affine)
    fine_grid = nearest_on_grid(target_labels, (cfg.levels[-1][0],) * 3)
    result.weight = fade_weight(fine_grid, cfg.fade_start_mm, cfg.fade_width_mm)
    return result


def jacobian_negative_fraction(transfer: Transfer, shape: Sequence[int], spacing: Sequence[float],
                               origin: Sequence[float]) -> float:
    """Fraction of grid voxels where the (faded) map folds (det of its Jacobian <= 0)."""
    with torch.no_grad():
        mapped = transfer.map_points(grid_points(shape, spacing, origin))
        grads = [torch.gradient(mapped[..., c], spacing=list(spacing)) for c in range(3)]
        jac = torch.stack([torch.stack(g, dim=-1) for g in grads], dim=-2)
        det = torch.linalg.det(jac)
    return float((det <= 0).float().mean())


def organ_values_present(*label_volumes: np.ndarray, candidates: Sequence[int] = range(1, 14)) -> List[int]:
    """Label values present in every given array."""
    return [v for v in candidates if all((arr == v).any() for arr in label_volumes)]
