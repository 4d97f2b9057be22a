"""The client side of the worker process: start it, send it a request, follow its events, cancel it.

Pure Python (no ``slicer``, no torch): :mod:`.logic` runs every segmentation through it. The
network runs in ``python -m AbdomenKDSegLib.slicer.worker`` (see :mod:`.worker` for its protocol):

- persistent (:class:`WorkerSettings` ``persistent=True``, the logic's default): the first run
  starts a serving worker (``--serve``); later runs send it their :class:`~.request.SegmentRequest`
  over a local authenticated connection and find the model already loaded. A different Python,
  module, thread count, worker option, environment or installed package set starts a new one
  (:meth:`WorkerClient.start`); a different model, device or backend is the worker's business.
  Cancel, a crash or an unexpected error ends the worker (the next run starts a fresh one);
  :meth:`WorkerClient.shutdown` ends it, and so does the client being garbage-collected;
- one-shot: every run starts a worker with the request on its command line.

:meth:`WorkerClient.cancel` kills the worker's whole process tree (inside Slicer: the
``PythonSlicer`` launcher and the real Python it starts): it runs in its own process group
(POSIX) or is ended with ``taskkill /T`` (Windows). The worker also ends itself when this process
is gone (it is given this pid, and its stdin is a pipe only this process holds).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

from ..errors import AbdomenKDSegError
from ..request import (
    KEY_ENV,
    USER_ERRORS,
    DoneEvent,
    ErrorEvent,
    SegmentRequest,
    StartedEvent,
    WorkerEvent,
    parse_event,
)
from ..resources import LIBRARY_PARENT

#: The worker's module (``python -m``).
WORKER_MODULE = "AbdomenKDSegLib.slicer.worker"
#: Seconds allowed for a killed worker to disappear.
CANCEL_TIMEOUT_S = 2.0


class WorkerError(AbdomenKDSegError):
    """The worker process failed or stopped unexpectedly (crash, killed, broken installation)."""


@dataclass(frozen=True)
class LogEvent:
    """A line of the worker that is not a protocol event: its stderr, or stray stdout."""

    line: str


#: What a :class:`WorkerJob` reports: the worker's protocol events and its other lines.
Event = Union[WorkerEvent, LogEvent]


def python_command(executable: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """The command prefix that starts Python: an executable, or a launcher command as a list."""
    return [str(executable)] if isinstance(executable, (str, os.PathLike)) else [str(a) for a in executable]


def library_parent() -> Path:
    """Folder that contains the ``AbdomenKDSegLib`` package (put on the worker's PYTHONPATH)."""
    return LIBRARY_PARENT


def worker_environment() -> dict[str, str]:
    """This process's environment with the engine's folder first on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(library_parent())] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def kill_process_tree(process: subprocess.Popen) -> None:
    """SIGKILL a worker's process group (POSIX) or ``taskkill /F /T`` its tree (Windows).

    Inside Slicer the worker is the ``PythonSlicer`` launcher, whose child runs the network: killing
    only the launcher would leave the child computing.
    """
    if os.name == "nt":
        if process.poll() is None:
            try:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10,
                               creationflags=0x08000000)  # CREATE_NO_WINDOW
            except (OSError, subprocess.SubprocessError):
                pass
        if process.poll() is None:
            process.kill()
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the group outlives its leader: always sent
    except (ProcessLookupError, PermissionError, OSError):
        pass


def packages_stamp() -> tuple[tuple[str, int], ...]:
    """(folder, modification time) of this Python's site-packages folders (install/uninstall changes them)."""
    import site

    folders = list(getattr(site, "getsitepackages", lambda: [])())
    user = getattr(site, "getusersitepackages", lambda: None)()
    folders += [user] if isinstance(user, str) else []
    out = []
    for folder in folders:
        try:
            out.append((folder, os.stat(folder).st_mtime_ns))
        except OSError:
            pass
    return tuple(out)


@dataclass(frozen=True)
class WorkerSettings:
    """How worker processes are started: ``python`` (a command prefix, e.g. a launcher and its
    interpreter), the worker ``module``, ``extra_args`` (more worker options, e.g. test hooks) and
    whether one ``persistent`` worker serves every run."""

    python: tuple[str, ...] = (sys.executable,)
    module: str = WORKER_MODULE
    extra_args: tuple[str, ...] = ()
    persistent: bool = True

    def command(self, request: SegmentRequest, serve: bool) -> list[str]:
        """The command that starts a worker for ``request``: serving (``--serve``, with the request's
        thread count) or one-shot (the whole request on its command line)."""
        if serve:
            options = ["--serve"] + (["--threads", str(request.threads)] if request.threads > 0 else [])
        else:
            options = request.to_argv()
        return [*self.python, "-m", self.module, *options, "--parent-pid", str(os.getpid()), "--watch-stdin",
                *self.extra_args]


_RUNNING_JOBS: weakref.WeakSet[WorkerJob] = weakref.WeakSet()


class WorkerJob:
    """One worker process: its command, output readers and temporary folder.

    stdout lines are parsed as protocol events; stderr lines become :class:`LogEvent` and the last
    ones are kept for error messages. Both are read by daemon threads so the pipes never fill.
    """

    def __init__(self, command: list[str], env: dict[str, str], temp_dir: Path | None) -> None:
        self.command = command
        self.temp_dir = temp_dir
        #: serve mode: the connection requests go over (see :meth:`connect`), and its key
        self.connection: Any = None
        self.key: bytes = b""
        #: serve mode: what the worker was started with (:meth:`WorkerClient.start`) and runs served
        self.identity: tuple[Any, ...] = ()
        self.runs = 0
        self.events: queue.Queue[Event] = queue.Queue()
        self.stderr_tail: deque[str] = deque(maxlen=40)
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | 0x08000000  # CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True  # own process group: kill reaches its children too
        # stdin: a pipe nobody writes to; its end-of-file tells the worker this process is gone.
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
        )
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        _RUNNING_JOBS.add(self)

    def _read_stdout(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            line = line.strip()
            if line:
                self.events.put(parse_event(line) or LogEvent(line))

    def _read_stderr(self) -> None:
        for line in self.process.stderr:  # type: ignore[union-attr]
            line = line.rstrip()
            if line:
                self.stderr_tail.append(line)
                self.events.put(LogEvent(line))

    @property
    def pid(self) -> int:
        """Process id of the worker."""
        return self.process.pid

    def finished(self) -> bool:
        """True once the process has exited and both pipes are drained."""
        if self.process.poll() is None:
            return False
        for reader in self._readers:
            reader.join(timeout=1.0)
        return True

    def drain(self) -> list[Event]:
        """Events received since the last call."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def alive(self) -> bool:
        """True while the worker process (the launcher, when there is one) runs."""
        return self.process.poll() is None

    def connect(self, address: Any, family: str) -> None:
        """Serve mode: connect to the worker's listener (it is waiting in ``accept``)."""
        from multiprocessing.connection import Client

        self.connection = Client(address, family=family, authkey=self.key)

    def send(self, message: dict[str, Any]) -> None:
        """Serve mode: send one request (raises OSError when the worker is gone)."""
        if self.connection is None:
            raise OSError("the worker is not connected")
        self.connection.send_bytes(json.dumps(message).encode("utf-8"))

    def close_connection(self) -> None:
        """Close the serve connection: a serving worker ends at its end-of-file."""
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.close()
            except OSError:
                pass

    def kill(self, timeout: float = CANCEL_TIMEOUT_S) -> None:
        """Kill the worker's process tree (launcher and real Python) and wait until it is gone."""
        self.close_connection()
        kill_process_tree(self.process)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=0.5)
        self._close_stdin()
        _RUNNING_JOBS.discard(self)

    def cleanup(self) -> None:
        """Remove the temporary folder (input copy and label map, if any), close the pipes."""
        self.close_connection()
        self._close_stdin()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        _RUNNING_JOBS.discard(self)

    def shutdown(self, timeout: float = CANCEL_TIMEOUT_S) -> None:
        """End a serving worker: close its connection, wait up to ``timeout`` s, then kill its tree."""
        self.close_connection()
        self._close_stdin()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill(timeout=timeout)  # also any child a launcher left behind
        self.cleanup()

    def _close_stdin(self) -> None:
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:
            pass


