"""Two-stream sampler: labeled and unlabeled batches alternate 1:1, as in the paper's semi-supervised training.

An epoch is one pass over this rank's share of the labeled cases in a fresh random order; after each
labeled batch comes one unlabeled batch drawn from an endless stream that is reshuffled whenever it
is used up. Orders are pure functions of (seed, epoch) and (seed, cycle), so the sampler state is just
``(epoch, step)`` and resuming is exact. With several processes each rank takes every
``world_size``-th entry of the shared order (padded by wrapping around, like DistributedSampler), so
all ranks run the same number of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np


@dataclass(frozen=True)
class Batch:
    """One training step: ``kind`` is "labeled" or "unlabeled"; ``indices`` index that case list."""

    kind: str
    indices: Tuple[int, ...]


def _shard(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's entries of ``order`` after padding it to a multiple of ``world_size``."""
    total = int(math.ceil(len(order) / world_size)) * world_size
    padded = np.resize(order, total)  # repeats from the start, like DistributedSampler
    return padded[rank:total:world_size]


class TwoStreamSampler:
    """Alternating labeled/unlabeled batches (``use_unlabeled=False``: labeled batches only)."""

    def __init__(self, n_labeled: int, n_unlabeled: int, use_unlabeled: bool, batch_size: int = 1,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if n_labeled < 1:
            raise ValueError("the sampler needs at least one labeled case")
        if use_unlabeled and n_unlabeled < 1:
            raise ValueError("this recipe uses unlabeled data but there are no unlabeled cases")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.n_labeled = int(n_labeled)
        self.n_unlabeled = int(n_unlabeled)
        self.use_unlabeled = bool(use_unlabeled)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.step = 0  # next step within the epoch

    # ------------------------------------------------------------------ orders
    @property
    def labeled_per_rank(self) -> int:
        return int(math.ceil(self.n_labeled / self.world_size))

    @property
    def labeled_batches(self) -> int:
        return int(math.ceil(self.labeled_per_rank / self.batch_size))

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one epoch on this rank (2 x labeled batches when unlabeled data are used)."""
        return self.labeled_batches * (2 if self.use_unlabeled else 1)

    def labeled_order(self, epoch: int) -> np.ndarray:
        """This rank's labeled case indices for ``epoch`` (each case exactly once over all ranks)."""
        rng = np.random.default_rng([self.seed, 0, int(epoch)])
        return _shard(rng.permutation(self.n_labeled), self.rank, self.world_size)

    def unlabeled_index(self, k: int) -> int:
        """The ``k``-th unlabeled draw of this rank (the stream reshuffles every pass)."""
        per_rank = int(math.ceil(self.n_unlabeled / self.world_size))
        cycle, pos = divmod(int(k), per_rank)
        rng = np.random.default_rng([self.seed, 1, cycle])
        return int(_shard(rng.permutation(self.n_unlabeled), self.rank, self.world_size)[pos])

    def batch(self, epoch: int, step: int) -> Batch:
        """Batch number ``step`` (0-based) of ``epoch``."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside epoch of {self.steps_per_epoch} steps")
        b = self.batch_size
        if self.use_unlabeled:
            j, is_unlabeled = divmod(step, 2)
        else:
            j, is_unlabeled = step, 0
        if not is_unlabeled:
            order = self.labeled_order(epoch)
            return Batch("labeled", tuple(int(i) for i in order[j * b:(j + 1) * b]))
        first = (epoch * self.labeled_batches + j) * b
        return Batch("unlabeled", tuple(self.unlabeled_index(first + i) for i in range(b)))

    def epoch_batches(self, epoch: int) -> List[Batch]:
        """All batches of ``epoch`` in order."""
        return [self.batch(epoch, s) for s in range(self.steps_per_epoch)]

    # ------------------------------------------------------------------ iteration with state
    def __iter__(self):
        """Yield the remaining batches of the current epoch, advancing ``step``."""
        while self.step < self.steps_per_epoch:
            batch = self.batch(self.epoch, self.step)
            self.step += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first step."""
        self.epoch, self.step = int(epoch), 0

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "n_labeled": self.n_labeled,
                "n_unlabeled": self.n_unlabeled, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for key in ("seed", "n_labeled", "n_unlabeled", "world_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]}, "
                                 f"now {getattr(self, key)}: the data or the process count changed")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
