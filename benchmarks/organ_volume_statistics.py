"""Organ-volume reference statistics from the 50 FLARE22 training label maps (run once, result shipped).

For each of the 13 organs and each label map: the volume (mL) and the craniocaudal extent (mm, the
slices that hold the organ times the slice spacing, along the image axis closest to the patient's
superior axis). Writes the percentiles (1, 5, 50, 95, 99) of both, with min, max and the case count,
to ``AbdomenKDSeg/Resources/Statistics/flare22-organ-volumes.json``, which
:mod:`AbdomenKDSegLib.engine.organ_statistics` reads to flag implausible organ volumes.

Only the FLARE22 training labels are read (``../shared/data/flare22-labels``); the validation
cases are never used.

    .venv/bin/python benchmarks/organ_volume_statistics.py [--labels DIR] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AbdomenKDSegLib.engine.organ_statistics import PERCENTILES, STATISTICS_PATH, superior_axis
from AbdomenKDSegLib.engine.organs import ORGANS

REPO = Path(__file__).resolve().parents[1]
LABELS = REPO.parent / "shared" / "data" / "flare22-labels"


def case_measurements(path: Path) -> dict[int, tuple[float, float]]:
    """Organ value -> (volume mL, craniocaudal extent mm) of one label map."""
    image = sitk.ReadImage(str(path))
    labels = sitk.GetArrayViewFromImage(image)  # (z, y, x)
    spacing = image.GetSpacing()
    voxel_ml = float(np.prod(spacing)) / 1000.0
    axis = superior_axis(image.GetDirection())  # ITK index axis (x=0, y=1, z=2)
    numpy_axis = 2 - axis
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(ORGANS) + 1)
    out = {}
    for organ in ORGANS:
        if counts[organ.value] == 0:
            continue
        other = tuple(a for a in range(3) if a != numpy_axis)
        present = np.flatnonzero((labels == organ.value).any(axis=other))
        extent = (int(present[-1]) - int(present[0]) + 1) * float(spacing[axis])
        out[organ.value] = (counts[organ.value] * voxel_ml, extent)
    return out


def summarize(values: list[float]) -> dict[str, float]:
    """Percentiles (``p1`` ... ``p99``), min and max of ``values``, rounded."""
    array = np.asarray(values, dtype=np.float64)
    out = {f"p{p}": round(float(np.percentile(array, p)), 2) for p in PERCENTILES}
    out.update(min=round(float(array.min()), 2), max=round(float(array.max()), 2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=Path, default=LABELS, help="folder of FLARE22 label maps")
    parser.add_argument("--out", type=Path, default=STATISTICS_PATH, help="JSON file to write")
    args = parser.parse_args(argv)
    files = sorted(args.labels.glob("FLARE22_Tr_*.nii.gz"))
    if not files:
        print(f"error: no FLARE22_Tr_*.nii.gz in {args.labels}", file=sys.stderr)
        return 1
    volumes: dict[int, list[float]] = {o.value: [] for o in ORGANS}
    extents: dict[int, list[float]] = {o.value: [] for o in ORGANS}
    for path in files:
        for value, (ml, mm) in case_measurements(path).items():
            volumes[value].append(ml)
            extents[value].append(mm)
        print(f"{path.name}: done", file=sys.stderr)
    organs = {}
    for organ in ORGANS:
        if not volumes[organ.value]:
            continue
        organs[organ.key] = {"value": organ.value, "name": organ.name, "cases": len(volumes[organ.value]),
                             "volume_ml": summarize(volumes[organ.value]),
                             "extent_mm": summarize(extents[organ.value])}
    report = {
        "source": "FLARE22 training label maps (hand-drawn), " + ", ".join(f.name for f in files[:1])
                  + f" ... {files[-1].name}",
        "cases": len(files),
        "volume": "voxel count x voxel volume, mL",
        "extent": "craniocaudal extent: slices holding the organ x slice spacing, mm",
        "percentiles": list(PERCENTILES),
        "organs": organs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"{len(files)} label maps -> {args.out}")
    for key, entry in organs.items():
        v = entry["volume_ml"]
        print(f"{key:<22} p1 {v['p1']:>8.1f}  p50 {v['p50']:>8.1f}  p99 {v['p99']:>8.1f} mL   "
              f"extent p50 {entry['extent_mm']['p50']:.0f} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
