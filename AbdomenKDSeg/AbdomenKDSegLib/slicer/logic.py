"""AbdomenKDSegLogic: segment a CT volume node into a 13-organ segmentation node (MRML only).

This is the one engine module that imports ``slicer``, and it uses only MRML classes (no Qt, CTK
or ``slicer.app``), so it runs both inside Slicer and with the ``slicer-core`` package from PyPI.
It never imports torch: the network runs in a worker process (:mod:`AbdomenKDSegLib.slicer.worker`,
started and followed by :mod:`AbdomenKDSegLib.slicer.worker_client`) that exchanges files with it:

1. the input volume node is written to a temporary ``.nrrd`` with a volume storage node;
2. the worker segments it (a :class:`~AbdomenKDSegLib.request.SegmentRequest`) and writes a uint8
   label map ``.nrrd`` (same geometry), reporting progress as JSON lines on its stdout;
3. the label map is read back with a storage node and turned into one segment per organ (name,
   color and SNOMED CT terminology from :mod:`AbdomenKDSegLib.engine.organs`), sharing one labelmap
   layer, with the input volume as reference geometry; the temporary files are deleted.
   With ``keepCoarseResult`` (and the fine stage on) the worker also writes the coarse stage's
   result at full resolution, which fills a second segmentation "<volume name> organs (coarse)"
   the same way, to compare coarse and fine.

The worker is persistent (``reuseWorker``, on by default): the first run starts it, later runs
find the model already loaded (see :mod:`AbdomenKDSegLib.slicer.worker_client`); a different model file
(or the same file changed on disk), device or backend makes the worker load that model.
:meth:`AbdomenKDSegLogic.shutdownWorker` ends it (the module calls it when its widget is cleaned
up, the scene closes or the application quits; a logic that is garbage-collected ends its worker
too). With ``reuseWorker = False`` every run starts a one-shot worker.

Scripting waits for the worker (``waitForCompletion=True``); the GUI starts it with
``waitForCompletion=False`` and calls :meth:`AbdomenKDSegLogic.poll` from a timer.
:meth:`AbdomenKDSegLogic.cancel` kills the worker's whole process tree.

Output safety: the input node is never modified; the output node's segments are changed only
when a run succeeds, and a node the logic created for a run that failed or was cancelled is
removed again. In an existing output node only the organ segments this module made (segment tag
:data:`ORGAN_TAG` with their terminology) are replaced; every other segment is kept. A segmentation
that belongs to another volume (:meth:`AbdomenKDSegLogic.otherVolumeOfSegmentation`) is filled
only with ``allowOtherVolume=True``.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import slicer
import vtk

from ..engine.organ_statistics import OrganRow, craniocaudal_extent_mm, organ_table
from ..engine.organs import BY_KEY, BY_VALUE, ORGANS, Organ
from ..errors import AbdomenKDSegError, BundleError, InputError
from ..request import (
    BACKEND_NAMES,
    ENGINE_STAGES,
    DoneEvent,
    ProgressEvent,
    ProgressMap,
    SegmentRequest,
    Stage,
    check_backend,
    check_device,
    organ_values,
)
from .worker_client import LogEvent, WorkerClient, WorkerError, WorkerRun, WorkerSettings, python_command

#: ``progress(stage_text, fraction)``: human-readable stage and overall fraction in [0, 1].
ProgressCallback = Callable[[str, float], None]

MODULE_NAME = "AbdomenKDSeg"
BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"
#: Node attribute marking a segmentation created by the "keep coarse result" option; its value is
#: the ID of the input volume node it belongs to. Only nodes carrying it are ever reused for it.
COARSE_RESULT_ATTRIBUTE = "AbdomenKDSeg.CoarseResultOf"
#: Node attribute of every segmentation this module filled: the ID of the input volume node.
INPUT_VOLUME_ATTRIBUTE = "AbdomenKDSeg.inputVolume"
#: vtkSegment tag of every organ segment this module made: the organ key (e.g. "liver").
ORGAN_TAG = "AbdomenKDSeg.organ"

#: The progress stages of a run: the logic's own around the worker's (:data:`request.ENGINE_STAGES`);
#: the weights are percent of a fine run's progress bar.
STAGES: tuple[Stage, ...] = (
    Stage("export", "Saving input volume", 2.0),
    Stage("started", "Starting worker", 3.0),
    *ENGINE_STAGES,
    Stage("import", "Importing segments", 6.0),
)


class SegmentationCancelled(AbdomenKDSegError):
    """A blocking :meth:`AbdomenKDSegLogic.segment` call was cancelled."""


class OtherVolumeError(ValueError):
    """The output segmentation belongs to another volume (pass ``allowOtherVolume=True`` to fill it)."""


def _default_python_executable() -> str:
    """Python that runs the worker: ``PythonSlicer`` inside Slicer, else this interpreter."""
    if hasattr(slicer, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def registerSegmentationConverters() -> None:
    """Register labelmap <-> closed-surface converter rules if none are registered yet.

    Slicer does this at start-up; with ``slicer-core`` alone it must be done before segmentation
    nodes are created or converted.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) == 0:
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def coarseResultName(volumeNode: Any) -> str:
    """Name of the coarse-result segmentation of a volume: "<volume name> organs (coarse)"."""
    return f"{volumeNode.GetName()} organs (coarse)"


