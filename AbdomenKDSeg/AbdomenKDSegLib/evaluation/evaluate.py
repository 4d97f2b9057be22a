"""Evaluate predicted label maps against reference label maps: FLARE22 DSC and NSD per case and organ.

Inputs are either two label files or two folders. Folders are matched by case id: the file name without
its extension (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``) and without a trailing nnU-Net
channel suffix ``_0000``, so ``case_0000.nii.gz`` and ``case.nii.gz`` are the same case. The reference
folder defines the cases. A reference case without prediction is an error naming the missing cases,
unless ``missing_as_zero`` is set, in which case it scores 0 (DSC and NSD) for every organ, the
challenge convention for a failed case. Predictions without reference are ignored with a warning.
A prediction whose size, spacing, origin or direction differs from its reference is an error naming
the case. A label map (prediction or reference) must hold whole numbers 0..13: a non-integer image
(a CT in float HU, a probability map) or values outside the organ labels (a CT's HU values) is an
error naming the file and the values. Scores follow :mod:`AbdomenKDSegLib.evaluation.metrics` (spacing from the
reference header). Output CSVs are checked before anything is read: their folder must exist (none is
created), and they must not be folders or input label maps.

Summary: per organ, mean and population standard deviation (ddof=0) over cases, ignoring NaN (only the
single-slice tubular case of the official rules gives NaN) with ``n`` the number of cases counted; the
last row is the mean over organs (the FLARE22 headline figure): mean and std over cases of each case's
mean over its organs.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from ..engine.image_io import case_id
from ..engine.organs import ORGANS, Organ
from ..errors import InputError
from .metrics import score_label_maps

LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: Geometry tolerances: spacing and origin in mm, direction cosines unitless.
SPACING_TOL_MM = 1e-3
ORIGIN_TOL_MM = 1e-3
DIRECTION_TOL = 1e-4


@dataclass(frozen=True)
class CaseScore:
    """DSC and NSD of one organ in one case (floats in 0..1; NaN only in the single-slice tubular case)."""

    case: str
    organ: Organ
    dsc: float
    nsd: float


@dataclass(frozen=True)
class OrganSummary:
    """Mean and population std over cases of one organ (``organ`` None: the mean over organs)."""

    organ: Optional[Organ]
    n: int
    dsc_mean: float
    dsc_std: float
    nsd_mean: float
    nsd_std: float


@dataclass(frozen=True)
class CasePair:
    """One case to evaluate; ``pred`` is None for a missing prediction."""

    case: str
    pred: Optional[Path]
    ref: Path


@dataclass(frozen=True)
class EvaluationResult:
    """Per case and organ scores (cases sorted, organs in label order), the summary, and missing cases."""

    scores: list[CaseScore]
    summary: list[OrganSummary]
    missing: list[str]


# ----------------------------------------------------------------------------------------------------
# Cases and files


def _is_label_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(LABEL_SUFFIXES)


def list_cases(folder: Path) -> dict[str, Path]:
    """Label files of a folder by case id; raises InputError if two files map to one case."""
    cases: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if not _is_label_file(path):
            continue
        cid = case_id(path)
        if cid in cases:
            raise InputError(f"{folder}: files {cases[cid].name} and {path.name} are both case {cid!r}")
        cases[cid] = path
    return cases


def pair_cases(pred: Path, ref: Path, missing_as_zero: bool = False) -> list[CasePair]:
    """Cases to evaluate for a file pair or two folders (see module docstring for the matching rules)."""
    pred, ref = Path(pred), Path(ref)
    for path, what in ((pred, "prediction"), (ref, "reference")):
        if not path.exists():
            raise InputError(f"{what} path does not exist: {path}")
    if pred.is_file() and ref.is_file():
        return [CasePair(case_id(ref), pred, ref)]
    if not (pred.is_dir() and ref.is_dir()):
        raise InputError(f"give two label files or two folders, got prediction {pred} and reference {ref}")
    preds, refs = list_cases(pred), list_cases(ref)
    if not refs:
        raise InputError(f"no label files ({', '.join(LABEL_SUFFIXES)}) in reference folder {ref}")
    missing = sorted(set(refs) - set(preds))
    if missing and not missing_as_zero:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise InputError(f"{len(missing)} reference case(s) have no prediction in {pred}: {shown} "
                         "(use --missing-as-zero to score them 0)")
    extra = sorted(set(preds) - set(refs))
    if extra:
        print(f"warning: ignoring {len(extra)} prediction(s) without reference: {', '.join(extra[:10])}",
              file=sys.stderr)
    return [CasePair(cid, preds.get(cid), refs[cid]) for cid in sorted(refs)]


def read_label_map(path: Path) -> sitk.Image:
    """Read a 3D scalar label map; raises InputError naming the file if it is unreadable or not one."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read label map {path}: {str(exc).strip().splitlines()[-1]}") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a 3D scalar label map, got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    return image


