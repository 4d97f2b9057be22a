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

The graph comes from the bundle when it stores one (no PyTorch; its compiled model is exported to
the cache once and imported by later runs, :func:`compile_stored_graph`), else from
:mod:`onnx_backend`'s export.

Input of a runner: a (1, 1, Z, Y, X) float32 numpy array (or CPU torch tensor) of exactly the
window shape (z-scored CT). Output: softmax probabilities (1, C, Z, Y, X), float32, of the same kind.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from ..atomic_files import atomic_write_bytes
from ..threads import get_threads
from . import graph_cache, onnx_backend

if TYPE_CHECKING:
    import torch

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


def _config(threads: Optional[int]) -> dict[str, object]:
    return {"INFERENCE_NUM_THREADS": int(threads or get_threads()), "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32"}


def compile_graph(model: bytes, threads: Optional[int] = None,
                  graph_name: Optional[str] = None) -> Callable[[np.ndarray], np.ndarray]:
    """Compile an ONNX graph of logits for the CPU; returns ``infer(x) -> probabilities``
    (softmax over axis 1) for one float32 batch. ``graph_name``: the graph's file name in the
    cache (:func:`onnx_backend.cache_name`); OpenVINO then keeps the compiled model in that
    graph's folder (:func:`compiled_cache_dir`) and the cache is pruned to its cap afterwards;
    None: no compiled-model cache.

    ``threads`` inference threads (default :func:`threads.get_threads`), latency mode (one
    stream), float32 precision (no bf16/fp16 down-conversion on CPUs that support it). The
    intermediate buffers are released after every call, so an idle compiled model holds only its
    weights and the coarse and fine models never hold their working memory at the same time.
    """
    ov_core = core()
    config = _config(threads)
    cache = compiled_cache_dir(graph_name) if graph_name else None
    if cache is not None:
        config["CACHE_DIR"] = str(cache)
    compiled = ov_core.compile_model(with_softmax(ov_core.read_model(io.BytesIO(model))), "CPU", config)
    if cache is not None:
        graph_cache.prune(keep=[graph_name])  # the new blob counts towards the cap
    return _infer_function(compiled)


def stored_graph_name(sha256: str, stage: str, window_zyx: Sequence[int]) -> str:
    """Cache name of the compiled model of a bundle's stored graph (:data:`graph_cache.STORED_RE`)."""
    import openvino as ov

    version = "".join(c if c.isalnum() or c == "." else "_" for c in ov.get_version())
    return f"{sha256[:32]}-{stage}-{'x'.join(str(int(n)) for n in window_zyx)}-stored-ov{version}"


def compile_stored_graph(graph: Callable[[], bytes], name: Optional[str],
                         threads: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
    """``infer`` of a bundle's stored graph (``graph()`` gives the complete ONNX model).

    With a cache ``name`` (:func:`stored_graph_name`) the compiled model is exported to
    ``<cache>/openvino/<name>/model.blob`` once and imported by later runs (~0.2 s instead of
    ~0.8 s to complete, read and compile a stage's graph); a blob that cannot be imported (another
    CPU, a corrupt file) is compiled and written again. Options as in :func:`compile_graph`.
    """
    ov_core = core()
    config = _config(threads)
    folder = compiled_cache_dir(name) if name else None
    blob = folder / "model.blob" if folder is not None else None
    if blob is not None and blob.is_file():
        try:
            compiled = ov_core.import_model(io.BytesIO(blob.read_bytes()), "CPU", config)
        except Exception:  # OpenVINO raises RuntimeError and its own types for foreign or broken blobs
            pass
        else:
            graph_cache.touch(blob)
            return _infer_function(compiled)
    compiled = ov_core.compile_model(with_softmax(ov_core.read_model(io.BytesIO(graph()))), "CPU", config)
    if blob is not None:
        try:
            buffer = io.BytesIO()
            compiled.export_model(buffer)
            atomic_write_bytes(blob, buffer.getvalue())
        except Exception:  # an unwritable cache or an OpenVINO without export: compile next time
            pass
        else:
            graph_cache.prune(keep=[name])
    return _infer_function(compiled)


def _infer_function(compiled) -> Callable[[np.ndarray], np.ndarray]:  # noqa: ANN001 (openvino.CompiledModel)
    """``infer(x)``: probabilities of one batch, written by OpenVINO into a fresh array; calls serialised."""
    import openvino as ov

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


def make_runner(net: Optional[torch.nn.Module], window_zyx: Sequence[int], sha256: Optional[str], stage: str,
                threads: Optional[int] = None, graph: Optional[Callable[[], bytes]] = None) -> Runner:
    """A callable mapping a (1, 1, *window_zyx) float32 batch to softmax probabilities (1, C, Z, Y, X).

    ``graph``: a function returning the stage's complete ONNX graph (a bundle's stored graph): compiled
    as it is, no PyTorch. Without it the graph of ``net`` is exported (or read from the shared ONNX
    cache). Compiled on the first call. If export or OpenVINO fails on this network, a RuntimeWarning
    says so and the runner computes the same probabilities with PyTorch on ``net`` instead.
    Raises ImportError when openvino is missing, ValueError for a batch of another shape.
    """
    if not available():
        raise ImportError("the OpenVINO backend needs openvino: pip install openvino "
                          "(or use backend='onnx' or 'torch')")

    def create() -> Callable[[np.ndarray], np.ndarray]:
        if graph is not None:
            return compile_stored_graph(graph, stored_graph_name(sha256, stage, window_zyx) if sha256 else None,
                                        threads)
        graph_name = onnx_backend.cache_name(sha256, stage, window_zyx) if sha256 else None
        return onnx_backend.cached_graph(net, window_zyx, sha256, stage,
                                         lambda model: compile_graph(model, threads, graph_name),
                                         engine="OpenVINO")

    return onnx_backend.graph_runner(net, window_zyx, stage, "OpenVINO", create, apply_softmax=False)
