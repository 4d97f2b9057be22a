"""Helpers shared by the Slicer-logic tests: test inputs, the worker's processes, and the scene's state."""

from __future__ import annotations

import os
import time
from pathlib import Path

TESTING = Path(__file__).resolve().parent
LAUNCHER = TESTING / "fake_python_launcher.py"  # a stand-in for PythonSlicer: starts the real Python, waits
SMALL_CT = TESTING.parent / "AbdomenKDSeg" / "Resources" / "Testing" / "ct-abdomen-6mm.nrrd"


def process_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan nobody reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def wait_gone(pids: list[int], seconds: float) -> float:
    """Seconds until every pid is gone; fails after ``seconds``."""
    start = time.monotonic()
    while any(process_running(p) for p in pids):
        assert time.monotonic() - start < seconds, f"still running after {seconds} s: " + \
            str([p for p in pids if process_running(p)])
        time.sleep(0.05)
    return time.monotonic() - start


def scene_state(scene) -> list:
    """Every node (id, class, name, modified time) and every segmentation's segments (id, name)."""
    state = []
    nodes = scene.GetNodes()
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        entry = [node.GetID(), node.GetClassName(), node.GetName(), node.GetMTime()]
        if node.IsA("vtkMRMLSegmentationNode"):
            seg = node.GetSegmentation()
            entry.append([(seg.GetNthSegmentID(k), seg.GetNthSegment(k).GetName())
                          for k in range(seg.GetNumberOfSegments())])
        state.append(entry)
    return state
