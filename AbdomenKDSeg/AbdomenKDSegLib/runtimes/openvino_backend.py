"""OpenVINO CPU backend for the student networks (optional, needs ``openvino``).

The same exported ONNX graph as :mod:`onnx_backend` (same cache file, keyed by the bundle's
SHA-256, stage and window), with a softmax over the class axis appended, is compiled by
OpenVINO's CPU plugin in float32 and writes its probabilities straight into a fresh numpy array
(no copy, no separate softmax pass). Its oneDNN kernels
handle the student's depthwise 3D convolutions far better than ONNX Runtime's grouped
convolution: one 96x64x96 window takes ~0.6-0.9 s instead of ~1.4-2.5 s on 2 cores
(``benchmarks/README.md``); logits agree with PyTorch within ~1e-3 (a different summation order).

Compiled models are cached by OpenVINO itself in ``<onnx cache>/openvino/<graph name>/`` (halves
the compile time of later runs) when that folder is writable; without it everything works, a little
slower. One folder per cached graph, so the size cap of :mod:`.graph_cache` deletes a graph's
compiled blobs with it; a graph without a bundle checksum (not cached) is compiled without a cache.

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

from . import graph_cache, onnx_backend

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


def compiled_cache_dir(graph_name: Optional[str] = None) -> Optional[Path]:
    """Folder for OpenVINO's compiled-model cache of the cached graph ``graph_name``
    (``<onnx cache>/openvino/<graph name without .onnx>``; without a name ``<onnx cache>/openvino``),
    created if needed; None if not writable."""
    root = onnx_backend.cache_dir()
    folder = graph_cache.compiled_dir(graph_name, root) if graph_name else root / graph_cache.OPENVINO_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def _opset():  # noqa: ANN202 (an OpenVINO opset module)
    try:
        import openvino.opset13 as ops
    except ImportError:  # OpenVINO 2024.x
        import openvino.runtime.opset13 as ops
    return ops


def with_softmax(model):  # noqa: ANN001, ANN201 (openvino.Model)
    """``model`` (one output, logits (1, C, Z, Y, X)) with a softmax over C appended."""
    import openvino as ov

    ops = _opset()
    steps = ov.preprocess.PrePostProcessor(model)
    steps.output(0).postprocess().custom(lambda logits: ops.softmax(logits, 1).output(0))
    return steps.build()


def compile_graph(model: bytes, threads: Optional[int] = None,
                  graph_name: Optional[str] = None) -> Callable[[np.ndarray], np.ndarray]:
    """Compile an ONNX graph of logits for the CPU; returns ``infer(x) -> probabilities``
    (softmax over axis 1) for one float32 batch. ``graph_name``: the graph's file name in the
    cache (:func:`onnx_backend.cache_name`); OpenVINO then keeps the compiled model in that
    graph's folder (:func:`compiled_cache_dir`) and the cache is pruned to its cap afterwards;
    None: no compiled-model cache.

    ``threads`` inference threads (default ``torch.get_num_threads()``), latency mode (one
    stream), float32 precision (no bf16/fp16 down-conversion on CPUs that support it). The
    intermediate buffers are released after every call, so an idle compiled model holds only its
    weights and the coarse and fine models never hold their working memory at the same time.
    """
    ov_core = core()
    config: dict[str, object] = {"INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
                                 "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    cache = compiled_cache_dir(graph_name) if graph_name else None
    if cache is not None:
        config["CACHE_DIR"] = str(cache)
    import openvino as ov

    compiled = ov_core.compile_model(with_softmax(ov_core.read_model(io.BytesIO(model))), "CPU", config)
    if cache is not None:
        graph_cache.prune(keep=[graph_name])  # the new blob counts towards the cap
    request = compiled.create_infer_request()
    out_shape = tuple(compiled.output(0).get_shape())
    lock = threading.Lock()

    release = getattr(compiled, "release_memory", None)  # OpenVINO >= 2024.3

    def infer(x: np.ndarray) -> np.ndarray:
        probabilities = np.empty(out_shape, np.float32)
        with lock:  # one request object: calls are serialised
            request.set_output_tensor(0, ov.Tensor(probabilities, shared_memory=True))
            request.infer({0: x})
            if release is not None:
                release()  # intermediate buffers (~0.4 GB per window) go back; no measurable slow-down
        return probabilities

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

    graph_name = onnx_backend.cache_name(sha256, stage, window_zyx) if sha256 else None

    def create() -> Callable[[np.ndarray], np.ndarray]:
        return onnx_backend.cached_graph(net, window_zyx, sha256, stage,
                                         lambda model: compile_graph(model, threads, graph_name),
                                         engine="OpenVINO")

    return onnx_backend.graph_runner(net, window_zyx, stage, "OpenVINO", create, softmax=False)
