"""Training augmentation "v4" of the paper's reference code (random affine, intensity, noise), in torch.

Input: a raw-HU volume (Z, Y, X) and an integer label map (Z, Y, X) with values 0..13, or ``None``
for an unlabeled case. Output: a z-scored patch (1, pz, py, px) and a soft one-hot label
(C, pz, py, px) whose channels sum to 1 (``None`` for unlabeled cases: their dummy label would be pure
background and no loss reads it). Steps, in order:

 1. +1024 HU (zero padding then means air);  2. centre-pad to round(1.25 x patch);
 3. one-hot label;  4. elastic deformation (p 0.5);  5. random affine: per-axis scaling (p 0.5 each)
    and rotations (p 0.5 each), theta = R(Z) R(Y) R(X) S (the reference's "Rx Ry Rz S", x = depth);
 6. -1024 HU;  7. uniform random crop;
 8. clip to the HU window;  9. z-score with the patch's own mean and std;  10. Gaussian noise
    (std ~ U(0, 0.1)), always;  11. brightness x U(0.75, 1.25) (p 0.5);  12. background +1e-7, renormalise.

Coordinates: ``F.affine_grid`` works in normalised (x, y, z) = (X, Y, Z) order, i.e. row 0 of theta is
the last array axis. The reference applies its "z" scale range U(0.5, 2) on row 0, so it acts on X
(``scale_axis: reference``); ``scale_axis: labelled`` puts it on Z instead.

Random numbers come from one CPU ``torch.Generator`` (its state is checkpointed), so results are the
same on CPU and GPU for a given seed, up to floating point. The affine resampling is evaluated only on
the voxels of the random crop, which gives exactly the crop of the full resampled volume.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..engine.preprocess import clip_and_zscore
from .recipe import AugmentConfig


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=gen).item())


def _chance(gen: torch.Generator, p: float) -> bool:
    return bool(torch.rand((), generator=gen).item() < p)


def centre_pad(volume: torch.Tensor, min_shape: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad the last three axes of ``volume`` (..., Z, Y, X) symmetrically to at least ``min_shape``."""
    pads = []
    for n, m in zip(volume.shape[-3:], min_shape):
        extra = max(0, int(m) - int(n))
        pads.append((extra // 2, extra - extra // 2))
    if not any(p != (0, 0) for p in pads):
        return volume
    flat = [v for p in reversed(pads) for v in p]
    return F.pad(volume, flat, mode="constant", value=value)


def gaussian_kernel1d(sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """Normalised Gaussian of size 2*int(4 sigma + 0.5) + 1."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth3d(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, C, D, H, W) per channel, zero padding, same size."""
    k = gaussian_kernel1d(sigma, field.device)
    r = (k.numel() - 1) // 2
    c = field.shape[1]
    out = field
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = k.numel()
        weight = k.view(1, 1, *shape).repeat(c, 1, 1, 1, 1)
        padding = [0, 0, 0]
        padding[axis] = r
        out = F.conv3d(out, weight, padding=tuple(padding), groups=c)
    return out


def identity_grid(shape: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """(1, D, H, W, 3) normalised identity sampling grid (align_corners=True)."""
    theta = torch.eye(3, 4, device=device)[None]
    return F.affine_grid(theta, [1, 1, *[int(s) for s in shape]], align_corners=True)


def elastic_grid(shape: Sequence[int], displacement: torch.Tensor, sigma: float) -> torch.Tensor:
    """Sampling grid (1, D, H, W, 3) of the elastic deformation.

    ``displacement`` (1, 3, g, g, g) in [-1, 1] is smoothed with a Gaussian of ``sigma`` (grid units),
    upsampled trilinearly to ``shape``, multiplied by ``sigma`` and added to the identity grid; each
    coordinate component is then min-max rescaled to [-1, 1].
    """
    smooth = gaussian_smooth3d(displacement, sigma)
    up = F.interpolate(smooth, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)
    grid = identity_grid(shape, displacement.device) + sigma * up.permute(0, 2, 3, 4, 1)
    flat = grid.reshape(-1, 3)
    lo, hi = flat.min(0).values, flat.max(0).values
    return (grid - lo) / (hi - lo).clamp_min(1e-12) * 2.0 - 1.0


def rotation_matrix(axis: int, degrees: float) -> torch.Tensor:
    """3x3 rotation about affine_grid coordinate ``axis`` (0 = x = X, 1 = y = Y, 2 = z = Z)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    if axis == 0:
        m = [[1, 0, 0], [0, c, -s], [0, s, c]]
    elif axis == 1:
        m = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    else:
        m = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    return torch.tensor(m, dtype=torch.float32)


def compose_theta(angles_xyz: Sequence[float], scale_xyz: Sequence[float]) -> torch.Tensor:
    """3x3 affine_grid matrix R(about Z) R(about Y) R(about X) S, the reference's composition.

    ``angles_xyz`` / ``scale_xyz`` are indexed by affine_grid coordinate (0 = X, 1 = Y, 2 = Z). The
    reference names its axes x = depth (Z), y = height (Y), z = width (X) and applies Rx Ry Rz S, i.e.
    the rotation about the depth axis is outermost and the one about the width axis acts first.
    """
    rotation = (rotation_matrix(2, angles_xyz[2]) @ rotation_matrix(1, angles_xyz[1])
                @ rotation_matrix(0, angles_xyz[0]))
    return rotation @ torch.diag(torch.tensor([float(v) for v in scale_xyz], dtype=torch.float32))


class AugmentV4:
    """Callable augmenter; ``generator`` holds the random state (CPU ``torch.Generator``)."""

    def __init__(self, cfg: AugmentConfig, patch_size: Sequence[int], hu_window: Tuple[float, float],
                 num_classes: int = 14, zscore_eps: float = 1e-5,
                 generator: Optional[torch.Generator] = None) -> None:
        self.cfg = cfg
        self.patch = tuple(int(s) for s in patch_size)
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.num_classes = int(num_classes)
        self.zscore_eps = float(zscore_eps)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.last_params: dict = {}

    # ------------------------------------------------------------------ random parameters
    def _draw_theta(self) -> Tuple[torch.Tensor, list, list]:
        cfg, gen = self.cfg, self.generator
        labelled = []  # factors named z, y, x by the reference code
        for rng in (cfg.scale_major, cfg.scale_minor, cfg.scale_minor):
            labelled.append(_uniform(gen, *rng) if _chance(gen, cfg.scale_p) else 1.0)
        if cfg.scale_axis == "reference":  # as executed: theta rows (x, y, z) = factors (z, y, x)
            diag = [labelled[0], labelled[1], labelled[2]]
        else:  # as labelled: the "z" factor acts on Z (theta row 2)
            diag = [labelled[2], labelled[1], labelled[0]]
        angles = []
        for _ in range(3):
            turn = _chance(gen, cfg.rotate_p)
            angles.append(_uniform(gen, -cfg.rotate_deg, cfg.rotate_deg) if turn else 0.0)
        return compose_theta(angles, diag), diag, angles

    # ------------------------------------------------------------------ the pipeline
    def __call__(self, image: torch.Tensor, label: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``image`` (Z, Y, X) HU, ``label`` (Z, Y, X) int or None -> (1, pz, py, px), (C, pz, py, px)."""
        if self.cfg.name == "none":
            return self._plain(image, label)
        cfg, gen, dev = self.cfg, self.generator, image.device
        # 1-3: shift, pad, one-hot (channel 0 image, channels 1.. label)
        x = image.float()[None] + cfg.hu_shift
        target = [max(int(round(cfg.pad_factor * p)), p) for p in self.patch]
        x = centre_pad(x, target, 0.0)
        parts = [x]
        if label is not None:
            y = centre_pad(label.long()[None], target, 0)[0]
            parts.append(F.one_hot(y, self.num_classes).permute(3, 0, 1, 2).float())
        vol = torch.cat(parts)[None]  # (1, 1 [+ C], D, H, W)
        shape = vol.shape[2:]
        params: dict = {"padded_shape": tuple(int(s) for s in shape)}
        # 4: elastic
        if _chance(gen, cfg.elastic_p):
            g = cfg.elastic_grid
            disp = torch.rand((1, 3, g, g, g), generator=gen) * 2.0 - 1.0
            sigma = _uniform(gen, *cfg.elastic_sigma)
            grid = elastic_grid(shape, disp.to(dev), sigma)
            vol = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            params["elastic_sigma"] = sigma
        # 5: affine (draws) ; 7: crop start (draw) ; the resampling is done on the crop only
        theta, diag, angles = self._draw_theta()
        starts = [int(torch.randint(0, int(n) - p + 1, (), generator=gen).item())
                  for n, p in zip(shape, self.patch)]
        crop = tuple(slice(s, s + p) for s, p in zip(starts, self.patch))
        params.update(scale_xyz=diag, angles_xyz=angles, crop_start=starts)
        if torch.equal(theta, torch.eye(3)):
            vol = vol[(slice(None), slice(None)) + crop]
        else:
            full = torch.cat([theta, torch.zeros(3, 1)], dim=1)[None].to(dev)
            grid = F.affine_grid(full, [1, 1, *shape], align_corners=True)[(slice(None),) + crop]
            vol = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        vol = vol[0]
        # 6, 8, 9: shift back, clip, z-score on the patch
        x = clip_and_zscore(vol[:1] - cfg.hu_shift, *self.hu_window, eps=self.zscore_eps)
        # 10: noise, always
        std = _uniform(gen, 0.0, cfg.noise_std_max)
        x = x + torch.randn(x.shape, generator=gen).to(dev) * std
        # 11: brightness
        if _chance(gen, cfg.brightness_p):
            factor = _uniform(gen, *cfg.brightness)
            x = x * factor
            params["brightness"] = factor
        params["noise_std"] = std
        self.last_params = params
        if label is None:
            return x, None
        return x, normalise_background(vol[1:], cfg.background_eps)

    def _plain(self, image: torch.Tensor, label: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """No augmentation: centre-pad to the patch if needed, random crop, clip, z-score, one-hot."""
        x = centre_pad(image.float()[None], self.patch, -self.cfg.hu_shift)
        shape = x.shape[1:]
        starts = [int(torch.randint(0, int(n) - p + 1, (), generator=self.generator).item())
                  for n, p in zip(shape, self.patch)]
        crop = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(starts, self.patch))
        x = clip_and_zscore(x[crop], *self.hu_window, eps=self.zscore_eps)
        self.last_params = {"crop_start": starts}
        if label is None:
            return x, None
        y = centre_pad(label.long()[None], self.patch, 0)[crop][0]
        return x, F.one_hot(y, self.num_classes).permute(3, 0, 1, 2).float()


def normalise_background(soft: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Add ``eps`` to channel 0 (background) and renormalise (C, ...) so channels sum to 1."""
    soft = soft.clone()
    soft[0] += eps
    return soft / soft.sum(0, keepdim=True)
