"""Accuracy of a model bundle on real CT it never saw (and on a generated held-out split).

    python benchmarks/validate_model.py [--model BUNDLE] [--heldout DATA_DIR/heldout] [--out JSON]

Segments the two validation CTs of ../shared/data (CPU, the default runtime) and scores them with the
FLARE22 rules (DSC, NSD):
  * ct-abdomen-contrast-ircadb01: portal-venous CT, hand labels of liver, kidneys and spleen only
    (every other organ is unlabeled there, so only these four are scored);
  * ct-abdomen-slab-amos0001: a 55 mm slab, hand labels of 11 organs (scored: the organs present).
These two cases are for measuring only: no model of this project is trained on them or on data made
from them. With ``--heldout`` it also scores the generated held-out split (``imagesTs/labelsTs`` from
``abdomen-kdseg make-training-set``; targets never used for training) to show the synthetic-real gap.
Prints a table and writes JSON (default benchmarks/results/default_model_validation.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from AbdomenKDSegLib.engine.bundle import default_bundle_path, load_bundle
from AbdomenKDSegLib.engine.inference import Predictor
from AbdomenKDSegLib.engine.organs import BY_VALUE
from AbdomenKDSegLib.evaluation.metrics import score_images

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
#: Validation case -> label values scored (None: every organ present in the reference).
VALIDATION: Dict[str, Optional[Sequence[int]]] = {
    "ct-abdomen-contrast-ircadb01": (1, 2, 3, 13),
    "ct-abdomen-slab-amos0001": None,
}


def score_case(predictor: Predictor, image_path: Path, label_path: Path,
               organs: Optional[Sequence[int]]) -> Dict:
    """Segment one CT and score the chosen organs; also lists organs predicted where the reference has none."""
    image = sitk.ReadImage(str(image_path))
    started = time.perf_counter()
    pred, info = predictor.predict(image)
    seconds = time.perf_counter() - started
    ref = sitk.ReadImage(str(label_path))
    ref_values = set(np.unique(sitk.GetArrayViewFromImage(ref)).tolist()) - {0}
    values = sorted(organs if organs is not None else ref_values)
    scores = score_images(ref, pred, [BY_VALUE[v] for v in values])
    per_organ = {s.organ.key: {"dsc": round(float(s.dsc), 4), "nsd": round(float(s.nsd), 4)} for s in scores}
    pred_values = set(np.unique(sitk.GetArrayViewFromImage(pred)).tolist()) - {0}
    empty = [BY_VALUE[v].key for v in values if v not in pred_values]
    return {"image": str(image_path), "organs_scored": [BY_VALUE[v].key for v in values],
            "per_organ": per_organ,
            "mean_dsc": round(float(np.nanmean([s.dsc for s in scores])), 4),
            "mean_nsd": round(float(np.nanmean([s.nsd for s in scores])), 4),
            "empty_organs": empty, "seconds": round(seconds, 2), "backend": getattr(info, "backend", None)}


def validate(model: Path, heldout: Optional[Path] = None, threads: Optional[int] = None) -> Dict:
    """Scores of ``model`` on the validation CTs (and the held-out split); see the module docstring."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    predictor = Predictor(load_bundle(model), device="cpu")
    report: Dict = {"model": str(model), "validation": {}, "heldout_synthetic": {}}
    for case, organs in VALIDATION.items():
        folder = DATA / case
        report["validation"][case] = score_case(predictor, folder / "image.nii.gz",
                                                folder / "labels-flare13.nii.gz", organs)
    if heldout is not None:
        report["heldout_synthetic"] = score_heldout(predictor, heldout)
        if report["heldout_synthetic"]:
            report["heldout_synthetic_mean"] = _mean_per_organ(list(report["heldout_synthetic"].values()))
    return report


def score_heldout(predictor: Predictor, heldout: Path) -> Dict[str, Dict]:
    """Scores of every case of a generated held-out split (``heldout/imagesTs``, ``heldout/labelsTs``), by case name."""
    scores = {}
    for image in sorted((heldout / "imagesTs").glob("*_0000.nii.gz")):
        name = image.name[: -len("_0000.nii.gz")]
        scores[name] = score_case(predictor, image, heldout / "labelsTs" / f"{name}.nii.gz", None)
    return scores


def _mean_per_organ(cases: List[Dict]) -> Dict[str, float]:
    """Mean DSC per organ over the cases, and of the cases' means. The FLARE rules give NaN where an
    organ cannot be scored (a tubular organ on a single slice of a slab): such entries are skipped."""
    per: Dict[str, List[float]] = {}
    for case in cases:
        for organ, s in case["per_organ"].items():
            if not np.isnan(s["dsc"]):
                per.setdefault(organ, []).append(s["dsc"])
    out = {organ: round(float(np.mean(v)), 4) for organ, v in per.items()}
    out["mean"] = round(float(np.nanmean([c["mean_dsc"] for c in cases])), 4)
    return out


def print_report(report: Dict, stream=sys.stdout) -> None:  # noqa: ANN001
    for case, res in report["validation"].items():
        print(f"\n{case} (validation, never trained on): mean DSC {res['mean_dsc']:.3f} over "
              f"{len(res['organs_scored'])} organs, {res['seconds']:.1f} s", file=stream)
        for organ, s in res["per_organ"].items():
            print(f"  {organ:<22} DSC {s['dsc']:.3f}  NSD {s['nsd']:.3f}", file=stream)
        if res["empty_organs"]:
            print(f"  empty: {', '.join(res['empty_organs'])}", file=stream)
    if report.get("heldout_synthetic_mean"):
        print(f"\ngenerated held-out split ({len(report['heldout_synthetic'])} cases): mean DSC "
              f"{report['heldout_synthetic_mean']['mean']:.3f}", file=stream)
        for organ, v in report["heldout_synthetic_mean"].items():
            if organ != "mean":
                print(f"  {organ:<22} DSC {v:.3f}", file=stream)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="bundle (default: the bundled model)")
    parser.add_argument("--heldout", type=Path, default=None, help="the generator's heldout/ folder")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "default_model_validation.json")
    args = parser.parse_args()
    report = validate(args.model or default_bundle_path(), args.heldout, args.threads)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
