"""Gaussian-weighted sliding-window inference of one network on a volume (numpy; any runtime).

A *network* here is any callable mapping a z-scored (1, 1, Z, Y, X) float32 window to softmax
probabilities (1, C, Z, Y, X) float32: an ONNX Runtime or OpenVINO graph, or a PyTorch module
wrapped by :func:`runtimes.torch_backend.make_runner`. The predictor's stages and training's
predictions of unlabeled cases both call :func:`sliding_window_probabilities`.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Optional, Sequence

import numpy as np

from .preprocess import PAD_HU, clip_and_zscore, pad_to_min_size

#: ``network(window)``: (1, 1, Z, Y, X) float32 z-scored CT -> (1, C, Z, Y, X) float32 probabilities.
Network = Callable[[np.ndarray], np.ndarray]


def gaussian_importance(window: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """nnU-Net's window weighting: a Gaussian centred on the window, sigma = size * sigma_scale.

    Returns float32 (Z, Y, X) with maximum 1; zeros (if any) replaced by the smallest
    positive weight so every voxel keeps some weight.
    """
    return _importance(tuple(int(n) for n in window), float(sigma_scale)).copy()


@lru_cache(maxsize=8)
def _importance(window: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    axes = []
    for n in window:
        centre, sigma = n // 2, n * sigma_scale
        i = np.arange(n, dtype=np.float64)
        axes.append(np.exp(-((i - centre) ** 2) / (2 * sigma**2)))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = (weights / weights.max()).astype(np.float32)
    if (weights == 0).any():
        weights[weights == 0] = weights[weights > 0].min()
    return weights


def window_starts(size: int, window: int, overlap: float = 0.5) -> list[int]:
    """Start indices of sliding windows covering ``size`` with at least ``overlap`` (nnU-Net rule).

    ``size >= window`` is required (pad first). The starts are spread evenly from 0 to
    ``size - window``; with size 96, window 64 and overlap 0.5 this gives [0, 32].
    """
    if size < window:
        raise ValueError(f"axis of size {size} is smaller than the window {window}")
    step = window * (1 - overlap)
    n = int(math.ceil((size - window) / step)) + 1
    if n == 1:
        return [0]
    span = size - window
    return [int(round(i * span / (n - 1))) for i in range(n)]


def sliding_window_probabilities(
    network: Network,
    volume: np.ndarray,
    window_zyx: Sequence[int],
    overlap: float,
    hu_window: Sequence[float],
    progress: Optional[Callable[[float], None]] = None,
) -> np.ndarray:
    """Probabilities (C, Z, Y, X) float32 of ``network`` on ``volume`` (Z, Y, X, HU), by windows.

    The volume is padded with air to at least one window of ``window_zyx``; windows overlap by
    ``overlap`` (fraction); each window is clipped to ``hu_window`` (low, high HU) and z-scored on
    its own; window softmaxes are blended with the Gaussian weights and renormalised across
    channels. ``progress(fraction)`` is called after each window. The array ``network`` returns is
    weighted in place (the runners return a fresh one per call); with a single window it becomes
    the result, so no volume-sized buffers are allocated.
    """
    window = tuple(int(n) for n in window_zyx)
    padded, region = pad_to_min_size(np.asarray(volume), window, PAD_HU)
    starts = [window_starts(n, w, overlap) for n, w in zip(padded.shape, window)]
    positions = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    weight = _importance(window, 1.0 / 8)
    single = len(positions) == 1  # the window is the volume: no accumulation buffers
    total: np.ndarray | None = None
    norm = weight if single else np.zeros(padded.shape, dtype=np.float32)
    for i, (z, y, x) in enumerate(positions):
        sl = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
        patch = clip_and_zscore(padded[sl], float(hu_window[0]), float(hu_window[1]))
        probs = np.asarray(network(np.ascontiguousarray(patch[None, None]))[0], dtype=np.float32)
        if not probs.flags.writeable:
            probs = probs.copy()
        np.multiply(probs, weight, out=probs)  # in place: no window-sized temporary
        if single:
            total = probs
        else:
            if total is None:
                total = np.zeros((probs.shape[0],) + tuple(padded.shape), dtype=np.float32)
            total[(slice(None),) + sl] += probs
            norm[sl] += weight
        if progress is not None:
            progress((i + 1) / len(positions))
    assert total is not None
    total /= norm
    total /= total.sum(axis=0, keepdims=True)
    return total[(slice(None),) + region]
