"""ONNX Runtime CPU backend for the student networks (optional, needs ``onnxruntime``; no PyTorch).

The graph of a stage comes from the bundle when it stores one (:mod:`.bundle_graphs`: no PyTorch
needed); otherwise the student (a PyTorch module) is exported once per bundle, stage and window
shape with the TorchScript-based ``torch.onnx.export`` (no network access; needs PyTorch). It runs
in an ONNX Runtime ``CPUExecutionProvider`` session; the softmax over the class axis is applied
afterwards in numpy (ONNX Runtime's Softmax on a non-last axis costs ~7x more). On a CPU this is
about 2.5x faster than eager PyTorch for the depthwise-separable student (``benchmarks/README.md``).

Exported graphs are cached in ``$ABDOMENKDSEG_CACHE`` (default ``$XDG_CACHE_HOME/abdomen-kdseg``
or ``~/.cache/abdomen-kdseg``) under a name built from the bundle's SHA-256, the stage, the
window and the torch version; files are written atomically. When the folder is not writable
the graph is kept in memory only. A cached graph that ONNX Runtime cannot load is replaced.
A cached graph is touched when used; after a new one is written the least recently used graphs
beyond ``$ABDOMENKDSEG_CACHE_MAX_MB`` (default 400 MB) are deleted (:mod:`.graph_cache`). An
export (a cache miss, 10-30 s for the default model) first prints one line on stderr saying so.

Input of a runner: a (1, 1, Z, Y, X) float32 numpy array (or CPU torch tensor) of exactly the
window shape (z-scored CT). Output: softmax probabilities (1, C, Z, Y, X), float32, of the same kind.
"""

from __future__ import annotations

import inspect
import io
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, TypeVar

import numpy as np

from ..atomic_files import atomic_write_bytes
from ..threads import get_threads
from . import graph_cache
from .graph_cache import CACHE_ENV, cache_dir  # noqa: F401 (CACHE_ENV: re-exported, the tests use it)

if TYPE_CHECKING:
    import torch

#: ONNX opset used for the export (InstanceNormalization, ConvTranspose, grouped Conv).
OPSET = 17
#: Bumped whenever the exported graph changes for the same weights (invalidates old cache files).
EXPORT_VERSION = "2"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"

#: (1, 1, Z, Y, X) float32 window -> (1, C, Z, Y, X) probabilities (numpy in, numpy out; torch in, torch out)
Runner = Callable[[Any], Any]
T = TypeVar("T")


def available() -> bool:
    """True when ``onnxruntime`` can be imported (the backend can run)."""
    try:
        import onnxruntime  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def cache_name(sha256: str, stage: str, window_zyx: Sequence[int]) -> str:
    """File name of a cached graph: bundle hash, stage, window (Z x Y x X), torch and export version."""
    import torch

    window = "x".join(str(int(n)) for n in window_zyx)
    torch_version = torch.__version__.replace("+", "_")
    return f"{sha256[:32]}-{stage}-{window}-torch{torch_version}-opset{OPSET}-v{EXPORT_VERSION}.onnx"


def export_onnx(net: torch.nn.Module, window_zyx: Sequence[int]) -> bytes:
    """Serialized ONNX graph of ``net(x)`` (logits) for a fixed (1, 1, *window_zyx) float32 input.

    The network is exported from a float32 CPU copy in eval mode; ``net`` itself is not changed.
    """
    import copy

    import torch

    model = copy.deepcopy(net).float().cpu().eval()
    example = torch.zeros((1, 1) + tuple(int(n) for n in window_zyx), dtype=torch.float32)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Deprecation of the TorchScript exporter, and InstanceNorm "train=True" (it always uses
        # the statistics of its input, which is what eval mode computes too).
        warnings.simplefilter("ignore")
        with torch.no_grad():
            kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=OPSET,
                          do_constant_folding=True)
            if "dynamo" in inspect.signature(torch.onnx.export).parameters:
                kwargs["dynamo"] = False  # the TorchScript exporter: no onnxscript needed
            torch.onnx.export(model, (example,), buffer, **kwargs)
    return buffer.getvalue()




_ARENA_LOCK = threading.Lock()
_shared_arena: Optional[bool] = None


def shared_arena() -> bool:
    """Register one process-wide ONNX Runtime CPU arena, once; True when sessions can share it.

    Each session otherwise grows and keeps its own arena (about 0.7 GB for a 96x64x96 student
    window), so the coarse and the fine session together would hold twice that. Runs shrink the
    shared arena when they end (:func:`run_options`), so it is only held during a window. False if
    registration fails (sessions then run without an arena: ~15 % slower per window).
    """
    global _shared_arena
    with _ARENA_LOCK:
        if _shared_arena is None:
            import onnxruntime as ort

            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                         ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg({}))
                _shared_arena = True
            except Exception as exc:  # already registered by someone else, or an old onnxruntime
                _shared_arena = "already" in str(exc).lower()
        return _shared_arena


