"""Worker process of the Slicer module: runs :func:`inference.segment_file` and reports over stdout.

Started by :class:`AbdomenKDSegLib.logic.AbdomenKDSegLogic` as
``<python> -m AbdomenKDSegLib.worker --input IN.nrrd --output OUT.nrrd [--model M] [--device D]
[--organs 1,5,13] [--no-fine] [--coarse-output COARSE.nrrd] [--parent-pid PID] [--watch-stdin]``.
Running the network in its own process means a CUDA crash or an out-of-memory kill cannot take
Slicer down, Cancel is a process kill, memory is returned after each run, and freshly installed
packages work without restarting Slicer.

Lifetime: the worker follows Slicer itself, not its own parent process (inside Slicer that is the
``PythonSlicer`` launcher, which starts the real Python as its child and waits). It exits with
code 3 once the process ``--parent-pid`` (Slicer) is gone, checked every second with a portable
pid check (a zombie counts as gone), and, with ``--watch-stdin``, as soon as its stdin (a pipe
whose other end only Slicer holds) reaches end-of-file while Slicer is gone.

Protocol: every line the worker writes to stdout is one JSON object with an ``event`` key:

- ``{"event": "started", "pid": int, "python": str}``: the worker is alive;
- ``{"event": "progress", "stage": str, "fraction": float}``: fraction of that stage in [0, 1];
- ``{"event": "done", "output": str, "device": str, "backend": str, "timings": {stage: seconds},
  "voxel_counts": {value: count}, "warnings": [str]}``: the label map was written; with
  ``--coarse-output`` (and the fine stage on) also ``"coarse_output": str``, the coarse result's file;
- ``{"event": "error", "type": str, "message": str, "warnings": [str]}``: a handled failure (exit
  code 2 for input/model errors, 1 for anything unexpected).

Warnings are reported only in these events, each once (not also printed on stderr). Everything
else (library chatter, tracebacks) goes to stderr, which the logic keeps for its log.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import threading
import time
import warnings
from typing import Any, Callable, TextIO

#: Exit code for errors the user can fix (bad input, missing or corrupt model).
EXIT_USER_ERROR = 2
#: Exit code for unexpected failures (a bug or a broken installation).
EXIT_FAILURE = 1
#: Exit code when the process the worker works for (Slicer) is gone.
EXIT_ORPHANED = 3


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
    p.add_argument("--parent-pid", type=int, default=0,
                   help="exit when this process (Slicer) is gone (default: the process that started the worker)")
    p.add_argument("--watch-stdin", action="store_true",
                   help="stdin is a pipe held by that process: exit at its end-of-file once the process is gone "
                        "(the worker then reads and discards stdin)")
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
    events.emit("started", pid=os.getpid(), python=sys.executable)
    if args.debug_delay > 0:
        events.progress("waiting", 0.0)
        time.sleep(args.debug_delay)
    if args.debug_crash:
        faulthandler._sigsegv()  # a real native crash, as a broken GPU driver would cause
    with warnings.catch_warnings(record=True) as caught:  # reported in the events, not on stderr
        warnings.simplefilter("always")
        return _run_engine(args, events, segment, caught)


def _unique_messages(caught: list[warnings.WarningMessage], *more: Any) -> list[str]:
    """Distinct warning texts, in order: the recorded warnings, then ``more``."""
    out: list[str] = []
    for text in [str(w.message) for w in caught] + [str(m) for m in more]:
        if text not in out:
            out.append(text)
    return out


def _run_engine(args: argparse.Namespace, events: EventWriter, segment: Callable[..., Any] | None,
                caught: list[warnings.WarningMessage]) -> int:
    """The segmentation itself; warnings are recorded in ``caught``."""
    from .errors import AbdomenKDSegError, BundleError, InputError

    def error(kind: str, message: str) -> None:
        events.emit("error", type=kind, message=message, warnings=_unique_messages(caught))

    try:
        if segment is None:
            segment = load_engine(args.threads)
        extra = {} if args.coarse_output is None else {"coarse_output": args.coarse_output}
        result = segment(
            args.input, args.output, model=args.model, device=args.device, fine=args.fine,
            organs=organ_list(args.organs), progress=events.progress, **extra,
        )
    except (InputError, BundleError) as exc:
        error(type(exc).__name__, str(exc))
        return EXIT_USER_ERROR
    except AbdomenKDSegError as exc:
        error("AbdomenKDSegError", str(exc))
        return EXIT_USER_ERROR
    except MemoryError:
        error("MemoryError", "the computer ran out of memory while segmenting this volume")
        return EXIT_FAILURE
    except ImportError as exc:
        error("ImportError", missing_package_message(exc))
        return EXIT_FAILURE
    except Exception as exc:  # report anything else as one message; the traceback goes to stderr
        import traceback

        traceback.print_exc(file=sys.stderr)
        error(type(exc).__name__, f"{type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    coarse = getattr(result, "coarse_output_path", None)
    events.emit(
        "done",
        output=str(result.output_path),
        device=str(result.device),
        backend=str(getattr(result, "backend", "") or ""),
        timings={k: float(v) for k, v in result.timings.items()},
        voxel_counts={str(k): int(v) for k, v in result.voxel_counts.items()},
        warnings=_unique_messages([], *result.warnings, *(str(w.message) for w in caught)),
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


class ParentWatch:
    """Whether one process (the application the worker works for) is still running, on every OS.

    POSIX: ``os.kill(pid, 0)``, a zombie counting as gone (Linux ``/proc``). Windows: a handle
    opened at once (so a later reuse of the pid cannot fool it), polled with
    ``WaitForSingleObject``. Never ``os.getppid()``: a launcher may stand between the two.
    """

    def __init__(self, pid: int) -> None:
        self.pid = int(pid)
        self._handle: Any = None
        if os.name == "nt" and self.pid > 0:
            self._handle = _windows_open_process(self.pid)

    def alive(self) -> bool:
        """True while the process exists and has not exited."""
        if self.pid <= 0:
            return False
        if os.name == "nt":
            return _windows_process_alive(self.pid, self._handle)
        return process_alive(self.pid)


def process_alive(pid: int) -> bool:
    """True while POSIX process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # no /proc (macOS): the parent of a dead process reaps it at once
        return True
    state = stat[stat.rfind(b")") + 2:][:1]  # the field after the command name "(...)"
    return state not in (b"Z", b"X", b"x")


