"""What the ONNX Runtime and OpenVINO backends share, tested on both: probabilities equal to
PyTorch's, one exported graph cached on disk and reused (OpenVINO also keeps its compiled blob), a
corrupt cache file replaced, the in-memory fallback of an unwritable cache, the PyTorch fallback
when the runtime fails, the refusal of a batch of another shape, the one-line message before an
export (a cache miss only), and the cache's size cap (a hit touches the graph, a new graph prunes
the least recently used ones). Each backend is skipped when not installed;
their own behaviour (caches, selection, label maps on the sample CT) is in test_onnx_backend.py
and test_openvino_backend.py."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

from AbdomenKDSegLib.runtimes import graph_cache, onnx_backend, openvino_backend

from engine_helpers import private_runtime_cache, tiny_student, torch_probabilities

TINY_WINDOW = (16, 16, 32)
SHA = "00112233445566778899aabbccddeeff" * 2


@dataclass(frozen=True)
class Backend:
    module: ModuleType
    engine: str  #: the name its warnings use
    runtime: str  #: the name its export message uses
    tolerance: float  #: largest probability difference accepted against PyTorch
    breakable: str  #: the step whose failure must fall back to PyTorch


BACKENDS = {
    "onnx": Backend(onnx_backend, "ONNX", "ONNX Runtime", 1e-4, "export_onnx"),
    # oneDNN sums in another order than PyTorch: within 1e-3 rather than bit for bit
    "openvino": Backend(openvino_backend, "OpenVINO", "OpenVINO", 1e-3, "compile_graph"),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> Backend:
    chosen = BACKENDS[request.param]
    if not chosen.module.available():
        pytest.skip(f"{request.param} is not installed (pip install -e '.[{request.param}]')")
    return chosen


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets an empty graph cache and one thread (the test machine has 2 shared cores)."""
    yield from private_runtime_cache(tmp_path, monkeypatch)


def test_tiny_student_probabilities_match_pytorch(backend):
    net = tiny_student()
    x = torch.randn((1, 1) + TINY_WINDOW, generator=torch.Generator().manual_seed(1))
    probs = backend.module.make_runner(net, TINY_WINDOW, SHA, "coarse")(x)
    assert probs.dtype == torch.float32 and probs.device.type == "cpu"
    assert tuple(probs.shape) == (1, 14) + TINY_WINDOW
    torch.testing.assert_close(probs.sum(dim=1), torch.ones((1,) + TINY_WINDOW), atol=1e-5, rtol=0)
    assert (probs - torch_probabilities(net, x)).abs().max().item() < backend.tolerance


def test_graph_is_cached_once_and_reused(backend, monkeypatch):
    net = tiny_student()
    x = torch.randn((1, 1) + TINY_WINDOW)
    first = backend.module.make_runner(net, TINY_WINDOW, SHA, "fine")(x)
    graphs = list(onnx_backend.cache_dir().glob("*.onnx"))
    assert [f.name for f in graphs] == [onnx_backend.cache_name(SHA, "fine", TINY_WINDOW)]
    assert not list(onnx_backend.cache_dir().glob("*.tmp"))  # the atomic write left nothing behind
    if backend.module is openvino_backend:
        assert any((onnx_backend.cache_dir() / "openvino").iterdir())  # OpenVINO's compiled blob

    def no_export(*args, **kwargs):
        raise AssertionError("the cached graph should have been used")

    monkeypatch.setattr(onnx_backend, "export_onnx", no_export)
    second = backend.module.make_runner(net, TINY_WINDOW, SHA, "fine")(x)
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_corrupt_cache_file_is_replaced(backend):
    net = tiny_student()
    path = onnx_backend.cache_dir() / onnx_backend.cache_name(SHA, "coarse", TINY_WINDOW)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an onnx graph")
    x = torch.randn((1, 1) + TINY_WINDOW)
    probs = backend.module.make_runner(net, TINY_WINDOW, SHA, "coarse")(x)
    assert (probs - torch_probabilities(net, x)).abs().max().item() < backend.tolerance
    assert path.stat().st_size > 1000


