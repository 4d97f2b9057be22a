"""Intensity windowing and trilinear resizing with bounded memory.

Resizing is trilinear with ``align_corners=True``, the reference code's ``F.interpolate``
setting. It is separable, so it is computed slab by slab along the output Z axis: for each slab
only the two source slices around each output slice are converted to float32 and resized
in-plane (bilinear), then blended along Z. Peak extra memory is one slab, whatever the volume
size, and the result equals a single whole-volume ``F.interpolate`` up to float rounding.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
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
    probabilities: ArrayLike, out_shape: tuple[int, int, int], slab: int = 16, chunk: int = 1 << 19,
    threads: int | None = None,
) -> np.ndarray:
    """Argmax of the trilinear (align_corners=True) resize of probabilities (C, Z, Y, X) to ``out_shape``.

    Exact shortcut: an output voxel lies in a cell of 2x2x2 source voxels, and its interpolated
    probability vector is a convex combination of theirs; if all of them share the same argmax,
    so does the combination. Only voxels in cells whose corners disagree (near organ borders) are
    interpolated, in chunks of ``chunk`` voxels, so the full-size C-channel map never exists and
    the cost scales with the border area. Slabs of ``slab`` output slices are processed by
    ``threads`` threads (default ``torch.get_num_threads()``). Returns uint8 labels (Zo, Yo, Xo)
    on the CPU.
    """
    if probabilities.ndim != 4:
        raise ValueError(f"expected (C, Z, Y, X) probabilities, got shape {tuple(probabilities.shape)}")
    probs = probabilities if isinstance(probabilities, torch.Tensor) else torch.from_numpy(probabilities)
    probs = probs.detach().to("cpu", torch.float32).contiguous()
    n_classes, zs, ys, xs = probs.shape
    labels = probs.argmax(dim=0).to(torch.uint8)
    uniform = _uniform_cells(labels)
    axes = [_source_positions(n_in, int(n_out)) for n_in, n_out in zip((zs, ys, xs), out_shape)]
    (lz, hz, wz), (ly, hy, wy), (lx, hx, wx) = [
        (torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(w)) for lo, hi, w in axes
    ]
    flat = probs.view(n_classes, -1).numpy()
    lz, ly, lx, hz, hy, hx = (t.numpy() for t in (lz, ly, lx, hz, hy, hx))
    # flat source index of each output voxel's lower corner, split per axis, and the step to the
    # upper corner along each axis (0 where the upper corner is clipped to the edge)
    base = (lz * (ys * xs), ly * xs, lx)
    step = ((hz - lz) * (ys * xs), (hy - ly) * xs, hx - lx)
    weight = (wz.numpy(), wy.numpy(), wx.numpy())
    labels_np, uniform_np = labels.numpy(), uniform.numpy()
    out = np.empty(tuple(int(s) for s in out_shape), dtype=np.uint8)

    def fill_slab(z0: int) -> None:
        z = slice(z0, min(out.shape[0], z0 + slab))
        grid = np.ix_(lz[z], ly, lx)
        block = labels_np[grid]
        voxels = np.nonzero(~uniform_np[grid])
        for c0 in range(0, voxels[0].size, chunk):
            iz, iy, ix = (v[c0:c0 + chunk] for v in voxels)
            block[iz, iy, ix] = _interpolated_argmax(flat, (iz + z0, iy, ix), base, step, weight)
        out[z] = block

    starts = range(0, out.shape[0], slab)
    workers = max(1, min(torch.get_num_threads() if threads is None else threads, len(starts)))
    if workers == 1:
        for z0 in starts:
            fill_slab(z0)
    else:  # numpy releases the GIL in these gathers and reductions; slabs are independent
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fill_slab, starts))
    return out


def _interpolated_argmax(
    flat: np.ndarray,
    voxels: tuple[np.ndarray, np.ndarray, np.ndarray],
    base: tuple[np.ndarray, ...],
    step: tuple[np.ndarray, ...],
    weight: tuple[np.ndarray, ...],
) -> np.ndarray:
    """Argmax (uint8) of the trilinear blend of the 8 corner probability vectors of output voxels.

    ``flat`` is (C, Z*Y*X) float32; ``voxels`` are output coordinates; ``base``/``step``/``weight``
    are per-axis lookups of the lower corner's flat offset, the offset to the upper corner and the
    upper corner's weight.
    """
    idx = base[0].take(voxels[0]) + base[1].take(voxels[1]) + base[2].take(voxels[2])
    steps = [s.take(v) for s, v in zip(step, voxels)]
    upper = [w.take(v) for w, v in zip(weight, voxels)]
    acc = np.zeros((flat.shape[0], idx.size), dtype=np.float32)
    for dz in (0, 1):
        wz = upper[0] if dz else 1 - upper[0]
        iz = idx + steps[0] if dz else idx
        for dy in (0, 1):
            wzy = wz * (upper[1] if dy else 1 - upper[1])
            izy = iz + steps[1] if dy else iz
            for dx in (0, 1):
                w = wzy * (upper[2] if dx else 1 - upper[2])
                acc += flat.take(izy + steps[2] if dx else izy, axis=1) * w
    return acc.argmax(axis=0).astype(np.uint8)


def _uniform_cells(labels: torch.Tensor) -> torch.Tensor:
    """(Z, Y, X) bool: True where the 2x2x2 cell starting at the voxel (clipped at the far edges)
    holds a single label."""
    padded = torch.cat([labels, labels[-1:]], 0)
    padded = torch.cat([padded, padded[:, -1:]], 1)
    padded = torch.cat([padded, padded[:, :, -1:]], 2)
    z, y, x = labels.shape
    lo = hi = labels
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                corner = padded[dz:dz + z, dy:dy + y, dx:dx + x]
                lo, hi = torch.minimum(lo, corner), torch.maximum(hi, corner)
    return lo == hi


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
