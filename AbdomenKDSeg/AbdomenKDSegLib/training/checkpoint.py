"""Atomic training checkpoints and random-number-generator states.

A checkpoint is written to a temporary file in the destination folder, flushed and fsync'ed, then
renamed over the destination (``os.replace``) and the folder fsync'ed, so a crash (even SIGKILL) at
any moment leaves either the previous complete checkpoint or the new complete one. Checkpoints hold
only tensors, numbers, strings, lists and dicts and are loaded with ``torch.load(weights_only=True)``.

Test hook: with ``ABDOMENKDSEG_TEST_CKPT_PAUSE="<bytes>:<marker path>[:<skip>]"`` in the environment the
writer lets ``<skip>`` saves of the process complete (default 0), then pauses (sleeps) after ``<bytes>``
bytes of the next temporary file, having created the marker file, so a test can kill the process in
the middle of a write.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..atomic_files import atomic_path
from ..errors import AbdomenKDSegError

PAUSE_ENV = "ABDOMENKDSEG_TEST_CKPT_PAUSE"
FORMAT = "abdomen-kdseg-training-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(AbdomenKDSegError):
    """A checkpoint is missing, unreadable or belongs to another run."""


_SAVES = [0]  # checkpoints written by this process (for the test hook's <skip>)


class _CountingWriter:
    """File wrapper that counts bytes and implements the test pause hook."""

    def __init__(self, fh, pause: Optional[str], name: str = "") -> None:
        self.fh = fh
        self.name = name
        self.written = 0
        self.pause_at: Optional[int] = None
        self.marker: Optional[str] = None
        if pause:
            fields = pause.split(":")
            skip = int(fields[2]) if len(fields) > 2 and fields[2] else 0
            if _SAVES[0] >= skip:
                self.pause_at, self.marker = int(fields[0]), fields[1] or None

    def write(self, data) -> int:
        n = self.fh.write(data)
        self.written += len(data)
        if self.pause_at is not None and self.written >= self.pause_at:
            self.pause_at = None
            self.fh.flush()
            os.fsync(self.fh.fileno())
            if self.marker:
                Path(self.marker).write_text(self.name)
            time.sleep(3600)
        return n

    def flush(self) -> None:
        self.fh.flush()


def save_checkpoint(state: Dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`atomic_files.atomic_path`, fsync'ed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as fh:
        writer = _CountingWriter(fh, os.environ.get(PAUSE_ENV), str(tmp))
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, writer)
    _SAVES[0] += 1
    return path


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (CPU tensors, no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an AbdomenKDSeg training checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state.get('format_version')} is not "
                              f"supported (expected {FORMAT_VERSION})")
    return state


# ---------------------------------------------------------------------------- RNG states
def get_rng_state() -> Dict[str, Any]:
    """Python, NumPy (legacy global), torch CPU and all CUDA generator states, checkpoint-safe."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
