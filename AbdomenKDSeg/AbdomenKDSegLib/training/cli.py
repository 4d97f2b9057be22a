"""``abdomen-kdseg train``: the training command (registered into the main CLI by ``register_cli``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import AbdomenKDSegError, InputError
from ..request import DEVICES
from ..resources import RECIPES_DIR


def resolve_recipe_path(value: Optional[str]) -> Optional[Path]:
    """A recipe file path, or the name of a shipped recipe (``proposed``, ``cpu_small``, ...)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{value}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise InputError(f"recipe {value!r} not found (a YAML file, or one of: {', '.join(known) or 'none'})")


def parse_overrides(items: List[str]) -> Dict[str, Any]:
    """``["epochs=10", "augment.scale_axis=labelled"]`` -> nested dict; values parsed as YAML."""
    import yaml

    out: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        value = yaml.safe_load(raw) if raw != "" else None
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


#: Exit code of ``train`` when it stopped at ``--max-steps`` before the run completed (resumable).
EXIT_STOPPED = 3

TRAIN_EPILOG = f"""\
--max-steps N trains at most N optimiser steps in this invocation, counted
across the stages (the coarse stage's remaining steps, then the fine stage's),
writes the checkpoints and stops; the same command with --resume trains N more,
until the run completes and the bundle is exported. A resumed run continues
exactly where it stopped (the same weights as an uninterrupted run).

exit codes:
  0  done: the run completed and RUN_DIR/model.safetensors was written
  1  error (bad data, recipe or checkpoint; the message says which)
  2  usage error (unknown or invalid option)
  {EXIT_STOPPED}  stopped early at --max-steps: nothing is wrong, continue with --resume
"""


class KeepLinesFormatter(argparse.HelpFormatter):
    """Help formatter that wraps one-line texts (the description) and keeps texts with line breaks
    (the epilog's exit code table) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``train`` from parsed arguments; returns the exit code (0 done, 3 stopped at --max-steps:
    resumable with --resume)."""
    from .pipeline import train
    from .recipe import load_recipe

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set or [])
    if args.init_from is not None:
        if not Path(args.init_from).is_file():
            raise InputError(f"--init-from {args.init_from}: no such model bundle")
        overrides["init_from"] = str(Path(args.init_from).resolve())
    recipe = load_recipe(resolve_recipe_path(args.config), overrides)
    result = train(recipe, args.data, args.out, resume=args.resume, cache_dir=args.cache, device=args.device,
                   max_steps=args.max_steps, progress=not args.quiet)
    if not result.completed:
        print(f"stopped after {result.steps_run} step(s) (--max-steps {args.max_steps}) at "
              f"{result.stopped_at}; run the same command with --resume to continue", file=sys.stderr)
        return EXIT_STOPPED
    if not args.quiet:
        print(f"model bundle -> {result.bundle}")
    return 0


