"""Intensity windowing and trilinear resizing with bounded memory.

Resizing is trilinear with ``align_corners=True``, the reference code's ``F.interpolate``
setting. It is separable, so it is computed slab by slab along the output Z axis: for each slab
only the two source slices around each output slice are converted to float32 and resized
in-plane (bilinear), then blended along Z. Peak extra memory is one slab, whatever the volume
size, and the result equals a single whole-volume ``F.interpolate`` up to float rounding.
"""

from __future__ import annotations

from typing import Iterator, Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]

#: HU window of the paper (width 600, level 0).
HU_MIN, HU_MAX = -300.0, 300.0
#: Value that padding represents (air).
PAD_HU = -1024.0


def clip_and_zscore(
    window: torch.Tensor, lo: float = HU_MIN, hi: float = HU_MAX, eps: float = 1e-5
) -> torch.Tensor:
    """Clip HU to [lo, hi], then z-score with the window's own mean and standard deviation."""
    x = window.float().clamp(lo, hi)
    return (x - x.mean()) / (x.std(unbiased=False) + eps)


def _source_positions(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower index, upper index and upper weight of each output sample (align_corners=True)."""
    if n_out == 1 or n_in == 1:
        pos = np.zeros(n_out)
    else:
        pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def iter_resized_slabs(
    array: ArrayLike,
    out_shape: tuple[int, int, int],
    slab: int = 8,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(z0, z1, block)`` covering the trilinear resize of ``array`` to ``out_shape``.

    ``array`` is (Z, Y, X) or (C, Z, Y, X), numpy or torch, any dtype. ``block`` is a float32
    tensor (C, z1 - z0, Yo, Xo) (C = 1 for 3D input) on ``device`` (default: the array's device,
    CPU for numpy).
    """
    channels_first = array.ndim == 4
    if array.ndim not in (3, 4):
        raise ValueError(f"expected a (Z, Y, X) or (C, Z, Y, X) array, got shape {tuple(array.shape)}")
    zi = array.shape[-3]
    zo, yo, xo = (int(s) for s in out_shape)
    if min(zo, yo, xo) < 1:
        raise ValueError(f"invalid output shape {out_shape}")
    if device is None:
        device = array.device if isinstance(array, torch.Tensor) else "cpu"
    lo, hi, w = _source_positions(zi, zo)
    for z0 in range(0, zo, slab):
        z1 = min(zo, z0 + slab)
        s0, s1 = int(lo[z0]), int(hi[z1 - 1]) + 1
        src = array[:, s0:s1] if channels_first else array[None, s0:s1]
        if isinstance(src, np.ndarray):
            src = torch.from_numpy(np.array(src, dtype=np.float32))  # a slab-sized copy
        src = src.to(device=device, dtype=torch.float32)  # (C, n, Y, X)
        planes = F.interpolate(src.transpose(0, 1), size=(yo, xo), mode="bilinear", align_corners=True)
        planes = planes.transpose(0, 1)  # (C, n, Yo, Xo)
        idx_lo = torch.as_tensor(lo[z0:z1] - s0, device=device)
        idx_hi = torch.as_tensor(hi[z0:z1] - s0, device=device)
        wz = torch.as_tensor(w[z0:z1], device=device).view(1, -1, 1, 1)
        yield z0, z1, planes[:, idx_lo] * (1 - wz) + planes[:, idx_hi] * wz


def resize_volume(
    array: ArrayLike, out_shape: tuple[int, int, int], slab: int = 8, device: torch.device | str | None = None
) -> torch.Tensor:
    """Trilinear (align_corners=True) resize of (Z, Y, X) or (C, Z, Y, X) to ``out_shape``.

    Returns float32 (Zo, Yo, Xo) or (C, Zo, Yo, Xo), matching the input's rank.
    """
    blocks = [b for _, _, b in iter_resized_slabs(array, out_shape, slab, device)]
    out = torch.cat(blocks, dim=1)
    return out if array.ndim == 4 else out[0]


def resize_argmax(
    probabilities: ArrayLike, out_shape: tuple[int, int, int], slab: int = 8
) -> np.ndarray:
    """Resize class probabilities (C, Z, Y, X) trilinearly to ``out_shape`` and take the argmax.

    Computed slab by slab, so the full-size C-channel float map never exists. Returns uint8
    labels (Zo, Yo, Xo) on the CPU.
    """
    if probabilities.ndim != 4:
        raise ValueError(f"expected (C, Z, Y, X) probabilities, got shape {tuple(probabilities.shape)}")
    out = np.empty(tuple(int(s) for s in out_shape), dtype=np.uint8)
    for z0, z1, block in iter_resized_slabs(probabilities, out_shape, slab):
        out[z0:z1] = block.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return out


def pad_to_min_size(volume: torch.Tensor, min_shape: tuple[int, int, int], value: float = PAD_HU) -> tuple[
    torch.Tensor, tuple[slice, slice, slice]
]:
    """Pad (Z, Y, X) symmetrically with ``value`` to at least ``min_shape``.

    Returns the padded volume and the slices that recover the original region from it.
    """
    pads, region = [], []
    for n, m in zip(volume.shape, min_shape):
        extra = max(0, m - n)
        before = extra // 2
        pads.append((before, extra - before))
        region.append(slice(before, before + n))
    if any(p != (0, 0) for p in pads):
        flat = [v for p in reversed(pads) for v in p]  # F.pad wants last axis first
        volume = F.pad(volume[None, None], flat, mode="constant", value=value)[0, 0]
    return volume, tuple(region)  # type: ignore[return-value]
