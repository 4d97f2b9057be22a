"""PyTorch runner of one network: the reference, the CUDA path and training's predictions.

:func:`make_runner` turns a PyTorch module into the numpy network callable that
:func:`engine.sliding_window.sliding_window_probabilities` takes. Importing this module imports
PyTorch; the CPU runtimes (:mod:`.onnx_backend`, :mod:`.openvino_backend`) do not need it.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch

from ..threads import sync_torch

Runner = Callable[[np.ndarray], np.ndarray]


def make_runner(net: torch.nn.Module, device: torch.device | str = "cpu", channels_last: bool = True) -> Runner:
    """``run(batch)``: softmax probabilities (1, C, Z, Y, X) float32 numpy of ``net`` on a (1, 1, Z, Y, X)
    float32 numpy batch, computed on ``device`` in ``torch.inference_mode``.

    ``net`` is used as it is when it already lives on ``device``; otherwise a copy is moved there, so
    the caller's module never changes device. On CUDA the forward pass runs under float16 autocast;
    on the CPU ``channels_last`` uses the channels-last-3d memory format (faster convolutions).
    """
    device = torch.device(device)
    sync_torch()
    first = next(iter(net.parameters()), None)
    if first is not None and first.device != device:
        net = copy.deepcopy(net).to(device)
    net.eval()

    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
        if channels_last and device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                logits = net(x)
        else:
            logits = net(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    return run


def is_cuda_out_of_memory(exc: BaseException) -> bool:
    """True for PyTorch's CUDA out-of-memory error."""
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def cuda_available() -> bool:
    """``torch.cuda.is_available()``."""
    return bool(torch.cuda.is_available())


def empty_cuda_cache() -> None:
    """Give PyTorch's cached CUDA memory back."""
    torch.cuda.empty_cache()