def session_options(threads: Optional[int] = None):  # noqa: ANN201 (onnxruntime.SessionOptions)
    """ONNX Runtime options: ``threads`` intra-op threads (default :func:`threads.get_threads`), one
    inter-op thread, sequential execution, all graph optimizations, the shared CPU arena."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or get_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if shared_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    else:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    return options


def run_options():  # noqa: ANN201 (onnxruntime.RunOptions)
    """Per-run options: give the arena's memory back at the end of every run (when it is shared).

    Measured on one 96x64x96 window: the process keeps ~0.25 GB instead of ~0.9 GB between
    windows, at the speed of a kept arena (no-arena runs are ~15 % slower).
    """
    import onnxruntime as ort

    options = ort.RunOptions()
    if shared_arena():
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def _new_session(model: bytes, threads: Optional[int]):  # noqa: ANN202
    import onnxruntime as ort

    return ort.InferenceSession(model, sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])


def load_or_export(net: torch.nn.Module, window_zyx: Sequence[int], sha256: Optional[str], stage: str,
                   threads: Optional[int] = None):  # noqa: ANN201 (onnxruntime.InferenceSession)
    """An ONNX Runtime session for ``stage``'s network, from the cache or a fresh export."""
    return cached_graph(net, window_zyx, sha256, stage, lambda model: _new_session(model, threads))


#: set in a thread that prepares graphs ahead of use (:func:`graph_runner`'s ``prepare``): no messages
#: there, the call that waits for it speaks instead (an input that fails to read must stay one error line)
_QUIET = threading.local()


def announce_export(engine: str, stage: str, cached: bool) -> None:
    """One line on stderr before an export (a cache miss), above any progress bar: the CLI shows it and
    the Slicer worker forwards it to the module's log. Silent in a background preparation."""
    if getattr(_QUIET, "on", False):
        return
    once = ("once per model: up to about 30 s" if cached else
            "not cached (the model has no checksum): up to about 30 s")
    _say(f"preparing the CPU runtime ({engine}) for the {stage} network of this model, {once}...")


