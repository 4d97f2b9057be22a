"""``abdomen-kdseg train``: the training command (registered into the main CLI by ``register_cli``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import InputError

#: Recipe files shipped in the source tree (``Resources/recipes/<name>.yaml``).
RECIPES_DIR = Path(__file__).resolve().parents[3] / "Resources" / "recipes"


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


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``train`` from parsed arguments; returns the exit code (0 done, 3 stopped at --max-steps)."""
    from .pipeline import train
    from .recipe import load_recipe

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    recipe = load_recipe(resolve_recipe_path(args.config), parse_overrides(args.set or []))
    result = train(recipe, args.data, args.out, resume=args.resume, cache_dir=args.cache, device=args.device,
                   max_steps=args.max_steps, progress=not args.quiet)
    if not result.completed:
        print(f"stopped at --max-steps {args.max_steps}; continue with --resume", file=sys.stderr)
        return 3
    if not args.quiet:
        print(f"model bundle -> {result.bundle}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to the main parser's subparsers."""
    p = subparsers.add_parser(
        "train", help="train the coarse and fine students (KD from cross-teaching teachers) on a data folder",
        description="Train a recipe: coarse stage, coarse predictions of unlabeled cases, fine stage, "
                    "export of the student bundle (RUN_DIR/model.safetensors). Several GPUs: "
                    "torchrun --nproc_per_node N -m AbdomenKDSegLib.training.cli ...")
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
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache", default=None, help="preprocessing cache folder (default RUN_DIR/cache)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set epochs=50 --set augment.scale_axis=labelled")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop each stage at this global step (resume later with --resume)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")


def main(argv: Optional[List[str]] = None) -> int:
    """Stand-alone entry point (``python -m AbdomenKDSegLib.training.cli``, e.g. under torchrun)."""
    parser = argparse.ArgumentParser(prog="abdomen-kdseg train")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
