"""The worker lives exactly as long as Slicer wants it, also behind a launcher like ``PythonSlicer``.

Inside Slicer the worker is started through ``PythonSlicer``, a launcher that starts the real Python
as its child and waits. ``fake_python_launcher.py`` does the same here, so the worker's parent is
the launcher: a segmentation must still succeed, Cancel must end launcher and child, and killing
the process that plays Slicer (it holds the worker's stdin pipe) must end both within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from AbdomenKDSegLib.engine.organs import ORGANS
from AbdomenKDSegLib.request import SegmentRequest
from AbdomenKDSegLib.slicer import worker as worker_module
from AbdomenKDSegLib.slicer import worker_client
from AbdomenKDSegLib.slicer.logic import AbdomenKDSegLogic

from conftest import load_volume
from engine_helpers import make_tiny_bundle
from logic_helpers import LAUNCHER, SMALL_CT, TESTING, process_running, wait_gone

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX process groups and /proc; Windows uses taskkill")


# ----------------------------------------------------------------------------- helpers
def started_pid(logs: list[str]) -> int | None:
    """Pid of the real Python, from the logic's "Worker started (process N, ...)" line."""
    for line in logs:
        if line.startswith("Worker started (process "):
            return int(line.split("(process ")[1].split(",")[0])
    return None


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def launcher_logic(logs: list[str]) -> AbdomenKDSegLogic:
    logic = AbdomenKDSegLogic()
    logic.pythonExecutable = [sys.executable, str(LAUNCHER)]
    logic.threads = torch.get_num_threads()
    logic.logCallback = logs.append
    return logic


def wait_for_stage(logic: AbdomenKDSegLogic, texts: list[str], stage: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while stage not in texts:
        assert logic.poll() and time.monotonic() < deadline, f"no '{stage}' stage"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.safetensors", seed=7)


# ----------------------------------------------------------------------------- through the launcher
@pytest.mark.parametrize("stdin_mode", ["inherit", "devnull"])
def test_segmentation_through_the_launcher_succeeds(mrml_scene, tiny_bundle, monkeypatch, stdin_mode):
    """"devnull": the launcher closes the worker's stdin at once; while Slicer runs that is ignored."""
    monkeypatch.setenv("FAKE_LAUNCHER_STDIN", stdin_mode)
    volume = load_volume(mrml_scene, SMALL_CT, "CT 6 mm")
    logs: list[str] = []
    logic = launcher_logic(logs)
    node = logic.segment(volume, device="cpu", model=tiny_bundle)
    seg = node.GetSegmentation()
    assert [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())] == [o.key for o in ORGANS]
    assert node.GetName() == "CT 6 mm organs"
    command = next(line for line in logs if line.startswith("Starting worker:"))
    assert str(LAUNCHER) in command and "--watch-stdin" in command
    python = started_pid(logs)
    assert python is not None and python != os.getpid()
    assert not logic.isRunning and logic.lastRunInfo.device == "cpu"
    assert all("exited with code 3" not in line for line in logs)


def test_cancel_through_the_launcher_leaves_no_process(mrml_scene, monkeypatch):
    monkeypatch.setenv("FAKE_LAUNCHER_STDIN", "pipe")  # a launcher that does not forward stdin
    volume = load_volume(mrml_scene, SMALL_CT, "CT")
    logs: list[str] = []
    texts: list[str] = []
    logic = launcher_logic(logs)
    logic.workerExtraArgs = ["--debug-delay", "120"]
    logic.segment(volume, device="cpu", waitForCompletion=False, progress=lambda t, f: texts.append(t))
    launcher, python = logic.workerPid, None
    try:
        wait_for_stage(logic, texts, "Waiting")
        python = started_pid(logs)
        assert python is not None and python != launcher
        assert process_running(launcher) and process_running(python)
        started = time.perf_counter()
        assert logic.cancel()
        assert time.perf_counter() - started < 2.0
        wait_gone([launcher, python], 2.0)  # the launcher and the real Python it started
    finally:
        kill_group(launcher)
    assert not logic.isRunning


SLICER_STAND_IN = textwrap.dedent("""
    import json, sys, time
    testing, launcher, ct = sys.argv[1:4]
    sys.path.insert(0, testing)
    import slicer
    from conftest import load_volume
    from AbdomenKDSegLib.slicer.logic import AbdomenKDSegLogic, registerSegmentationConverters

    registerSegmentationConverters()
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    logs = []
    logic = AbdomenKDSegLogic()
    logic.pythonExecutable = [sys.executable, launcher]
    logic.logCallback = logs.append
    logic.workerExtraArgs = ["--debug-delay", "300"]
    logic.segment(load_volume(scene, ct, "CT"), device="cpu", waitForCompletion=False)
    deadline = time.monotonic() + 60
    while not any(line.startswith("Worker started (process ") for line in logs):
        assert logic.poll() and time.monotonic() < deadline
        time.sleep(0.05)
    line = next(line for line in logs if line.startswith("Worker started (process "))
    python = int(line.split("(process ")[1].split(",")[0])
    print(json.dumps({"launcher": logic.workerPid, "python": python}), flush=True)
    while True:  # Slicer at work until it is killed
        logic.poll()
        time.sleep(0.1)
""")


