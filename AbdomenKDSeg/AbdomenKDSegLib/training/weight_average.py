"""Weight averaging of a fine-tuned network with the network it started from (a "model soup" of two).

A student continued on new data (``train --init-from``) and its starting point lie in one basin of the
loss; the average of their weights usually keeps what the start knew and adds what the continuation
learnt (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022: WiSE-FT). Floating-point
tensors are averaged, ``(1 - w) * start + w * run``; other tensors (integer buffers, if a network
has any) are the run's. Both state dicts must have the same keys and shapes (the same architecture).
"""

from __future__ import annotations

from typing import Dict, Mapping

import torch

from ..errors import BundleError


def average_state_dicts(start: Mapping[str, torch.Tensor], run: Mapping[str, torch.Tensor], run_weight: float
                        ) -> Dict[str, torch.Tensor]:
    """``(1 - run_weight) * start + run_weight * run`` per floating-point tensor (float32 math, the run's
    dtype); other tensors are the run's. Raises :class:`BundleError` naming the first mismatch."""
    if not 0.0 <= run_weight <= 1.0:
        raise BundleError(f"the run's weight in the average must be in [0, 1], got {run_weight}")
    if set(start) != set(run):
        missing = sorted(set(start) ^ set(run))
        raise BundleError(f"cannot average networks of different architectures: {missing[0]} is in only one")
    out: Dict[str, torch.Tensor] = {}
    for name, value in run.items():
        other = start[name]
        if other.shape != value.shape:
            raise BundleError(f"cannot average {name}: shape {tuple(other.shape)} vs {tuple(value.shape)}")
        if value.is_floating_point():
            mixed = (1.0 - run_weight) * other.detach().float() + run_weight * value.detach().float()
            out[name] = mixed.to(value.dtype)
        else:
            out[name] = value.detach().clone()
    return out


def average_into(run_net: torch.nn.Module, start_net: torch.nn.Module, run_weight: float) -> torch.nn.Module:
    """Load the average of ``start_net`` and ``run_net`` into ``run_net`` (in place); returns it."""
    run_net.load_state_dict(average_state_dicts(start_net.state_dict(), run_net.state_dict(), run_weight))
    return run_net