@atexit.register
def _kill_running_workers() -> None:
    """Do not leave workers behind when the application exits."""
    for job in list(_RUNNING_JOBS):
        job.kill(timeout=1.0)
        job.cleanup()


class WorkerRun:
    """One request in flight: its worker, and the worker's answer (:attr:`done` or :attr:`error`).

    ``temp_dir``: the run's exchange folder, removed when the run ends. A persistent worker's
    request is sent as soon as the worker is connected (``request_id`` > 0).
    """

    def __init__(self, job: WorkerJob, request: SegmentRequest, persistent: bool, request_id: int,
                 temp_dir: Path | None, log: Callable[[str], None]) -> None:
        self.job, self.request, self.persistent = job, request, persistent
        self.request_id, self.temp_dir, self._log = request_id, temp_dir, log
        self.sent = False
        self.done: DoneEvent | None = None
        self.error: ErrorEvent | None = None

    def events(self) -> Iterator[Event]:
        """This run's events received since the last call; a persistent worker is connected and sent
        the request when it reports that it started."""
        for event in self.job.drain():
            if self.persistent and getattr(event, "request", None) not in (None, self.request_id):
                continue  # an earlier request's event (none is expected)
            if isinstance(event, StartedEvent):
                self._log(f"Worker started (process {event.pid}, {event.python})")
                if self.persistent and self.job.connection is None and event.address:
                    try:
                        self.job.connect(event.address, event.family or "AF_UNIX")
                    except (OSError, EOFError, ValueError) as exc:
                        self._log(f"Could not connect to the worker (process {self.job.pid}): {exc}")
                        self.job.kill()
                        continue
                    self.send()
            elif isinstance(event, DoneEvent):
                self.done = event
            elif isinstance(event, ErrorEvent):
                self.error = event
            yield event

    def send(self) -> None:
        """Send the request to the (connected) persistent worker; a failure ends that worker."""
        try:
            self.job.send({"id": self.request_id, "argv": self.request.to_argv()})
            self.sent = True
        except (OSError, ValueError) as exc:
            self._log(f"Could not send the request to the worker (process {self.job.pid}): {exc}")
            self.job.kill()  # the run then ends as a stopped worker

    def ended(self) -> bool:
        """True once the worker answered (persistent) or exited with its pipes drained."""
        if self.persistent and (self.done is not None or self.error is not None):
            return True
        return self.job.finished()

    def exit_code(self) -> int | None:
        """The worker's exit code; None while it runs (a persistent worker that answered)."""
        return self.job.process.poll()

    def succeeded(self) -> bool:
        """The worker wrote the result: it said so, and exited with 0 (one-shot) or still serves."""
        code = self.exit_code()
        return self.done is not None and (code == 0 or (self.persistent and code is None))

    def keeps_worker(self) -> bool:
        """A persistent worker is kept after a success and after an error the user can fix."""
        return self.persistent and self.job.alive() and (
            self.done is not None or (self.error is not None and self.error.type in USER_ERRORS))

    def crash_error(self) -> WorkerError:
        """The error of a worker that stopped without a handled error: how it ended, its last output."""
        code = self.exit_code()
        if code is not None and code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        lines = list(self.job.stderr_tail)
        fatal = [line for line in lines if line.startswith("Fatal Python error")][:1]
        tail = "\n".join(fatal + [line for line in lines[-8:] if line not in fatal])
        return WorkerError(
            f"the segmentation worker stopped unexpectedly ({how}) before producing a result"
            + (f"; its last output:\n{tail}" if tail else "")
        )


