"""End-to-end speed and peak memory of ``abdomen-kdseg segment`` on the CPU, at clinical sizes.

Every run is a fresh child process (``python -m AbdomenKDSegLib.cli segment IN OUT ...``): the
seconds are wall-clock from process start to exit (interpreter start, imports, model loading,
reading, both stages, writing the label map), the memory is the child's peak resident set size.
Inputs: the 3 mm sample CT and clinical sizes resampled from it (clinical spacing, see
``common.prepare_input``), cached as uncompressed NIfTI in ``benchmarks/data-cache/``.

Variants (``--variants``):
  default     the CLI with its default options
  torch       PyTorch, channels_last_3d on      (--backend torch, when the CLI has --backend)
  torch-nocl  PyTorch, channels_last_3d off     (--no-channels-last)
  onnx        ONNX Runtime CPU backend          (--backend onnx)
  openvino    OpenVINO CPU backend              (--backend openvino)
When the installed CLI has no ``--backend`` option, the torch/onnx variants run through this
script's ``--child`` driver, which does exactly what ``cmd_segment`` does with a Predictor of that
backend. Each variant is warmed up once on the sample CT first (not timed; fills the ONNX and
OpenVINO caches).

Usage:
  python benchmarks/segment_speed.py                 # sample, 512x512x300, 512x512x800
  python benchmarks/segment_speed.py --quick         # sample CT only
  python benchmarks/segment_speed.py --sizes 512x512x300 --variants torch torch-nocl onnx --threads 1 2
  python benchmarks/segment_speed.py --profile 512x512x300   # cProfile of one in-process run
  python benchmarks/segment_speed.py --window-bench 5 --threads 1 2  # seconds per window and backend
Writes benchmarks/results/segment_speed.json (and .prof/.txt files with --profile).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = ("default", "torch", "torch-nocl", "onnx", "openvino")
#: Targets of issue 3 on a 2-core CPU: size -> (max seconds or None, max peak RSS in GB = 1e9 bytes).
TARGETS = {"512x512x300": (15.0, 2.5), "512x512x800": (None, 4.0)}
MIB_PER_GB = 1e9 / 2**20


# ------------------------------------------------------------------------------------- child driver
def child_main(argv: Sequence[str]) -> int:
    """``--child``: segment one file like ``abdomen-kdseg segment`` with a chosen backend."""
    parser = argparse.ArgumentParser(prog="segment_speed.py --child")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from AbdomenKDSegLib.cli import print_summary
    from AbdomenKDSegLib.engine.inference import Predictor, segment_file

    predictor = Predictor(args.model, device=args.device, channels_last=not args.no_channels_last,
                          backend=args.backend)
    result = segment_file(args.input, args.output, predictor=predictor)
    print(f"backend {predictor.backend}")
    print_summary(result)
    return 0


# ----------------------------------------------------------------------------------------- commands
def cli_has_backend_option() -> bool:
    """True when ``abdomen-kdseg segment`` accepts ``--backend``."""
    from AbdomenKDSegLib.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return any("--backend" in a.option_strings for a in sub.choices["segment"]._actions)


def segment_command(variant: str, source: Path, target: Path, threads: int, device: str,
                    model: Optional[str], cli_backend: bool) -> list[str]:
    """The child command line of one variant."""
    backend = {"torch": "torch", "torch-nocl": "torch", "onnx": "onnx", "openvino": "openvino"}.get(variant)
    use_cli = variant == "default" or cli_backend
    if use_cli:
        cmd = [sys.executable, "-m", "AbdomenKDSegLib.cli", "segment", str(source), str(target),
               "--device", device, "--threads", str(threads)]
        if backend is not None and cli_backend:
            cmd += ["--backend", backend]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(source), str(target),
               "--device", device, "--threads", str(threads), "--backend", backend or "torch"]
    if variant == "torch-nocl":
        cmd.append("--no-channels-last")
    if model:
        cmd += ["--model", model]
    return cmd


STAGE_RE = re.compile(r"([a-z_]+) ([0-9.]+)s")


def parse_stages(stdout: str) -> dict[str, float]:
    """Seconds per stage from the summary line 'device cpu, backend openvino; seconds: read 0.10s ...'."""
    for line in stdout.splitlines():
        if line.startswith("device ") and "seconds:" in line:
            body = line.split("seconds:", 1)[1].split(";")[0]
            return {k: float(v) for k, v in STAGE_RE.findall(body)}
    return {}


def measure(variant: str, size: str, source: Path, threads: int, args: argparse.Namespace,
            cli_backend: bool, repeat: int) -> dict[str, Any]:
    """Run one variant on one input as a child process; returns the row for the table and JSON."""
    with tempfile.TemporaryDirectory(prefix="akd-bench-") as tmp:
        target = Path(tmp) / "labels.nii.gz"
        cmd = segment_command(variant, source, target, threads, args.device, args.model, cli_backend)
        run = common.run_measured(cmd, env=common.child_env(threads), timeout=args.timeout, min_available_mb=1024)
        out_mb = target.stat().st_size / 2**20 if target.is_file() else None
    stages = parse_stages(run.stdout_tail)
    row: dict[str, Any] = {
        "size": size, "variant": variant, "threads": threads, "repeat": repeat,
        "seconds": run.seconds if run.ok else None, "peak_rss_mb": run.peak_rss_mb,
        "own_maxrss_mb": run.own_maxrss_mb, "tree_peak_rss_mb": run.tree_peak_rss_mb,
        "in_process_s": round(sum(stages.values()), 2) if stages else None,
        "stages_s": stages, "output_mb": out_mb, "ok": run.ok, "command": cmd,
    }
    gpu = re.search(r"GPU peak ([0-9.]+) MiB", run.stdout_tail)
    row["gpu_peak_mb"] = float(gpu.group(1)) if gpu else None
    m = re.search(r"^device (\w+), backend (\w+);", run.stdout_tail, re.M)
    row["device"] = m.group(1) if m else None
    row["backend"] = m.group(2) if m else ("cli-default" if variant == "default" else variant)
    if not run.ok:
        row["error"] = ("killed: machine short of memory" if run.low_memory else "timeout" if run.timed_out
                        else run.stderr_tail[-1500:])
    for key in ("read", "coarse", "fine", "write"):
        row[f"{key}_s"] = stages.get(key)
    return row


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best (fastest) successful run per size against TARGETS."""
    verdicts = []
    for size, (max_s, max_gb) in TARGETS.items():
        done = [r for r in rows if r["size"] == size and r["ok"] and r.get("device") == "cpu"]  # CPU targets
        if not done:
            continue
        best = min(done, key=lambda r: r["seconds"])
        lowest = min(r["peak_rss_mb"] for r in done)
        verdict = {"size": size, "best_variant": best["variant"], "threads": best["threads"],
                   "seconds": best["seconds"], "peak_rss_gb": round(best["peak_rss_mb"] / MIB_PER_GB, 2),
                   "lowest_peak_rss_gb": round(lowest / MIB_PER_GB, 2),
                   "target_seconds": max_s, "target_peak_rss_gb": max_gb}
        verdict["seconds_ok"] = None if max_s is None else best["seconds"] <= max_s
        verdict["memory_ok"] = best["peak_rss_mb"] / MIB_PER_GB <= max_gb
        verdicts.append(verdict)
    return verdicts