#: The label values a FLARE22 label map may hold (0 background, 1..13 the organs).
MAX_LABEL = max(organ.value for organ in ORGANS)
_LISTED_VALUES = 5  # at most this many distinct bad values are listed one by one


def _values_text(values: np.ndarray) -> str:
    """``"value 14"``, ``"values 14, 255"`` for a few distinct values, ``"values -1024..1567"`` for many."""
    values = values.astype(np.int64) if np.issubdtype(values.dtype, np.floating) else values  # whole numbers
    lo, hi = int(values.min()), int(values.max())
    if values.size <= 1_000_000 or hi - lo < 1000:
        distinct = np.unique(values)
        if distinct.size <= _LISTED_VALUES:
            shown = ", ".join(str(v) for v in distinct.tolist())
            return f"value{'s' if distinct.size > 1 else ''} {shown}"
    return f"values {lo}..{hi}"


def check_label_values(array: np.ndarray, path: Path, what: str = "label map") -> np.ndarray:
    """``array`` if it holds only whole numbers 0..13 (a float or boolean array converted to uint8);
    else InputError naming the file and the offending values (e.g. a CT given instead of a label map)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    floating = not np.issubdtype(array.dtype, np.integer)
    if floating:
        if not np.isfinite(array).all():
            raise InputError(f"{what} {path} is not a label map: it holds NaN or infinite values "
                             f"(a label map holds the organ labels 0..{MAX_LABEL})")
        fractional = array[np.rint(array) != array]
        if fractional.size:
            raise InputError(f"{what} {path} is not a label map: its voxels hold non-integer values "
                             f"(e.g. {float(fractional.flat[0]):g}; a label map holds the organ labels "
                             f"0..{MAX_LABEL}): is this a CT or a probability map instead of a label map?")
    if array.min() < 0 or array.max() > MAX_LABEL:
        bad = array[(array < 0) | (array > MAX_LABEL)]
        looks_like_ct = bad.min() < 0 or bad.max() > 255
        hint = ("is this a CT instead of a label map?" if looks_like_ct else
                f"is it labelled with another scheme? (this tool scores the FLARE22 labels 1..{MAX_LABEL})")
        values = _values_text(bad)
        verb = "are" if values.startswith("values") else "is"
        raise InputError(f"{what} {path}: {values} {verb} outside the organ labels 0..{MAX_LABEL}: {hint}")
    return array.astype(np.uint8) if floating else array


def _label_array(image: sitk.Image, path: Path, what: str = "label map") -> np.ndarray:
    """(Z, Y, X) integer array of a label image (a view while ``image`` lives), checked by
    :func:`check_label_values`."""
    return check_label_values(sitk.GetArrayViewFromImage(image), path, what)


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(x), 6) for x in values)


def check_geometry(ref: sitk.Image, pred: sitk.Image, case: str) -> None:
    """Raise InputError naming ``case`` if the prediction's grid differs from the reference's."""
    problems = []
    if ref.GetSize() != pred.GetSize():
        problems.append(f"size {pred.GetSize()} vs reference {ref.GetSize()}")
    checks = (("spacing", ref.GetSpacing(), pred.GetSpacing(), SPACING_TOL_MM),
              ("origin", ref.GetOrigin(), pred.GetOrigin(), ORIGIN_TOL_MM),
              ("direction", ref.GetDirection(), pred.GetDirection(), DIRECTION_TOL))
    for name, a, b, tol in checks:
        if not np.allclose(a, b, rtol=0, atol=tol):
            problems.append(f"{name} {_rounded(b)} vs reference {_rounded(a)}")
    if problems:
        details = "; ".join(problems)
        raise InputError(f"case {case}: prediction geometry differs from the reference: {details}")


# ----------------------------------------------------------------------------------------------------
# Scoring


def evaluate_case(pair: CasePair, organs: Sequence[Organ] = ORGANS) -> list[CaseScore]:
    """FLARE22 DSC and NSD of each organ for one case (all 0 for a missing prediction)."""
    if pair.pred is None:
        return [CaseScore(pair.case, organ, 0.0, 0.0) for organ in organs]
    ref = read_label_map(pair.ref)
    pred = read_label_map(pair.pred)
    check_geometry(ref, pred, pair.case)
    spacing_zyx = ref.GetSpacing()[::-1]
    ref_labels = _label_array(ref, pair.ref, "reference")
    pred_labels = _label_array(pred, pair.pred, "prediction")
    scores = score_label_maps(ref_labels, pred_labels, spacing_zyx, organs)
    return [CaseScore(pair.case, s.organ, s.dsc, s.nsd) for s in scores]


def _init_worker() -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _score_all(pairs: list[CasePair], organs: Sequence[Organ], workers: int,
               progress: bool) -> list[CaseScore]:
    bar = tqdm(total=len(pairs), desc="evaluate", unit="case", disable=not progress, file=sys.stderr)
    results: list[list[CaseScore]] = []
    try:
        if workers <= 1:
            for pair in pairs:
                results.append(evaluate_case(pair, organs))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
                for scores in pool.map(evaluate_case, pairs, [organs] * len(pairs)):
                    results.append(scores)
                    bar.update()
    finally:
        bar.close()
    return [score for case_scores in results for score in case_scores]


def _mean_std(values: list[float]) -> tuple[int, float, float]:
    finite = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return 0, math.nan, math.nan
    return int(finite.size), float(finite.mean()), float(finite.std())


def summarize(scores: Sequence[CaseScore], organs: Sequence[Organ] = ORGANS) -> list[OrganSummary]:
    """Per-organ mean and std over cases (NaN ignored), then a row (organ None) over organs.

    That last row gives the mean and std over cases of each case's mean over organs; without NaN its
    mean equals the mean of the per-organ means.
    """
    rows = []
    for organ in organs:
        mine = [s for s in scores if s.organ.value == organ.value]
        n, dsc_mean, dsc_std = _mean_std([s.dsc for s in mine])
        _, nsd_mean, nsd_std = _mean_std([s.nsd for s in mine])
        rows.append(OrganSummary(organ, n, dsc_mean, dsc_std, nsd_mean, nsd_std))
    case_dsc, case_nsd = _case_means(scores)
    n, dsc_all, dsc_all_std = _mean_std(case_dsc)
    _, nsd_all, nsd_all_std = _mean_std(case_nsd)
    rows.append(OrganSummary(None, n, dsc_all, dsc_all_std, nsd_all, nsd_all_std))
    return rows


def _case_means(scores: Sequence[CaseScore]) -> tuple[list[float], list[float]]:
    """Per case, the mean over organs of DSC and of NSD (NaN ignored)."""
    by_case: dict[str, list[CaseScore]] = {}
    for s in scores:
        by_case.setdefault(s.case, []).append(s)
    dsc = [_mean_std([s.dsc for s in rows])[1] for rows in by_case.values()]
    nsd = [_mean_std([s.nsd for s in rows])[1] for rows in by_case.values()]
    return dsc, nsd


def evaluate(pred: Path, ref: Path, organs: Sequence[Organ] = ORGANS, workers: int = 1,
             missing_as_zero: bool = False, progress: bool = True) -> EvaluationResult:
    """Evaluate a prediction file/folder against a reference file/folder; see the module docstring."""
    pairs = pair_cases(pred, ref, missing_as_zero)
    scores = _score_all(pairs, list(organs), max(1, int(workers)), progress)
    missing = [p.case for p in pairs if p.pred is None]
    return EvaluationResult(scores, summarize(scores, organs), missing)


# ----------------------------------------------------------------------------------------------------
# Output


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.6f}"


def format_summary(summary: Sequence[OrganSummary]) -> str:
    """Plain-text table: organ, n, DSC mean ± std, NSD mean ± std (the last row: mean over organs)."""
    lines = [f"{'Organ':<22}{'n':>5}  {'DSC mean ± std':<18}  {'NSD mean ± std':<18}"]
    for row in summary:
        name = row.organ.name if row.organ is not None else "Mean over organs"
        dsc = f"{row.dsc_mean:.4f} ± {row.dsc_std:.4f}"
        nsd = f"{row.nsd_mean:.4f} ± {row.nsd_std:.4f}"
        lines.append(f"{name:<22}{row.n:>5}  {dsc:<18}  {nsd:<18}")
    return "\n".join(lines)


def _input_files(path: Path) -> list[Path]:
    """The label files an evaluation reads: ``path`` itself, or the label files of a folder."""
    path = Path(path)
    if path.is_dir():
        return [p for p in path.iterdir() if _is_label_file(p)]
    return [path] if path.exists() else []


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_output_file(path: Path, inputs: Sequence[Path] = (), option: str = "output file") -> Path:
    """Raise InputError unless ``path`` can be written as a new or replaced file: its folder exists
    (no folder is created), it is not a folder, it is writable, and it is none of the label files read
    from ``inputs`` (files or folders). Returns ``path``. Cheap: run it before computing anything."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name, e.g. {path / 'scores.csv'}")
    parent = path.parent
    if not parent.exists():
        raise InputError(f"{option} {path}: the folder {parent} does not exist (evaluate creates no folders: "
                         "check the path, or create the folder first)")
    if not parent.is_dir():
        raise InputError(f"{option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{option} {path}: no permission to write there")
    if path.exists() and not path.is_file():
        raise InputError(f"{option} {path} exists and is not a regular file")
    for source in inputs:
        for label_file in _input_files(Path(source)):
            if _same_file(path, label_file):
                raise InputError(f"{option} {path} is the input label map {label_file}: writing the scores "
                                 "there would destroy it; give another file name")
    return path


