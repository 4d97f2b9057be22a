"""Ending a finished command-line process without the interpreter's module teardown."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once its work is done, skipping CPython's module teardown.

    After a CPU segmentation (no PyTorch imported: numpy, SimpleITK, OpenVINO) the interpreter's
    teardown still takes ~0.17 s on a 2-core CPU against ~0.045 s here (medians of 5 fresh runs on
    the sample CT, 2026-12-07), so it saves ~0.12 s per run; with PyTorch imported (CUDA, backend
    torch) it saves ~0.7 s. The teardown does nothing a finished command needs. What a normal
    exit does that matters is done first, in the interpreter's order: thread
    shutdown (idle executor workers, e.g. OpenVINO's telemetry sender, are told to stop; non-daemon
    threads are joined), ``atexit`` handlers (logging, multiprocessing), then ``sys.stdout`` and
    ``sys.stderr`` are flushed and ``os._exit`` ends the process. For entry points only (console
    script, ``python -m``), called from the main thread; never for library calls.
    """
    shutdown = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx runs first (CPython >= 3.9)
    if shutdown is not None and threading.current_thread() is threading.main_thread():
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed, replaced or broken stream
            pass
    os._exit(code)