# ------------------------------------------------------------------------------------------ profile
def profile_run(size: str, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """cProfile one in-process segmentation (default Predictor options); prints the top functions."""
    import cProfile
    import io
    import pstats

    import torch

    from AbdomenKDSegLib.engine.inference import Predictor, segment_file

    torch.set_num_threads(threads)
    source = common.prepare_input(size)
    predictor = Predictor(args.model, device=args.device)
    with tempfile.TemporaryDirectory(prefix="akd-prof-") as tmp:
        segment_file(common.SAMPLE_CT, Path(tmp) / "warm.nii.gz", predictor=predictor)  # warm-up
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        result = segment_file(source, Path(tmp) / "labels.nii.gz", predictor=predictor)
        profiler.disable()
        seconds = time.perf_counter() - t0
    stem = common.RESULTS / f"segment_speed_profile_{size}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(str(stem.with_suffix(".prof")))
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(35)
    stem.with_suffix(".txt").write_text(text.getvalue())
    print(f"profile of {size} ({predictor.backend}, {threads} threads): {seconds:.1f} s; stages "
          + ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items()))
    print("\n".join(text.getvalue().splitlines()[:60]))
    print(f"full profile: {stem.with_suffix('.prof')} and {stem.with_suffix('.txt')}")
    return {"size": size, "backend": predictor.backend, "threads": threads, "seconds": round(seconds, 2),
            "stages_s": {k: round(v, 3) for k, v in result.timings.items()},
            "prof": str(stem.with_suffix(".prof"))}


