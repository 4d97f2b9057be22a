"""The ``abdomen-kdseg`` command line: segment, evaluate, train, model-info."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import __version__, output_paths
from .engine.image_io import case_id, dicom_series_files, has_image_suffix
from .errors import AbdomenKDSegError, InputError, UsageError
from .request import BACKENDS, DEVICES, ProgressMap
from .threads import set_threads


def _format_warning(message, category, filename, lineno, file=None, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


def find_cases(folder: Path) -> list[Path]:
    """Inputs in a folder of cases: image files, and sub-folders holding a DICOM series (sorted)."""
    cases = [p for p in sorted(folder.iterdir()) if p.is_file() and has_image_suffix(p)
             and not p.name.lower().endswith(".raw")]
    cases += [p for p in sorted(folder.iterdir()) if p.is_dir() and dicom_series_files(p)]
    return cases


class StageProgress:
    """Turns (stage, fraction) callbacks into one tqdm bar per case, shown from the first update on
    (so an input rejected while reading leaves only its error message). ``fine``/``coarse_output``:
    the stages that run (:class:`request.ProgressMap`)."""

    def __init__(self, desc: str, disable: bool, fine: bool = True, coarse_output: bool = False) -> None:
        self.desc, self.disable, self.bar = desc, disable, None
        self.map = ProgressMap(fine=fine, coarse_output=coarse_output)

    def __call__(self, stage: str, fraction: float) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=self.desc, unit="%", disable=self.disable, leave=False,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}]")
        target = 100.0 * self.map(stage, fraction)[1]
        self.bar.set_postfix_str(stage, refresh=False)
        self.bar.update(max(0.0, target - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_summary(result, stream=None, organs: Sequence[int] | None = None) -> None:  # noqa: ANN001
    """Organ table (voxels, mL, the FLARE22 1st-99th percentile range scaled by the field of view, a flag
    outside it: :mod:`engine.organ_statistics`) and seconds per stage of a :class:`SegmentationResult`;
    ``organs``: the label values asked for (default all 13)."""
    from .engine.organ_statistics import format_table, organ_table
    from .engine.organs import ORGANS

    chosen = [o for o in ORGANS if organs is None or o.value in organs]
    rows = organ_table(result.volumes_ml(), _field_of_view_mm(result.output_path), chosen)
    lines = format_table(rows, result.voxel_counts)
    timing = "  ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    total = sum(result.timings.values())
    line = f"device {result.device}, backend {result.backend}; seconds: {timing}; total {total:.2f}s"
    if getattr(result, "gpu_peak_mb", None) is not None:
        line += f"; GPU peak {result.gpu_peak_mb:.0f} MiB"
    lines.append(line)
    print("\n".join(lines), file=stream or sys.stdout)


def _field_of_view_mm(path: Path | None) -> float | None:
    """Craniocaudal extent (mm) of an image file, from its header; None when it cannot be read."""
    import SimpleITK as sitk

    from .engine.organ_statistics import craniocaudal_extent_mm

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except (RuntimeError, TypeError):
        return None
    return craniocaudal_extent_mm(reader.GetSize(), reader.GetSpacing(), reader.GetDirection())


@dataclass
class CaseJob:
    """One input of ``segment`` and where its results go (all paths checked before any work)."""

    input: Path
    output: Path
    coarse_output: Path | None = None
    preview: Path | None = None

    @property
    def name(self) -> str:
        return case_id(self.input)


@dataclass
class SegmentPlan:
    """Every case of a ``segment`` command with its outputs, and the folders to create first."""

    jobs: list[CaseJob]
    batch: bool
    organs: list[int] | None = None
    create: list[Path] = field(default_factory=list)


def plan_segment(args: argparse.Namespace) -> SegmentPlan:
    """Check the arguments and every output path of ``segment`` before anything is loaded or read.

    Raises :class:`InputError` for a missing input or a folder without images, :class:`UsageError`
    for bad organs or outputs (rules in :mod:`output_paths`): an output that is an input, an
    existing file without ``--overwrite``, a missing or read-only folder, a wrong file type, two
    cases with the same output name.
    """
    from .engine.organs import resolve_organs

    source = Path(args.input)
    if not source.exists():
        raise InputError(f"input not found: {source}")
    organs = [o.value for o in resolve_organs(args.organs)] if args.organs is not None else None
    if organs == []:
        raise UsageError("--organs names no organ: give a comma-separated list such as liver,spleen")
    batch = source.is_dir() and not dicom_series_files(source)
    cases = find_cases(source) if batch else [source]
    if batch and not cases:
        raise InputError(f"no images (NIfTI/NRRD/MHA files or DICOM series folders) found in {source}")
    inputs = [source, *cases]
    plan = SegmentPlan([CaseJob(case, Path()) for case in cases], batch, organs)
    seen: dict[str, Path] = {}
    for job in plan.jobs:
        if job.name in seen:
            raise UsageError(f"the cases {seen[job.name].name} and {job.input.name} in {source} would both be "
                             f"written as {job.name}.nii.gz; rename one")
        seen[job.name] = job.input
    outputs = {"output": (args.output, ".nii.gz", output_paths.LABEL_SUFFIXES),
               "coarse output": (args.coarse_output, ".nii.gz", output_paths.LABEL_SUFFIXES),
               "preview": (args.preview, ".png", output_paths.PREVIEW_SUFFIXES)}
    for what, (text, suffix, suffixes) in outputs.items():
        if not text:
            continue
        target, as_folder = Path(text), batch or output_paths.is_folder_target(text)
        if as_folder:
            if batch and target.exists() and not target.is_dir():
                raise UsageError(f"{what} {target} must be a folder when the input is a folder of cases")
            if output_paths.check_output_folder(target, inputs, f"{what} folder") and target not in plan.create:
                plan.create.append(target)
        for job in plan.jobs:
            path = target / f"{job.name}{suffix}" if as_folder else target
            output_paths.check_output_file(path, inputs, args.overwrite, what, suffixes,
                                           parent_checked=as_folder)
            setattr(job, what.replace(" ", "_"), path)
    for job in plan.jobs:
        if job.coarse_output is not None and job.coarse_output.absolute() == job.output.absolute():
            raise UsageError(f"--coarse-output {job.coarse_output} is the same file as the output: the coarse "
                             "label maps would replace the fine ones; give another name or folder")
    return plan


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment one input (file or DICOM folder) or every case of a folder."""
    plan = plan_segment(args)
    for folder in plan.create:
        folder.mkdir(parents=True, exist_ok=True)
        print(f"created the folder {folder}", file=sys.stderr)
    from .engine.inference import Predictor, segment_file

    predictor = Predictor(args.model, device=args.device, channels_last=not args.no_channels_last,
                          backend=args.backend)
    predictor.prepare_in_background(("coarse",) if args.no_fine else ("coarse", "fine"))  # while the CT is read
    failed: list[tuple[str, str]] = []
    for job in plan.jobs:
        bar = StageProgress(job.name, disable=args.quiet, fine=not args.no_fine,
                            coarse_output=job.coarse_output is not None)
        started = time.perf_counter()
        try:
            result = segment_file(job.input, job.output, device=args.device, fine=not args.no_fine,
                                  organs=plan.organs, progress=bar, predictor=predictor,
                                  coarse_output=job.coarse_output, overwrite=args.overwrite)
        except AbdomenKDSegError as exc:
            bar.close()
            if not plan.batch:
                raise
            failed.append((job.input.name, str(exc)))
            print(f"error: {job.input.name}: {exc}", file=sys.stderr)
            continue
        bar.close()
        if not args.quiet:
            print(f"{job.name} -> {result.output_path} ({time.perf_counter() - started:.1f}s)")
            if result.coarse_output_path is not None:
                print(f"coarse result -> {result.coarse_output_path}")
            print_summary(result, organs=plan.organs)
        if job.preview is not None:
            _write_preview(job, result.output_path)
    if plan.batch:
        print(f"{len(plan.jobs) - len(failed)} of {len(plan.jobs)} cases segmented into {args.output}")
        for name, why in failed:
            print(f"  failed: {name}: {why}", file=sys.stderr)
    return 1 if failed else 0


