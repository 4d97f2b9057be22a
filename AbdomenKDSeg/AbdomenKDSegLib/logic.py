"""AbdomenKDSegLogic: segment a CT volume node into a 13-organ segmentation node (MRML only).

This is the one engine module that imports ``slicer``, and it uses only MRML classes (no Qt, CTK
or ``slicer.app``), so it runs both inside Slicer and with the ``slicer-core`` package from PyPI.
It never imports torch: the network runs in a worker process (``python -m
AbdomenKDSegLib.worker``, see :mod:`AbdomenKDSegLib.worker`) that exchanges files with it:

1. the input volume node is written to a temporary ``.nrrd`` with a volume storage node;
2. the worker segments it and writes a uint8 label map ``.nrrd`` (same geometry), reporting
   progress as JSON lines on its stdout;
3. the label map is read back with a storage node and turned into one segment per organ (name,
   color and SNOMED CT terminology from :mod:`AbdomenKDSegLib.organs`), sharing one labelmap
   layer, with the input volume as reference geometry; the temporary files are deleted.
   With ``keepCoarseResult`` (and the fine stage on) the worker also writes the coarse stage's
   result at full resolution, which fills a second segmentation "<volume name> organs (coarse)"
   the same way, to compare coarse and fine.

The worker is persistent (``reuseWorker``, on by default): the first run starts it
(``python -m AbdomenKDSegLib.worker --serve``), later runs send it their request over a local
authenticated connection and find the model already loaded, so they pay neither the interpreter
start, nor the imports, nor the model loading. A different Python, thread count, worker option or
environment starts a new worker; a different model file (or the same file changed on disk), device
or backend makes the worker load that model. Cancel, a crash or an unexpected error ends the worker
(the next run starts a fresh one); :meth:`AbdomenKDSegLogic.shutdownWorker` ends it (the module
calls it when its widget is cleaned up, the scene closes or the application quits; a logic that is
garbage-collected ends its worker too). With ``reuseWorker = False`` every run starts a one-shot
worker as before.

Scripting waits for the worker (``waitForCompletion=True``); the GUI starts it with
``waitForCompletion=False`` and calls :meth:`AbdomenKDSegLogic.poll` from a timer.
:meth:`AbdomenKDSegLogic.cancel` kills the worker's whole process tree (the ``PythonSlicer``
launcher and the real Python it starts): it runs in its own process group (POSIX) or is ended
with ``taskkill /T`` (Windows). The worker also ends itself when this process is gone (it is
given this pid, and its stdin is a pipe only this process holds).

Output safety: the input node is never modified; the output node's segments are changed only
when a run succeeds, and a node the logic created for a run that failed or was cancelled is
removed again. In an existing output node only the organ segments this module made (segment tag
:data:`ORGAN_TAG` with their terminology) are replaced; every other segment is kept. A segmentation
that belongs to another volume (:meth:`AbdomenKDSegLogic.otherVolumeOfSegmentation`) is filled
only with ``allowOtherVolume=True``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import slicer
import vtk

from .errors import AbdomenKDSegError, BundleError, InputError
from .organs import BY_KEY, BY_VALUE, Organ, resolve_organs

#: ``progress(stage_text, fraction)``: human-readable stage and overall fraction in [0, 1].
ProgressCallback = Callable[[str, float], None]

MODULE_NAME = "AbdomenKDSeg"
DEVICES = ("auto", "cpu", "cuda")
BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"
#: Seconds allowed for a killed worker to disappear.
CANCEL_TIMEOUT_S = 2.0
#: Node attribute marking a segmentation created by the "keep coarse result" option; its value is
#: the ID of the input volume node it belongs to. Only nodes carrying it are ever reused for it.
COARSE_RESULT_ATTRIBUTE = "AbdomenKDSeg.CoarseResultOf"
#: Node attribute of every segmentation this module filled: the ID of the input volume node.
INPUT_VOLUME_ATTRIBUTE = "AbdomenKDSeg.inputVolume"
#: vtkSegment tag of every organ segment this module made: the organ key (e.g. "liver").
ORGAN_TAG = "AbdomenKDSeg.organ"

#: Engine stage -> (text shown to the user, overall fraction at its start, at its end).
STAGES: dict[str, tuple[str, float, float]] = {
    "export": ("Saving input volume", 0.0, 0.02),
    "started": ("Starting worker", 0.02, 0.05),
    "waiting": ("Waiting", 0.05, 0.05),
    "orient": ("Reorienting", 0.05, 0.06),
    "coarse": ("Coarse segmentation", 0.06, 0.55),
    "fine": ("Fine segmentation", 0.55, 0.86),
    "upsample": ("Resampling to full resolution", 0.55, 0.90),
    "resample": ("Resampling to full resolution", 0.86, 0.92),
    "coarse_resample": ("Resampling the coarse result", 0.92, 0.92),
    "done": ("Writing label map", 0.92, 0.94),
    "import": ("Importing segments", 0.94, 1.0),
}


#: Error types after which a persistent worker is kept (the user can fix them; see :mod:`.worker`).
WORKER_USER_ERRORS = ("InputError", "BundleError", "AbdomenKDSegError")


class WorkerError(AbdomenKDSegError):
    """The worker process failed or stopped unexpectedly (crash, killed, broken installation)."""


class SegmentationCancelled(AbdomenKDSegError):
    """A blocking :meth:`AbdomenKDSegLogic.segment` call was cancelled."""


class OtherVolumeError(ValueError):
    """The output segmentation belongs to another volume (pass ``allowOtherVolume=True`` to fill it)."""


def default_python_executable() -> str:
    """Python that runs the worker: ``PythonSlicer`` inside Slicer, else this interpreter."""
    if hasattr(slicer, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def library_parent() -> Path:
    """Folder that contains the ``AbdomenKDSegLib`` package (put on the worker's PYTHONPATH)."""
    return Path(__file__).resolve().parent.parent


def register_segmentation_converters() -> None:
    """Register labelmap <-> closed-surface converter rules if none are registered yet.

    Slicer does this at start-up; with ``slicer-core`` alone it must be done before segmentation
    nodes are created or converted.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) == 0:
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def stage_progress(stage: str, fraction: float) -> tuple[str, float | None]:
    """(text for the user, overall fraction) of an engine stage; None for an unknown stage."""
    text, start, end = STAGES.get(stage, (stage.replace("_", " ").capitalize(), -1.0, -1.0))
    if start < 0:
        return text, None
    return text, start + (end - start) * min(max(float(fraction), 0.0), 1.0)


def coarse_result_name(volumeNode: Any) -> str:
    """Name of the coarse-result segmentation of a volume: "<volume name> organs (coarse)"."""
    return f"{volumeNode.GetName()} organs (coarse)"


def segment_tag(segment: Any, name: str) -> str | None:
    """Value of a vtkSegment tag, or None when the segment has no such tag."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else None


def terminology_tag_name() -> str:
    """The vtkSegment tag holding the terminology entry ("TerminologyEntry")."""
    return slicer.vtkSegment.GetTerminologyEntryTagName()


def terminology_codes(entry: str | None) -> tuple[tuple[str, str], ...]:
    """(scheme, code) of category, type and modifier of a serialized terminology entry; () if none.

    The code meanings and context names are left out, so a renamed meaning still matches.
    """
    fields = (entry or "").split("~")
    if len(fields) < 4:
        return ()
    return tuple(tuple(field.split("^")[:2]) for field in fields[1:4])  # type: ignore[misc]


def organ_of_segment(segment: Any, segmentId: str = "") -> Organ | None:
    """The organ a segment holds if this module made it, else None (the segment is the user's).

    A module segment carries :data:`ORGAN_TAG` = the organ key (segments of earlier versions: the
    organ key as segment ID) and still that organ's terminology codes: a segment the user
    re-labelled (e.g. renamed and coded "Tumor") is the user's.
    """
    key = segment_tag(segment, ORGAN_TAG) or segmentId
    organ = BY_KEY.get(key)
    if organ is None:
        return None
    codes = terminology_codes(segment_tag(segment, terminology_tag_name()))
    return organ if codes == terminology_codes(organ.terminology_entry()) else None


def python_command(executable: str | Sequence[str]) -> list[str]:
    """The command prefix that starts Python: an executable, or a launcher command as a list."""
    return [executable] if isinstance(executable, (str, os.PathLike)) else [str(a) for a in executable]


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


#: Network runtime names shown to the user.
BACKEND_NAMES = {"torch": "PyTorch", "onnx": "ONNX Runtime", "openvino": "OpenVINO"}


def runtime_text(backend: str, device: str) -> str:
    """``("openvino", "cpu")`` -> ``"OpenVINO on CPU"``; ``("torch", "cuda:0")`` -> ``"PyTorch on CUDA:0"``."""
    where = str(device).upper() if device else "?"
    return f"{BACKEND_NAMES.get(backend, backend)} on {where}" if backend else f"on {where}"


def organ_volumes_ml(counts: dict[int, int], spacing: Any, organs: Any) -> dict[str, float]:
    """Organ name -> mL of the ``organs`` present in ``counts`` (voxels), with voxel ``spacing`` in mm."""
    voxel_ml = float(spacing[0]) * float(spacing[1]) * float(spacing[2]) / 1000.0
    return {o.name: counts[o.value] * voxel_ml for o in organs if counts.get(o.value)}


@dataclass
class RunInfo:
    """What the last successful run did: runtime used, seconds per stage, organ voxel counts, warnings.

    ``warnings`` name the input volume (not the worker's temporary file), each once;
    ``empty_organs``: names of the requested organs not found in the image.
    """

    device: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    voxel_counts: dict[int, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    total_seconds: float = 0.0
    backend: str = ""
    empty_organs: list[str] = field(default_factory=list)
    volume_name: str = ""
    #: organ name -> volume in mL (organs found), in organ order
    volumes_ml: dict[str, float] = field(default_factory=dict)

    def volume_rows(self) -> list[tuple[str, str]]:
        """(organ, volume text) for the panel's table: the organs found in mL, then those not found."""
        rows = [(name, f"{ml:.1f}") for name, ml in self.volumes_ml.items()]
        return rows + [(name, "not found") for name in self.empty_organs]

    def summary(self) -> str:
        """One line such as ``"8.1 s, OpenVINO on CPU (coarse 4.2 s, fine 2.9 s, ...)"``."""
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items() if v >= 0.05)
        return f"{self.total_seconds:.1f} s, {runtime_text(self.backend, self.device)}" + (
            f" ({parts})" if parts else "")

    def notes(self) -> list[str]:
        """What the user should see after the run: the warnings, then the organs not found."""
        notes = [f"Warning: {w}" for w in self.warnings]
        if self.empty_organs:
            notes.append(f"Not found in this image (empty segments): {', '.join(self.empty_organs)}")
        return notes


# ----------------------------------------------------------------------------- worker process
_RUNNING_JOBS: weakref.WeakSet[WorkerJob] = weakref.WeakSet()


class WorkerJob:
    """One worker process: its command, output readers and temporary folder.

    stdout lines are parsed as protocol events; stderr lines become ``log`` events and the last
    ones are kept for error messages. Both are read by daemon threads so the pipes never fill.
    """

    def __init__(self, command: list[str], env: dict[str, str], temp_dir: Path | None) -> None:
        self.command = command
        self.temp_dir = temp_dir
        #: serve mode: the connection requests go over (see :meth:`connect`), and its key
        self.connection: Any = None
        self.key: bytes = b""
        #: serve mode: the worker's identity (:meth:`AbdomenKDSegLogic._worker_identity`) and runs served
        self.identity: tuple[Any, ...] = ()
        self.runs = 0
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
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
            if not line:
                continue
            try:
                event = json.loads(line)
                if not isinstance(event, dict) or "event" not in event:
                    raise ValueError
            except ValueError:
                event = {"event": "log", "line": line}
            self.events.put(event)

    def _read_stderr(self) -> None:
        for line in self.process.stderr:  # type: ignore[union-attr]
            line = line.rstrip()
            if line:
                self.stderr_tail.append(line)
                self.events.put({"event": "log", "line": line})

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

    def drain(self) -> list[dict[str, Any]]:
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

        if isinstance(address, list):
            address = tuple(address)
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


# ----------------------------------------------------------------------------- the logic
@dataclass
class _Run:
    """State of the run in progress."""

    job: WorkerJob
    input_node: Any
    output_node: Any
    created_output: bool
    organs: list[Organ]
    output_path: Path
    progress: Optional[ProgressCallback]
    fine: bool
    start_time: float
    coarse_path: Path | None = None
    input_path: Path | None = None
    result_event: dict[str, Any] | None = None
    error_event: dict[str, Any] | None = None
    last_fraction: float = 0.0
    #: the run's exchange folder (a persistent worker outlives it)
    temp_dir: Path | None = None
    #: persistent worker: the request (id and one-shot options) and whether it was sent
    request_id: int = 0
    request_argv: list[str] = field(default_factory=list)
    persistent: bool = False
    sent: bool = False


def _shutdown_held_worker(holder: list[WorkerJob]) -> None:
    """End the persistent worker a logic held (its finalizer: the logic itself is gone)."""
    while holder:
        holder.pop().shutdown(timeout=1.0)


class AbdomenKDSegLogic:
    """Headless, scriptable segmentation of 13 abdominal organs.

    Attributes that can be changed before :meth:`segment`:
    ``pythonExecutable`` (interpreter that runs the worker; ``PythonSlicer`` in Slicer; a list is a
    command prefix, e.g. a launcher script and its interpreter),
    ``modelPath`` (model bundle; None = the bundled default), ``fineStage`` (run the fine stage),
    ``keepCoarseResult`` (also output the coarse result, see :meth:`segment`),
    ``threads`` (torch CPU threads in the worker, 0 = default), ``workerExtraArgs`` (extra
    worker options), ``backend`` (network runtime on the CPU: "auto", "torch", "onnx",
    "openvino"), ``reuseWorker`` (keep one worker with the model loaded between runs, default
    True; :meth:`shutdownWorker` ends it), ``logCallback`` (called with each log line; default:
    the ``logging`` module).
    After a successful run: ``lastRunInfo`` and ``lastCoarseSegmentationNode`` (None unless the
    coarse result was kept).
    """

    def __init__(self) -> None:
        self.pythonExecutable: str | list[str] = default_python_executable()
        self.workerModule: str = "AbdomenKDSegLib.worker"
        self.workerExtraArgs: list[str] = []
        self.modelPath: str | None = None
        self.fineStage: bool = True
        self.keepCoarseResult: bool = False
        self.threads: int = 0
        self.backend: str = "auto"
        self.reuseWorker: bool = True
        self.logCallback: Optional[Callable[[str], None]] = None
        self.lastRunInfo: RunInfo | None = None
        self.lastCoarseSegmentationNode: Any = None
        self._run: _Run | None = None
        self._cancelRequested = False
        #: the persistent worker (at most one), in a list its finalizer shares with this logic
        self._held: list[WorkerJob] = []
        self._requests = 0
        weakref.finalize(self, _shutdown_held_worker, self._held)

    # ------------------------------------------------------------------ public API
    @property
    def isRunning(self) -> bool:
        """True while a worker started by :meth:`segment` has not been finalized."""
        return self._run is not None

    @property
    def workerPid(self) -> int | None:
        """Process id of the running worker, else of the persistent worker waiting for the next run, else None.

        Inside Slicer that is the ``PythonSlicer`` launcher's pid (the real Python is its child).
        """
        if self._run is not None:
            return self._run.job.pid
        worker = self._held[0] if self._held else None
        return worker.pid if worker is not None and worker.alive() else None

    @property
    def workerRunning(self) -> bool:
        """True while a persistent worker is running (idle or busy)."""
        return bool(self._held) and self._held[0].alive()

    def shutdownWorker(self) -> bool:
        """End the persistent worker (a running segmentation is cancelled first); False if none ran.

        Closing the connection ends it within a moment; its process tree is killed after 2 s.
        The next :meth:`segment` starts a new one. Safe to call at any time, also twice.
        """
        if self._run is not None:
            self.cancel()
        if not self._held:
            return False
        worker = self._held.pop()
        was_alive = worker.alive()
        worker.shutdown()
        if was_alive:
            self.log(f"Worker (process {worker.pid}) ended.")
        return was_alive

    def segment(
        self,
        inputVolumeNode: Any,
        outputSegmentationNode: Any = None,
        device: str = "auto",
        organs: Sequence[str | int] | None = None,
        progress: Optional[ProgressCallback] = None,
        waitForCompletion: bool = True,
        model: str | os.PathLike[str] | None = None,
        fine: bool | None = None,
        keepCoarse: bool | None = None,
        allowOtherVolume: bool = False,
    ) -> Any:
        """Segment ``inputVolumeNode`` (a CT scalar volume) into organ segments.

        ``outputSegmentationNode``: None to create "<volume name> organs", or a
        vtkMRMLSegmentationNode whose organ segments made by this module are replaced on success
        (every other segment, e.g. a user's "My tumor", is kept). A segmentation that belongs to
        another volume (:meth:`otherVolumeOfSegmentation`) raises :class:`OtherVolumeError` unless
        ``allowOtherVolume``. ``device``: "auto", "cpu" or "cuda".
        ``organs``: organ keys, names or label values (None = all 13). ``progress(text, fraction)``
        receives the stage and the overall fraction. ``model``/``fine`` override ``modelPath``
        and ``fineStage``. With ``waitForCompletion=False`` the call returns at once and the
        caller must call :meth:`poll` until it returns False.

        ``keepCoarse`` (overrides ``keepCoarseResult``): with the fine stage on, also put the coarse
        stage's result at full resolution (same organs, names, colors, terminology and geometry)
        into a second segmentation, returned by :meth:`findCoarseResultNode` and kept in
        :attr:`lastCoarseSegmentationNode`. That node is reused on later runs only if this option
        created it for the same volume (it carries :data:`COARSE_RESULT_ATTRIBUTE` = the volume's
        node ID); otherwise a new "<volume name> organs (coarse)" is created, shown as outlines in
        the slice views. A user's node is never replaced, even with the same name. It is created
        only once the run has succeeded, so cancel and errors leave the scene unchanged. With the
        fine stage off the output already is the coarse result: no second node is made.

        Returns the output segmentation node. Raises InputError (bad input volume), BundleError
        (missing or corrupt model), OtherVolumeError, WorkerError (the worker failed) or
        SegmentationCancelled.
        """
        if self._run is not None:
            raise RuntimeError("a segmentation is already running; cancel it or wait for it to finish")
        device = self._check_device(device)
        organ_list = self._check_organs(organs)
        model_path = self._check_model(model if model is not None else self.modelPath)
        scene = self._check_input(inputVolumeNode)
        self._check_output(outputSegmentationNode, scene)
        other = self.otherVolumeOfSegmentation(outputSegmentationNode, inputVolumeNode)
        if other is not None and not allowOtherVolume:
            raise OtherVolumeError(
                f"segmentation '{outputSegmentationNode.GetName()}' belongs to volume '{other}', not to "
                f"'{inputVolumeNode.GetName()}': choose \"Create new segmentation\" or allow replacing its organs")
        run_fine = self.fineStage if fine is None else bool(fine)
        keep_coarse = run_fine and (self.keepCoarseResult if keepCoarse is None else bool(keepCoarse))

        self._cancelRequested = False
        start_time = time.perf_counter()
        temp_dir = Path(tempfile.mkdtemp(prefix="AbdomenKDSeg-"))
        created = outputSegmentationNode is None
        persistent = bool(self.reuseWorker)
        try:
            self._report(progress, "export", 0.0)
            input_path = self.write_volume(inputVolumeNode, temp_dir / "input.nrrd")
            output_path = temp_dir / "labels.nrrd"
            coarse_path = temp_dir / "coarse.nrrd" if keep_coarse else None
            if persistent:
                argv = self.worker_request_args(input_path, output_path, device, organ_list, model_path, run_fine,
                                                coarse_output=coarse_path)
                job = self._persistent_worker()
            else:
                command = self.worker_command(input_path, output_path, device, organ_list, model_path, run_fine,
                                              coarse_output=coarse_path)
                self.log(f"Starting worker: {' '.join(command)}")
                job = self._start_job(command, self.worker_environment(), temp_dir)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        if created:
            outputSegmentationNode = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{inputVolumeNode.GetName()} organs")
        self._run = _Run(job, inputVolumeNode, outputSegmentationNode, created, organ_list, output_path,
                         progress, run_fine, start_time, coarse_path, input_path, temp_dir=temp_dir,
                         persistent=persistent)
        if persistent:
            self._requests += 1
            self._run.request_id, self._run.request_argv = self._requests, argv
            job.runs += 1
            self.log(f"Worker request {self._requests} (process {job.pid}, run {job.runs}): {' '.join(argv)}")
            if job.connection is not None:
                self._send_request(self._run)
        self._report(progress, "started", 0.0, self._run)
        if waitForCompletion:
            self.wait()
        return outputSegmentationNode

    def _start_job(self, command: list[str], env: dict[str, str], temp_dir: Path | None) -> WorkerJob:
        try:
            return WorkerJob(command, env, temp_dir)
        except OSError as exc:
            python = " ".join(python_command(self.pythonExecutable))
            raise WorkerError(f"could not start the worker with Python '{python}': {exc}") from exc

    def _worker_identity(self, env: dict[str, str]) -> tuple[Any, ...]:
        """What a persistent worker was started with; a change needs a new worker.

        Includes the modification times of the site-packages folders: a package installed or
        updated since (e.g. by the module's install step) is then used by the next run.
        """
        return (tuple(python_command(self.pythonExecutable)), self.workerModule, int(self.threads),
                tuple(str(a) for a in self.workerExtraArgs), tuple(sorted(env.items())), packages_stamp())

    def _persistent_worker(self) -> WorkerJob:
        """The persistent worker for this run: the running one if it still fits, else a new one."""
        env = self.worker_environment()
        identity = self._worker_identity(env)
        if self._held:
            worker = self._held[0]
            if not worker.alive():
                self._handle_idle_events(worker)
                self.log(f"The worker (process {worker.pid}) had stopped (exit code {worker.process.returncode}); "
                         "starting a new one")
            elif worker.identity != identity:
                self.log(f"Worker settings changed (Python, threads, options or environment): ending the worker "
                         f"(process {worker.pid}) and starting a new one")
            else:
                self._handle_idle_events(worker)
                self.log(f"Reusing the running worker (process {worker.pid})")
                return worker
            self._held.pop()
            worker.shutdown(timeout=1.0)
        command = self.serve_command()
        self.log(f"Starting worker: {' '.join(command)}")
        key = secrets.token_bytes(32)
        from .worker import KEY_ENV

        worker = self._start_job(command, {**env, KEY_ENV: key.hex()}, None)
        worker.key, worker.identity = key, identity
        self._held.append(worker)
        return worker

    def _handle_idle_events(self, worker: WorkerJob) -> None:
        """Log what an idle persistent worker wrote since its last run."""
        for event in worker.drain():
            if event.get("event") == "log":
                self.log(str(event.get("line", "")))

    def _send_request(self, run: _Run) -> None:
        """Send the run's request to its (connected) persistent worker; a failure ends that worker."""
        try:
            run.job.send({"id": run.request_id, "argv": run.request_argv})
            run.sent = True
        except (OSError, ValueError) as exc:
            self.log(f"Could not send the request to the worker (process {run.job.pid}): {exc}")
            run.job.kill()  # poll() then reports the stopped worker

    def poll(self) -> bool:
        """Process worker messages; finalize when it has exited. True while still running.

        On success the output node receives the segments and :attr:`lastRunInfo` is set; on
        failure the error is raised (once) and the scene is left as before the run.
        """
        run = self._run
        if run is None:
            return False
        if self._cancelRequested:
            self.cancel()
            return False
        self._handle_events(run, run.job.drain())
        if self._run is not run:  # cancelled from the progress callback
            return False
        if run.persistent and (run.result_event is not None or run.error_event is not None):
            self._finalize(run)
            return False
        if not run.job.finished():
            return True
        self._handle_events(run, run.job.drain())
        if self._run is not run:
            return False
        self._finalize(run)
        return False

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> None:
        """Block until the run finishes (raising its error) or ``timeout`` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if self._cancelRequested:
                self.cancel()
                raise SegmentationCancelled("the segmentation was cancelled")
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(interval)
        if self._cancelRequested:
            raise SegmentationCancelled("the segmentation was cancelled")

    def cancel(self) -> bool:
        """Kill the running worker (gone within 2 s) and undo the run. False if none was running.

        Safe to call from the ``progress`` callback of a blocking :meth:`segment` call, which then
        raises :class:`SegmentationCancelled`.
        """
        run = self._run
        if run is None:
            return False
        self._cancelRequested = True
        self._run = None
        run.job.kill()
        run.job.cleanup()
        if run.temp_dir is not None:
            shutil.rmtree(run.temp_dir, ignore_errors=True)
        if run.job in self._held:  # the next run starts a fresh worker
            self._held.remove(run.job)
        self._discard_output(run)
        self.log("Segmentation cancelled.")
        return True

    def showIn3D(self, segmentationNode: Any, show: bool = True) -> None:
        """Show (build the closed-surface representation) or hide the organs in 3D views."""
        register_segmentation_converters()
        if show:
            if not segmentationNode.CreateClosedSurfaceRepresentation():
                raise AbdomenKDSegError(f"could not build 3D surfaces for '{segmentationNode.GetName()}'")
        else:
            segmentationNode.RemoveClosedSurfaceRepresentation()

    @staticmethod
    def otherVolumeOfSegmentation(segmentationNode: Any, volumeNode: Any) -> str | None:
        """Name of the volume ``segmentationNode`` belongs to when that is not ``volumeNode``, else None.

        A segmentation belongs to the volume of its reference image geometry (node reference, as
        the Segment Editor sets it) and to the input volume of the run that filled it
        (:data:`INPUT_VOLUME_ATTRIBUTE`; a volume since removed from the scene still counts). None
        for no segmentation, or one tied to no volume (e.g. a new, empty one).
        """
        if segmentationNode is None or volumeNode is None:
            return None
        own_id = volumeNode.GetID()
        scene = segmentationNode.GetScene()
        role = (segmentationNode.GetReferenceImageGeometryReferenceRole()
                if hasattr(segmentationNode, "GetReferenceImageGeometryReferenceRole") else "referenceImageGeometryRef")
        reference = segmentationNode.GetNodeReference(role)
        if reference is not None and reference.GetID() != own_id:
            return reference.GetName()
        filled_from = segmentationNode.GetAttribute(INPUT_VOLUME_ATTRIBUTE)
        if filled_from and filled_from != own_id:
            node = scene.GetNodeByID(filled_from) if scene is not None else None
            return node.GetName() if node is not None else f"{filled_from} (no longer in the scene)"
        return None

    @staticmethod
    def findCoarseResultNode(inputVolumeNode: Any, scene: Any = None, exclude: Any = None) -> Any:
        """The segmentation that "keep coarse result" created for ``inputVolumeNode``, or None.

        Found by its :data:`COARSE_RESULT_ATTRIBUTE` (the volume's node ID), not by its name, so a
        user's segmentation that happens to have the same name is never taken. ``exclude``: a node
        to skip (the main output of the run).
        """
        scene = scene or inputVolumeNode.GetScene()
        volume_id = inputVolumeNode.GetID()
        if scene is None or not volume_id:
            return None
        nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if node is not exclude and node.GetAttribute(COARSE_RESULT_ATTRIBUTE) == volume_id:
                return node
        return None

    def getParameterNode(self, scene: Any = None) -> Any:
        """The module's singleton vtkMRMLScriptedModuleNode in ``scene`` (created if missing)."""
        scene = scene or slicer.mrmlScene
        node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(MODULE_NAME)
            node.SetAttribute("ModuleName", MODULE_NAME)
            node.SetName(scene.GenerateUniqueName(MODULE_NAME))
            node = scene.AddNode(node)
        return node

    def log(self, text: str) -> None:
        """Send a line to ``logCallback`` (or the ``logging`` module)."""
        if self.logCallback is not None:
            self.logCallback(text)
        else:
            logging.getLogger(MODULE_NAME).info(text)

    # ------------------------------------------------------------------ files and process
    @staticmethod
    def write_volume(volumeNode: Any, path: Path) -> Path:
        """Write a volume node to ``path`` (uncompressed NRRD) without touching the node."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(0)
        if not storage.WriteData(volumeNode) or not path.is_file():
            raise InputError(f"could not write volume '{volumeNode.GetName()}' to the temporary file {path}")
        return path

    @staticmethod
    def read_labelmap(path: Path) -> Any:
        """Read a label map file into a new vtkMRMLLabelMapVolumeNode that is not in any scene."""
        node = slicer.vtkMRMLLabelMapVolumeNode()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not path.is_file() or not storage.ReadData(node) or node.GetImageData() is None:
            raise WorkerError(f"the worker finished but its label map {path} could not be read")
        return node

    def serve_command(self) -> list[str]:
        """Command line that starts the persistent worker (``--serve``)."""
        cmd = [*python_command(self.pythonExecutable), "-m", self.workerModule, "--serve",
               "--parent-pid", str(os.getpid()), "--watch-stdin"]
        if self.threads > 0:
            cmd += ["--threads", str(self.threads)]
        return cmd + [str(a) for a in self.workerExtraArgs]

    @staticmethod
    def run_selection_args(organs: list[Organ], model: Path | None, fine: bool,
                           coarse_output: Path | None) -> list[str]:
        """What one run segments and how: the options the one-shot command and the worker request share."""
        argv: list[str] = []
        if len(organs) < len(BY_VALUE):
            argv += ["--organs", ",".join(str(o.value) for o in organs)]
        if model is not None:
            argv += ["--model", str(model)]
        if not fine:
            argv.append("--no-fine")
        if coarse_output is not None:
            argv += ["--coarse-output", str(coarse_output)]
        return argv

    def worker_request_args(self, input_path: Path, output_path: Path, device: str, organs: list[Organ],
                            model: Path | None, fine: bool, coarse_output: Path | None = None) -> list[str]:
        """The options of one run, as the persistent worker receives them (one-shot options)."""
        argv = ["--input", str(input_path), "--output", str(output_path), "--device", device]
        if self.backend and self.backend != "auto":
            argv += ["--backend", str(self.backend)]
        return argv + self.run_selection_args(organs, model, fine, coarse_output)

    def worker_command(self, input_path: Path, output_path: Path, device: str, organs: list[Organ],
                       model: Path | None, fine: bool, coarse_output: Path | None = None) -> list[str]:
        """Command line that runs the worker for one segmentation (``coarse_output``: keep coarse result)."""
        cmd = [*python_command(self.pythonExecutable), "-m", self.workerModule, "--input", str(input_path),
               "--output", str(output_path), "--device", device, "--parent-pid", str(os.getpid()), "--watch-stdin"]
        cmd += self.run_selection_args(organs, model, fine, coarse_output)
        if self.backend and self.backend != "auto":
            cmd += ["--backend", str(self.backend)]
        if self.threads > 0:
            cmd += ["--threads", str(self.threads)]
        return cmd + [str(a) for a in self.workerExtraArgs]

    @staticmethod
    def worker_environment() -> dict[str, str]:
        """This process's environment with the engine's folder first on PYTHONPATH."""
        env = dict(os.environ)
        paths = [str(library_parent())] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        return env

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_device(device: str) -> str:
        name = str(device or "auto").strip().lower()
        if name not in DEVICES:
            raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
        return name

    @staticmethod
    def _check_organs(organs: Sequence[str | int] | None) -> list[Organ]:
        if isinstance(organs, (str, int)):
            organs = [organs]
        chosen = resolve_organs(list(organs) if organs is not None else None)
        if not chosen:
            raise ValueError("no organ selected: choose at least one organ (or None for all 13)")
        return chosen

    @staticmethod
    def _check_model(model: str | os.PathLike[str] | None) -> Path | None:
        if model is None or str(model) == "":
            return None
        path = Path(model).expanduser()
        if not path.is_file():
            raise BundleError(f"model file not found: {path}")
        return path.resolve()

    @staticmethod
    def _check_input(node: Any) -> Any:
        """Validate the input volume node; returns its scene."""
        if node is None:
            raise InputError("no input volume: select a CT volume")
        name = node.GetName() if hasattr(node, "GetName") else str(node)
        if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"'{name}' is not a scalar CT volume ({node.GetClassName()})")
        image = node.GetImageData()
        if image is None or image.GetNumberOfPoints() == 0:
            raise InputError(f"volume '{name}' has no image data (load or compute a CT volume first)")
        if image.GetNumberOfScalarComponents() != 1:
            raise InputError(f"volume '{name}' has {image.GetNumberOfScalarComponents()} components per "
                             "voxel; a single-component CT volume is needed")
        dims = image.GetDimensions()
        if min(dims) < 2:
            raise InputError(f"volume '{name}' is 2D ({dims[0]}x{dims[1]}x{dims[2]} voxels); "
                             "a 3D CT volume is needed")
        scene = node.GetScene()
        if scene is None:
            raise InputError(f"volume '{name}' is not in a MRML scene")
        return scene

    @staticmethod
    def _check_output(node: Any, scene: Any) -> None:
        if node is None:
            return
        if not node.IsA("vtkMRMLSegmentationNode"):
            raise ValueError(f"output '{node.GetName()}' is a {node.GetClassName()}, not a segmentation node")
        if node.GetScene() is not scene:
            raise ValueError(f"output segmentation '{node.GetName()}' is not in the input volume's scene")

    # ------------------------------------------------------------------ events and finalization
    @staticmethod
    def _report(progress: Optional[ProgressCallback], stage: str, fraction: float,
                run: _Run | None = None) -> None:
        """Call ``progress`` with the stage text and the overall fraction (never decreasing)."""
        text, overall = stage_progress(stage, fraction)
        if run is not None:
            if overall is not None:
                run.last_fraction = max(run.last_fraction, overall)
            overall = run.last_fraction
        if progress is not None:
            progress(text, overall if overall is not None else 0.0)

    def _handle_events(self, run: _Run, events: list[dict[str, Any]]) -> None:
        for event in events:
            if self._run is not run:  # cancelled from a callback
                return
            kind = event.get("event")
            if run.persistent and "request" in event and event.get("request") != run.request_id:
                continue  # an earlier request's event (none is expected)
            if kind == "progress":
                self._report(run.progress, str(event.get("stage", "")), float(event.get("fraction", 0.0)), run)
            elif kind == "started":
                self.log(f"Worker started (process {event.get('pid')}, {event.get('python')})")
                if run.persistent and run.job.connection is None and event.get("address"):
                    try:
                        run.job.connect(event["address"], str(event.get("family", "AF_UNIX")))
                    except (OSError, EOFError, ValueError) as exc:
                        self.log(f"Could not connect to the worker (process {run.job.pid}): {exc}")
                        run.job.kill()
                        continue
                    self._send_request(run)
            elif kind == "done":
                run.result_event = event
            elif kind == "error":
                run.error_event = event
            elif kind == "log":
                self.log(str(event.get("line", "")))

    def _finalize(self, run: _Run) -> None:
        """The worker has exited (or, persistent, answered): import its result or raise its error; clean up.

        A persistent worker is kept after a success and after an error the user can fix (bad
        input, bad model); after anything else (crash, out of memory, unexpected error) it is
        ended, and the next run starts a fresh one.
        """
        self._run = None
        code = run.job.process.returncode if not run.persistent else run.job.process.poll()
        keep_worker = run.persistent and run.job.alive() and (
            run.result_event is not None
            or (run.error_event is not None and str(run.error_event.get("type")) in WORKER_USER_ERRORS))
        try:
            if (code == 0 or (run.persistent and code is None)) and run.result_event is not None:
                self._report(run.progress, "import", 0.0, run)
                self._import_result(run)
                self._report(run.progress, "import", 1.0, run)
                return
            if not keep_worker:
                run.job.kill()  # a launcher that died may have left its child behind
            self._discard_output(run)
            raise self._error_from(run, code)
        except BaseException:
            if run.created_output and run.output_node.GetScene() is not None:
                self._discard_output(run)
            raise
        finally:
            if run.persistent:
                if run.temp_dir is not None:
                    shutil.rmtree(run.temp_dir, ignore_errors=True)
                if not keep_worker:
                    run.job.kill()
                    run.job.cleanup()
                    if run.job in self._held:
                        self._held.remove(run.job)
            else:
                run.job.cleanup()

    def _error_from(self, run: _Run, code: int) -> AbdomenKDSegError:
        """The exception that describes a failed worker."""
        event = run.error_event
        if event is not None:
            for warning in self._name_the_volume(run, [str(w) for w in event.get("warnings", [])]):
                self.log(f"Warning: {warning}")
            classes = {"InputError": InputError, "BundleError": BundleError}
            message = self._name_the_volume(run, [str(event.get("message"))])[0]
            return classes.get(str(event.get("type")), WorkerError)(message)
        if code is not None and code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        lines = list(run.job.stderr_tail)
        fatal = [line for line in lines if line.startswith("Fatal Python error")][:1]
        tail = "\n".join(fatal + [line for line in lines[-8:] if line not in fatal])
        return WorkerError(
            f"the segmentation worker stopped unexpectedly ({how}) before producing a result"
            + (f"; its last output:\n{tail}" if tail else "")
        )

    def _discard_output(self, run: _Run) -> None:
        """Remove the output node if this run created it; a user's node is left untouched."""
        node = run.output_node
        if run.created_output and node is not None and node.GetScene() is not None:
            node.GetScene().RemoveNode(node)

    def _import_result(self, run: _Run) -> None:
        """Read the worker's label map(s) and replace the output node's segments with the organs.

        Everything that can fail (reading, checking, building segmentations) happens before a node
        is modified. A kept coarse result fills its own node through the same code.
        """
        segmentation, label_node = self._read_result(run, run.output_path)
        coarse = self._read_result(run, run.coarse_path) if run.coarse_path is not None else None
        output = run.output_node
        if output.GetScene() is None:
            raise WorkerError("the output segmentation was removed from the scene during the run")
        self._fill_segmentation_node(output, segmentation, label_node, run.input_node)
        self.lastCoarseSegmentationNode = None
        if coarse is not None:
            self.lastCoarseSegmentationNode = self._import_coarse(run, *coarse)
        event = run.result_event or {}
        counts = {int(k): int(v) for k, v in dict(event.get("voxel_counts", {})).items()}
        self.lastRunInfo = RunInfo(
            device=str(event.get("device", "")),
            timings={str(k): float(v) for k, v in dict(event.get("timings", {})).items()},
            voxel_counts=counts,
            warnings=self._name_the_volume(run, [str(w) for w in event.get("warnings", [])]),
            total_seconds=time.perf_counter() - run.start_time,
            backend=str(event.get("backend", "")),
            empty_organs=[o.name for o in run.organs if o.value not in counts],
            volume_name=run.input_node.GetName() or "",
            volumes_ml=organ_volumes_ml(counts, run.input_node.GetSpacing(), run.organs),
        )
        for note in self.lastRunInfo.notes():
            self.log(note)
        self.log(f"Segmentation of '{self.lastRunInfo.volume_name}' finished in {self.lastRunInfo.summary()}")

    @staticmethod
    def _name_the_volume(run: _Run, texts: list[str]) -> list[str]:
        """``texts`` with the worker's temporary input file replaced by the volume's name, each once."""
        path = str(run.input_path) if run.input_path is not None else None
        name = f"volume '{run.input_node.GetName()}'"
        out: list[str] = []
        for text in texts:
            if path:
                text = text.replace(path, name)
            if text not in out:
                out.append(text)
        return out

    def _read_result(self, run: _Run, path: Path) -> tuple[Any, Any]:
        """(vtkSegmentation of the run's organs, label map node) from a label map file of the worker."""
        label_node = self.read_labelmap(path)
        input_node = run.input_node
        if input_node.GetScene() is not None and input_node.GetImageData() is not None:
            got, want = label_node.GetImageData().GetDimensions(), input_node.GetImageData().GetDimensions()
            if tuple(got) != tuple(want):
                raise WorkerError(f"the worker's label map has {got} voxels but the input has {want}")
        return build_segmentation(label_node, run.organs), label_node

    def _fill_segmentation_node(self, node: Any, segmentation: Any, label_node: Any, input_node: Any,
                                coarse_of: str | None = None) -> None:
        """Put ``segmentation``'s organs into ``node``, with the input volume's geometry and transform.

        The organ segments this module made earlier (:func:`organ_of_segment`) are replaced, every
        other segment is kept as it is. ``coarse_of``: the input volume's ID for a coarse-result
        node (sets :data:`COARSE_RESULT_ATTRIBUTE`); None removes that mark (the node now holds a
        main result).
        """
        register_segmentation_converters()
        target = node.GetSegmentation()
        kept = [target.GetNthSegmentID(i) for i in range(target.GetNumberOfSegments())
                if organ_of_segment(target.GetNthSegment(i), target.GetNthSegmentID(i)) is None]
        was_modifying = node.StartModify()
        try:
            if not kept:
                target.DeepCopy(segmentation)
            else:
                self._replace_organ_segments(node, segmentation, kept)
            reference = input_node if input_node.GetScene() is not None else label_node
            node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
            if input_node.GetScene() is not None:
                node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())
                node.SetAttribute(INPUT_VOLUME_ATTRIBUTE, input_node.GetID())
            if coarse_of is not None:
                node.SetAttribute(COARSE_RESULT_ATTRIBUTE, coarse_of)
            elif node.GetAttribute(COARSE_RESULT_ATTRIBUTE) is not None:
                node.RemoveAttribute(COARSE_RESULT_ATTRIBUTE)
        finally:
            node.EndModify(was_modifying)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()

    def _replace_organ_segments(self, node: Any, segmentation: Any, kept: list[str]) -> None:
        """Remove ``node``'s module-made organ segments and add ``segmentation``'s; ``kept`` stay."""
        target = node.GetSegmentation()
        source_name = (target.GetSourceRepresentationName() if hasattr(target, "GetSourceRepresentationName")
                       else target.GetMasterRepresentationName())
        if source_name != BINARY_LABELMAP:  # e.g. imported surfaces: labelmaps are needed to add organs
            node.CreateBinaryLabelmapRepresentation()
            if hasattr(target, "SetSourceRepresentationName"):
                target.SetSourceRepresentationName(BINARY_LABELMAP)
            else:
                target.SetMasterRepresentationName(BINARY_LABELMAP)
            self.log(f"'{node.GetName()}' now stores its segments as binary labelmaps (was: {source_name})")
        for segment_id in [target.GetNthSegmentID(i) for i in range(target.GetNumberOfSegments())]:
            if segment_id not in kept:
                target.RemoveSegment(segment_id)
        for i in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(i)
            new_id = segment_id if target.GetSegment(segment_id) is None else target.GenerateUniqueSegmentID(segment_id)
            target.AddSegment(segmentation.GetNthSegment(i), new_id)

    def _import_coarse(self, run: _Run, segmentation: Any, label_node: Any) -> Any:
        """Fill the coarse-result node of the input volume (reused if this option made it, else new)."""
        input_node, scene = run.input_node, run.output_node.GetScene()
        node = self.findCoarseResultNode(input_node, scene, exclude=run.output_node)
        created = node is None
        if created:
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", coarse_result_name(input_node))
        try:
            self._fill_segmentation_node(node, segmentation, label_node, input_node, coarse_of=input_node.GetID())
        except BaseException:
            if created:
                scene.RemoveNode(node)
            raise
        if created and node.GetDisplayNode() is not None:
            node.GetDisplayNode().SetVisibility2DFill(False)  # outlines over the fine result's fill
        self.log(f"Coarse result kept in '{node.GetName()}'")
        return node


def build_segmentation(labelNode: Any, organs: Sequence[Organ]) -> Any:
    """A vtkSegmentation with one segment per organ, all sharing the label map as one layer.

    Segment IDs are the organ keys (e.g. ``"liver"``), label values are the FLARE22 values, and
    names, colors and the ``TerminologyEntry`` tag come from the organ table; each segment carries
    :data:`ORGAN_TAG` = its organ key (how a later run finds the segments it may replace). Voxels of organs not
    in ``organs`` are set to background. Organs absent from the image get an empty segment.
    """
    from vtk.util.numpy_support import vtk_to_numpy

    image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(labelNode)
    if image is None:
        raise WorkerError("could not convert the worker's label map to a segmentation")
    voxels = vtk_to_numpy(image.GetPointData().GetScalars())
    keep = {o.value for o in organs}
    unknown = set(int(v) for v in _unique(voxels)) - keep - {0}
    for value in unknown:
        voxels[voxels == value] = 0
    if unknown:
        image.Modified()
    segmentation = slicer.vtkSegmentation()
    if hasattr(segmentation, "SetSourceRepresentationName"):
        segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
    else:  # Slicer < 5.4 calls it "master"
        segmentation.SetMasterRepresentationName(BINARY_LABELMAP)
    for organ in organs:
        segment = slicer.vtkSegment()
        segment.SetName(organ.name)
        segment.SetColor(*organ.color_float)
        segment.SetLabelValue(organ.value)
        segment.SetTag(terminology_tag_name(), organ.terminology_entry())
        segment.SetTag(ORGAN_TAG, organ.key)
        segment.AddRepresentation(BINARY_LABELMAP, image)
        segmentation.AddSegment(segment, organ.key)
    return segmentation


def _unique(values: Any) -> list[int]:
    """Distinct values of a 1-D integer array (bincount: fast for uint8 label maps)."""
    import numpy as np

    if values.size == 0:
        return []
    if values.dtype.kind == "u" and values.dtype.itemsize <= 2:
        return [int(v) for v in np.flatnonzero(np.bincount(values))]
    return [int(v) for v in np.unique(values)]