def _say(message: str) -> None:
    """``message`` on stderr, above any tqdm progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()
    except ImportError:
        print(message, file=sys.stderr, flush=True)


def cached_graph(net: torch.nn.Module, window_zyx: Sequence[int], sha256: Optional[str], stage: str,
                 load: Callable[[bytes], T], engine: str = "ONNX Runtime") -> T:
    """``load(graph)`` of ``stage``'s exported ONNX graph, read from the cache or freshly exported.

    Without a ``sha256`` (weights not identified) nothing is cached. A cached graph that ``load``
    rejects (corrupt or truncated file) is re-exported and overwritten; an unwritable cache folder
    leaves the graph in memory (RuntimeWarning). A cache hit touches the file (its last use); an
    export first prints one line on stderr (:func:`announce_export`, naming ``engine``), and once the
    new graph is written the cache is pruned to its size cap (:func:`graph_cache.prune`; this
    bundle's graphs are kept). Shared by the ONNX Runtime and OpenVINO backends.
    """
    path = cache_dir() / cache_name(sha256, stage, window_zyx) if sha256 else None
    if path is not None and path.is_file():
        try:
            loaded = load(path.read_bytes())
        except Exception:  # corrupt or truncated cache file (runtimes raise their own types)
            pass
        else:
            graph_cache.touch(path)
            return loaded
    announce_export(engine, stage, cached=path is not None)
    model = export_onnx(net, window_zyx)
    if path is not None:
        try:
            atomic_write_bytes(path, model)
        except OSError as exc:
            warnings.warn(f"cannot cache the ONNX graph in {path.parent} ({exc}); it is kept in memory",
                          RuntimeWarning, stacklevel=2)
        else:
            graph_cache.prune(keep=[path.name])
    return load(model)


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """Softmax of float32 ``logits`` over ``axis`` (in place where possible), float32."""
    x = np.asarray(logits, dtype=np.float32)
    x = x - x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


#: seconds a first call waits silently for a background preparation before it says why it waits
PREPARE_NOTICE_S = 1.0


def graph_runner(net: Optional[torch.nn.Module], window_zyx: Sequence[int], stage: str, engine: str,
                 create: Callable[[], Callable[[np.ndarray], np.ndarray]], apply_softmax: bool = True) -> Runner:
    """A :data:`Runner` over a compiled graph that ``create()`` builds on the first call.

    ``create`` returns a function mapping the (1, 1, Z, Y, X) float32 numpy batch to logits
    (1, C, Z, Y, X); softmax over C is applied here in numpy (``apply_softmax=False``: the graph
    already returns probabilities). If ``create`` fails and there is a PyTorch ``net``, a
    RuntimeWarning names ``engine`` and the cause and the runner uses PyTorch on ``net`` instead
    (without ``net``, e.g. a bundle's stored graph run without PyTorch, the error is raised).
    Raises ValueError for a batch that is not exactly (1, 1, *window_zyx).

    ``run.prepare()`` builds the graph ahead of the first call (e.g. in a background thread while
    the image is read); it never raises, warns or prints: a failure is left to the first call to report,
    and a first call that waits more than :data:`PREPARE_NOTICE_S` for it prints one line saying why.
    """
    window = tuple(int(n) for n in window_zyx)
    state: dict[str, object] = {}
    lock = threading.Lock()

    def prepare() -> None:
        with lock:
            if "infer" not in state:
                _QUIET.on = True
                try:
                    state["infer"] = create()
                except Exception:  # the first call tries again and reports it (or falls back to PyTorch)
                    pass
                finally:
                    _QUIET.on = False

    def run(batch: Any) -> Any:
        if tuple(batch.shape) != (1, 1) + window:
            raise ValueError(f"the {engine} {stage} network takes a (1, 1, {window[0]}, {window[1]}, "
                             f"{window[2]}) batch, got {tuple(batch.shape)}")
        if not lock.acquire(timeout=PREPARE_NOTICE_S):  # a background preparation is still compiling
            _say(f"waiting for the CPU runtime ({engine}) to be prepared for the {stage} network "
                 "(the first run of a model: up to about 30 s)...")
            lock.acquire()
        try:
            if "infer" not in state:
                try:
                    state["infer"] = create()
                except Exception as exc:  # exporters and runtimes raise many types; PyTorch still works
                    if net is None:
                        raise
                    warnings.warn(f"the {engine} backend failed for the {stage} network "
                                  f"({type(exc).__name__}: {exc}); using PyTorch for it",
                                  RuntimeWarning, stacklevel=2)
                    from . import torch_backend

                    state["infer"] = torch_backend.make_runner(net, _device_of(net), channels_last=False)
                    state["torch"] = True
        finally:
            lock.release()
        infer = state["infer"]
        is_numpy = isinstance(batch, np.ndarray)
        x = np.ascontiguousarray(batch if is_numpy else batch.detach().to("cpu").numpy(), dtype=np.float32)
        out = np.ascontiguousarray(infer(x))  # type: ignore[operator]
        if apply_softmax and not state.get("torch"):
            out = softmax(out)
        if is_numpy:
            return out
        import torch

        return torch.from_numpy(out)

    run.prepare = prepare  # type: ignore[attr-defined]
    return run


def _device_of(net: torch.nn.Module) -> Any:
    for p in net.parameters():
        return p.device
    return "cpu"


def make_runner(net: Optional[torch.nn.Module], window_zyx: Sequence[int], sha256: Optional[str], stage: str,
                threads: Optional[int] = None, graph: Optional[Callable[[], bytes]] = None) -> Runner:
    """A callable mapping a (1, 1, *window_zyx) float32 batch to softmax probabilities (1, C, Z, Y, X).

    ``graph``: a function returning the stage's complete ONNX graph (a bundle's stored graph,
    :func:`bundle_graphs.complete_graph`): used as it is, no PyTorch. Without it the graph of
    ``net`` is exported (or read from the cache) on the first call, so a stage that never runs
    costs nothing. ``threads`` defaults to :func:`threads.get_threads` at that first call. If the
    export or ONNX Runtime fails on this network, a RuntimeWarning says so and the runner computes
    the same probabilities with PyTorch on ``net`` instead.
    Raises ImportError when onnxruntime is missing, ValueError for a batch of another shape.
    """
    if not available():
        raise ImportError("the ONNX backend needs onnxruntime: pip install onnxruntime (or use backend='torch')")

    def create() -> Callable[[np.ndarray], np.ndarray]:
        if graph is not None:
            session = _new_session(graph(), threads)
        else:
            session = load_or_export(net, window_zyx, sha256, stage, threads)
        options = run_options()
        return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x}, options)[0]

    return graph_runner(net, window_zyx, stage, "ONNX", create)
