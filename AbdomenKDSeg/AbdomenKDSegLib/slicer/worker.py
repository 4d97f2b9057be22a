"""Worker process of the Slicer module: runs :func:`inference.segment_file` and reports over stdout.

Started by :mod:`AbdomenKDSegLib.slicer.worker_client` (for the Slicer logic) in one of two modes:

- one-shot: ``<python> -m AbdomenKDSegLib.slicer.worker --input IN.nrrd --output OUT.nrrd [--model M]
  [--device D] [--backend B] [--organs 1,5,13] [--no-fine] [--coarse-output COARSE.nrrd]
  [--threads N] [--parent-pid PID] [--watch-stdin]``: one segmentation (the options of a
  :class:`~AbdomenKDSegLib.request.SegmentRequest`), then the process exits;
- serve (the logic's default): ``<python> -m AbdomenKDSegLib.slicer.worker --serve [--parent-pid PID]
  [--watch-stdin] [--threads N]``: a persistent worker that keeps the loaded networks between
  runs, so a second segmentation pays neither the interpreter start, nor the imports, nor the
  model loading (:class:`Engine`). It listens on a local, authenticated connection
  (:mod:`multiprocessing.connection`: a Unix socket, a named pipe on Windows; the key comes in
  ``$ABDOMENKDSEG_WORKER_KEY``) whose address it reports in its ``started`` event; each message
  there is one request, a JSON object ``{"id": int, "argv": SegmentRequest.to_argv()}``
  (``{"shutdown": true}`` ends the worker; the thread count is the worker's own). The worker ends
  when that connection closes (the logic ended it, or Slicer is gone: the OS closes it), after an
  unexpected failure of a request (the logic then starts a fresh worker), and as below.
  The connection, not stdin, carries the requests because a launcher may not forward stdin.

Running the network in its own process means a CUDA crash or an out-of-memory kill cannot take
Slicer down and Cancel is a process kill (a cancelled or crashed persistent worker is replaced by
a fresh one on the next run).

Lifetime: the worker follows Slicer itself, not its own parent process (inside Slicer that is the
``PythonSlicer`` launcher, which starts the real Python as its child and waits). It exits with
code 3 once the process ``--parent-pid`` (Slicer) is gone, checked every second with a portable
pid check (a zombie counts as gone), and, with ``--watch-stdin``, as soon as its stdin (a pipe
whose other end only Slicer holds) reaches end-of-file while Slicer is gone.

Protocol: every line the worker writes to stdout is one JSON object with an ``event`` key
(the event types of :mod:`AbdomenKDSegLib.request`):

- ``{"event": "started", "pid": int, "python": str}``: the worker is alive (serve mode: also
  ``"address"``, where to connect, and ``"family"``);
- ``{"event": "progress", "stage": str, "fraction": float}``: fraction of that stage in [0, 1];
- ``{"event": "done", "output": str, "device": str, "backend": str, "timings": {stage: seconds},
  "voxel_counts": {value: count}, "warnings": [str]}``: the label map was written; with
  ``--coarse-output`` (and the fine stage on) also ``"coarse_output": str``, the coarse result's file;
- ``{"event": "error", "type": str, "message": str, "warnings": [str]}``: a handled failure (exit
  code 2 for input/model errors, 1 for anything unexpected).

In serve mode the events of a request carry ``"request": id``; each request ends with exactly one
``done`` or ``error`` event (an ``error`` of a type in :data:`request.USER_ERRORS` (input or model
errors) leaves the worker serving; after any other the worker exits with code 1).

Warnings are reported only in these events, each once (not also printed on stderr). Everything
else (library chatter, tracebacks) goes to stderr, which the logic keeps for its log.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, TextIO

from ..request import (
    KEY_ENV,
    DoneEvent,
    ErrorEvent,
    ProgressEvent,
    SegmentRequest,
    StartedEvent,
    WorkerEvent,
    add_request_arguments,
)

#: Exit code for errors the user can fix (bad input, missing or corrupt model).
EXIT_USER_ERROR = 2
#: Exit code for unexpected failures (a bug or a broken installation).
EXIT_FAILURE = 1
#: Exit code when the process the worker works for (Slicer) is gone.
EXIT_ORPHANED = 3
#: ``segment(request, progress)``: runs one request, returns a :class:`inference.SegmentationResult`.
SegmentFunction = Callable[[SegmentRequest, Callable[[str, float], None]], Any]


class EventWriter:
    """Writes protocol events, one JSON object per line, flushed immediately."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last_progress: tuple[str, float] | None = None
        #: serve mode: id of the request being worked on, added to every event as ``"request"``
        self.request: int | None = None

    def emit(self, event: WorkerEvent) -> None:
        """Write one event line (marked with the request being worked on)."""
        self.stream.write(event.for_request(self.request).to_json() + "\n")
        self.stream.flush()

    def progress(self, stage: str, fraction: float) -> None:
        """Progress event; repeated identical (stage, fraction) pairs are dropped."""
        key = (str(stage), round(float(fraction), 3))
        if key != self._last_progress:
            self._last_progress = key
            self.emit(ProgressEvent(stage=key[0], fraction=min(max(key[1], 0.0), 1.0)))


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
    """Command-line options of the worker; ``.request``: the one-shot mode's :class:`SegmentRequest`."""
    p = argparse.ArgumentParser(prog="python -m AbdomenKDSegLib.slicer.worker", description=__doc__.splitlines()[0])
    p.add_argument("--serve", action="store_true",
                   help="persistent worker: serve requests over a local connection (see the module's help)")
    add_request_arguments(p, required=False)
    p.add_argument("--parent-pid", type=int, default=0,
                   help="exit when this process (Slicer) is gone (default: the process that started the worker)")
    p.add_argument("--watch-stdin", action="store_true",
                   help="stdin is a pipe held by that process: exit at its end-of-file once the process is gone "
                        "(the worker then reads and discards stdin)")
    # Test hooks, hidden from --help: a slow start (to test Cancel) and a native crash.
    p.add_argument("--debug-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--debug-crash", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.request = None
    if not args.serve:
        if args.input is None or args.output is None:
            p.error("--input and --output are required (or --serve)")
        try:
            args.request = SegmentRequest.from_namespace(args)
        except ValueError as exc:  # UsageError: e.g. an unknown organ
            p.error(str(exc))
    return args


def run(args: argparse.Namespace, events: EventWriter, segment: SegmentFunction | None = None) -> int:
    """Run the one-shot request, reporting through ``events``; returns the process exit code."""
    events.emit(StartedEvent(pid=os.getpid(), python=sys.executable))
    return run_request(args.request, events, segment, args.debug_delay, args.debug_crash)


def run_request(request: SegmentRequest, events: EventWriter, segment: SegmentFunction | None = None,
                debug_delay: float = 0.0, debug_crash: bool = False) -> int:
    """One segmentation (after the ``started`` event): 0, or the exit code of its failure.

    ``segment``: default :func:`load_engine`'s; ``debug_delay``/``debug_crash``: the test hooks."""
    if debug_delay > 0:
        events.progress("waiting", 0.0)
        time.sleep(debug_delay)
    if debug_crash:
        faulthandler._sigsegv()  # a real native crash, as a broken GPU driver would cause
    with warnings.catch_warnings(record=True) as caught:  # reported in the events, not on stderr
        warnings.simplefilter("always")
        return _run_engine(request, events, segment, caught)


def _unique_messages(caught: list[warnings.WarningMessage], *more: Any) -> list[str]:
    """Distinct warning texts, in order: the recorded warnings, then ``more``."""
    out: list[str] = []
    for text in [str(w.message) for w in caught] + [str(m) for m in more]:
        if text not in out:
            out.append(text)
    return out


def _run_engine(request: SegmentRequest, events: EventWriter, segment: SegmentFunction | None,
                caught: list[warnings.WarningMessage]) -> int:
    """The segmentation itself; warnings are recorded in ``caught``."""
    from ..errors import AbdomenKDSegError, BundleError, InputError

    def error(kind: str, message: str) -> None:
        events.emit(ErrorEvent(type=kind, message=message, warnings=tuple(_unique_messages(caught))))

    try:
        if segment is None:
            segment = load_engine(request.threads)
        result = segment(request, events.progress)
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
    events.emit(DoneEvent(
        output=str(result.output_path),
        device=str(result.device),
        backend=str(getattr(result, "backend", "") or ""),
        timings={k: float(v) for k, v in result.timings.items()},
        voxel_counts={int(k): int(v) for k, v in result.voxel_counts.items()},
        warnings=tuple(_unique_messages([], *result.warnings, *(str(w.message) for w in caught))),
        coarse_output=None if coarse is None else str(coarse),
    ))
    return 0


def load_engine(threads: int = 0) -> SegmentFunction:
    """Import the engine (torch and friends) and return its ``segment(request, progress)`` (:class:`Engine`)."""
    return Engine(threads).segment


class Engine:
    """The engine with its loaded networks, kept between the requests of a serving worker.

    :meth:`segment` runs a :class:`SegmentRequest` with :func:`inference.segment_file` and reuses
    the :class:`inference.Predictor` while the model file (path, size, modification time), the
    device and the backend asked for are the same; anything else loads the new model (the old
    one is dropped first, so two models never share the memory). Warnings raised while loading
    (e.g. CUDA asked for but unavailable) are repeated on every run that reuses the predictor.
    A predictor that fell back to the CPU during a run (CUDA out of memory) is not reused.
    """

    def __init__(self, threads: int = 0) -> None:
        from ..threads import set_threads

        if threads > 0:
            set_threads(threads)
        from ..engine import inference

        self._inference = inference
        self.predictor: Any = None
        self.key: tuple[Any, ...] | None = None
        self.device_loaded = ""
        self.load_warnings: list[warnings.WarningMessage] = []
        #: how many times a model was loaded (tests and benchmarks read it)
        self.loads = 0

    @staticmethod
    def model_key(model: Any, device: str, backend: str) -> tuple[Any, ...]:
        """What identifies a loaded predictor: the model file as it is now, device and backend."""
        from ..engine.bundle import default_bundle_path

        path = Path(model) if model is not None else default_bundle_path()
        try:
            st = path.stat()
            stamp: tuple[Any, ...] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = ()
        return (str(path.resolve()), stamp, str(device), str(backend))

    def forget(self) -> None:
        """Drop the loaded networks (and free their memory)."""
        self.predictor, self.key, self.load_warnings = None, None, []
        gc.collect()

    def segment(self, request: SegmentRequest, progress: Callable[[str, float], None] | None = None) -> Any:
        """:func:`inference.segment_file` of ``request`` with the predictor kept for the next call. The
        outputs are the caller's temporary files (the Slicer logic's), so they may be replaced."""
        key = self.model_key(request.model, request.device, request.backend)
        if self.key != key or self.predictor is None:
            self.forget()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.predictor = self._inference.Predictor(request.model, device=request.device, progress=progress,
                                                           backend=request.backend)
            self.key, self.load_warnings, self.loads = key, list(caught), self.loads + 1
            self.device_loaded = str(self.predictor.device)
            self.predictor.prepare_in_background(("coarse", "fine") if request.fine else ("coarse",))
        for w in self.load_warnings:  # what loading said, for this run too
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        try:
            result = self._inference.segment_file(
                request.input, request.output, device=request.device, fine=request.fine,
                organs=None if request.organs is None else list(request.organs), progress=progress,
                predictor=self.predictor, coarse_output=request.coarse_output, overwrite=True)
        except BaseException:
            if str(self.predictor.device) != self.device_loaded:
                self.forget()
            raise
        if str(self.predictor.device) != self.device_loaded:  # fell back to the CPU: load afresh next time
            self.forget()
        return result


def missing_package_message(exc: ImportError) -> str:
    """User-facing text for a missing dependency in the worker's Python."""
    name = getattr(exc, "name", None) or str(exc)
    hint = ("install PyTorch with the PyTorch extension (PyTorch Utils module): it is needed for GPU use"
            if name == "torch"
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


def listen(key: bytes) -> Any:
    """A :class:`multiprocessing.connection.Listener` only this worker's starter can connect to.

    Linux: an abstract Unix socket (no file); other POSIX: a Unix socket in a private folder;
    Windows: a named pipe. ``key`` authenticates the client (HMAC challenge).
    """
    import secrets
    import tempfile
    from multiprocessing.connection import Listener

    name = f"AbdomenKDSeg-{os.getpid()}-{secrets.token_hex(8)}"
    if os.name == "nt":
        return Listener(rf"\\.\pipe\{name}", family="AF_PIPE", authkey=key)
    if sys.platform.startswith("linux"):
        return Listener("\0" + name, family="AF_UNIX", authkey=key)
    folder = tempfile.mkdtemp(prefix="AbdomenKDSeg-worker-")
    return Listener(os.path.join(folder, "socket"), family="AF_UNIX", authkey=key)


def request_args(serve_args: argparse.Namespace, argv: list[str]) -> SegmentRequest:
    """A serve-mode request (``argv``: :meth:`SegmentRequest.to_argv`) with the worker's own thread count."""
    return replace(SegmentRequest.from_argv(argv), threads=serve_args.threads)


def serve(args: argparse.Namespace, events: EventWriter, key: bytes,
          make_engine: Callable[[int], Any] | None = None) -> int:
    """Serve requests until the connection closes (0), or an unexpected failure (its exit code)."""
    listener = listen(key)
    address = listener.address
    if isinstance(address, bytes):  # a Linux abstract socket name
        address = address.decode("utf-8")
    events.emit(StartedEvent(pid=os.getpid(), python=sys.executable, address=address,
                             family="AF_PIPE" if os.name == "nt" else "AF_UNIX"))
    try:
        conn = listener.accept()
    finally:
        listener.close()  # one client only; a Unix socket file is removed here
    engines: list[Any] = []

    def segment(request: SegmentRequest, progress: Callable[[str, float], None]) -> Any:
        if not engines:  # the engine is loaded by the first request, then kept
            engines.append((make_engine or Engine)(args.threads))
        return engines[0].segment(request, progress)

    while True:
        try:
            message = json.loads(conn.recv_bytes().decode("utf-8"))
        except (EOFError, OSError, ValueError):  # the logic closed the connection, or Slicer is gone
            return 0
        if not isinstance(message, dict) or message.get("shutdown"):
            return 0
        events.request = int(message.get("id", 0))
        try:
            try:
                req = request_args(args, list(message.get("argv", [])))
            except ValueError as exc:  # UsageError
                events.emit(ErrorEvent(type="WorkerError", message=f"invalid request {message}: {exc}"))
                return EXIT_FAILURE
            code = run_request(req, events, segment, args.debug_delay, args.debug_crash)
        finally:
            events.request = None
        if code not in (0, EXIT_USER_ERROR):
            return code
        gc.collect()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m AbdomenKDSegLib.slicer.worker``."""
    faulthandler.enable(file=sys.stderr)
    args = parse_args(argv)
    exit_when_orphaned(args.parent_pid, watch_stdin=args.watch_stdin)
    events = EventWriter(protocol_stream())
    if args.serve:
        key = os.environ.pop(KEY_ENV, "")
        if not key:
            events.emit(ErrorEvent(type="WorkerError", message=f"--serve needs ${KEY_ENV}"))
            return EXIT_FAILURE
        return serve(args, events, bytes.fromhex(key))
    return run(args, events)


if __name__ == "__main__":
    from AbdomenKDSegLib.process_exit import exit_now

    exit_now(main())  # Slicer waits for the process: skip the interpreter's teardown (~0.12 s; ~0.7 s with PyTorch)
