"""The graph cache folder (AbdomenKDSegLib.runtimes.graph_cache): size cap with least-recently-used pruning,
only the project's files ever deleted, ``abdomen-kdseg cache`` listing and ``--clear``.

Fake graph files (named like onnx_backend.cache_name, arbitrary bytes) are enough here: no runtime
is needed. The backends' use of the cache (touch on a hit, prune after a write, the message before
an export) is tested on both runtimes in test_runtime_backends.py."""

from __future__ import annotations

import argparse
import os
import time

import pytest

from AbdomenKDSegLib.runtimes import graph_cache

MB = 1_000_000
DAY = 86_400.0


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(graph_cache.CACHE_ENV, str(folder))
    monkeypatch.delenv(graph_cache.MAX_MB_ENV, raising=False)
    folder.mkdir()
    return folder


def graph_name(key: str, stage: str) -> str:
    return f"{key * 32}-{stage}-96x64x96-torch2.13.0_cpu-opset17-v2.onnx"


def fake_bundle(folder, key: str, age_days: float, size: int = MB, blob: bool = True):
    """The coarse and fine graphs of one bundle (last used ``age_days`` ago), each with an OpenVINO blob."""
    paths = []
    stamp = time.time() - age_days * DAY
    for stage in ("coarse", "fine"):
        path = folder / graph_name(key, stage)
        path.write_bytes(b"g" * size)
        paths.append(path)
        if blob:
            blob_dir = graph_cache.compiled_dir(path.name, folder)
            blob_dir.mkdir(parents=True)
            (blob_dir / "123456789.blob").write_bytes(b"b" * (size // 2))
            paths.append(blob_dir / "123456789.blob")
        for p in paths[-2:]:
            os.utime(p, (stamp, stamp))
    return paths


def not_ours(folder):
    """Files a user (or another program) keeps in the same folder: never deleted."""
    files = [folder / "notes.txt", folder / "model.onnx", folder / "openvino" / "readme.md",
             folder / "other" / "x.onnx", folder / "openvino" / "not-a-graph" / "1.blob"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("keep me")
    return files


def test_prune_deletes_least_recently_used_bundles_beyond_the_cap(cache):
    old = fake_bundle(cache, "a", age_days=30)
    middle = fake_bundle(cache, "b", age_days=10)
    new = fake_bundle(cache, "c", age_days=1)
    others = not_ours(cache)
    # 3 bundles of 3 MB each; a cap of 7 MB keeps the two most recent
    removed = graph_cache.prune(limit=7 * MB)
    assert [e.name for e in removed] == [graph_name("a", "coarse"), graph_name("a", "fine")]
    assert not any(p.exists() for p in old)
    assert not graph_cache.compiled_dir(graph_name("a", "coarse"), cache).exists()  # its blob folder too
    assert all(p.exists() for p in middle + new + others)
    graph_cache.prune(limit=0, keep=[graph_name("c", "fine")])  # the model in use survives any cap
    assert not any(p.exists() for p in middle) and all(p.exists() for p in new + others)


def test_prune_keeps_the_model_in_use_even_if_it_is_the_oldest(cache):
    oldest = fake_bundle(cache, "a", age_days=30)
    newer = fake_bundle(cache, "b", age_days=1)
    graph_cache.prune(limit=4 * MB, keep=[graph_name("a", "coarse")])
    assert all(p.exists() for p in oldest) and not any(p.exists() for p in newer)


def test_orphans_old_blobs_and_stale_temporary_files_are_pruned_first(cache):
    recent = fake_bundle(cache, "c", age_days=1)
    legacy = cache / "openvino" / "17552363840134794409.blob"  # the flat layout of earlier versions
    legacy.write_bytes(b"x" * MB)
    orphan = graph_cache.compiled_dir(graph_name("d", "fine"), cache) / "42.blob"  # graph deleted by hand
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x" * MB)
    stale = cache / ("." + graph_name("e", "coarse") + ".k3j4.tmp")  # a crashed write
    stale.write_bytes(b"x" * MB)
    writing = cache / ("." + graph_name("f", "coarse") + ".q9z8.tmp")  # a write in progress
    writing.write_bytes(b"x" * MB)
    for path in (legacy, orphan, stale):
        os.utime(path, (time.time() - 5 * DAY,) * 2)
    graph_cache.prune(limit=3 * MB)
    assert not legacy.exists() and not orphan.exists() and not orphan.parent.exists() and not stale.exists()
    assert writing.exists() and all(p.exists() for p in recent)


def test_size_cap_from_the_environment(monkeypatch):
    monkeypatch.delenv(graph_cache.MAX_MB_ENV, raising=False)
    assert graph_cache.max_bytes() == 400 * MB
    monkeypatch.setenv(graph_cache.MAX_MB_ENV, "50")
    assert graph_cache.max_bytes() == 50 * MB
    monkeypatch.setenv(graph_cache.MAX_MB_ENV, "0")
    assert graph_cache.max_bytes() == 0
    for bad in ("lots", "-3", "nan"):
        monkeypatch.setenv(graph_cache.MAX_MB_ENV, bad)
        with pytest.warns(RuntimeWarning, match=graph_cache.MAX_MB_ENV):
            assert graph_cache.max_bytes() == 400 * MB


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="abdomen-kdseg")
    graph_cache.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cache", *argv])
    return args.func(args)


def test_cache_command_lists_files_sizes_and_total(cache, capsys):
    fake_bundle(cache, "a", age_days=3)
    not_ours(cache)
    assert run_cli() == 0
    out = capsys.readouterr().out
    assert f"graph cache {cache}" in out and "size cap 400.0 MB" in out
    assert graph_name("a", "coarse") in out and graph_name("a", "fine") in out
    assert f"openvino/{graph_name('a', 'fine')[:-5]}/123456789.blob" in out
    assert "total 3.0 MB in 4 file(s) of 1 model(s)" in out
    assert "5 other file(s) in the folder are not this project's graphs: left alone" in out
    assert "notes.txt" not in out


def test_cache_clear_deletes_only_the_projects_graphs(cache, capsys):
    graphs = fake_bundle(cache, "a", age_days=3) + fake_bundle(cache, "b", age_days=1, blob=False)
    others = not_ours(cache)
    assert run_cli("--clear") == 0
    assert capsys.readouterr().out.strip() == f"removed 6 file(s) of 2 model(s) from {cache}: 5.0 MB freed"
    assert not any(p.exists() for p in graphs) and all(p.exists() for p in others)
    assert run_cli("--clear") == 0
    assert "removed 0 file(s)" in capsys.readouterr().out
    assert run_cli() == 0
    assert "total 0.0 MB in 0 file(s)" in capsys.readouterr().out


def test_cache_command_without_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(graph_cache.CACHE_ENV, str(tmp_path / "never-made"))
    assert run_cli() == 0 and "empty (no folder yet)" in capsys.readouterr().out
    assert run_cli("--clear") == 0 and "0.0 MB freed" in capsys.readouterr().out
    assert not (tmp_path / "never-made").exists()


def test_graph_names_of_the_backends_are_recognised():
    torch = pytest.importorskip("torch")
    from AbdomenKDSegLib.runtimes import onnx_backend

    name = onnx_backend.cache_name("0123456789abcdef" * 4, "fine", (96, 64, 96))
    assert graph_cache.bundle_key(name) == "0123456789abcdef" * 2
    assert torch.__version__.replace("+", "_") in name
    assert graph_cache.bundle_key("model.onnx") is None and graph_cache.bundle_key(name + ".bak") is None
