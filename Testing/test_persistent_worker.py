"""The persistent worker: started on first use, reused with the model loaded, replaced after Cancel or a crash.

Real MRML (slicer-core), the real worker process and engine, and the ``PythonSlicer`` stand-in
(``fake_python_launcher.py``) where the process tree matters.
"""

from __future__ import annotations

import gc
import io
import json
import os
import signal
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import slicer
import torch
import vtk

from AbdomenKDSegLib.errors import BundleError, InputError
from AbdomenKDSegLib.slicer import worker as worker_module
from AbdomenKDSegLib.slicer.logic import AbdomenKDSegLogic, SegmentationCancelled

from conftest import load_volume
from engine_helpers import make_tiny_bundle
from logic_helpers import LAUNCHER, SMALL_CT, TESTING, process_running, scene_state, wait_gone

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX process groups and /proc")


# ----------------------------------------------------------------------------- helpers
def started_pids(logs: list[str]) -> list[int]:
    """Pids of the real Pythons started, from the "Worker started (process N, ...)" lines."""
    return [int(line.split("(process ")[1].split(",")[0]) for line in logs
            if line.startswith("Worker started (process ")]


def make_logic(logs: list[str], launcher: bool = False) -> AbdomenKDSegLogic:
    logic = AbdomenKDSegLogic()
    if launcher:
        logic.pythonExecutable = [sys.executable, str(LAUNCHER)]
    logic.threads = torch.get_num_threads()
    logic.logCallback = logs.append
    return logic


def labels_of(scene, segmentation_node, volume) -> np.ndarray:
    """The segmentation as one label array on the volume's grid (value = segment position + 1)."""
    seg = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    for i in range(seg.GetNumberOfSegments()):
        ids.InsertNextValue(seg.GetNthSegmentID(i))
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, node, volume)
    labels = slicer.util.arrayFromVolume(node).copy()
    scene.RemoveNode(node)
    return labels


def flipped_ct(scene, name: str):
    """The small CT mirrored left-right: another input than the first run's."""
    volume = load_volume(scene, SMALL_CT, name)
    array = slicer.util.arrayFromVolume(volume)
    array[:] = array[:, :, ::-1].copy()
    slicer.util.arrayFromVolumeModified(volume)
    return volume


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("bundles")
    return SimpleNamespace(a=make_tiny_bundle(folder / "a.safetensors", seed=7),
                           b=make_tiny_bundle(folder / "b.safetensors", seed=8))


# ----------------------------------------------------------------------------- reuse
def test_second_run_reuses_the_worker_and_equals_a_one_shot_run(mrml_scene, bundles):
    """Run 2 (another CT, another model) in the same worker gives what a fresh one-shot worker gives."""
    first, second = load_volume(mrml_scene, SMALL_CT, "CT A"), flipped_ct(mrml_scene, "CT B")
    logs: list[str] = []
    logic = make_logic(logs)
    try:
        logic.segment(first, device="cpu", model=bundles.a)
        pid = logic.workerPid
        assert pid is not None and process_running(pid) and logic.workerRunning and not logic.isRunning
        reused = logic.segment(second, device="cpu", model=bundles.b)
        assert logic.workerPid == pid and len(started_pids(logs)) == 1
        assert f"Reusing the running worker (process {pid})" in logs
        assert reused.GetName() == "CT B organs"

        one_shot_logs: list[str] = []
        one_shot = make_logic(one_shot_logs)
        one_shot.reuseWorker = False
        fresh = one_shot.segment(second, device="cpu", model=bundles.b)
        assert one_shot.workerPid is None and not one_shot.workerRunning
        assert any(line.startswith("Starting worker:") and "--serve" not in line for line in one_shot_logs)
        got, want = labels_of(mrml_scene, reused, second), labels_of(mrml_scene, fresh, second)
        assert want.any() and np.array_equal(got, want)
        assert logic.lastRunInfo.voxelCounts == one_shot.lastRunInfo.voxelCounts
        # ... and a worker that went back to model A still matches model A's run
        again = logic.segment(first, device="cpu", model=bundles.a)
        assert logic.workerPid == pid
        assert np.array_equal(labels_of(mrml_scene, again, first),
                              labels_of(mrml_scene, mrml_scene.GetFirstNodeByName("CT A organs"), first))
    finally:
        logic.shutdownWorker()
    wait_gone([pid, *started_pids(logs)], 3.0)


def test_backend_change_is_used_by_the_same_worker(mrml_scene, bundles):
    volume = load_volume(mrml_scene, SMALL_CT, "CT")
    logs: list[str] = []
    logic = make_logic(logs)
    try:
        logic.backend = "torch"
        logic.segment(volume, device="cpu", model=bundles.a, organs=["liver", "spleen"])
        pid = logic.workerPid
        assert logic.lastRunInfo.backend == "torch"
        assert any("--backend torch" in line for line in logs if line.startswith("Worker request "))
        logic.backend = "auto"
        logic.segment(volume, device="cpu", model=bundles.a, organs=["liver", "spleen"])
        assert logic.workerPid == pid
        from AbdomenKDSegLib.runtimes import onnx_backend, openvino_backend

        expected = "openvino" if openvino_backend.available() else "onnx" if onnx_backend.available() else "torch"
        assert logic.lastRunInfo.backend == expected
    finally:
        logic.shutdownWorker()


