"""The whole training run: coarse stage -> coarse predictions of unlabeled cases -> fine stage -> bundle.

Run folder layout (``out_dir``)::

    recipe.yaml                 the resolved recipe (every hyperparameter)
    cache/coarse, cache/fine    preprocessed cases (:mod:`.data`), unless ``cache_dir`` is given
    cache/coarse_pred/          the coarse student's label maps of unlabeled cases (96^3, uint8 .npy)
    coarse/, fine/              checkpoint_latest.pt, weights_epochNNNN.pt, steps.csv, epochs.csv, losses.png
    model.safetensors           the exported student (coarse + fine), loadable by the engine
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import __version__
from ..engine.bundle import save_bundle
from ..engine.inference import resolve_device
from ..engine.sliding_window import sliding_window_probabilities
from ..errors import InputError
from .checkpoint import load_checkpoint
from .data import (
    CachedCase,
    CaseFiles,
    build_coarse_cache,
    build_fine_cache,
    find_cases,
    kfold_train_indices,
)
from .distributed import barrier, init_distributed, pick_device
from .recipe import Recipe, as_recipe
from .trainer import LATEST, StageTrainer, stage_state_summary

BUNDLE_NAME = "model.safetensors"


@dataclass
class TrainResult:
    """What :func:`train` did. ``completed`` is False when it stopped at ``max_steps``.

    ``steps_run``: optimiser steps trained by this call (both stages). ``stopped_at``: where an
    early stop left the run, e.g. ``"coarse step 6 of 8"`` (None when completed).
    """

    out_dir: Path
    completed: bool
    bundle: Optional[Path] = None
    stages: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    steps_run: int = 0
    stopped_at: Optional[str] = None


def preprocessing_settings(recipe: Recipe) -> Dict[str, Any]:
    """The bundle's preprocessing block (read by the engine's Predictor) for ``recipe``."""
    return recipe.preprocessing.to_dict()


def _net_digest(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def predict_unlabeled_masks(net: torch.nn.Module, cases: Sequence[CachedCase], folder: Path, recipe: Recipe,
                            device: torch.device, progress: bool = False) -> Dict[str, Path]:
    """Coarse label maps (argmax of the Gaussian-weighted sliding-window softmax) of unlabeled cases.

    Uses the engine's sliding window (:func:`~AbdomenKDSegLib.engine.sliding_window.sliding_window_probabilities`)
    with the recipe's preprocessing on the cached coarse volumes, like the reference
    (``test_nopreprocess``: probability maps, argmax, no largest-component step). Saved as (Z, Y, X)
    uint8 .npy files; recomputed only when the network or the case changed.
    """
    from tqdm import tqdm

    from ..runtimes import torch_backend

    folder.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(net).eval()  # the caller's network keeps its mode and device
    digest = _net_digest(model)
    network = torch_backend.make_runner(model, device)
    pre = recipe.preprocessing
    out: Dict[str, Path] = {}
    for case in tqdm(cases, desc="coarse predictions (unlabeled)", disable=not progress, leave=False):
        path = folder / f"{case.case_id}.npy"
        meta_path = folder / f"{case.case_id}.json"
        key = {"net_sha256": digest, "case": json.loads(case.meta_path.read_text())["key"]}
        if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == key:
            out[case.case_id] = path
            continue
        image, _ = case.load()
        probs = sliding_window_probabilities(network, np.asarray(image, dtype=np.float32), pre.window_zyx,
                                             pre.window_overlap, pre.hu_window)
        labels = probs.argmax(axis=0).astype(np.uint8)
        np.save(path, labels, allow_pickle=False)
        meta_path.write_text(json.dumps(key))
        out[case.case_id] = path
    return out


def _select_cases(recipe: Recipe, data_dir: Path) -> tuple[List[CaseFiles], List[CaseFiles]]:
    files = find_cases(data_dir)
    keep = kfold_train_indices(len(files.labeled), recipe.n_folds, recipe.fold, recipe.fold_seed)
    labeled = [files.labeled[i] for i in keep]
    uses_unlabeled = any(recipe.stage_variant(s).unlabeled for s in ("coarse", "fine"))
    unlabeled = list(files.unlabeled) if uses_unlabeled else []
    if uses_unlabeled and not unlabeled:
        raise InputError(f"recipe variant {recipe.variant!r} needs unlabeled cases but {data_dir}/unlabeled "
                         "holds none")
    return labeled, unlabeled


def _write_recipe(out: Path, recipe: Recipe, resume: bool) -> None:
    import yaml

    path = out / "recipe.yaml"
    existing = any((out / s / LATEST).is_file() for s in ("coarse", "fine"))
    if existing and not resume:
        raise InputError(f"{out} already holds a training run; pass --resume (resume=True) to continue it "
                         "or choose another output folder")
    if not (existing and path.is_file()):  # a resumed run keeps its recipe file (checkpoints check it)
        path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def _echo(enabled: bool):
    def log(msg: str) -> None:
        if enabled:
            print(msg, file=sys.stderr, flush=True)
    return log


def train(config: Recipe | Dict[str, Any] | str | Path | None, data_dir: str | Path, out_dir: str | Path,
          resume: bool = False, *, cache_dir: str | Path | None = None, device: str = "auto",
          max_steps: Optional[int] = None, progress: bool = True) -> TrainResult:
    """Train the coarse and fine stages of a recipe and export the student bundle.

    ``config``: a :class:`Recipe`, a dict, a YAML path or None (the paper's defaults). ``data_dir``: the
    data folder (:mod:`.data`). ``out_dir``: the run folder. ``resume``: continue from the latest
    checkpoints. ``max_steps``: train at most this many optimiser steps in this call, counted across
    the stages (the coarse stage's remaining steps first, then the fine stage's), then write the
    checkpoint and return with ``completed`` False; calling again with ``resume=True`` (and the same
    ``max_steps``) advances by as many steps again, until the run completes and the bundle is
    exported (time-boxed runs, tests). Several processes: launch with ``torchrun``; rank 0 prepares
    data and writes.
    """
    if max_steps is not None and int(max_steps) < 1:
        raise InputError(f"max_steps (--max-steps) must be at least 1, got {max_steps}")
    recipe = as_recipe(config)
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return _train(recipe, data_dir, out_dir, resume, cache_dir, device, max_steps, progress)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _train(recipe: Recipe, data_dir: str | Path, out_dir: str | Path, resume: bool,
           cache_dir: str | Path | None, device: str, max_steps: Optional[int], progress: bool) -> TrainResult:
    dist = init_distributed(torch.device(resolve_device(device, fallback=False)).type)
    dev = pick_device(device, dist)
    if recipe.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=dev.type == "cuda")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = not recipe.deterministic
    log = _echo(progress and dist.is_main)
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_recipe(out, recipe, resume)
    barrier(dist)
    labeled_files, unlabeled_files = _select_cases(recipe, Path(data_dir))
    log(f"training {recipe.variant} (coarse: {recipe.stage_variant('coarse').name}) on "
        f"{len(labeled_files)} labeled + {len(unlabeled_files)} unlabeled cases, device {dev}, "
        f"{dist.world_size} process(es)")
    result = TrainResult(out_dir=out, completed=False)

    # ---- coarse stage
    if dist.is_main:
        build_coarse_cache(labeled_files + unlabeled_files, cache, recipe)
    barrier(dist)
    coarse_all = build_coarse_cache(labeled_files + unlabeled_files, cache, recipe)
    coarse_lab, coarse_unl = coarse_all[:len(labeled_files)], coarse_all[len(labeled_files):]
    coarse = StageTrainer("coarse", recipe, coarse_lab, coarse_unl, out / "coarse", dev, dist, progress, log)
    budget = None if max_steps is None else int(max_steps)  # steps this call may still train
    if not _run_stage(coarse, resume, budget, result):
        return result
    if budget is not None:
        budget -= result.steps_run
        if budget <= 0 and not _stage_completed(out / "fine"):
            # the budget is spent: stop before the coarse predictions and the fine cache
            result.stopped_at = "the end of the coarse stage (the fine stage has not started)"
            return result
    coarse_net, coarse_cfg = coarse.export_network()

    # ---- coarse predictions of unlabeled cases, fine cache
    fine_variant = recipe.stage_variant("fine")
    fine_unl_files = unlabeled_files if fine_variant.unlabeled else []
    masks: Dict[str, Path] = {}
    if dist.is_main:
        if fine_unl_files:
            log(f"predicting coarse masks of {len(coarse_unl)} unlabeled cases")
            masks = predict_unlabeled_masks(coarse_net, coarse_unl, cache / "coarse_pred", recipe, dev,
                                            progress)
        build_fine_cache(labeled_files + fine_unl_files, cache, recipe, masks)
    barrier(dist)
    if fine_unl_files:
        masks = {c.case_id: cache / "coarse_pred" / f"{c.case_id}.npy" for c in fine_unl_files}
    fine_all = build_fine_cache(labeled_files + fine_unl_files, cache, recipe, masks)
    fine_lab, fine_unl = fine_all[:len(labeled_files)], fine_all[len(labeled_files):]

    # ---- fine stage
    del coarse
    fine = StageTrainer("fine", recipe, fine_lab, fine_unl, out / "fine", dev, dist, progress, log)
    if not _run_stage(fine, resume, budget, result):
        return result
    fine_net, fine_cfg = fine.export_network()

    # ---- export
    if dist.is_main:
        metadata = {
            "trained": True,
            "description": f"AbdomenKDSeg student trained with recipe variant {recipe.variant!r} "
                           f"(coarse stage: {recipe.stage_variant('coarse').name!r})",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "software": f"abdomen-kdseg {__version__}, torch {torch.__version__}",
            "recipe": recipe.to_dict(),
            "training": result.stages,
            "data": {"labeled": len(labeled_files), "unlabeled": len(unlabeled_files),
                     "labeled_cases": [c.case_id for c in labeled_files],
                     "unlabeled_cases": [c.case_id for c in unlabeled_files]},
            "preprocessing": preprocessing_settings(recipe),
        }
        result.bundle = save_bundle(out / BUNDLE_NAME, coarse_net, fine_net, coarse_cfg, fine_cfg, metadata)
        log(f"exported the student to {result.bundle}")
    else:
        result.bundle = out / BUNDLE_NAME
    barrier(dist)
    result.completed = True
    return result


def _run_stage(trainer: StageTrainer, resume: bool, max_steps: Optional[int], result: TrainResult) -> bool:
    """Start (or resume) and run one stage for at most ``max_steps`` steps; record its summary and
    the steps it trained in ``result``; False if it stopped early."""
    trainer.start(resume)
    before = trainer.global_step
    finished = trainer.run(max_steps)
    result.steps_run += trainer.global_step - before
    result.stages[trainer.stage] = stage_state_summary(trainer)
    if not finished:
        result.stopped_at = f"{trainer.stage} step {trainer.global_step} of {trainer.total_steps}"
    return finished


def _stage_completed(folder: Path) -> bool:
    """True if ``folder`` holds the checkpoint of a completed stage."""
    path = folder / LATEST
    return path.is_file() and bool(load_checkpoint(path).get("completed"))


def stage_checkpoint(out_dir: str | Path, stage: str) -> Dict[str, Any]:
    """The latest checkpoint of ``stage`` of a run folder (for inspection and tests)."""
    return load_checkpoint(Path(out_dir) / stage / LATEST)


__all__ = ["train", "TrainResult", "predict_unlabeled_masks", "preprocessing_settings", "stage_checkpoint"]