def _write_preview(job: CaseJob, labels_path: Path) -> None:
    import SimpleITK as sitk

    from .engine.image_io import read_image
    from .figures.preview import save_preview

    save_preview(read_image(job.input, check=False), sitk.ReadImage(str(labels_path)), job.preview,
                 title=f"AbdomenKDSeg: {job.name}")
    print(f"preview -> {job.preview}")


def cmd_model_info(args: argparse.Namespace) -> int:
    """Verify a bundle (weights and card) and print a short summary of its card, or (``--json``)
    the whole card as JSON."""
    import json

    from .engine.bundle import default_bundle_path, verify_bundle
    from .engine.model_card import summary_lines

    path = Path(args.model) if args.model else default_bundle_path()
    header, card, tensors = verify_bundle(path)  # a corrupt, modified or old-format file stops here
    if args.json:
        print(json.dumps(card, indent=2, sort_keys=True))
        return 0
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    info = {
        "path": str(path), "format_version": header.get("format_version"), "sha256": header.get("sha256"),
        "verified": True, "bytes": path.stat().st_size,
        "dtypes": sorted({str(t.dtype) for t in tensors.values() if t.dtype.kind == "f"}),
        "parameters": {stage: sum(t.size for name, t in tensors.items()
                                  if name.startswith(f"{stage}.") and not name.endswith(buffers))
                       for stage in ("coarse", "fine")},
    }
    print("\n".join(summary_lines(card, info)))
    print("full model card: abdomen-kdseg model-info --json" + (f" {args.model}" if args.model else ""))
    return 0