def cmd_make_training_set(args: argparse.Namespace) -> int:
    """Run ``make-training-set`` from parsed arguments; returns the exit code."""
    import dataclasses

    from .appearance import AppearanceRanges
    from .make_training_set import (
        GeneratorOptions,
        RenderRanges,
        make_training_set,
        parse_heldout,
        parse_range,
        parse_weights,
    )

    if args.variants < 1 or args.workers < 1 or args.heldout_variants < 1 or args.first_variant < 0:
        raise InputError("--variants, --heldout-variants and --workers must be >= 1, --first-variant >= 0")
    render, look = RenderRanges(), AppearanceRanges()
    if args.fov_weights:
        render = dataclasses.replace(render, fov_probabilities=parse_weights(
            args.fov_weights, [n for n, _ in render.fov_probabilities], "field-of-view"))
    if args.slab_mm:
        render = dataclasses.replace(render, slab_mm=parse_range(args.slab_mm, "--slab-mm"))
    if args.thickness_mm:
        render = dataclasses.replace(render, slice_thickness_mm=parse_range(args.thickness_mm, "--thickness-mm"))
    if args.phase_weights:
        look = dataclasses.replace(look, phase_probabilities=parse_weights(
            args.phase_weights, [n for n, _ in look.phase_probabilities], "contrast-phase"))
    if args.hollow_fill is not None or args.fat_halo is not None:
        for name, value in (("--hollow-fill", args.hollow_fill), ("--fat-halo", args.fat_halo)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise InputError(f"{name} is a probability in [0, 1], got {value}")
        look = dataclasses.replace(look, hollow_fill_probability=args.hollow_fill or 0.0,
                                   fat_halo_probability=args.fat_halo or 0.0)
    if args.fat_halo_mm:
        if not args.fat_halo:
            raise InputError("--fat-halo-mm sets the thickness of the fat layer: give its chance with --fat-halo P")
        look = dataclasses.replace(look, fat_halo_mm=parse_range(args.fat_halo_mm, "--fat-halo-mm"))
    custom_look = look != AppearanceRanges()
    opts = GeneratorOptions(
        source_image=Path(args.source_image), source_labels=Path(args.source_labels), targets=Path(args.targets),
        out=Path(args.out), variants=args.variants, heldout=tuple(parse_heldout(args.heldout)),
        heldout_variants=args.heldout_variants, seed=args.seed, workers=args.workers, previews=args.previews,
        include_source=not args.no_source_case, render=render,
        appearance=look if custom_look else None, first_variant=args.first_variant)
    bars: Dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.quiet:
            return
        from tqdm import tqdm

        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=stage, unit="case")
        bar = bars[stage]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    report = make_training_set(opts, progress)
    if not args.quiet:
        n_train = sum(1 for c in report["cases"] if c["split"] == "train")
        n_held = len(report["cases"]) - n_train
        print(f"{n_train} training + {n_held} held-out cases in {opts.out} "
              f"(anatomy transfer: mean DSC {report['fit_dice_mean']['all']:.3f} of the warped source labels "
              f"vs the targets); report: {opts.out / 'report.json'}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` and ``make-training-set`` subcommands to the main parser's subparsers."""
    g = subparsers.add_parser(
        "make-training-set", help="generate a varied labeled training set from one labeled CT and many label maps",
        description="Deform a labeled CT onto each target label map (anatomy transfer: affine + dense fit of "
                    "the organ masks), then render each target VARIANTS times with random contrast phase, "
                    "texture, noise, blur, spacing and field of view. Writes OUT/imagesTr, OUT/labelsTr "
                    "(what `train --data OUT` reads), OUT/heldout/ (held-out targets), OUT/previews/*.png "
                    "and OUT/report.json. Deterministic given --seed; a re-run reuses finished fits and cases.")
    g.add_argument("--source-image", required=True, help="the labeled CT (HU) whose anatomy is transferred")
    g.add_argument("--source-labels", required=True, help="its organ labels (FLARE22 values)")
    g.add_argument("--targets", required=True, help="folder of target label maps (e.g. the FLARE22 labels)")
    g.add_argument("--out", required=True, help="output data folder")
    g.add_argument("--variants", type=int, default=2, help="rendered cases per training target (default 2)")
    g.add_argument("--heldout", default="", help="targets kept out of training, e.g. 41-50 or 0003,0007")
    g.add_argument("--heldout-variants", type=int, default=1, help="rendered cases per held-out target")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--first-variant", type=int, default=0, metavar="K",
                   help="number the variants K, K+1, ... (case names and seeds): a second set made with other "
                        "weights can then be merged into the same data folder")
    g.add_argument("--fov-weights", default=None, metavar="NAME=W,...",
                   help="weights of the fields of view target, extended, slab, liver_cut "
                        "(default target=0.3,extended=0.25,slab=0.3,liver_cut=0.15)")
    g.add_argument("--slab-mm", default=None, metavar="LOW-HIGH", help="slab length range, mm (default 40-150)")
    g.add_argument("--thickness-mm", default=None, metavar="LOW-HIGH",
                   help="slice thickness range, mm (default 0.6-5; the slice spacing is the thickness, 1-5 mm)")
    g.add_argument("--phase-weights", default=None, metavar="NAME=W,...",
                   help="weights of the contrast phases non_contrast, arterial, portal_venous, delayed "
                        "(default non_contrast=0.2,arterial=0.2,portal_venous=0.4,delayed=0.2)")
    g.add_argument("--hollow-fill", type=float, default=None, metavar="P",
                   help="chance that an image's stomach and duodenum are re-filled with fluid (0-35 HU) or oral "
                        "contrast (150-500 HU), often with an anterior air-fluid level (default 0: the source's "
                        "own, nearly collapsed contents)")
    g.add_argument("--fat-halo", type=float, default=None, metavar="P",
                   help="chance of a fat layer (-120..-70 HU) around the organs, replacing the soft tissue "
                        "next to them (default 0)")
    g.add_argument("--fat-halo-mm", default=None, metavar="LOW-HIGH",
                   help="thickness range of that fat layer, mm (default 2-8)")
    g.add_argument("--workers", type=int, default=1, help="processes (one CPU thread each)")
    g.add_argument("--previews", type=int, default=6, help="PNG previews of the first N cases")
    g.add_argument("--no-source-case", action="store_true", help="do not add the unwarped source CT itself")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")
    g.set_defaults(func=cmd_make_training_set)
    p = subparsers.add_parser(
        "train", help="train the coarse and fine students (KD from cross-teaching teachers) on a data folder",
        description="Train a recipe: coarse stage, coarse predictions of unlabeled cases, fine stage, "
                    "export of the student bundle (RUN_DIR/model.safetensors). Several GPUs: "
                    "torchrun --nproc_per_node N -m AbdomenKDSegLib.training.cli ...",
        epilog=TRAIN_EPILOG, formatter_class=KeepLinesFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_train)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="recipe YAML, or a shipped recipe name (proposed, fsl, cts, cpu_small, ...); "
                        "default: the paper's values")
    p.add_argument("--data", required=True,
                   help="data folder with imagesTr/, labelsTr/ and optional unlabeled/")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, cache, model.safetensors)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoints")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--cache", default=None, help="preprocessing cache folder (default RUN_DIR/cache)")
    p.add_argument("--init-from", default=None, metavar="BUNDLE",
                   help="fine-tune: start each stage's student from this model bundle's coarse/fine network "
                        "(e.g. the shipped model) instead of random weights; recorded in the recipe")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set epochs=50 --set augment.scale_axis=labelled")
    p.add_argument("--max-steps", type=positive_int, default=None, metavar="N",
                   help="train at most N optimiser steps in this invocation (coarse, then fine), then stop "
                        f"with exit code {EXIT_STOPPED}; --resume continues with N more")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")


def main(argv: Optional[List[str]] = None) -> int:
    """Stand-alone entry point (``python -m AbdomenKDSegLib.training.cli``, e.g. under torchrun)."""
    parser = argparse.ArgumentParser(prog="abdomen-kdseg train", epilog=TRAIN_EPILOG,
                                     formatter_class=KeepLinesFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except AbdomenKDSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