def segmentTag(segment: Any, name: str) -> str | None:
    """Value of a vtkSegment tag, or None when the segment has no such tag."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else None


def terminologyTagName() -> str:
    """The vtkSegment tag holding the terminology entry ("TerminologyEntry")."""
    return slicer.vtkSegment.GetTerminologyEntryTagName()


def terminologyCodes(entry: str | None) -> tuple[tuple[str, str], ...]:
    """(scheme, code) of category, type and modifier of a serialized terminology entry; () if none.

    The code meanings and context names are left out, so a renamed meaning still matches.
    """
    fields = (entry or "").split("~")
    if len(fields) < 4:
        return ()
    return tuple(tuple(part.split("^")[:2]) for part in fields[1:4])  # type: ignore[misc]


def organOfSegment(segment: Any, segmentId: str = "") -> Organ | None:
    """The organ a segment holds if this module made it, else None (the segment is the user's).

    A module segment carries :data:`ORGAN_TAG` = the organ key (segments of earlier versions: the
    organ key as segment ID) and still that organ's terminology codes: a segment the user
    re-labelled (e.g. renamed and coded "Tumor") is the user's.
    """
    key = segmentTag(segment, ORGAN_TAG) or segmentId
    organ = BY_KEY.get(key)
    if organ is None:
        return None
    codes = terminologyCodes(segmentTag(segment, terminologyTagName()))
    return organ if codes == terminologyCodes(organ.terminology_entry()) else None


def runtimeText(backend: str, device: str) -> str:
    """``("openvino", "cpu")`` -> ``"OpenVINO on CPU"``; ``("torch", "cuda:0")`` -> ``"PyTorch on CUDA:0"``."""
    where = str(device).upper() if device else "?"
    return f"{BACKEND_NAMES.get(backend, backend)} on {where}" if backend else f"on {where}"


def organVolumesMl(counts: dict[int, int], spacing: Any, organs: Any) -> dict[str, float]:
    """Organ name -> mL of the ``organs`` present in ``counts`` (voxels), with voxel ``spacing`` in mm."""
    voxelMl = float(spacing[0]) * float(spacing[1]) * float(spacing[2]) / 1000.0
    return {o.name: counts[o.value] * voxelMl for o in organs if counts.get(o.value)}


def fieldOfViewMm(volumeNode: Any) -> float | None:
    """A volume node's extent along the patient's superior axis, mm (None without image data)."""
    image = volumeNode.GetImageData() if volumeNode is not None else None
    if image is None:
        return None
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(matrix)
    direction = [matrix.GetElement(i, j) for i in range(3) for j in range(3)]
    return craniocaudal_extent_mm(image.GetDimensions(), volumeNode.GetSpacing(), direction)


@dataclass
class RunInfo:
    """What the last successful run did: runtime used, seconds per stage, organ voxel counts, warnings.

    ``warnings`` name the input volume (not the worker's temporary file), each once;
    ``emptyOrgans``: names of the requested organs not found in the image.
    """

    device: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    voxelCounts: dict[int, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    totalSeconds: float = 0.0
    backend: str = ""
    emptyOrgans: list[str] = field(default_factory=list)
    volumeName: str = ""
    #: organ name -> volume in mL (organs found), in organ order
    volumesMl: dict[str, float] = field(default_factory=dict)
    #: the input's craniocaudal field of view in mm (scales the FLARE22 volume ranges); None: unknown
    fieldOfViewMm: Optional[float] = None

    def organTable(self) -> list[OrganRow]:
        """The organ table of the panel, the CLI and the web app: each requested organ's volume against
        the FLARE22 1st-99th percentile range scaled by the field of view, flagged outside it."""
        names = set(self.volumesMl) | set(self.emptyOrgans)
        return organ_table(self.volumesMl, self.fieldOfViewMm, [o for o in ORGANS if o.name in names])

    def volumeRows(self) -> list[tuple[str, str]]:
        """(organ, volume text) for the panel's table: the organs found in mL, then those not found."""
        rows = [(name, f"{ml:.1f}") for name, ml in self.volumesMl.items()]
        return rows + [(name, "not found") for name in self.emptyOrgans]

    def summary(self) -> str:
        """One line such as ``"8.1 s, OpenVINO on CPU (coarse 4.2 s, fine 2.9 s, ...)"``."""
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items() if v >= 0.05)
        return f"{self.totalSeconds:.1f} s, {runtimeText(self.backend, self.device)}" + (
            f" ({parts})" if parts else "")

    def notes(self) -> list[str]:
        """What the user should see after the run: the warnings, then the organs not found."""
        notes = [f"Warning: {w}" for w in self.warnings]
        if self.emptyOrgans:
            notes.append(f"Not found in this image (empty segments): {', '.join(self.emptyOrgans)}")
        return notes


@dataclass
class _Run:
    """State of the run in progress: its nodes, files and progress, and its worker request."""

    worker: WorkerRun
    input_node: Any
    output_node: Any
    created_output: bool
    organs: list[Organ]
    progress: Optional[ProgressCallback]
    progress_map: ProgressMap
    start_time: float

    @property
    def request(self) -> SegmentRequest:
        """What the worker was asked to do (its files included)."""
        return self.worker.request


def _log_to(logic: weakref.ref, text: str) -> None:
    """Log through a logic that may be gone (the worker client must not keep it alive)."""
    target = logic()
    if target is not None:
        target.log(text)


class AbdomenKDSegLogic:
    """Headless, scriptable segmentation of 13 abdominal organs.

    Attributes that can be changed before :meth:`segment`:
    ``pythonExecutable`` (interpreter that runs the worker; ``PythonSlicer`` in Slicer; a list is a
    command prefix, e.g. a launcher script and its interpreter),
    ``modelPath`` (model bundle; None = the bundled default), ``fineStage`` (run the fine stage),
    ``keepCoarseResult`` (also output the coarse result, see :meth:`segment`),
    ``threads`` (torch CPU threads in the worker, 0 = default), ``workerExtraArgs`` (extra
    worker options), ``backend`` (network runtime on the CPU, one of :data:`request.BACKENDS`),
    ``reuseWorker`` (keep one worker with the model loaded between runs, default
    True; :meth:`shutdownWorker` ends it), ``logCallback`` (called with each log line; default:
    the ``logging`` module).
    After a successful run: ``lastRunInfo`` and ``lastCoarseSegmentationNode`` (None unless the
    coarse result was kept).
    """

    def __init__(self) -> None:
        self.pythonExecutable: str | list[str] = _default_python_executable()
        self.workerModule: str = "AbdomenKDSegLib.slicer.worker"
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
        self._workers = WorkerClient(functools.partial(_log_to, weakref.ref(self)))

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
        return self._run.worker.job.pid if self._run is not None else self._workers.pid

    @property
    def workerRunning(self) -> bool:
        """True while a persistent worker is running (idle or busy)."""
        return self._workers.running

    def workerSettings(self) -> WorkerSettings:
        """How this logic starts its workers (from ``pythonExecutable``, ``workerModule``,
        ``workerExtraArgs`` and ``reuseWorker``)."""
        return WorkerSettings(tuple(python_command(self.pythonExecutable)), self.workerModule,
                              tuple(str(a) for a in self.workerExtraArgs), bool(self.reuseWorker))

    def shutdownWorker(self) -> bool:
        """End the persistent worker (a running segmentation is cancelled first); False if none ran.

        Closing the connection ends it within a moment; its process tree is killed after 2 s.
        The next :meth:`segment` starts a new one. Safe to call at any time, also twice.
        """
        if self._run is not None:
            self.cancel()
        return self._workers.shutdown()

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
        keepCoarseResult: bool | None = None,
        allowOtherVolume: bool = False,
    ) -> Any:
        """Segment ``inputVolumeNode`` (a CT scalar volume) into organ segments.

        ``outputSegmentationNode``: None to create "<volume name> organs", or a
        vtkMRMLSegmentationNode whose organ segments made by this module are replaced on success
        (every other segment, e.g. a user's "My tumor", is kept). A segmentation that belongs to
        another volume (:meth:`otherVolumeOfSegmentation`) raises :class:`OtherVolumeError` unless
        ``allowOtherVolume``. ``device``: "auto", "cpu" or "cuda".
        ``organs``: organ keys, names or label values (None = all 13). ``progress(text, fraction)``
        receives the stage and the overall fraction. ``model``/``fine``/``keepCoarseResult``
        override the attributes ``modelPath``, ``fineStage`` and ``keepCoarseResult``. With
        ``waitForCompletion=False`` the call returns at once and the caller must call :meth:`poll`
        until it returns False.

        ``keepCoarseResult``: with the fine stage on, also put the coarse stage's result at full
        resolution (same organs, names, colors, terminology and geometry) into a second
        segmentation, returned by :meth:`findCoarseResultNode` and kept in
        :attr:`lastCoarseSegmentationNode`. That node is reused on later runs only if this option
        created it for the same volume (it carries :data:`COARSE_RESULT_ATTRIBUTE` = the volume's
        node ID); otherwise a new "<volume name> organs (coarse)" is created, shown as outlines in
        the slice views. A user's node is never replaced, even with the same name. It is created
        only once the run has succeeded, so cancel and errors leave the scene unchanged. With the
        fine stage off the output already is the coarse result: no second node is made.

        Returns the output segmentation node. Raises InputError (bad input volume), BundleError
        (missing or corrupt model), OtherVolumeError, UsageError (a ValueError: unknown device,
        backend or organ), WorkerError (the worker failed) or SegmentationCancelled.
        """
        if self._run is not None:
            raise RuntimeError("a segmentation is already running; cancel it or wait for it to finish")
        device = check_device(device)
        backend = check_backend(self.backend)
        values = organ_values(organs)  # None: all 13
        model_path = self._checkModel(model if model is not None else self.modelPath)
        scene = self._checkInput(inputVolumeNode)
        self._checkOutput(outputSegmentationNode, scene)
        other = self.otherVolumeOfSegmentation(outputSegmentationNode, inputVolumeNode)
        if other is not None and not allowOtherVolume:
            raise OtherVolumeError(
                f"segmentation '{outputSegmentationNode.GetName()}' belongs to volume '{other}', not to "
                f"'{inputVolumeNode.GetName()}': choose \"Create new segmentation\" or allow replacing its organs")
        run_fine = self.fineStage if fine is None else bool(fine)
        keep_coarse = run_fine and (self.keepCoarseResult if keepCoarseResult is None else bool(keepCoarseResult))
        settings = self.workerSettings()

        self._cancelRequested = False
        start_time = time.perf_counter()
        progress_map = ProgressMap(STAGES, fine=run_fine, coarse_output=keep_coarse)
        temp_dir = Path(tempfile.mkdtemp(prefix="AbdomenKDSeg-"))
        try:
            self._report(progress, progress_map, "export", 0.0)
            request = SegmentRequest(
                input=self.writeVolume(inputVolumeNode, temp_dir / "input.nrrd"), output=temp_dir / "labels.nrrd",
                model=model_path, device=device, backend=backend, organs=values, fine=run_fine,
                coarse_output=temp_dir / "coarse.nrrd" if keep_coarse else None, threads=int(self.threads))
            worker = self._workers.start(request, settings, temp_dir)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        created = outputSegmentationNode is None
        if created:
            outputSegmentationNode = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{inputVolumeNode.GetName()} organs")
        organ_list = list(ORGANS) if values is None else [BY_VALUE[v] for v in values]
        self._run = _Run(worker, inputVolumeNode, outputSegmentationNode, created, organ_list, progress,
                         progress_map, start_time)
        self._report(progress, progress_map, "started", 0.0)
        if waitForCompletion:
            self.wait()
        return outputSegmentationNode

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
        if not self._handleEvents(run):
            return False
        if not run.worker.ended():
            return True
        if not self._handleEvents(run):  # the last lines, once the pipes are drained
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
        self._workers.cancel(run.worker)
        self._discardOutput(run)
        self.log("Segmentation cancelled.")
        return True

    def showIn3D(self, segmentationNode: Any, show: bool = True) -> None:
        """Show (build the closed-surface representation) or hide the organs in 3D views."""
        registerSegmentationConverters()
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

    # ------------------------------------------------------------------ files
    @staticmethod
    def writeVolume(volumeNode: Any, path: Path) -> Path:
        """Write a volume node to ``path`` (uncompressed NRRD) without touching the node."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(0)
        if not storage.WriteData(volumeNode) or not path.is_file():
            raise InputError(f"could not write volume '{volumeNode.GetName()}' to the temporary file {path}")
        return path

    @staticmethod
    def readLabelmap(path: Path) -> Any:
        """Read a label map file into a new vtkMRMLLabelMapVolumeNode that is not in any scene."""
        node = slicer.vtkMRMLLabelMapVolumeNode()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not path.is_file() or not storage.ReadData(node) or node.GetImageData() is None:
            raise WorkerError(f"the worker finished but its label map {path} could not be read")
        return node

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _checkModel(model: str | os.PathLike[str] | None) -> Path | None:
        if model is None or str(model) == "":
            return None
        path = Path(model).expanduser()
        if not path.is_file():
            raise BundleError(f"model file not found: {path}")
        return path.resolve()

    @staticmethod
    def _checkInput(node: Any) -> Any:
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
    def _checkOutput(node: Any, scene: Any) -> None:
        if node is None:
            return
        if not node.IsA("vtkMRMLSegmentationNode"):
            raise ValueError(f"output '{node.GetName()}' is a {node.GetClassName()}, not a segmentation node")
        if node.GetScene() is not scene:
            raise ValueError(f"output segmentation '{node.GetName()}' is not in the input volume's scene")

    # ------------------------------------------------------------------ events and finalization
    @staticmethod
    def _report(progress: Optional[ProgressCallback], progress_map: ProgressMap, stage: str, fraction: float) -> None:
        """Call ``progress`` with the stage text and the overall fraction (never decreasing)."""
        text, overall = progress_map(stage, fraction)
        if progress is not None:
            progress(text, overall)

    def _handleEvents(self, run: _Run) -> bool:
        """Report the worker's progress and log its lines; False when a callback cancelled the run."""
        for event in run.worker.events():
            if isinstance(event, ProgressEvent):
                self._report(run.progress, run.progress_map, event.stage, event.fraction)
            elif isinstance(event, LogEvent):
                self.log(event.line)
            if self._run is not run:  # cancelled from a callback
                return False
        return True

    def _finalize(self, run: _Run) -> None:
        """The worker has exited (or, persistent, answered): import its result or raise its error; clean up.

        A persistent worker is kept after a success and after an error the user can fix (bad
        input, bad model); after anything else (crash, out of memory, unexpected error) it is
        ended, and the next run starts a fresh one.
        """
        self._run = None
        try:
            if not run.worker.succeeded():
                raise self._errorFrom(run)
            self._report(run.progress, run.progress_map, "import", 0.0)
            self._importResult(run)
            self._report(run.progress, run.progress_map, "import", 1.0)
        except BaseException:
            self._discardOutput(run)
            raise
        finally:
            self._workers.finish(run.worker)

    def _errorFrom(self, run: _Run) -> AbdomenKDSegError:
        """The exception that describes a failed worker: its error event, else how it stopped."""
        event = run.worker.error
        if event is None:
            return run.worker.crash_error()
        for warning in self._nameTheVolume(run, list(event.warnings)):
            self.log(f"Warning: {warning}")
        classes = {"InputError": InputError, "BundleError": BundleError}
        return classes.get(event.type, WorkerError)(self._nameTheVolume(run, [event.message])[0])

    def _discardOutput(self, run: _Run) -> None:
        """Remove the output node if this run created it; a user's node is left untouched."""
        node = run.output_node
        if run.created_output and node is not None and node.GetScene() is not None:
            node.GetScene().RemoveNode(node)

    def _importResult(self, run: _Run) -> None:
        """Read the worker's label map(s) and replace the output node's segments with the organs.

        Everything that can fail (reading, checking, building segmentations) happens before a node
        is modified. A kept coarse result fills its own node through the same code.
        """
        segmentation, label_node = self._readResult(run, run.request.output)
        coarse_path = run.request.coarse_output
        coarse = self._readResult(run, coarse_path) if coarse_path is not None else None
        output = run.output_node
        if output.GetScene() is None:
            raise WorkerError("the output segmentation was removed from the scene during the run")
        self._fillSegmentationNode(output, segmentation, label_node, run.input_node)
        self.lastCoarseSegmentationNode = None
        if coarse is not None:
            self.lastCoarseSegmentationNode = self._importCoarse(run, *coarse)
        done = run.worker.done or DoneEvent()  # (set: the run succeeded)
        self.lastRunInfo = RunInfo(
            device=done.device,
            timings=dict(done.timings),
            voxelCounts=dict(done.voxel_counts),
            warnings=self._nameTheVolume(run, list(done.warnings)),
            totalSeconds=time.perf_counter() - run.start_time,
            backend=done.backend,
            emptyOrgans=[o.name for o in run.organs if o.value not in done.voxel_counts],
            volumeName=run.input_node.GetName() or "",
            volumesMl=organVolumesMl(done.voxel_counts, run.input_node.GetSpacing(), run.organs),
            fieldOfViewMm=fieldOfViewMm(run.input_node),
        )
        for note in self.lastRunInfo.notes():
            self.log(note)
        self.log(f"Segmentation of '{self.lastRunInfo.volumeName}' finished in {self.lastRunInfo.summary()}")

    @staticmethod
    def _nameTheVolume(run: _Run, texts: list[str]) -> list[str]:
        """``texts`` with the worker's temporary input file replaced by the volume's name, each once."""
        path = str(run.request.input)
        name = f"volume '{run.input_node.GetName()}'"
        out: list[str] = []
        for text in texts:
            text = text.replace(path, name)
            if text not in out:
                out.append(text)
        return out

    def _readResult(self, run: _Run, path: Path) -> tuple[Any, Any]:
        """(vtkSegmentation of the run's organs, label map node) from a label map file of the worker."""
        label_node = self.readLabelmap(path)
        input_node = run.input_node
        if input_node.GetScene() is not None and input_node.GetImageData() is not None:
            got, want = label_node.GetImageData().GetDimensions(), input_node.GetImageData().GetDimensions()
            if tuple(got) != tuple(want):
                raise WorkerError(f"the worker's label map has {got} voxels but the input has {want}")
        return buildSegmentation(label_node, run.organs), label_node

    def _fillSegmentationNode(self, node: Any, segmentation: Any, label_node: Any, input_node: Any,
                              coarse_of: str | None = None) -> None:
        """Put ``segmentation``'s organs into ``node``, with the input volume's geometry and transform.

        The organ segments this module made earlier (:func:`organOfSegment`) are replaced, every
        other segment is kept as it is. ``coarse_of``: the input volume's ID for a coarse-result
        node (sets :data:`COARSE_RESULT_ATTRIBUTE`); None removes that mark (the node now holds a
        main result).
        """
        registerSegmentationConverters()
        target = node.GetSegmentation()
        kept = [target.GetNthSegmentID(i) for i in range(target.GetNumberOfSegments())
                if organOfSegment(target.GetNthSegment(i), target.GetNthSegmentID(i)) is None]
        was_modifying = node.StartModify()
        try:
            if not kept:
                target.DeepCopy(segmentation)
            else:
                self._replaceOrganSegments(node, segmentation, kept)
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

    def _replaceOrganSegments(self, node: Any, segmentation: Any, kept: list[str]) -> None:
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

    def _importCoarse(self, run: _Run, segmentation: Any, label_node: Any) -> Any:
        """Fill the coarse-result node of the input volume (reused if this option made it, else new)."""
        input_node, scene = run.input_node, run.output_node.GetScene()
        node = self.findCoarseResultNode(input_node, scene, exclude=run.output_node)
        created = node is None
        if created:
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", coarseResultName(input_node))
        try:
            self._fillSegmentationNode(node, segmentation, label_node, input_node, coarse_of=input_node.GetID())
        except BaseException:
            if created:
                scene.RemoveNode(node)
            raise
        if created and node.GetDisplayNode() is not None:
            node.GetDisplayNode().SetVisibility2DFill(False)  # outlines over the fine result's fill
        self.log(f"Coarse result kept in '{node.GetName()}'")
        return node


def buildSegmentation(labelNode: Any, organs: Sequence[Organ]) -> Any:
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
        segment.SetTag(terminologyTagName(), organ.terminology_entry())
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