def _shutdown_held_worker(holder: list[WorkerJob]) -> None:
    """End the persistent worker a client held (its finalizer: the client itself is gone)."""
    while holder:
        holder.pop().shutdown(timeout=1.0)


class WorkerClient:
    """Starts a worker for each request, keeping at most one persistent worker between requests.

    ``log`` receives a line for each process event (start, reuse, end, connection problems).
    """

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        #: the persistent worker (at most one), in a list its finalizer shares with this client
        self._held: list[WorkerJob] = []
        self._requests = 0
        weakref.finalize(self, _shutdown_held_worker, self._held)

    @property
    def pid(self) -> int | None:
        """Process id of the persistent worker while it runs, else None."""
        return self._held[0].pid if self.running else None

    @property
    def running(self) -> bool:
        """True while a persistent worker is running (idle or busy)."""
        return bool(self._held) and self._held[0].alive()

    def start(self, request: SegmentRequest, settings: WorkerSettings, temp_dir: Path | None) -> WorkerRun:
        """Start ``request``: sent to the persistent worker (started first if none fits), or run by a
        one-shot worker. ``temp_dir`` belongs to the run from now on. Raises :class:`WorkerError` when
        the worker cannot be started."""
        if not settings.persistent:
            command = settings.command(request, serve=False)
            self.log(f"Starting worker: {' '.join(command)}")
            return WorkerRun(self._start_job(settings, command, worker_environment(), temp_dir), request,
                             False, 0, temp_dir, self.log)
        job = self._persistent_worker(settings, request)
        self._requests += 1
        job.runs += 1
        run = WorkerRun(job, request, True, self._requests, temp_dir, self.log)
        self.log(f"Worker request {run.request_id} (process {job.pid}, run {job.runs}): "
                 f"{' '.join(request.to_argv())}")
        if job.connection is not None:
            run.send()
        return run

    def finish(self, run: WorkerRun) -> None:
        """After the run: keep or end its worker (:meth:`WorkerRun.keeps_worker`), remove its files."""
        if not run.keeps_worker():
            if run.persistent or not run.succeeded():
                run.job.kill()  # a launcher that died may have left its child behind
            run.job.cleanup()
            if run.job in self._held:
                self._held.remove(run.job)
        if run.temp_dir is not None:
            shutil.rmtree(run.temp_dir, ignore_errors=True)

    def cancel(self, run: WorkerRun) -> None:
        """Kill the run's worker (gone within 2 s) and remove its files; the next run starts a fresh one."""
        run.job.kill()
        run.job.cleanup()
        if run.temp_dir is not None:
            shutil.rmtree(run.temp_dir, ignore_errors=True)
        if run.job in self._held:
            self._held.remove(run.job)

    def shutdown(self) -> bool:
        """End the persistent worker; False if none was running. Safe to call at any time, also twice.

        Closing the connection ends it within a moment; its process tree is killed after 2 s.
        """
        if not self._held:
            return False
        worker = self._held.pop()
        was_alive = worker.alive()
        worker.shutdown()
        if was_alive:
            self.log(f"Worker (process {worker.pid}) ended.")
        return was_alive

    def _start_job(self, settings: WorkerSettings, command: list[str], env: dict[str, str],
                   temp_dir: Path | None) -> WorkerJob:
        try:
            return WorkerJob(command, env, temp_dir)
        except OSError as exc:
            raise WorkerError(f"could not start the worker with Python '{' '.join(settings.python)}': {exc}") from exc

    def _persistent_worker(self, settings: WorkerSettings, request: SegmentRequest) -> WorkerJob:
        """The persistent worker for ``request``: the running one if it still fits, else a new one.

        It fits when started with the same settings, thread count and environment, and no package
        was installed or updated since (site-packages modification times).
        """
        env = worker_environment()
        identity = (settings.python, settings.module, request.threads, settings.extra_args,
                    tuple(sorted(env.items())), packages_stamp())
        if self._held:
            worker = self._held[0]
            if not worker.alive():
                self._log_idle_output(worker)
                self.log(f"The worker (process {worker.pid}) had stopped (exit code {worker.process.returncode}); "
                         "starting a new one")
            elif worker.identity != identity:
                self.log(f"Worker settings changed (Python, threads, options or environment): ending the worker "
                         f"(process {worker.pid}) and starting a new one")
            else:
                self._log_idle_output(worker)
                self.log(f"Reusing the running worker (process {worker.pid})")
                return worker
            self._held.pop()
            worker.shutdown(timeout=1.0)
        command = settings.command(request, serve=True)
        self.log(f"Starting worker: {' '.join(command)}")
        key = secrets.token_bytes(32)
        worker = self._start_job(settings, command, {**env, KEY_ENV: key.hex()}, None)
        worker.key, worker.identity = key, identity
        self._held.append(worker)
        return worker

    def _log_idle_output(self, worker: WorkerJob) -> None:
        """Log what an idle persistent worker wrote since its last run."""
        for event in worker.drain():
            if isinstance(event, LogEvent):
                self.log(event.line)
