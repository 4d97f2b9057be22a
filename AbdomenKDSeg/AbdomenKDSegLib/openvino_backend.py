"""OpenVINO CPU backend for the student networks (optional, needs ``openvino``).

The same exported ONNX graph as :mod:`onnx_backend` (same cache file, keyed by the bundle's
SHA-256, stage and window) is compiled by OpenVINO's CPU plugin in float32. Its oneDNN kernels
handle the student's depthwise 3D convolutions far better than ONNX Runtime's grouped
convolution: one 96x64x96 window takes ~0.6-0.9 s instead of ~1.4-2.5 s on 2 cores
(``benchmarks/README.md``); logits agree with PyTorch within ~1e-3 (a different summation order).

Compiled models are cached by OpenVINO itself in ``<onnx cache>/openvino`` (halves the compile
time of later runs) when that folder is writable; without it everything works, a little slower.

Input of a runner: a (1, 1, Z, Y, X) float32 tensor of exactly the window shape (z-scored CT).
Output: softmax probabilities (1, C, Z, Y, X), float32, on the CPU.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import onnx_backend

Runner = onnx_backend.Runner

_CORE_LOCK = threading.Lock()
_core = None


def available() -> bool:
    """True when ``openvino`` can be imported (the backend can run)."""
    try:
        import openvino  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def core():  # noqa: ANN201 (openvino.Core)
    """The process-wide ``openvino.Core`` (created on first use)."""
    global _core
    with _CORE_LOCK:
        if _core is None:
            import openvino as ov

            _core = ov.Core()
        return _core


def compiled_cache_dir() -> Optional[Path]:
    """Folder for OpenVINO's compiled-model cache (``<onnx cache>/openvino``), None if not writable."""
    folder = onnx_backend.cache_dir() / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def compile_graph(model: bytes, threads: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
    """Compile an ONNX graph for the CPU; returns ``infer(x) -> logits`` for one float32 batch.

    ``threads`` inference threads (default ``torch.get_num_threads()``), latency mode (one
    stream), float32 precision (no bf16/fp16 down-conversion on CPUs that support it). The
    intermediate buffers are released after every call, so an idle compiled model holds only its
    weights and the coarse and fine models never hold their working memory at the same time.
    """
    ov_core = core()
    config: dict[str, object] = {"INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
                                 "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    cache = compiled_cache_dir()
    if cache is not None:
        config["CACHE_DIR"] = str(cache)
    compiled = ov_core.compile_model(ov_core.read_model(io.BytesIO(model)), "CPU", config)
    request = compiled.create_infer_request()
    lock = threading.Lock()

    release = getattr(compiled, "release_memory", None)  # OpenVINO >= 2024.3

    def infer(x: np.ndarray) -> np.ndarray:
        with lock:  # one request object: calls are serialised
            logits = request.infer({0: x})[0].copy()
            if release is not None:
                release()  # intermediate buffers (~0.4 GB per window) go back; no measurable slow-down
            return logits

    return infer


def make_runner(net: torch.nn.Module, window_zyx: Sequence[int], sha256: Optional[str], stage: str,
                threads: Optional[int] = None) -> Runner:
    """A callable mapping a (1, 1, *window_zyx) float32 batch to softmax probabilities (1, C, Z, Y, X).

    The graph is exported (or read from the shared ONNX cache) and compiled on the first call. If
    export or OpenVINO fails on this network, a RuntimeWarning says so and the runner computes the
    same probabilities with PyTorch instead.
    Raises ImportError when openvino is missing, ValueError for a batch of another shape.
    """
    if not available():
        raise ImportError("the OpenVINO backend needs openvino: pip install openvino "
                          "(or use backend='onnx' or 'torch')")

    def create() -> Callable[[np.ndarray], np.ndarray]:
        return onnx_backend.cached_graph(net, window_zyx, sha256, stage,
                                         lambda model: compile_graph(model, threads))

    return onnx_backend.graph_runner(net, window_zyx, stage, "OpenVINO", create)