def write_scores_csv(scores: Sequence[CaseScore], path: Path) -> None:
    """CSV with columns case, organ (key), value (label), dsc, nsd; one row per case and organ.

    The folder of ``path`` must exist (InputError otherwise; no folder is created)."""
    path = check_output_file(Path(path))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "organ", "value", "dsc", "nsd"])
        for s in scores:
            writer.writerow([s.case, s.organ.key, s.organ.value, _fmt(s.dsc), _fmt(s.nsd)])


def summary_csv_path(scores_csv: Path) -> Path:
    """``results.csv`` -> ``results_summary.csv`` (same folder)."""
    scores_csv = Path(scores_csv)
    return scores_csv.with_name(scores_csv.stem + "_summary" + (scores_csv.suffix or ".csv"))


def write_summary_csv(summary: Sequence[OrganSummary], path: Path) -> None:
    """CSV with columns organ, value, n, dsc_mean, dsc_std, nsd_mean, nsd_std; last row organ 'mean'.

    The folder of ``path`` must exist (InputError otherwise; no folder is created)."""
    path = check_output_file(Path(path))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["organ", "value", "n", "dsc_mean", "dsc_std", "nsd_mean", "nsd_std"])
        for r in summary:
            key, value = (r.organ.key, r.organ.value) if r.organ is not None else ("mean", "")
            writer.writerow([key, value, r.n, _fmt(r.dsc_mean), _fmt(r.dsc_std), _fmt(r.nsd_mean),
                             _fmt(r.nsd_std)])


