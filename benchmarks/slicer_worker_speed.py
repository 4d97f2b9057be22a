"""Seconds per segmentation through the Slicer logic: persistent worker (model kept loaded) vs one-shot workers.

Runs the real :class:`AbdomenKDSegLib.slicer.logic.AbdomenKDSegLogic` on real MRML (slicer-core): each run
exports the volume node, has the worker segment it (CPU, default model, default backend) and imports
the 13 segments into a segmentation node. The time is ``RunInfo.totalSeconds`` (from the
``segment`` call to the imported segments, as the panel shows it).

Scenarios, each with a fresh logic (so run 1 starts a new worker):
  persistent   ``reuseWorker = True`` (the default): run 1 starts the worker (interpreter, imports,
               model loading), runs 2 and 3 reuse it
  one-shot     ``reuseWorker = False``: every run starts a new worker process
  second CT    persistent, run 1 on the 6 mm CT, run 2 on the 3 mm CT (the second CT a user segments)
Inputs: the module's self-test CT (AbdomenKDSeg/Resources/Testing/ct-abdomen-6mm.nrrd) and the 3 mm
sample CT (../shared/data/ct-abdomen-3mm/image.nii.gz). One untimed one-shot run first fills the
on-disk ONNX/OpenVINO caches, as any earlier session of the module would have.

Usage:
  python benchmarks/slicer_worker_speed.py [--runs 3] [--launcher] [--threads N]
``--launcher`` starts the worker through Testing/fake_python_launcher.py, a PythonSlicer stand-in.
Writes benchmarks/results/slicer_worker_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = common.REPO
sys.path.insert(0, str(REPO / "AbdomenKDSeg"))
sys.path.insert(0, str(REPO / "Testing"))
SMALL_CT = REPO / "AbdomenKDSeg" / "Resources" / "Testing" / "ct-abdomen-6mm.nrrd"
INPUTS = {"ct-abdomen-6mm": SMALL_CT, "ct-abdomen-3mm": common.SAMPLE_CT}
LAUNCHER = REPO / "Testing" / "fake_python_launcher.py"
OUT = common.RESULTS / "slicer_worker_speed.json"


def new_logic(args: argparse.Namespace, reuse: bool, logs: list[str]) -> Any:
    from AbdomenKDSegLib.slicer.logic import AbdomenKDSegLogic

    logic = AbdomenKDSegLogic()
    logic.reuseWorker = reuse
    logic.threads = args.threads
    logic.logCallback = logs.append
    if args.launcher:
        logic.pythonExecutable = [sys.executable, str(LAUNCHER)]
    return logic


def timed_run(logic: Any, scene: Any, volume: Any) -> dict[str, Any]:
    started = time.perf_counter()
    node = logic.segment(volume, device="cpu")
    wall = time.perf_counter() - started
    info = logic.lastRunInfo
    segments = node.GetSegmentation().GetNumberOfSegments()
    scene.RemoveNode(node)
    return {"seconds": round(info.totalSeconds, 3), "wall_seconds": round(wall, 3),
            "worker_pid": logic.workerPid, "backend": info.backend, "device": info.device, "segments": segments,
            "engine_seconds": round(sum(info.timings.values()), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="runs per scenario and input")
    p.add_argument("--launcher", action="store_true", help="start workers through the PythonSlicer stand-in")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the worker (0: default)")
    args = p.parse_args(argv)

    import slicer

    from AbdomenKDSegLib.engine.bundle import default_bundle_path
    from AbdomenKDSegLib.slicer.logic import registerSegmentationConverters

    from conftest import load_volume

    registerSegmentationConverters()
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    volumes = {name: load_volume(scene, path, name) for name, path in INPUTS.items()}
    warnings.simplefilter("ignore")

    logs: list[str] = []
    warm = new_logic(args, False, logs)
    for volume in volumes.values():  # fills the ONNX/OpenVINO disk caches; not timed
        timed_run(warm, scene, volume)

    rows: list[dict[str, Any]] = []
    for name, volume in volumes.items():
        for scenario, reuse in (("persistent", True), ("one-shot", False)):
            logic = new_logic(args, reuse, logs)
            for run in range(1, args.runs + 1):
                row = {"input": name, "scenario": scenario, "run": run, **timed_run(logic, scene, volume)}
                rows.append(row)
                print(f"{name:16s} {scenario:10s} run {run}: {row['seconds']:.2f} s (pid {row['worker_pid']})",
                      flush=True)
            logic.shutdownWorker()
    logic = new_logic(args, True, logs)
    for run, name in enumerate(("ct-abdomen-6mm", "ct-abdomen-3mm"), start=1):
        rows.append({"input": name, "scenario": "second CT", "run": run, **timed_run(logic, scene, volumes[name])})
    logic.shutdownWorker()

    def seconds(inp: str, scenario: str, run: int) -> float:
        return next(r["seconds"] for r in rows if r["input"] == inp and r["scenario"] == scenario and r["run"] == run)

    summary = []
    for name in volumes:
        first, second = seconds(name, "persistent", 1), seconds(name, "persistent", 2)
        summary.append({"input": name, "first_run_s": first, "second_run_s": second,
                        "second_over_first": round(second / first, 3),
                        "one_shot_run2_s": seconds(name, "one-shot", 2),
                        "target_met": second <= 0.5 * first})
    for row in rows:
        first = seconds(row["input"], "persistent", 1) if row["scenario"] != "second CT" else None
        row["vs_first_persistent"] = round(row["seconds"] / first, 3) if first else None

    common.print_table(rows, [("input", "input"), ("scenario", "scenario"), ("run", "run"),
                              ("seconds", "seconds"), ("engine_seconds", "engine s"),
                              ("vs_first_persistent", "/ run 1"), ("worker_pid", "worker pid"),
                              ("backend", "backend")])
    print()
    common.print_table(summary, [("input", "input"), ("first_run_s", "run 1 s"), ("second_run_s", "run 2 s"),
                                 ("second_over_first", "run 2 / run 1"), ("one_shot_run2_s", "one-shot run s"),
                                 ("target_met", "run 2 <= half run 1")])
    data = {
        "benchmark": "slicer_worker_speed",
        "what": "seconds from AbdomenKDSegLogic.segment() to the imported segments (RunInfo.totalSeconds), "
                "CPU, default model and backend, real MRML (slicer-core)",
        "model": str(default_bundle_path()),
        "launcher": bool(args.launcher),
        "threads": args.threads,
        "machine": common.machine_info(),
        "summary": summary,
        "runs": rows,
    }
    common.write_json(data, OUT)
    print(f"\nwrote {OUT}")
    return 0 if all(s["target_met"] for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
