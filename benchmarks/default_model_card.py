"""Finish a trained run into the shipped default model: measure it, write its model card, install it.

    python benchmarks/default_model_card.py RUN_DIR [--install]

Segments the sample CT (../shared/data/ct-abdomen-3mm) with RUN_DIR/model.safetensors, scores it
with the FLARE22 metrics against that CT's reference labels, reads the training time from the run's
epoch logs, and writes the figures into the bundle's model card. The sample CT is the *training*
case of the default model, so its scores measure fitting, not generalisation; the card says so, and
says that no held-out labeled CT was available to measure generalisation. With ``--install`` the
bundle is written (float16 storage) to AbdomenKDSeg/Resources/Models/abdomen-kdseg-default.safetensors.
Prints a table and writes benchmarks/results/default_model.json (``--out``).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
import torch

from AbdomenKDSegLib.bundle import default_bundle_path, load_bundle, save_bundle
from AbdomenKDSegLib.inference import segment_file
from AbdomenKDSegLib.metrics import score_images
from AbdomenKDSegLib.networks import NetworkConfig

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ct-abdomen-3mm"


def training_seconds(run: Path) -> dict[str, float]:
    """Wall-clock seconds of each stage, summed from RUN/<stage>/epochs.csv."""
    out = {}
    for stage in ("coarse", "fine"):
        with open(run / stage / "epochs.csv") as f:
            out[stage] = round(sum(float(row["seconds"]) for row in csv.DictReader(f)), 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--install", action="store_true")
    parser.add_argument("--recipe", default="cpu_default", help="name of the recipe the run used (for the card)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "default_model.json")
    args = parser.parse_args()
    bundle = load_bundle(args.run / "model.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = segment_file(DATA / "image.nii.gz", Path(tmp) / "pred.nii.gz", model=bundle, device="cpu")
        seconds = time.perf_counter() - started
        scores = score_images(sitk.ReadImage(str(DATA / "labels-flare13.nii.gz")),
                              sitk.ReadImage(str(result.output_path)))
    per_organ = {s.organ.key: {"dsc": round(float(s.dsc), 4), "nsd": round(float(s.nsd), 4)} for s in scores}
    present = [s for s in scores if s.organ.value != 10]  # esophagus is absent from the reference labels
    mean_dsc = sum(float(s.dsc) for s in present) / len(present)
    card = dict(bundle.metadata)
    card["training"] = {**card.get("training", {}), "seconds_per_stage": training_seconds(args.run),
                        "hardware": f"{platform.processor() or platform.machine()}, "
                                    f"{torch.get_num_threads()} CPU threads, no GPU"}
    unlabeled = ", ".join(card.get("data", {}).get("unlabeled_cases", [])) or "none"
    card["data"] = {
        **card.get("data", {}),
        "description": "1 labeled CT: ../shared/data/ct-abdomen-3mm (TotalSegmentator test CT, 3 mm, labels "
                       "from TotalSegmentator renumbered to FLARE22, esophagus absent); unlabeled cases "
                       f"({unlabeled}): the 20-slice DICOM series ct-upper-abdomen-dicom and crops of the "
                       "labeled CT (see the README's 'Default model')",
    }
    card["metrics"] = {
        "training_case": {"case": "ct-abdomen-3mm (the training case: measures fitting only)",
                          "per_organ": per_organ, "mean_dsc_12_present_organs": round(mean_dsc, 4)},
        "held_out": "not measured: no labeled CT other than the training case is available",
    }
    card["description"] = (f"CPU demonstration model (recipe {args.recipe}, the paper's method, shortened): "
                           "trained on ONE labeled CT; not for clinical or research use; train your own with a GPU")
    report = {"bundle": str(args.run / "model.safetensors"), "segment_seconds_cpu": round(seconds, 2),
              "timings": {k: round(v, 2) for k, v in result.timings.items()}, **card["metrics"],
              "training": card["training"]}
    print(f"{'organ':<22}{'DSC':>8}{'NSD':>8}   (training case: fitting, not generalisation)")
    for key, value in per_organ.items():
        print(f"{key:<22}{value['dsc']:>8.3f}{value['nsd']:>8.3f}")
    print(f"mean DSC over the 12 present organs: {mean_dsc:.3f}; "
          f"training seconds {card['training']['seconds_per_stage']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    if args.install:
        arch = card["architecture"]
        target = save_bundle(default_bundle_path(), bundle.coarse, bundle.fine, NetworkConfig.from_dict(arch["coarse"]),
                             NetworkConfig.from_dict(arch["fine"]), card, dtype=torch.float16)
        print(f"installed {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
