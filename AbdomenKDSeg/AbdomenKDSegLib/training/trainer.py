"""The training loop of one stage (coarse or fine): S, T1, T2 trained jointly and online.

One optimizer (the paper's Nesterov SGD, or Adam for short CPU recipes) over all networks of the
variant, poly learning rate stepped per epoch, labeled and unlabeled batches alternating 1:1
(:mod:`.sampler`), augmentation "v4" (:mod:`.augment`), the losses of :mod:`.losses`, AMP on CUDA
(autocast float16 + GradScaler), fp32 on CPU. Checkpoints (:mod:`.checkpoint`) hold everything
needed to continue bit-for-bit: networks, optimizer, scheduler, grad scaler, sampler position, and
the RNG states of every rank.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..engine.networks import NetworkConfig, build_network, student_config, teacher1_config, teacher2_config
from ..engine.organs import NUM_CLASSES
from ..errors import InputError
from .augment import AugmentV4
from .checkpoint import CheckpointError, get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from .data import CachedCase
from .distributed import DistInfo, all_gather_object, barrier
from .logs import TrainingLogger
from .losses import loss_weights, step_loss
from .recipe import Recipe, Variant
from .sampler import TwoStreamSampler

STAGES = ("coarse", "fine")
LATEST = "checkpoint_latest.pt"
# recipe keys that may change between a run and its resumption
RESUMABLE_KEYS = ("checkpoint_every_steps", "checkpoint_every_epochs", "snapshot_every_epochs")


def network_configs(recipe: Recipe, variant: Variant) -> Dict[str, NetworkConfig]:
    """NetworkConfig of every role of ``variant`` (recipe.student / recipe.teacher are overrides)."""
    configs: Dict[str, NetworkConfig] = {}
    if variant.student:
        configs["S"] = student_config(**recipe.student)
    for role in variant.roles:
        if role == "S":
            continue
        if variant.teacher_arch == "student":  # CTS: two students with different decoders
            up = "transposed" if role == "T1" else variant.teacher2_upsampling
            configs[role] = student_config(**{**recipe.student, "upsampling": up})
        elif role == "T1":
            configs[role] = teacher1_config(**recipe.teacher)
        else:
            configs[role] = teacher2_config(**{**recipe.teacher, "upsampling": variant.teacher2_upsampling})
    return configs


class Ensemble(nn.Module):
    """The networks of a variant; ``forward(x)`` returns {role: logits (B, 14, Z, Y, X)}."""

    def __init__(self, nets: Dict[str, nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(nets)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {role: net(x) for role, net in self.nets.items()}


def poly_lambda(epochs: int, power: float) -> Callable[[int], float]:
    """LR factor ``(1 - epoch / epochs) ** power`` (clamped at 0)."""
    def factor(epoch: int) -> float:
        return max(0.0, 1.0 - epoch / float(epochs)) ** power
    return factor


def make_optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer: SGD (lr, momentum, Nesterov, weight decay) or Adam (lr, weight decay)."""
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                           weight_decay=recipe.weight_decay)


def _stage_seed(seed: int, stage: str, rank: int = 0) -> int:
    return (int(seed) * 1_000_003 + STAGES.index(stage) * 7_919 + int(rank)) % (2**63 - 1)