# ------------------------------------------------------------------------------------- window bench
def window_bench(args: argparse.Namespace, threads_list: Sequence[int], reps: int) -> list[dict[str, Any]]:
    """Seconds per 96x64x96 student window, in-process, for each backend and thread count.

    Runners are built by the Predictor exactly as in a segmentation; one untimed call each, then
    ``reps`` rounds in which every configuration runs once (interleaved). Returns median rows.
    """
    import statistics

    import torch

    from AbdomenKDSegLib.engine.inference import Predictor
    from AbdomenKDSegLib.runtimes import onnx_backend, openvino_backend

    configs = [("torch", True), ("torch", False)]
    if onnx_backend.available():
        configs.append(("onnx", True))
    if openvino_backend.available():
        configs.append(("openvino", True))
    runners, times = {}, {}
    x = torch.randn(1, 1, 96, 64, 96, generator=torch.Generator().manual_seed(0))
    for threads in threads_list:
        torch.set_num_threads(threads)
        for backend, cl in configs:
            key = (backend if backend != "torch" else f"torch-{'cl' if cl else 'nocl'}", threads)
            pred = Predictor(args.model, device="cpu", backend=backend, channels_last=cl)
            runners[key] = pred.runners["fine"]
            with torch.inference_mode():
                runners[key](x)  # warm-up (and ONNX export or cache read)
            times[key] = []
    for _ in range(reps):
        for (name, threads), run in runners.items():
            torch.set_num_threads(threads)
            with torch.inference_mode():
                t0 = time.perf_counter()
                run(x)
                times[(name, threads)].append(time.perf_counter() - t0)
    rows = [{"config": name, "threads": threads, "median_s": round(statistics.median(ts), 3),
             "min_s": round(min(ts), 3), "runs": len(ts)} for (name, threads), ts in times.items()]
    common.print_table(rows, [("config", "window runner"), ("threads", "threads"),
                              ("median_s", "median s"), ("min_s", "min s"), ("runs", "runs")])
    return rows


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(common.DEFAULT_SIZES),
                        help="'sample' and/or XxYxZ sizes (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="sample CT only")
    parser.add_argument("--variants", nargs="+", default=["default"], choices=VARIANTS)
    parser.add_argument("--threads", nargs="+", type=int, default=None,
                        help="CPU thread counts to try (default: all cores)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per case (default 1)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--model", default=None, help="model bundle (default: the bundled model)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is killed")
    parser.add_argument("--profile", default=None, metavar="SIZE",
                        help="only profile one in-process run on SIZE (cProfile)")
    parser.add_argument("--window-bench", type=int, default=0, metavar="N",
                        help="only time N interleaved rounds of one 96x64x96 window per backend")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "segment_speed.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = ["sample"]
    for size in args.sizes:
        common.parse_size(size)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    args = parse_args(argv)
    import os

    threads_list = args.threads or [os.cpu_count() or 1]
    if args.profile:
        info = profile_run(args.profile, args, threads_list[0])
        common.write_json({"machine": common.machine_info(), "profile": info},
                          args.out.with_name("segment_speed_profile.json"))
        return 0
    if args.window_bench:
        rows = window_bench(args, threads_list, args.window_bench)
        common.write_json({"machine": common.machine_info(), "windows": rows},
                          args.out.with_name("segment_speed_windows.json"))
        return 0
    cli_backend = cli_has_backend_option()
    inputs = {size: common.prepare_input(size) for size in args.sizes}
    machine = common.machine_info()
    print(f"machine: {machine['cpu_count']} CPUs, load {machine['load_average_1_5_15']}, torch "
          f"{machine.get('torch')}; CLI --backend: {'yes' if cli_backend else 'no (child driver)'}")
    combos = [(variant, threads) for variant in args.variants for threads in threads_list]
    if not args.no_warmup:
        for variant, threads in combos:
            warm = measure(variant, "sample", common.SAMPLE_CT, threads, args, cli_backend, 0)
            if not warm["ok"]:
                print(f"warm-up of {variant} failed:\n{warm.get('error')}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for size, source in inputs.items():
        for rep in range(1, args.repeat + 1):
            for variant, threads in combos:  # interleaved, so load changes hit every variant alike
                row = measure(variant, size, source, threads, args, cli_backend, rep)
                rows.append(row)
                status = "ok" if row["ok"] else f"FAILED ({str(row.get('error'))[-300:]})"
                print(f"  {size:>12} {variant:<10} threads {threads}: {common.fmt(row['seconds'])} s, "
                      f"peak {row['peak_rss_mb']:.0f} MiB  {status}", flush=True)
    columns = [("size", "input (XxYxZ)"), ("variant", "variant"), ("backend", "backend"),
               ("threads", "threads"), ("seconds", "seconds"), ("peak_rss_mb", "peak RSS MiB"),
               ("read_s", "read"), ("coarse_s", "coarse"), ("fine_s", "fine"), ("write_s", "write")]
    if any(r.get("gpu_peak_mb") is not None for r in rows):
        columns.insert(6, ("gpu_peak_mb", "GPU peak MiB"))
    print()
    table = common.print_table(rows, columns)
    verdicts = check_targets(rows)
    for v in verdicts:
        s_ok = {None: "n/a", True: "met", False: "MISSED"}[v["seconds_ok"]]
        print(f"target {v['size']}: {v['seconds']} s (<= {v['target_seconds']}: {s_ok}), peak "
              f"{v['peak_rss_gb']} GB (<= {v['target_peak_rss_gb']}: {'met' if v['memory_ok'] else 'MISSED'})")
    report = {
        "benchmark": "segment_speed",
        "description": "wall seconds and peak RSS of one `abdomen-kdseg segment` child process per run",
        "machine": machine,
        "settings": {"sizes": args.sizes, "variants": args.variants, "threads": threads_list,
                     "repeat": args.repeat, "device": args.device, "model": args.model,
                     "cli_has_backend_option": cli_backend},
        "inputs": {size: common.image_summary(p) for size, p in inputs.items()},
        "runs": rows,
        "targets": verdicts,
        "table_markdown": table,
    }
    common.write_json(report, args.out)
    print(f"results -> {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
