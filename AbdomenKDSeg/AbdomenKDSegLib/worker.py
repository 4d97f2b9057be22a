"""Worker process of the Slicer module: runs :func:`inference.segment_file` and reports over stdout.

Started by :class:`AbdomenKDSegLib.logic.AbdomenKDSegLogic` as
``<python> -m AbdomenKDSegLib.worker --input IN.nrrd --output OUT.nrrd [--model M] [--device D]
[--organs 1,5,13] [--no-fine] [--coarse-output COARSE.nrrd]``. Running the network in its own
process means a CUDA crash or an out-of-memory kill cannot take Slicer down, Cancel is a process
kill, memory is returned after each run, and freshly installed packages work without restarting
Slicer.

Protocol: every line the worker writes to stdout is one JSON object with an ``event`` key:

- ``{"event": "started", "pid": int, "python": str}``: the worker is alive;
- ``{"event": "progress", "stage": str, "fraction": float}``: fraction of that stage in [0, 1];
- ``{"event": "done", "output": str, "device": str, "timings": {stage: seconds},
  "voxel_counts": {value: count}, "warnings": [str]}``: the label map was written; with
  ``--coarse-output`` (and the fine stage on) also ``"coarse_output": str``, the coarse result's file;
- ``{"event": "error", "type": str, "message": str}``: a handled failure (exit code 2 for
  input/model errors, 1 for anything unexpected).

Everything else (library chatter, tracebacks) goes to stderr, which the logic keeps for its log.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import threading
import time
from typing import Any, Callable, TextIO

#: Exit code for errors the user can fix (bad input, missing or corrupt model).
EXIT_USER_ERROR = 2
#: Exit code for unexpected failures (a bug or a broken installation).
EXIT_FAILURE = 1


class EventWriter:
    """Writes protocol events, one JSON object per line, flushed immediately."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last_progress: tuple[str, float] | None = None

    def emit(self, event: str, **fields: Any) -> None:
        """Write one event line."""
        self.stream.write(json.dumps({"event": event, **fields}) + "\n")
        self.stream.flush()

    def progress(self, stage: str, fraction: float) -> None:
        """Progress event; repeated identical (stage, fraction) pairs are dropped."""
        key = (str(stage), round(float(fraction), 3))
        if key != self._last_progress:
            self._last_progress = key
            self.emit("progress", stage=key[0], fraction=min(max(key[1], 0.0), 1.0))


def protocol_stream() -> TextIO:
    """A private copy of stdout for protocol events; stdout itself is redirected to stderr.

    Anything a library prints (Python or native code) then lands in stderr and cannot corrupt
    the JSON lines the parent process reads.
    """
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the worker."""
    p = argparse.ArgumentParser(prog="python -m AbdomenKDSegLib.worker", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="CT volume file (NRRD/NIfTI) or DICOM folder")
    p.add_argument("--output", required=True, help="label map file to write (.nrrd or .nii.gz)")
    p.add_argument("--model", default=None, help="model bundle (.safetensors); default: the bundled one")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--organs", default=None, help="comma-separated organ keys or label values")
    p.add_argument("--no-fine", dest="fine", action="store_false", help="coarse stage only")
    p.add_argument("--coarse-output", default=None,
                   help="also write the coarse result at full resolution here (ignored with --no-fine)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch default)")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone (default: the parent)")
    # Test hooks, hidden from --help: a slow start (to test Cancel) and a native crash.
    p.add_argument("--debug-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--debug-crash", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def organ_list(text: str | None) -> list[str] | None:
    """``"liver, 2,aorta"`` -> ``["liver", "2", "aorta"]``; empty or None -> None (all organs)."""
    if not text:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def run(args: argparse.Namespace, events: EventWriter,
        segment: Callable[..., Any] | None = None) -> int:
    """Run one segmentation, reporting through ``events``; returns the process exit code."""
    from .errors import AbdomenKDSegError, BundleError, InputError

    events.emit("started", pid=os.getpid(), python=sys.executable)
    if args.debug_delay > 0:
        events.progress("waiting", 0.0)
        time.sleep(args.debug_delay)
    if args.debug_crash:
        faulthandler._sigsegv()  # a real native crash, as a broken GPU driver would cause
    try:
        if segment is None:
            segment = load_engine(args.threads)
        extra = {} if args.coarse_output is None else {"coarse_output": args.coarse_output}
        result = segment(
            args.input, args.output, model=args.model, device=args.device, fine=args.fine,
            organs=organ_list(args.organs), progress=events.progress, **extra,
        )
    except (InputError, BundleError) as exc:
        events.emit("error", type=type(exc).__name__, message=str(exc))
        return EXIT_USER_ERROR
    except AbdomenKDSegError as exc:
        events.emit("error", type="AbdomenKDSegError", message=str(exc))
        return EXIT_USER_ERROR
    except MemoryError:
        events.emit("error", type="MemoryError",
                    message="the computer ran out of memory while segmenting this volume")
        return EXIT_FAILURE
    except ImportError as exc:
        events.emit("error", type="ImportError", message=missing_package_message(exc))
        return EXIT_FAILURE
    except Exception as exc:  # report anything else as one message; the traceback goes to stderr
        import traceback

        traceback.print_exc(file=sys.stderr)
        events.emit("error", type=type(exc).__name__, message=f"{type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    coarse = getattr(result, "coarse_output_path", None)
    events.emit(
        "done",
        output=str(result.output_path),
        device=str(result.device),
        timings={k: float(v) for k, v in result.timings.items()},
        voxel_counts={str(k): int(v) for k, v in result.voxel_counts.items()},
        warnings=[str(w) for w in result.warnings],
        **({} if coarse is None else {"coarse_output": str(coarse)}),
    )
    return 0


def load_engine(threads: int = 0) -> Callable[..., Any]:
    """Import the engine (torch and friends) and return ``segment_file``."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from .inference import segment_file

    return segment_file


def missing_package_message(exc: ImportError) -> str:
    """User-facing text for a missing dependency in the worker's Python."""
    name = getattr(exc, "name", None) or str(exc)
    hint = ("install PyTorch with the PyTorch extension (PyTorch Utils module)" if name == "torch"
            else "open the AbdomenKDSeg module and let it install its Python packages")
    return f"the Python package '{name}' is missing in {sys.executable}: {hint}"


def exit_when_orphaned(parent: int | None = None, interval: float = 1.0) -> None:
    """Exit once process ``parent`` (Slicer; default: the current parent) is gone (POSIX only).

    A worker whose application crashed would otherwise compute for nobody. Passing the pid
    explicitly also covers a parent that dies before this check starts.
    """
    if os.name == "nt":
        return
    parent = parent or os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(interval)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m AbdomenKDSegLib.worker``."""
    faulthandler.enable(file=sys.stderr)
    args = parse_args(argv)
    exit_when_orphaned(args.parent_pid)
    events = EventWriter(protocol_stream())
    return run(args, events)


if __name__ == "__main__":
    from AbdomenKDSegLib.process_exit import exit_now

    exit_now(main())  # Slicer waits for the process: skip the ~0.7 s teardown of PyTorch's modules