# ----------------------------------------------------------------------------------------------------
# Command line


def run_evaluate(args: argparse.Namespace) -> int:
    """``evaluate`` subcommand: print the summary table, write CSVs with ``--out``; returns 0.

    Bad input raises :class:`InputError` (``cli.main`` prints it and exits 1): the output files
    (``--out`` and its ``_summary.csv``) are checked first, before any label map is read (their folder
    must exist, they must not be folders or input files); then every label map must hold whole
    numbers 0..13 (:func:`check_label_values`: a CT given as a label map is refused).
    """
    if args.out:
        for path in (Path(args.out), summary_csv_path(Path(args.out))):
            check_output_file(path, (Path(args.pred), Path(args.ref)), option="--out")
    result = evaluate(Path(args.pred), Path(args.ref), workers=args.workers,
                      missing_as_zero=args.missing_as_zero, progress=not args.quiet)
    print(format_summary(result.summary))
    if result.missing:
        print(f"{len(result.missing)} case(s) without prediction scored 0: {', '.join(result.missing)}")
    if args.out:
        write_scores_csv(result.scores, Path(args.out))
        write_summary_csv(result.summary, summary_csv_path(Path(args.out)))
        print(f"wrote {args.out} and {summary_csv_path(Path(args.out))}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``evaluate PRED REF [--out CSV] [--workers N] [--missing-as-zero] [-q]``; returns its parser."""
    parser = subparsers.add_parser(
        "evaluate",
        help="FLARE22 DSC and NSD of predicted label maps against reference label maps",
        description="Score a predicted label map (or a folder of them) against the reference label map "
                    "(or folder) with the FLARE22 protocol: per-organ Dice and normalized surface Dice. "
                    "Folders are matched by file name; <case>_0000 matches <case>. Label maps must hold "
                    "the organ labels 0..13 (whole numbers): a CT or a probability map is refused. "
                    "Exit codes: 0 done, 1 bad input (the message names the file), 2 usage error.",
    )
    parser.add_argument("pred", metavar="PRED", help="predicted label map file or folder")
    parser.add_argument("ref", metavar="REF", help="reference label map file or folder")
    parser.add_argument("--out", metavar="CSV",
                        help="write per-case scores here (columns case, organ, value, dsc, nsd) "
                             "and the summary to <CSV stem>_summary.csv; the folder must exist")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="cases scored in parallel processes (default 1)")
    parser.add_argument("--missing-as-zero", action="store_true",
                        help="score reference cases without prediction 0 instead of failing")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_evaluate)
    return parser
