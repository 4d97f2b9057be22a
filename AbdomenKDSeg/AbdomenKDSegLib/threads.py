"""The process-wide CPU thread count of the engine (resizing, ONNX Runtime, OpenVINO, PyTorch).

Without PyTorch there is no ``torch.set_num_threads`` to hold it, so it lives here: ``--threads``
sets it with :func:`set_threads`, which also sets PyTorch's when PyTorch is already imported.
Without an explicit value :func:`get_threads` returns PyTorch's count when PyTorch is imported
(so ``torch.set_num_threads`` keeps working), else the CPUs this process may run on.
"""

from __future__ import annotations

import os
import sys

_threads: int | None = None


def _torch():  # noqa: ANN202 (the torch module, when it is already imported)
    module = sys.modules.get("torch")
    return module if module is not None and hasattr(module, "get_num_threads") else None


def set_threads(n: int) -> None:
    """Use ``n`` (>= 1) CPU threads from now on (PyTorch too, if imported; :func:`sync_torch` when
    PyTorch is imported later)."""
    global _threads
    _threads = int(n)
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(_threads)


def get_threads() -> int:
    """CPU threads to use: the :func:`set_threads` value, else PyTorch's, else the usable CPUs."""
    if _threads is not None:
        return _threads
    torch = _torch()
    if torch is not None:
        return int(torch.get_num_threads())
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def sync_torch() -> None:
    """Give a PyTorch imported after :func:`set_threads` the same thread count."""
    torch = _torch()
    if _threads is not None and torch is not None and torch.get_num_threads() != _threads:
        torch.set_num_threads(_threads)