class StageTrainer:
    """Trains one stage; ``run()`` returns True when all epochs are done (False if stopped early:
    ``run(max_steps=N)`` trains at most N more steps)."""

    def __init__(self, stage: str, recipe: Recipe, labeled: Sequence[CachedCase],
                 unlabeled: Sequence[CachedCase], folder: Path, device: torch.device,
                 dist: Optional[DistInfo] = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        self.recipe = recipe
        self.variant = recipe.stage_variant(stage)
        self.labeled = list(labeled)
        self.unlabeled = list(unlabeled) if self.variant.unlabeled else []
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.dist = dist or DistInfo()
        self.progress = progress
        self.log = log if self.dist.is_main else (lambda msg: None)
        self.epochs = recipe.stage_epochs(stage)
        self.t_max = recipe.rampup_epochs if recipe.rampup_epochs is not None else self.epochs
        self.use_amp = bool(recipe.amp and self.device.type == "cuda")
        self.global_step = 0
        self.completed = False

        self.configs = network_configs(recipe, self.variant)
        torch.manual_seed(_stage_seed(recipe.seed, stage))  # identical initial weights on every rank
        self.nets = {role: build_network(cfg).to(self.device) for role, cfg in self.configs.items()}
        if recipe.init_from:
            self._init_from_bundle(Path(recipe.init_from))
        self.ensemble = Ensemble(self.nets)
        self.model: nn.Module = self.ensemble
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                self.ensemble, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self._has_unused_parameters())
        self.optimizer = make_optimizer(self.ensemble.parameters(), recipe)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           poly_lambda(self.epochs, recipe.poly_power))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.sampler = TwoStreamSampler(len(self.labeled), len(self.unlabeled), self.variant.unlabeled,
                                        recipe.batch_size, recipe.seed + STAGES.index(stage),
                                        self.dist.rank, self.dist.world_size)
        generator = torch.Generator().manual_seed(_stage_seed(recipe.seed, stage, self.dist.rank + 1))
        self.augment = AugmentV4(recipe.augment, recipe.patch_size, recipe.hu_window, NUM_CLASSES,
                                 recipe.zscore_eps, generator)
        self.logger: Optional[TrainingLogger] = None

    # ------------------------------------------------------------------ helpers
    def _init_from_bundle(self, path: Path) -> None:
        """Copy the verified bundle's network of this stage into the exported role (fine-tuning).

        A bundle whose architecture differs from the recipe's student raises :class:`InputError`
        naming both; a missing, corrupt or tampered bundle raises the bundle's own error.
        """
        from ..engine.bundle import load_bundle

        source = load_bundle(path).network(self.stage)
        role = self.variant.export
        try:
            self.nets[role].load_state_dict(source.state_dict())
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise InputError(f"init_from {path}: its {self.stage} network does not fit the recipe's {role} "
                             f"network (different architecture: set the recipe's student options to the "
                             f"bundle's; {first})") from None
        self.log(f"[{self.stage}] {role} starts from the weights of {path}")

    def _has_unused_parameters(self) -> bool:
        """True if some network gets no gradient in unlabeled steps (DDP must then search for them)."""
        if not self.variant.unlabeled:
            return False
        trained = set()
        if self.variant.cross_teaching:
            trained |= {"T1", "T2"}
        if self.variant.student and (self.variant.psv or self.variant.kd):
            trained.add("S")
        return trained != set(self.variant.roles)

    def _case_ids(self) -> Dict[str, list]:
        return {"labeled": [c.case_id for c in self.labeled], "unlabeled": [c.case_id for c in self.unlabeled]}

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / LATEST

    def export_network(self) -> Tuple[nn.Module, NetworkConfig]:
        """The network used at inference (S, or T1 for CTS) and its config."""
        role = self.variant.export
        return self.nets[role], self.configs[role]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict:
        rng = {"global": get_rng_state(), "augment": self.augment.generator.get_state()}
        return {
            "stage": self.stage,
            "variant": self.variant.name,
            "recipe": self.recipe.to_dict(),
            "configs": {r: c.to_dict() for r, c in self.configs.items()},
            "models": {r: n.state_dict() for r, n in self.nets.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "epoch": self.sampler.epoch,
            "global_step": self.global_step,
            "completed": self.completed,
            "cases": self._case_ids(),
            "rng": all_gather_object(self.dist, rng),  # one entry per rank
            "world_size": self.dist.world_size,
        }

    def save(self) -> None:
        """Write the latest checkpoint (rank 0; every rank contributes its RNG state)."""
        state = self.state_dict()
        if self.dist.is_main:
            save_checkpoint(state, self.checkpoint_path)
        barrier(self.dist)

    def _check_compatible(self, state: Dict) -> None:
        path = self.checkpoint_path
        if state.get("stage") != self.stage or state.get("variant") != self.variant.name:
            raise CheckpointError(f"{path} is a {state.get('stage')}/{state.get('variant')} checkpoint, "
                                  f"expected {self.stage}/{self.variant.name}")
        old, new = dict(state["recipe"]), self.recipe.to_dict()
        changed = sorted(k for k in set(old) | set(new)
                         if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
        if changed:
            raise CheckpointError(f"cannot resume {path}: the recipe changed ({', '.join(changed)})")
        if state["cases"] != self._case_ids():
            raise CheckpointError(f"cannot resume {path}: the training cases changed since it was written")
        if int(state["world_size"]) != self.dist.world_size:
            raise CheckpointError(f"cannot resume {path}: written by {state['world_size']} process(es), "
                                  f"now {self.dist.world_size}")

    def load(self, state: Dict) -> None:
        """Restore everything from a checkpoint dict."""
        self._check_compatible(state)
        for role, net in self.nets.items():
            net.load_state_dict(state["models"][role])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.global_step = int(state["global_step"])
        self.completed = bool(state["completed"])
        rng = state["rng"][self.dist.rank]
        set_rng_state(rng["global"])
        self.augment.generator.set_state(rng["augment"])

    def start(self, resume: bool) -> bool:
        """Load the latest checkpoint when resuming and one exists; returns True if one was loaded."""
        loaded = False
        if resume and self.checkpoint_path.is_file():
            self.load(load_checkpoint(self.checkpoint_path))
            loaded = True
            self.log(f"[{self.stage}] resumed at epoch {self.sampler.epoch}, step {self.global_step}"
                     + (" (stage complete)" if self.completed else ""))
        self.logger = TrainingLogger(self.folder, self.stage, enabled=self.dist.is_main,
                                     resume_step=self.global_step if loaded else None,
                                     resume_epoch=self.sampler.epoch if loaded else None)
        return loaded

    # ------------------------------------------------------------------ training
    def load_batch(self, kind: str, indices: Sequence[int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Load and augment cached cases: images (B, 1, pz, py, px), soft targets (B, C, ...) or None."""
        cases = self.labeled if kind == "labeled" else self.unlabeled
        images, targets = [], []
        for i in indices:
            image, label = cases[i].load()
            x = torch.from_numpy(np.asarray(image, dtype=np.float32)).to(self.device)
            y = torch.from_numpy(label.astype(np.int64)).to(self.device) if label is not None else None
            x, y = self.augment(x, y if kind == "labeled" else None)
            images.append(x)
            targets.append(y)
        target = torch.stack(targets) if kind == "labeled" else None
        return torch.stack(images), target

    def train_step(self, kind: str, indices: Sequence[int], weights: Dict[str, float]
                   ) -> Tuple[float, Dict[str, float]]:
        """One optimizer step on one batch; returns (total loss, unweighted terms)."""
        x, target = self.load_batch(kind, indices)
        return self.optimize(x, target, weights)

    def optimize(self, x: torch.Tensor, target: Optional[torch.Tensor], weights: Dict[str, float]
                 ) -> Tuple[float, Dict[str, float]]:
        """Forward, loss, backward and optimizer step on an augmented batch (``target`` None: unlabeled)."""
        self.model.train()
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            logits = self.model(x)
        logits = {k: v.float() for k, v in logits.items()}
        total, terms = step_loss(self.variant, logits, target, weights, self.recipe)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(total.detach()), terms

    def _epoch_row(self, epoch: int, weights: Dict[str, float], lr: float, steps: int,
                   seconds: float) -> Dict:
        return {"epoch": epoch, "lr": lr, "steps": steps, "seconds": round(seconds, 3), **weights}

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole stage (epochs x steps per epoch)."""
        return self.epochs * self.sampler.steps_per_epoch

    def run(self, max_steps: Optional[int] = None) -> bool:
        """Train until the last epoch (True), or stop after ``max_steps`` optimiser steps of this call.

        ``max_steps`` counts the steps of this call, not the stage's global step: a stage resumed at
        step 10 and run with ``max_steps=2`` stops at step 12 (False), after writing its checkpoint
        so that a later ``start(resume=True)`` continues bit for bit. ``max_steps=0`` only writes
        the checkpoint. An already completed stage returns True without training.
        """
        if self.logger is None:
            self.start(resume=False)
        if self.completed:
            return True
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        from tqdm import tqdm

        stop_at = None if max_steps is None else self.global_step + int(max_steps)
        every_steps = self.recipe.checkpoint_every_steps
        while self.sampler.epoch < self.epochs:
            if stop_at is not None and self.global_step >= stop_at:
                self.save()
                return False
            epoch = self.sampler.epoch
            weights = loss_weights(self.recipe, epoch, self.t_max)
            lr = float(self.scheduler.get_last_lr()[0])
            bar = tqdm(total=self.sampler.steps_per_epoch, initial=self.sampler.step, leave=False,
                       desc=f"{self.stage} epoch {epoch + 1}/{self.epochs}",
                       disable=not (self.progress and self.dist.is_main))
            t_epoch = time.perf_counter()
            steps = 0
            stopped = False
            for batch in self.sampler:
                t0 = time.perf_counter()
                total, terms = self.train_step(batch.kind, batch.indices, weights)
                self.global_step += 1
                steps += 1
                if self.logger is not None:
                    self.logger.step({"epoch": epoch, "step": self.global_step, "kind": batch.kind, "lr": lr,
                                      **weights, "total": total, **terms,
                                      "seconds": round(time.perf_counter() - t0, 4)})
                bar.update(1)
                bar.set_postfix(kind=batch.kind[0], loss=f"{total:.4f}")
                if every_steps and self.global_step % every_steps == 0:
                    self.save()
                if stop_at is not None and self.global_step >= stop_at:
                    stopped = True
                    if self.sampler.step < self.sampler.steps_per_epoch:
                        bar.close()
                        self.save()
                        return False
            bar.close()
            # end of epoch
            self.scheduler.step()
            self.sampler.set_epoch(epoch + 1)
            if self.logger is not None:
                row = self.logger.epoch(self._epoch_row(epoch, weights, lr, steps, time.perf_counter() - t_epoch))
                self.log(_epoch_summary(self.stage, epoch, self.epochs, row))
            done = epoch + 1
            if done == self.epochs:
                break
            if stopped or done % max(1, self.recipe.checkpoint_every_epochs) == 0:
                self.save()
            self._snapshot(done)
            if stopped:
                return False
        self.completed = True
        self.save()
        self._snapshot(self.epochs)
        if self.logger is not None:
            self.logger.close()
        self.log(f"[{self.stage}] done: {self.epochs} epochs, {self.global_step} steps")
        return True

    def _snapshot(self, epochs_done: int) -> None:
        """Keep the weights every ``snapshot_every_epochs`` epochs (reference: every 250)."""
        every = self.recipe.snapshot_every_epochs
        if not self.dist.is_main or not every or epochs_done % every:
            return
        weights = {"models": {r: n.state_dict() for r, n in self.nets.items()},
                   "configs": {r: c.to_dict() for r, c in self.configs.items()},
                   "stage": self.stage, "epoch": epochs_done}
        save_checkpoint(weights, self.folder / f"weights_epoch{epochs_done:04d}.pt")


def stage_state_summary(trainer: StageTrainer) -> Dict:
    """Small JSON-able summary of a stage for the bundle's model card."""
    return {"variant": trainer.variant.name, "epochs": trainer.epochs, "steps": trainer.global_step,
            "exported": trainer.variant.export,
            "networks": {r: c.to_dict() for r, c in trainer.configs.items()}}


def _epoch_summary(stage: str, epoch: int, epochs: int, row: Dict) -> str:
    """One line per epoch: mean total loss of labeled / unlabeled steps, lr, ramp, seconds."""
    parts = [f"[{stage}] epoch {epoch + 1}/{epochs}"]
    for kind in ("labeled", "unlabeled"):
        if f"{kind}_total" in row:
            parts.append(f"{kind} {row[f'{kind}_total']:.4f}")
    parts.append(f"lr {row['lr']:.5f} ramp {row['ramp']:.4f} ({row['seconds']:.1f} s)")
    return "  ".join(parts)