def test_worker_settings_change_starts_a_new_worker(mrml_scene, bundles):
    volume = load_volume(mrml_scene, SMALL_CT, "CT")
    logs: list[str] = []
    logic = make_logic(logs)
    try:
        logic.segment(volume, device="cpu", model=bundles.a, organs=["liver"], fine=False)
        pid = logic.workerPid
        logic.threads = max(1, logic.threads - 1) if logic.threads > 1 else 2
        logic.segment(volume, device="cpu", model=bundles.a, organs=["liver"], fine=False)
        assert logic.workerPid != pid and len(started_pids(logs)) == 2
        wait_gone([pid], 3.0)
    finally:
        logic.shutdownWorker()


def test_a_user_error_keeps_the_worker(mrml_scene, bundles, tmp_path):
    """A corrupt model file is reported (BundleError) and changes nothing; the worker stays for the next run."""
    volume = load_volume(mrml_scene, SMALL_CT, "CT")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a model")
    logs: list[str] = []
    logic = make_logic(logs)
    try:
        logic.segment(volume, device="cpu", model=bundles.a, organs=["liver"], fine=False)
        pid = logic.workerPid
        before = scene_state(mrml_scene)
        with pytest.raises(BundleError):
            logic.segment(volume, device="cpu", model=corrupt)
        assert scene_state(mrml_scene) == before and logic.workerPid == pid
        logic.segment(volume, device="cpu", model=bundles.a, organs=["liver"], fine=False)
        assert logic.workerPid == pid
    finally:
        logic.shutdownWorker()


# ----------------------------------------------------------------------------- cancel, crash, shutdown
def test_cancel_during_the_second_run_kills_the_tree_and_the_third_starts_fresh(mrml_scene, bundles, monkeypatch):
    monkeypatch.setenv("FAKE_LAUNCHER_STDIN", "pipe")  # a launcher that does not forward stdin
    volume = load_volume(mrml_scene, SMALL_CT, "CT")
    logs: list[str] = []
    logic = make_logic(logs, launcher=True)
    try:
        logic.segment(volume, device="cpu", model=bundles.a)
        launcher, python = logic.workerPid, started_pids(logs)[0]
        assert launcher != python and process_running(launcher) and process_running(python)
        before = scene_state(mrml_scene)
        seen: dict[str, float] = {}

        def cancel_in_coarse_stage(text: str, fraction: float) -> None:
            if text == "Coarse segmentation" and "t" not in seen:
                seen["t"] = time.perf_counter()
                logic.cancel()

        with pytest.raises(SegmentationCancelled):
            logic.segment(volume, device="cpu", model=bundles.a, progress=cancel_in_coarse_stage)
        assert time.perf_counter() - seen["t"] < 2.0
        wait_gone([launcher, python], 2.0)
        assert scene_state(mrml_scene) == before
        assert logic.workerPid is None and not logic.workerRunning

        node = logic.segment(volume, device="cpu", model=bundles.a)
        assert logic.workerPid not in (None, launcher) and len(started_pids(logs)) == 2
        assert node.GetSegmentation().GetNumberOfSegments() == 13
    finally:
        logic.shutdownWorker()


def test_a_worker_killed_between_runs_is_replaced(mrml_scene, bundles):
    volume = load_volume(mrml_scene, SMALL_CT, "CT")
    logs: list[str] = []
    logic = make_logic(logs, launcher=True)
    try:
        logic.segment(volume, device="cpu", model=bundles.a, organs=["liver"], fine=False)
        launcher, python = logic.workerPid, started_pids(logs)[0]
        os.kill(python, signal.SIGKILL)  # the real Python dies (e.g. the OOM killer); its launcher follows
        wait_gone([python, launcher], 5.0)
        node = logic.segment(volume, device="cpu", model=bundles.a, organs=["liver"], fine=False)
        assert any(line.startswith(f"The worker (process {launcher}) had stopped") for line in logs)
        assert logic.workerPid not in (None, launcher) and len(started_pids(logs)) == 2
        assert node.GetSegmentation().GetNumberOfSegments() == 1
    finally:
        logic.shutdownWorker()


def test_a_crash_during_a_run_ends_the_worker_and_leaves_the_scene(mrml_scene, bundles):
    volume = load_volume(mrml_scene, SMALL_CT, "CT")
    logs: list[str] = []
    logic = make_logic(logs)
    logic.segment(volume, device="cpu", model=bundles.a, organs=["liver"], fine=False)
    pid = logic.workerPid
    before = scene_state(mrml_scene)
    logic.workerExtraArgs = ["--debug-crash"]  # a new worker (other options) that crashes in its run
    with pytest.raises(Exception, match="stopped unexpectedly"):
        logic.segment(volume, device="cpu", model=bundles.a)
    assert scene_state(mrml_scene) == before
    assert not logic.workerRunning and logic.workerPid is None
    wait_gone([pid, *started_pids(logs)], 3.0)
    logic.workerExtraArgs = []
    logic.segment(volume, device="cpu", model=bundles.a, organs=["liver"], fine=False)
    assert len(started_pids(logs)) == 3
    logic.shutdownWorker()