def _windows_open_process(pid: int) -> Any:
    """A handle that can wait on process ``pid``, or None."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    kernel32.OpenProcess.restype = wintypes.HANDLE
    synchronize, query_limited_information = 0x00100000, 0x1000
    return kernel32.OpenProcess(synchronize | query_limited_information, False, pid) or None


def _windows_process_alive(pid: int, handle: Any) -> bool:
    """Windows: the process behind ``handle`` (else ``pid``, opened now) has not exited."""
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.WaitForSingleObject.argtypes = [wintypes.HANDLE, wintypes.DWORD]
    kernel32.WaitForSingleObject.restype = wintypes.DWORD
    kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
    own = handle is None
    if own:
        handle = _windows_open_process(pid)
        if handle is None:
            return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists; else it is gone
    try:
        return kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: still running
    finally:
        if own:
            kernel32.CloseHandle(handle)


def exit_when_orphaned(parent: int | None = None, interval: float = 1.0, watch_stdin: bool = False) -> ParentWatch:
    """Exit (code 3) once process ``parent`` (Slicer; default: the process that started this one) is gone.

    A worker whose application crashed would otherwise compute for nobody. ``parent`` is checked
    now (a parent that died before this check starts), then every ``interval`` seconds by pid,
    never by comparing ``os.getppid()``: inside Slicer a launcher stands between the two. With
    ``watch_stdin`` a daemon thread reads stdin (a pipe only the parent holds) and checks the
    parent at once when it reaches end-of-file; an end-of-file while the parent still runs (a
    launcher that does not forward stdin) is ignored and the pid check goes on.
    """
    watch = ParentWatch(parent or os.getppid())
    if not watch.alive():
        os._exit(EXIT_ORPHANED)

    def poll() -> None:
        while True:
            time.sleep(interval)
            if not watch.alive():
                os._exit(EXIT_ORPHANED)

    def read_stdin(fd: int) -> None:
        try:
            while os.read(fd, 65536):
                pass
        except OSError:
            pass
        deadline = time.monotonic() + 2.0  # the parent's process may take a moment to end
        while time.monotonic() < deadline:
            if not watch.alive():
                os._exit(EXIT_ORPHANED)
            time.sleep(0.05)
        print(f"stdin closed but process {watch.pid} still runs: watching it", file=sys.stderr, flush=True)

    threading.Thread(target=poll, daemon=True, name="parent-watchdog").start()
    if watch_stdin and sys.stdin is not None:
        try:
            fd = sys.stdin.fileno()
        except (OSError, ValueError):
            fd = -1
        if fd >= 0:
            threading.Thread(target=read_stdin, args=(fd,), daemon=True, name="stdin-watchdog").start()
    return watch


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m AbdomenKDSegLib.worker``."""
    faulthandler.enable(file=sys.stderr)
    args = parse_args(argv)
    exit_when_orphaned(args.parent_pid, watch_stdin=args.watch_stdin)
    events = EventWriter(protocol_stream())
    return run(args, events)


if __name__ == "__main__":
    from AbdomenKDSegLib.process_exit import exit_now

    exit_now(main())  # Slicer waits for the process: skip the ~0.7 s teardown of PyTorch's modules
