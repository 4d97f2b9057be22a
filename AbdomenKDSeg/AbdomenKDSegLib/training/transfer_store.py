"""Fitted anatomy transfers on disk: one ``<target>.npz`` per target label map, written atomically.

The fits are the slow part of the training-set generator (about a minute per target on one CPU
thread), so they are stored once and re-rendered with new appearance randomisation at will. A file
holds the affine part, the control-grid displacement, the fade weight and the DSC reached; a file
whose ``key`` differs (other source, other settings) is refitted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from ..atomic_files import atomic_path
from .anatomy_transfer import FitSettings, GridVolume, Transfer

STORE_VERSION = 1


def fit_key(source_labels: Path, target_labels: Path, settings: FitSettings) -> str:
    """Digest of what a fit depends on: both label files (name and SHA-256 of the bytes: a copied or
    re-mounted data folder keeps its fits) and the settings."""
    parts = {"version": STORE_VERSION, "settings": dataclasses.asdict(settings)}
    for name, path in (("source", source_labels), ("target", target_labels)):
        parts[name] = [Path(path).name, hashlib.sha256(Path(path).read_bytes()).hexdigest()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=list).encode()).hexdigest()


def save_transfer(path: Path, transfer: Transfer, key: str, seconds: float) -> None:
    """Write ``transfer`` to ``path`` (.npz) atomically."""
    assert transfer.weight is not None
    arrays = {
        "affine": transfer.affine, "offset": transfer.offset, "control": transfer.control.numpy(),
        "extent": transfer.extent, "weight": transfer.weight.array,
        "weight_spacing": np.asarray(transfer.weight.spacing), "weight_origin": np.asarray(transfer.weight.origin),
        "meta": np.frombuffer(json.dumps({
            "key": key, "seconds": seconds,
            "dice": {str(k): v for k, v in transfer.dice.items()},
            "dice_affine": {str(k): v for k, v in transfer.dice_affine.items()},
        }).encode(), dtype=np.uint8),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def read_meta(path: Path) -> Dict:
    """The JSON part (key, seconds, dice, dice_affine) of a stored transfer."""
    with np.load(path, allow_pickle=False) as data:
        return json.loads(bytes(data["meta"]).decode())


def load_transfer(path: Path) -> Transfer:
    """Read a transfer written by :func:`save_transfer`."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        weight = GridVolume(data["weight"].astype(np.float32), tuple(float(v) for v in data["weight_spacing"]),
                            tuple(float(v) for v in data["weight_origin"]))
        return Transfer(data["affine"].astype(np.float64), data["offset"].astype(np.float64),
                        torch.as_tensor(data["control"]), data["extent"].astype(np.float64), weight,
                        dice={int(k): v for k, v in meta["dice"].items()},
                        dice_affine={int(k): v for k, v in meta["dice_affine"].items()})


def is_current(path: Path, key: str) -> bool:
    """True when ``path`` exists, is readable and was fitted with ``key``."""
    try:
        return read_meta(path).get("key") == key
    except (OSError, ValueError, KeyError):
        return False