def test_unwritable_cache_folder_keeps_the_graph_in_memory(backend, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv(onnx_backend.CACHE_ENV, str(blocker / "cache"))
    net = tiny_student()
    x = torch.randn((1, 1) + TINY_WINDOW)
    with pytest.warns(RuntimeWarning, match="cannot cache the ONNX graph"):
        probs = backend.module.make_runner(net, TINY_WINDOW, SHA, "coarse")(x)
    assert (probs - torch_probabilities(net, x)).abs().max().item() < backend.tolerance


def test_runtime_failure_falls_back_to_pytorch(backend, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such operator here")

    monkeypatch.setattr(backend.module, backend.breakable, broken)
    net = tiny_student()
    x = torch.randn((1, 1) + TINY_WINDOW)
    with pytest.warns(RuntimeWarning, match=f"{backend.engine} backend failed for the fine network.*no such operator"):
        probs = backend.module.make_runner(net, TINY_WINDOW, SHA, "fine")(x)
    torch.testing.assert_close(probs, torch_probabilities(net, x), atol=1e-6, rtol=0)


def test_prepare_builds_the_graph_once_ahead_and_leaves_failures_to_the_first_call(backend, monkeypatch):
    import warnings

    real, calls = getattr(backend.module, backend.breakable), []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.module, backend.breakable, counted)
    net = tiny_student()
    x = torch.randn((1, 1) + TINY_WINDOW)
    runner = backend.module.make_runner(net, TINY_WINDOW, SHA, "coarse")
    runner.prepare()
    assert len(calls) == 1  # built before any window
    runner.prepare()
    probs = runner(x)
    assert len(calls) == 1  # neither a second prepare nor the call builds it again
    assert (probs - torch_probabilities(net, x)).abs().max().item() < backend.tolerance

    def broken(*args, **kwargs):
        raise RuntimeError("no such operator here")

    monkeypatch.setattr(backend.module, backend.breakable, broken)
    failing = backend.module.make_runner(net, TINY_WINDOW, SHA, "fine")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        failing.prepare()  # silent: no exception, no warning
    with pytest.warns(RuntimeWarning, match=f"{backend.engine} backend failed for the fine network"):
        failing(x)  # the first call reports it and falls back to PyTorch


def test_batch_of_another_shape_is_refused(backend):
    runner = backend.module.make_runner(tiny_student(), TINY_WINDOW, SHA, "coarse")
    with pytest.raises(ValueError, match=rf"{backend.engine} coarse network takes a \(1, 1, 16, 16, 32\)"):
        runner(torch.zeros(1, 1, 16, 16, 16))


def test_export_prints_one_line_on_a_cache_miss_only(backend, capsys):
    net = tiny_student()
    x = torch.randn((1, 1) + TINY_WINDOW)
    backend.module.make_runner(net, TINY_WINDOW, SHA, "coarse")(x)
    lines = [line for line in capsys.readouterr().err.splitlines() if "preparing" in line]
    assert lines == [f"preparing the CPU runtime ({backend.runtime}) for the coarse network of this model, "
                     "once per model: up to about 30 s..."]
    backend.module.make_runner(net, TINY_WINDOW, SHA, "coarse")(x)  # from the cache: silent
    assert "preparing" not in capsys.readouterr().err
    backend.module.make_runner(net, TINY_WINDOW, None, "fine")(x)  # no checksum: never cached, said so
    assert "for the fine network of this model, not cached" in capsys.readouterr().err


def test_a_background_preparation_is_silent_and_a_first_call_waiting_for_it_says_why(backend, capsys, monkeypatch):
    """An export in ``prepare()`` (a background thread while the CT is read) prints nothing, so an input
    that then fails to read stays one error line; a window that has to wait for it says so."""
    import threading

    net = tiny_student()
    x = torch.randn((1, 1) + TINY_WINDOW)
    backend.module.make_runner(net, TINY_WINDOW, SHA, "coarse").prepare()  # a cache miss
    assert capsys.readouterr().err == ""
    real, started, release = getattr(backend.module, backend.breakable), threading.Event(), threading.Event()

    def slow(*args, **kwargs):
        started.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.module, backend.breakable, slow)
    monkeypatch.setattr(onnx_backend, "PREPARE_NOTICE_S", 0.05)
    runner = backend.module.make_runner(net, TINY_WINDOW, SHA, "fine")
    thread = threading.Thread(target=runner.prepare)
    thread.start()
    assert started.wait(10)
    threading.Timer(0.5, release.set).start()
    probs = runner(x)  # waits for the preparation, then uses its graph
    thread.join()
    assert (probs - torch_probabilities(net, x)).abs().max().item() < backend.tolerance
    waiting = [line for line in capsys.readouterr().err.splitlines() if "waiting" in line]
    assert waiting == [f"waiting for the CPU runtime ({backend.engine}) to be prepared for the fine network "
                       "(the first run of a model: up to about 30 s)..."]


def test_a_new_graph_prunes_old_bundles_and_a_hit_touches_its_graph(backend, monkeypatch):
    folder = onnx_backend.cache_dir()
    folder.mkdir(parents=True)
    old = [folder / onnx_backend.cache_name("9" * 64, stage, (96, 64, 96)) for stage in ("coarse", "fine")]
    month_ago = time.time() - 30 * 86_400
    for path in old:
        path.write_bytes(b"g" * 600_000)
        os.utime(path, (month_ago, month_ago))
    keep = folder / "notes.onnx"  # not one of the project's graph names
    keep.write_bytes(b"k" * 2_000_000)
    monkeypatch.setenv(graph_cache.MAX_MB_ENV, "1")  # room for the new tiny graph, not for the old bundle
    net = tiny_student()
    x = torch.randn((1, 1) + TINY_WINDOW)
    backend.module.make_runner(net, TINY_WINDOW, SHA, "coarse")(x)
    graph = folder / onnx_backend.cache_name(SHA, "coarse", TINY_WINDOW)
    assert graph.is_file() and keep.is_file() and not any(p.exists() for p in old)
    if backend.module is openvino_backend:  # the compiled blob lives in the graph's own folder
        assert list(graph_cache.compiled_dir(graph.name, folder).glob("*.blob"))
    os.utime(graph, (month_ago, month_ago))
    backend.module.make_runner(net, TINY_WINDOW, SHA, "coarse")(x)
    assert graph.stat().st_mtime > time.time() - 600  # used now: the most recent in the cache