def test_shutdown_leaves_no_process(mrml_scene, bundles):
    volume = load_volume(mrml_scene, SMALL_CT, "CT")
    logs: list[str] = []
    logic = make_logic(logs, launcher=True)
    logic.segment(volume, device="cpu", model=bundles.a, organs=["liver"], fine=False)
    launcher, python = logic.workerPid, started_pids(logs)[0]
    started = time.perf_counter()
    assert logic.shutdownWorker() is True
    assert time.perf_counter() - started < 3.0
    wait_gone([launcher, python], 1.0)
    assert logic.workerPid is None and logic.shutdownWorker() is False

    # a logic that is garbage-collected ends its worker too
    other_logs: list[str] = []
    other = make_logic(other_logs, launcher=True)
    other.segment(volume, device="cpu", model=bundles.a, organs=["liver"], fine=False)
    pids = [other.workerPid, started_pids(other_logs)[0]]
    del other
    gc.collect()
    wait_gone(pids, 3.0)


def test_shutdown_during_a_run_cancels_it(mrml_scene, bundles):
    volume = load_volume(mrml_scene, SMALL_CT, "CT")
    before = scene_state(mrml_scene)
    logs: list[str] = []
    texts: list[str] = []
    logic = make_logic(logs)
    logic.workerExtraArgs = ["--debug-delay", "120"]
    logic.segment(volume, device="cpu", model=bundles.a, waitForCompletion=False, progress=lambda t, f: texts.append(t))
    deadline = time.monotonic() + 60
    while "Waiting" not in texts:
        assert logic.poll() and time.monotonic() < deadline
        time.sleep(0.05)
    pid = logic.workerPid
    assert logic.shutdownWorker() is False  # the cancel already ended it
    wait_gone([pid, *started_pids(logs)], 2.0)
    assert not logic.isRunning and scene_state(mrml_scene) == before


# ----------------------------------------------------------------------------- the serve loop itself
def test_serve_answers_each_request_and_ends_after_an_unexpected_failure(monkeypatch, tmp_path):
    """In-process: a user error keeps serving, a MemoryError ends the loop with exit code 1."""
    outcomes = iter(["ok", InputError("input x is 2D"), MemoryError()])
    calls: list[dict] = []

    class FakeEngine:
        def __init__(self, threads: int) -> None:
            self.threads = threads

        def segment(self, request, progress):
            calls.append(request)
            outcome = next(outcomes)
            if isinstance(outcome, BaseException):
                raise outcome
            return SimpleNamespace(output_path=request.output, device="cpu", timings={}, voxel_counts={1: 3},
                                   warnings=[], backend="torch")

    stream = io.StringIO()
    events = worker_module.EventWriter(stream)
    args = worker_module.parse_args(["--serve", "--threads", "2"])
    key = os.urandom(16)
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.update(code=worker_module.serve(args, events, key, FakeEngine)))
    thread.start()
    deadline = time.monotonic() + 10
    while not stream.getvalue():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = json.loads(stream.getvalue().splitlines()[0])
    assert started["event"] == "started" and started["pid"] == os.getpid()
    from multiprocessing.connection import Client

    conn = Client(started["address"], family=started["family"], authkey=key)
    for i in (1, 2, 3):
        conn.send_bytes(json.dumps({"id": i, "argv": ["--input", f"in{i}.nrrd", "--output", str(tmp_path / "o.nrrd"),
                                                      "--backend", "torch", "--no-fine"]}).encode())
    thread.join(timeout=10)
    conn.close()
    assert result == {"code": worker_module.EXIT_FAILURE}
    lines = [json.loads(line) for line in stream.getvalue().splitlines()[1:]]
    ends = [(e["event"], e.get("request"), e.get("type")) for e in lines if e["event"] in ("done", "error")]
    assert ends == [("done", 1, None), ("error", 2, "InputError"), ("error", 3, "MemoryError")]
    assert [str(c.input) for c in calls] == ["in1.nrrd", "in2.nrrd", "in3.nrrd"]
    assert all(c.backend == "torch" and c.fine is False and c.threads == 2 for c in calls)


def test_serve_needs_the_key_and_ends_when_the_connection_closes(tmp_path):
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(TESTING.parent / "AbdomenKDSeg"))
    env.pop(worker_module.KEY_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "AbdomenKDSegLib.slicer.worker", "--serve"], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == worker_module.EXIT_FAILURE and worker_module.KEY_ENV in proc.stdout

    key = os.urandom(16)
    env[worker_module.KEY_ENV] = key.hex()
    proc = subprocess.Popen(
        [sys.executable, "-m", "AbdomenKDSegLib.slicer.worker", "--serve", "--parent-pid", str(os.getpid())],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        started = json.loads(proc.stdout.readline())
        from multiprocessing.connection import Client

        conn = Client(started["address"], family=started["family"], authkey=key)
        conn.close()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
