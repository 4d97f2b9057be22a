"""The ``abdomen-kdseg`` command line: segment, evaluate, train, model-info."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import AbdomenKDSegError, InputError
from .image_io import dicom_series_files, has_image_suffix

#: Overall progress fraction at which each stage starts and ends (for one progress bar).
STAGE_SPAN = {"orient": (0.0, 0.05), "coarse": (0.05, 0.55), "fine": (0.55, 0.9),
              "resample": (0.9, 0.98), "coarse_resample": (0.98, 0.98), "done": (0.98, 1.0)}


def _format_warning(message, category, filename, lineno, file=None, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


def case_name(path: Path) -> str:
    """Case identifier of an input: file name without image suffix and nnU-Net ``_0000`` channel tag."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-5] if name.endswith("_0000") else name


def find_cases(folder: Path) -> list[Path]:
    """Inputs in a folder of cases: image files, and sub-folders holding a DICOM series (sorted)."""
    cases = [p for p in sorted(folder.iterdir()) if p.is_file() and has_image_suffix(p)
             and not p.name.lower().endswith(".raw")]
    cases += [p for p in sorted(folder.iterdir()) if p.is_dir() and dicom_series_files(p)]
    return cases


class StageProgress:
    """Turns (stage, fraction) callbacks into one tqdm bar per case, shown from the first update on
    (so an input rejected while reading leaves only its error message)."""

    def __init__(self, desc: str, disable: bool) -> None:
        self.desc, self.disable, self.bar = desc, disable, None

    def __call__(self, stage: str, fraction: float) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=self.desc, unit="%", disable=self.disable, leave=False,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}]")
        lo, hi = STAGE_SPAN.get(stage, (0.0, 1.0))
        target = 100.0 * (lo + (hi - lo) * min(max(fraction, 0.0), 1.0))
        self.bar.set_postfix_str(stage, refresh=False)
        self.bar.update(max(0.0, target - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_summary(result, stream=None) -> None:  # noqa: ANN001
    """Organ table (voxels, mL) and seconds per stage of a :class:`SegmentationResult`."""
    from .organs import ORGANS

    volumes = result.volumes_ml()
    lines = [f"{'label':>5}  {'organ':<22}{'voxels':>12}{'volume mL':>12}"]
    for organ in ORGANS:
        n = result.voxel_counts.get(organ.value, 0)
        lines.append(f"{organ.value:>5}  {organ.name:<22}{n:>12d}{volumes.get(organ.value, 0.0):>12.1f}")
    timing = "  ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    total = sum(result.timings.values())
    line = f"device {result.device}, backend {result.backend}; seconds: {timing}; total {total:.2f}s"
    if getattr(result, "gpu_peak_mb", None) is not None:
        line += f"; GPU peak {result.gpu_peak_mb:.0f} MiB"
    lines.append(line)
    print("\n".join(lines), file=stream or sys.stdout)


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment one input (file or DICOM folder) or every case of a folder."""
    from .inference import Predictor, segment_file

    source, target = Path(args.input), Path(args.output)
    if not source.exists():
        raise InputError(f"input not found: {source}")
    batch = source.is_dir() and not dicom_series_files(source)
    cases = find_cases(source) if batch else [source]
    if batch and not cases:
        raise InputError(f"no images (NIfTI/NRRD/MHA files or DICOM series folders) found in {source}")
    if batch and target.exists() and not target.is_dir():
        raise InputError(f"output {target} must be a folder when the input is a folder of cases")
    coarse_target = Path(args.coarse_output) if args.coarse_output else None
    if batch and coarse_target is not None:
        _check_coarse_folder(coarse_target, target)
    predictor = Predictor(args.model, device=args.device, channels_last=not args.no_channels_last,
                          backend=args.backend)
    failed: list[tuple[str, str]] = []
    for case in cases:
        out = target / f"{case_name(case)}.nii.gz" if batch else target
        coarse_out = coarse_target / out.name if batch and coarse_target is not None else coarse_target
        bar = StageProgress(case_name(case), disable=args.quiet)
        started = time.perf_counter()
        try:
            result = segment_file(case, out, device=args.device, fine=not args.no_fine, organs=args.organs,
                                  progress=bar, predictor=predictor, coarse_output=coarse_out)
        except AbdomenKDSegError as exc:
            bar.close()
            if not batch:
                raise
            failed.append((case.name, str(exc)))
            print(f"error: {case.name}: {exc}", file=sys.stderr)
            continue
        bar.close()
        if not args.quiet:
            print(f"{case_name(case)} -> {result.output_path} ({time.perf_counter() - started:.1f}s)")
            if result.coarse_output_path is not None:
                print(f"coarse result -> {result.coarse_output_path}")
            print_summary(result)
        if args.preview:
            _write_preview(case, result.output_path, Path(args.preview), batch)
    if batch:
        print(f"{len(cases) - len(failed)} of {len(cases)} cases segmented into {target}")
        for name, why in failed:
            print(f"  failed: {name}: {why}", file=sys.stderr)
    return 1 if failed else 0


def _check_coarse_folder(coarse: Path, target: Path) -> None:
    """With a folder of cases, ``--coarse-output`` is a folder other than the output folder."""
    if coarse.exists() and not coarse.is_dir():
        raise InputError(f"--coarse-output {coarse} must be a folder when the input is a folder of cases")
    if coarse.resolve() == target.resolve():
        raise InputError(f"--coarse-output {coarse} is the output folder: the coarse label maps would replace "
                         "the fine ones; give another folder")


def _write_preview(case: Path, labels_path: Path, preview: Path, batch: bool) -> None:
    import SimpleITK as sitk

    from .image_io import read_image
    from .preview import save_preview

    png = preview / f"{case_name(case)}.png" if batch else preview
    save_preview(read_image(case, check=False), sitk.ReadImage(str(labels_path)), png,
                 title=f"AbdomenKDSeg: {case_name(case)}")
    print(f"preview -> {png}")


def cmd_model_info(args: argparse.Namespace) -> int:
    """Verify a bundle (weights and card) and print a short summary of its card, or (``--json``)
    the whole card as JSON."""
    import json

    from .bundle import default_bundle_path, verify_bundle
    from .model_card import summary_lines

    path = Path(args.model) if args.model else default_bundle_path()
    header, card, tensors = verify_bundle(path)  # a corrupt, modified or old-format file stops here
    if args.json:
        print(json.dumps(card, indent=2, sort_keys=True))
        return 0
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    info = {
        "path": str(path), "format_version": header.get("format_version"), "sha256": header.get("sha256"),
        "verified": True, "bytes": path.stat().st_size,
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values() if t.is_floating_point()}),
        "parameters": {stage: sum(t.numel() for name, t in tensors.items()
                                  if name.startswith(f"{stage}.") and not name.endswith(buffers))
                       for stage in ("coarse", "fine")},
    }
    print("\n".join(summary_lines(card, info)))
    print("full model card: abdomen-kdseg model-info --json" + (f" {args.model}" if args.model else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="abdomen-kdseg",
        description="13-organ abdominal CT segmentation (coarse-to-fine student, Choi FLARE22).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a CT (file or DICOM folder) or a folder of cases")
    seg.add_argument("input", help="NIfTI/NRRD/MHA file, DICOM series folder, or folder of cases")
    seg.add_argument("output", help="label map file (.nii.gz, .nrrd), or a folder for a folder of cases")
    seg.add_argument("--model", default=None, help="model bundle (.safetensors); default: the bundled model")
    seg.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    seg.add_argument("--preview", default=None, help="write a PNG preview here (a folder for many cases)")
    seg.add_argument("--organs", nargs="+", default=None, help="only these organs (keys, names or values)")
    seg.add_argument("--no-fine", action="store_true", help="coarse stage only (faster, coarser)")
    seg.add_argument("--coarse-output", default=None, metavar="PATH",
                     help="also write the coarse stage's result at full resolution here, to compare with the "
                          "fine one (a folder, one <case>.nii.gz per case, for a folder of cases); "
                          "not written with --no-fine, whose output already is the coarse result")
    seg.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "openvino"],
                     help="network runtime on the CPU: auto = OpenVINO, else ONNX Runtime, whichever is "
                          "installed first, else PyTorch (the CUDA path always uses PyTorch)")
    seg.add_argument("--no-channels-last", action="store_true", help="disable channels_last_3d on CPU (torch)")
    seg.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    seg.set_defaults(func=cmd_segment)

    info = sub.add_parser("model-info", help="verify a model bundle and summarise its card (--json: whole card)")
    info.add_argument("model", nargs="?", default=None, metavar="BUNDLE",
                      help="model bundle (.safetensors; default: the bundled model)")
    info.add_argument("--json", action="store_true", help="print the whole model card as JSON")
    info.set_defaults(func=cmd_model_info)

    for register in _optional_registrations():
        register(sub)
    return parser


def _optional_registrations() -> list[Callable[[argparse._SubParsersAction], None]]:
    """``register_cli`` of the evaluation, training, rendering and graph-cache modules."""
    import importlib

    found = []
    for name in ("evaluation", "training.cli", "render3d", "graph_cache"):
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:  # a partial install without that part
            if not (exc.name or "").startswith(f"{__package__}.{name.split('.')[0]}"):
                raise
            continue
        found.append(module.register_cli)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``abdomen-kdseg`` console script; returns the exit code."""
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
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
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def console_main() -> None:
    """The ``abdomen-kdseg`` console script and ``python -m AbdomenKDSegLib.cli``: :func:`main`,
    then the process ends at once (:func:`process_exit.exit_now`; saves ~0.7 s per run)."""
    from .process_exit import exit_now

    exit_now(main())


if __name__ == "__main__":
    console_main()