@pytest.mark.parametrize("stdin_mode", ["inherit", "pipe"])
def test_killing_slicer_ends_the_worker(tmp_path, stdin_mode):
    """"inherit": stdin end-of-file ends the worker at once; "pipe" (stdin not forwarded): the pid check."""
    env = dict(os.environ, FAKE_LAUNCHER_STDIN=stdin_mode)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        slicer_side = subprocess.Popen(
            [sys.executable, "-c", SLICER_STAND_IN, str(TESTING), str(LAUNCHER), str(SMALL_CT)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    pids = SimpleNamespace(launcher=0, python=0)
    try:
        line = slicer_side.stdout.readline()
        assert line, (tmp_path / "stderr.txt").read_text()[-3000:]
        found = json.loads(line)
        pids.launcher, pids.python = found["launcher"], found["python"]
        assert pids.launcher != pids.python
        time.sleep(1.5)  # the worker stays while "Slicer" runs, also after its launcher's first checks
        assert process_running(pids.launcher) and process_running(pids.python)
        slicer_side.kill()  # SIGKILL: no atexit, no cancel; the stdin pipe's only writer is gone
        slicer_side.wait(timeout=10)
        seconds = wait_gone([pids.python, pids.launcher], 5.0)
        if stdin_mode == "inherit":
            assert seconds < 1.5  # end-of-file, not the 1 s pid poll plus slack
    finally:
        if slicer_side.poll() is None:
            slicer_side.kill()
            slicer_side.wait(timeout=10)
        if pids.launcher:
            kill_group(pids.launcher)


# ----------------------------------------------------------------------------- the worker's liveness check
def test_worker_ignores_stdin_end_of_file_while_its_parent_runs(tmp_path):
    """End-of-file at once (stdin closed), parent alive: the worker goes on (here: to a missing-input error)."""
    proc = subprocess.run(
        [sys.executable, "-m", "AbdomenKDSegLib.slicer.worker", "--input", str(tmp_path / "missing.nrrd"),
         "--output", str(tmp_path / "out.nrrd"), "--parent-pid", str(os.getpid()), "--watch-stdin",
         "--debug-delay", "2.5"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == worker_module.EXIT_USER_ERROR, proc.stderr
    assert "stdin closed but process" in proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["event"] == "error"


def test_worker_exits_at_once_when_the_given_parent_is_already_gone(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "AbdomenKDSegLib.slicer.worker", "--input", "in.nrrd", "--output", "out.nrrd",
         "--parent-pid", str(gone.pid), "--debug-delay", "120"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == worker_module.EXIT_ORPHANED
    assert time.perf_counter() - started < 30


def test_process_alive_counts_a_zombie_as_gone():
    assert worker_module.process_alive(os.getpid())
    assert worker_module.ParentWatch(os.getpid()).alive()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while worker_module.process_alive(child.pid):  # exited but not reaped: a zombie
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert os.path.exists(f"/proc/{child.pid}") or sys.platform != "linux"  # still there, as a zombie
    assert child.wait(timeout=5) == 0
    assert not worker_module.ParentWatch(0).alive()


def test_windows_cancel_ends_the_tree_with_taskkill(monkeypatch):
    """The Windows path (not runnable here): ``taskkill /F /T /PID`` on the launcher, then a plain kill."""
    calls = []

    class FakeProcess:
        pid = 4321
        alive = True

        def poll(self):
            return None if self.alive else 1

        def kill(self):
            calls.append("kill")

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        FakeProcess.alive = False
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(worker_client.os, "name", "nt")
    monkeypatch.setattr(worker_client.subprocess, "run", fake_run)
    worker_client.kill_process_tree(FakeProcess())
    monkeypatch.undo()
    assert calls == [["taskkill", "/F", "/T", "/PID", "4321"]]


def test_worker_command_through_a_launcher_command():
    logic = AbdomenKDSegLogic()
    logic.pythonExecutable = [sys.executable, str(LAUNCHER)]
    cmd = logic.workerSettings().command(SegmentRequest("i.nrrd", "o.nrrd", device="cpu"), serve=False)
    assert cmd[:4] == [sys.executable, str(LAUNCHER), "-m", "AbdomenKDSegLib.slicer.worker"]
    assert cmd[cmd.index("--parent-pid") + 1] == str(os.getpid()) and "--watch-stdin" in cmd