def positive_int(text: str) -> int:
    """argparse type of a count: a whole number >= 1 (argparse turns the error into exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: give 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="abdomen-kdseg",
        description="13-organ abdominal CT segmentation (coarse-to-fine student, Choi FLARE22).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser(
        "segment", help="segment a CT (file or DICOM folder) or a folder of cases",
        epilog="Outputs are checked before any work: an output that is an input, an existing file (without "
               "--overwrite), a missing or read-only folder or a wrong file type stops with exit code 2. "
               "Exit codes: 0 done, 1 bad input or error (in a folder of cases: any case failed), "
               "2 usage error, 130 interrupted.")
    seg.add_argument("input", help="NIfTI/NRRD/MHA file, DICOM series folder, or folder of cases")
    seg.add_argument("output", help="label map file (.nii.gz, .nii, .nrrd, .mha) in an existing folder, or a "
                                    "folder (ending in / or existing; created if missing) that receives "
                                    "<case>.nii.gz; a folder for a folder of cases")
    seg.add_argument("--model", default=None, help="model bundle (.safetensors); default: the bundled model")
    seg.add_argument("--device", default="auto", choices=DEVICES,
                     help="auto (default): CUDA when a GPU is available, else the CPU; cuda without a GPU "
                          "runs on the CPU with a warning")
    seg.add_argument("--preview", default=None, metavar="PNG",
                     help="write a PNG preview here (a .png file, or a folder: <case>.png)")
    seg.add_argument("--organs", action="append", default=None, metavar="LIST",
                     help="only these organs: comma-separated keys, names or label values, e.g. "
                          "liver,spleen,3 (repeatable); default: all 13")
    seg.add_argument("--overwrite", action="store_true",
                     help="replace existing output files (label maps, coarse output, previews); without it an "
                          "existing file stops the run before any work")
    seg.add_argument("--no-fine", action="store_true", help="coarse stage only (faster, coarser)")
    seg.add_argument("--coarse-output", default=None, metavar="PATH",
                     help="also write the coarse stage's result at full resolution here, to compare with the "
                          "fine one (a folder, one <case>.nii.gz per case, for a folder of cases); "
                          "not written with --no-fine, whose output already is the coarse result")
    seg.add_argument("--backend", default="auto", choices=BACKENDS,
                     help="network runtime on the CPU: auto = OpenVINO, else ONNX Runtime, whichever is "
                          "installed first, else PyTorch (the CUDA path always uses PyTorch)")
    seg.add_argument("--no-channels-last", action="store_true", help="disable channels_last_3d on CPU (torch)")
    seg.add_argument("--threads", type=positive_int, default=None, metavar="N",
                     help="CPU threads (a whole number >= 1; default: PyTorch's choice, the cores)")
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    seg.set_defaults(func=cmd_segment)

    info = sub.add_parser("model-info", help="verify a model bundle and summarise its card (--json: whole card)")
    info.add_argument("model", nargs="?", default=None, metavar="BUNDLE",
                      help="model bundle (.safetensors; default: the bundled model)")
    info.add_argument("--json", action="store_true", help="print the whole model card as JSON")
    info.set_defaults(func=cmd_model_info)

    for register in _subcommand_registrations():
        register(sub)
    return parser


def _subcommand_registrations() -> list[Callable[[argparse._SubParsersAction], None]]:
    """``register_cli`` of the evaluation, training, 3D-figure, graph-cache and web-app commands (each module
    imports its heavy dependencies only when its command runs)."""
    from .evaluation.evaluate import register_cli as evaluate
    from .figures.render3d import register_cli as render_3d
    from .runtimes.graph_cache import register_cli as cache
    from .training.cli import register_cli as train
    from .web import register_cli as serve

    return [evaluate, train, render_3d, cache, serve]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``abdomen-kdseg`` console script; returns the exit code: 0 done, 1 bad input
    or an error, 2 usage error (argparse's and :class:`UsageError`), 3 training stopped early
    (resumable), 130 interrupted."""
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        set_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AbdomenKDSegError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line instead of a traceback; --debug shows it
        if args.debug:
            raise
        print(f"error: {exc or type(exc).__name__} (unexpected; --debug shows the traceback)", file=sys.stderr)
        return 1


def console_main() -> None:
    """The ``abdomen-kdseg`` console script and ``python -m AbdomenKDSegLib.cli``: :func:`main`,
    then the process ends at once (:func:`process_exit.exit_now`; saves ~0.12 s per CPU run, ~0.7 s with PyTorch)."""
    from .process_exit import exit_now

    exit_now(main())


if __name__ == "__main__":
    console_main()
