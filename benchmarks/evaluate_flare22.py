"""Time ``evaluate`` (FLARE22 DSC + NSD, 13 organs) on the 50 FLARE22 training label maps; writes JSON.

Each reference label map is scored against a perturbed copy of itself so the surface distances are
not trivial: the whole map shifted by one axial slice (numpy axis 0; 2.5-5 mm, more than the 2 mm
tolerance of the small organs) and one organ (organ number ``case index % 13 + 1``) eroded by one voxel
(6-neighbourhood). The copies are written as .nii.gz to a
temporary folder first (not timed); the timed part is :func:`AbdomenKDSegLib.evaluation.evaluate.evaluate` on the
two folders, reading included.

Usage: python benchmarks/evaluate_flare22.py [--workers N] [--cases N] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AbdomenKDSegLib.engine.organs import ORGANS
from AbdomenKDSegLib.evaluation.evaluate import evaluate, format_summary

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT.parent / "shared" / "data" / "flare22-labels"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "evaluate_flare22.json"


def erode6(mask: np.ndarray) -> np.ndarray:
    """One-voxel erosion of a (Z, Y, X) boolean mask with the 6-neighbourhood."""
    p = np.pad(mask, 1)
    out = mask.copy()
    for axis in range(3):
        for step in (-1, 1):
            out &= np.roll(p, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return out


def perturb(labels: np.ndarray, organ_value: int) -> np.ndarray:
    """Shift the map by one slice along numpy axis 0 (zero fill) and erode one organ by one voxel."""
    out = np.zeros_like(labels)
    out[1:] = labels[:-1]
    organ = out == organ_value
    out[organ & ~erode6(organ)] = 0
    return out


def prepare(files: list[Path], folder: Path) -> None:
    """Write each perturbed copy to ``folder`` (nnU-Net style name ``<case>_0000.nii.gz``)."""
    for i, path in enumerate(files):
        image = sitk.ReadImage(str(path))
        pred = sitk.GetImageFromArray(perturb(sitk.GetArrayFromImage(image), i % 13 + 1))
        pred.CopyInformation(image)
        sitk.WriteImage(pred, str(folder / path.name.replace(".nii.gz", "_0000.nii.gz")), True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--cases", type=int, default=50, help="use the first N label maps (default 50)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    files = sorted(LABELS.glob("FLARE22_Tr_*.nii.gz"))[: args.cases]
    if not files:
        raise SystemExit(f"no label maps in {LABELS}")
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        ref_dir, pred_dir = Path(tmp) / "ref", Path(tmp) / "pred"
        ref_dir.mkdir()
        pred_dir.mkdir()
        for path in files:
            os.symlink(path, ref_dir / path.name)
        t0 = time.perf_counter()
        prepare(files, pred_dir)
        prepare_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = evaluate(pred_dir, ref_dir, workers=args.workers, progress=True)
        total_s = time.perf_counter() - t0

    print(format_summary(result.summary))
    print()
    n = len(files)
    print(f"{'cases':<22}{n:>10}")
    print(f"{'workers':<22}{args.workers:>10}")
    print(f"{'seconds total':<22}{total_s:>10.1f}")
    print(f"{'seconds per case':<22}{total_s / n:>10.2f}")
    print(f"{'(preparing copies)':<22}{prepare_s:>10.1f}")

    overall = result.summary[-1]
    report = {
        "benchmark": "evaluate_flare22",
        "cases": n,
        "workers": args.workers,
        "seconds_total": round(total_s, 2),
        "seconds_per_case": round(total_s / n, 3),
        "seconds_preparing_copies": round(prepare_s, 2),
        "perturbation": "shift 1 slice along numpy axis 0 + one organ (index % 13 + 1) eroded 1 voxel",
        "mean_dsc": round(overall.dsc_mean, 4),
        "mean_nsd": round(overall.nsd_mean, 4),
        "per_organ": {r.organ.key: {"dsc": round(r.dsc_mean, 4), "nsd": round(r.nsd_mean, 4)}
                      for r in result.summary if r.organ is not None},
        "organs": len(ORGANS),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
