"""Seconds per training iteration (S + T1 + T2, one SGD step) and the parameter count of the recipe.

Each recipe runs in its own child process (peak memory measured by benchmarks/common.py). An
iteration = load a cached 96^3 coarse case, augmentation "v4", forward of every network, the losses
of the recipe, backward and the SGD step; labeled and unlabeled iterations alternate like in training.
The full-width recipe (``proposed``: teachers of 92 M parameters each) is slow on a CPU, so it runs
one iteration by default; the CPU recipes (``cpu_proposed``, ``cpu_default``) run a few. Data: the
real 3 mm sample CT and its labels (labeled) and a flipped crop of it (unlabeled), coarse-cached
under benchmarks/data-cache.

Usage: python benchmarks/training_speed.py [--device cpu] [--threads 2]
         [--recipes proposed:1 cpu_proposed:3 cpu_default:3] [--out benchmarks/results/training_speed.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DATA_CACHE,
    RESULTS,
    SAMPLE_CT,
    child_env,
    machine_info,
    print_table,
    run_measured,
    write_json,
)

PAPER_TRAINING_PARAMS_M = 189.3
LABELS = SAMPLE_CT.parent / "labels-flare13.nii.gz"


def prepare_data(root: Path) -> Path:
    """A training data folder with the sample CT (labeled) and a flipped crop of it (unlabeled)."""
    import SimpleITK as sitk

    if (root / "unlabeled" / "flipcrop_0000.nii.gz").is_file():
        return root
    for sub in ("imagesTr", "labelsTr", "unlabeled"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(SAMPLE_CT))
    sitk.WriteImage(image, str(root / "imagesTr" / "ct3mm_0000.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(LABELS)), str(root / "labelsTr" / "ct3mm.nii.gz"))
    sitk.WriteImage(sitk.Flip(image, [True, False, False])[:, 10:90, 5:100],
                    str(root / "unlabeled" / "flipcrop_0000.nii.gz"))
    return root


def worker(recipe_name: str, iterations: int, device: str, threads: int) -> dict:
    """Time ``iterations`` training iterations of ``recipe_name`` (coarse stage); returns a result dict."""
    import torch

    from AbdomenKDSegLib.engine.networks import count_parameters
    from AbdomenKDSegLib.training.cli import resolve_recipe_path
    from AbdomenKDSegLib.training.data import build_coarse_cache, find_cases
    from AbdomenKDSegLib.training.losses import loss_weights
    from AbdomenKDSegLib.training.recipe import load_recipe
    from AbdomenKDSegLib.training.trainer import StageTrainer

    torch.set_num_threads(threads)
    recipe = load_recipe(resolve_recipe_path(recipe_name))
    files = find_cases(prepare_data(DATA_CACHE / "training-data"))
    cases = build_coarse_cache(list(files.labeled + files.unlabeled), DATA_CACHE / "training-cache", recipe)
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = StageTrainer("coarse", recipe, cases[:1], cases[1:], Path(tmp), dev, progress=False)
        params = {role: count_parameters(net) for role, net in trainer.nets.items()}
        weights = loss_weights(recipe, 500, recipe.stage_epochs("coarse"))  # mid-run weights: all terms on
        rows = []
        for i in range(iterations):
            kind = "labeled" if i % 2 == 0 or not trainer.variant.unlabeled else "unlabeled"
            t0 = time.perf_counter()
            x, target = trainer.load_batch(kind, [0])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            total, _ = trainer.optimize(x, target, weights)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            rows.append({"kind": kind, "augment_s": round(t1 - t0, 3), "step_s": round(t2 - t1, 3),
                         "iteration_s": round(t2 - t0, 3), "loss": total})
    timed = rows[1:] if len(rows) > 2 else rows  # the first iteration warms up when there are several
    return {
        "recipe": recipe_name, "variant": recipe.variant, "device": str(dev), "threads": threads,
        "amp": bool(recipe.amp and dev.type == "cuda"),
        "params": params, "params_total": sum(params.values()),
        "patch_zyx": list(recipe.patch_size), "iterations": rows,
        "mean_iteration_s": round(sum(r["iteration_s"] for r in timed) / len(timed), 3),
        "mean_augment_s": round(sum(r["augment_s"] for r in timed) / len(timed), 3),
        "epochs_per_stage": recipe.epochs,
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else None,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["proposed:1", "cpu_proposed:3", "cpu_default:3"],
                        help="RECIPE:ITERATIONS items (recipe name or YAML path)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per recipe")
    parser.add_argument("--out", type=Path, default=RESULTS / "training_speed.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.iterations, args.device, args.threads)))
        return 0

    results = []
    for item in args.recipes:
        name, _, n = item.partition(":")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--iterations", n or "1",
               "--device", args.device, "--threads", str(args.threads)]
        run = run_measured(cmd, env=child_env(args.threads), timeout=args.timeout)
        line = [s for s in run.stdout_tail.splitlines() if s.startswith("RESULT ")]
        if not run.ok or not line:
            print(f"{name}: failed (rc {run.returncode}, timed out {run.timed_out})\n{run.stderr_tail}",
                  file=sys.stderr)
            results.append({"recipe": name, "failed": True, "stderr_tail": run.stderr_tail})
            continue
        res = json.loads(line[-1][len("RESULT "):])
        res["peak_rss_mb"] = run.peak_rss_mb
        res["wall_s"] = run.seconds
        results.append(res)

    table = []
    for r in results:
        if r.get("failed"):
            table.append({"recipe": r["recipe"]})
            continue
        p = r["params"]
        table.append({
            "recipe": r["recipe"], "device": r["device"], "threads": r["threads"],
            "S_M": p.get("S", 0) / 1e6 if "S" in p else None, "T1_M": p.get("T1", 0) / 1e6,
            "T2_M": p.get("T2", 0) / 1e6, "total_M": r["params_total"] / 1e6, "paper_M": PAPER_TRAINING_PARAMS_M,
            "iters": len(r["iterations"]), "s_per_iter": r["mean_iteration_s"], "augment_s": r["mean_augment_s"],
            "peak_gb": r["peak_rss_mb"] / 1024,
            "gpu_gb": r["gpu_peak_mb"] / 1024 if r.get("gpu_peak_mb") is not None else None,
        })
    print_table(table, [("recipe", "recipe"), ("device", "device"), ("threads", "threads"),
                        ("S_M", "S (M params)"), ("T1_M", "T1 (M)"), ("T2_M", "T2 (M)"),
                        ("total_M", "S+T1+T2 (M)"), ("paper_M", "paper (M)"), ("iters", "iterations"),
                        ("s_per_iter", "s / iteration"), ("augment_s", "of which augment s"),
                        ("peak_gb", "peak RSS GB")]
                + ([("gpu_gb", "GPU peak GB")] if any(t.get("gpu_gb") is not None for t in table) else []))
    write_json({"benchmark": "training_speed", "machine": machine_info(),
                "paper_training_params_M": PAPER_TRAINING_PARAMS_M, "results": results}, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
