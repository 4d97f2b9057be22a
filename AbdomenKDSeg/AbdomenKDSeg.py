"""3D Slicer module "Abdomen KD Seg": 13 abdominal organs in CT with a distilled coarse-to-fine student.

Thin layer over the engine: the GUI (:class:`AbdomenKDSegWidget`) edits a parameter node and
drives :class:`AbdomenKDSegLib.logic.AbdomenKDSegLogic` (re-exported here as
``AbdomenKDSegLogic``), which runs the network in a separate worker process. Nothing here
imports torch or the other engine dependencies at module load time, so the module appears in
Slicer before those packages are installed; they are installed on first use.

No ``from __future__ import annotations`` here, unlike the engine: Slicer's parameterNodeWrapper
evaluates the parameter class's annotations, which must then be real objects, not strings.
"""

import logging
import os
import sys
import tempfile
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:  # Slicer adds it; this also covers unusual launch setups
    sys.path.insert(0, _MODULE_DIR)

from AbdomenKDSegLib import dependencies
from AbdomenKDSegLib.logic import (  # noqa: F401  (re-exported for scripting)
    AbdomenKDSegLogic,
    SegmentationCancelled,
    WorkerError,
    segment_tag,
    terminology_tag_name,
)
from AbdomenKDSegLib.organs import ORGANS

DEVICE_CHOICES = ["Auto", "CPU", "CUDA"]
ALL_ORGAN_KEYS = ",".join(o.key for o in ORGANS)


#
# AbdomenKDSeg
#
class AbdomenKDSeg(ScriptedLoadableModule):
    """Module description shown in Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Abdomen KD Seg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["AbdomenKDSeg developers"]
        self.parent.helpText = """
Fully automatic segmentation of 13 abdominal organs in CT (liver, kidneys, spleen, pancreas, aorta,
inferior vena cava, adrenal glands, gallbladder, esophagus, stomach, duodenum) with a small
coarse-to-fine student network distilled from two cross-teaching teachers.
Select a CT volume and press <b>Segment abdomen</b>. The organs are written into a segmentation
(named, colored and coded with SNOMED CT terminology), by default a new one named after the volume.
Running again into an existing segmentation replaces only the organ segments this module made:
segments you added are kept, and the module asks before it fills a segmentation of another
volume. Warnings and organs not found are shown under the button. The network runs in a separate process:
<b>Cancel</b> stops it at once and a crash cannot affect Slicer. PyTorch and a few small Python
packages are installed on first use.
See the <a href="https://github.com/AbdomenKDSeg/SlicerAbdomenKDSeg">documentation</a>.
"""
        self.parent.acknowledgementText = """
The method is described in: Jae Won Choi, "Knowledge Distillation from Cross Teaching Teachers for
Efficient Semi-Supervised Abdominal Organ Segmentation in CT", MICCAI FLARE 2022 challenge
(Fast and Low-resource semi-supervised Abdominal oRgan sEgmentation), LNCS 13816.
The organ labels follow the FLARE22 challenge (https://flare22.grand-challenge.org/).
The self-test CT comes from the TotalSegmentator test data (Apache-2.0).
"""


#
# Parameter node
#
@parameterNodeWrapper
class AbdomenKDSegParameterNode:
    """Settings of the module, saved with the scene.

    inputVolume: CT to segment. outputSegmentation: segmentation to fill (None: create one).
    device: Auto/CPU/CUDA. fineStage: run the full-resolution fine stage. keepCoarseResult: also
    put the coarse stage's result into "<volume> organs (coarse)" (fine stage on only). organs:
    comma-separated keys of the organs to keep. modelPath: model bundle file ("" = the bundled model).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "Auto"
    fineStage: bool = True
    keepCoarseResult: bool = False
    organs: str = ALL_ORGAN_KEYS
    modelPath: str = ""


#
# Dependencies
#
def ensurePyTorch(log=print) -> None:
    """Make sure torch is installed, through the PyTorch extension (asks the user first)."""
    if dependencies.torch_available():
        return
    try:
        import PyTorchUtils
    except ModuleNotFoundError as exc:
        raise dependencies.DependencyError(
            "This module needs the PyTorch extension: install 'PyTorch' from the Extensions Manager "
            "and restart Slicer.") from exc
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if not torchLogic.torchInstalled():
        log("PyTorch is required. Installing it (this may take several minutes) ...")
        torch = torchLogic.installTorch(askConfirmation=True,
                                        torchVersionRequirement=dependencies.TORCH_REQUIREMENT)
        if torch is None:
            raise dependencies.DependencyError("PyTorch is required for the segmentation but was not installed.")


def ensurePythonPackages(requirementsPath: str, log=print) -> None:
    """Install torch (PyTorch extension) and the module's requirements (one confirmation)."""
    ensurePyTorch(log)
    constraintsPath = os.path.join(tempfile.gettempdir(), "AbdomenKDSeg-pip-constraints.txt")
    dependencies.ensure_requirements(
        requirementsPath,
        confirm=lambda message: slicer.util.confirmOkCancelDisplay(message, "AbdomenKDSeg"),
        install=slicer.util.pip_install,
        constraints_file=constraintsPath,
        log=log,
    )


#
# AbdomenKDSegWidget
#
class AbdomenKDSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: selectors and options bound to the parameter node, Segment/Cancel, progress."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGUI = False
        self._pollTimer = None
        self._runOutput = None
        self._lastInputVolumeID = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AbdomenKDSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AbdomenKDSegLogic()
        self.logic.logCallback = self.addLog

        self._populateOrganList()
        self.ui.progressBar.setVisible(False)
        self.ui.resultsLabel.setVisible(False)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        app = getattr(slicer, "app", None)
        if app is not None and hasattr(app, "connect"):  # the persistent worker ends with the application
            app.connect("aboutToQuit()", self.onAboutToQuit)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.selectAllOrgansButton.connect("clicked(bool)", lambda checked=False: self.setAllOrgansChecked(True))
        self.ui.selectNoOrgansButton.connect("clicked(bool)", lambda checked=False: self.setAllOrgansChecked(False))
        self.ui.organListWidget.connect("itemChanged(QListWidgetItem*)", self.onOrganItemChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.outputSegmentationSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.ui.show3DButton.setSegmentationNode)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.logic is not None:
            self.logic.shutdownWorker()  # cancels a running segmentation, ends the persistent worker
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def onAboutToQuit(self) -> None:
        """The application quits: end the persistent worker (it would also end by itself)."""
        if self.logic is not None:
            self.logic.shutdownWorker()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic is not None and self.logic.isRunning:
            self.onCancel()
        if self.logic is not None:
            self.logic.shutdownWorker()  # the model is loaded again on the next run
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(AbdomenKDSegParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[AbdomenKDSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        self._lastInputVolumeID = None  # a parameter node's saved output is kept when it is (re)connected
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Organ check boxes, model path, keep-coarse availability and the Segment button."""
        if self._updatingGUI:
            return
        if self._parameterNode is None:
            self._updateApplyButton()
            return
        if self._resetOutputOnInputChange():
            return  # the reset modified the parameter node: that update already refreshed the GUI
        self._updatingGUI = True
        try:
            selected = set(self.selectedOrganKeysFromParameter())
            for row in range(self.ui.organListWidget.count):
                item = self.ui.organListWidget.item(row)
                item.setCheckState(qt.Qt.Checked if item.data(qt.Qt.UserRole) in selected else qt.Qt.Unchecked)
            if self.ui.modelPathLineEdit.currentPath != self._parameterNode.modelPath:
                self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelPath
            # Without the fine stage the result already is the coarse one: nothing more to keep.
            self.ui.keepCoarseCheckBox.enabled = self._parameterNode.fineStage
            inputVolume = self._parameterNode.inputVolume
            if inputVolume:
                self.ui.outputSegmentationSelector.baseName = f"{inputVolume.GetName()} organs"
            self.ui.show3DButton.setSegmentationNode(self._parameterNode.outputSegmentation)
            self._updateApplyButton()
        finally:
            self._updatingGUI = False

    def _resetOutputOnInputChange(self) -> bool:
        """A new input volume gets a new output: the output selector goes back to "Create new".

        Otherwise a run on a second CT would overwrite the first CT's segmentation. True when the
        output was reset.
        """
        inputVolume = self._parameterNode.inputVolume
        inputID = inputVolume.GetID() if inputVolume else None
        previousID, self._lastInputVolumeID = self._lastInputVolumeID, inputID
        if previousID is None or inputID == previousID or not self._parameterNode.outputSegmentation:
            return False
        self._parameterNode.outputSegmentation = None
        return True

    def _updateApplyButton(self) -> None:
        if self.logic.isRunning:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the running segmentation."
            self.ui.applyButton.enabled = True
        elif not self._parameterNode or not self._parameterNode.inputVolume:
            self.ui.applyButton.text = "Segment abdomen"
            self.ui.applyButton.toolTip = "Select an input CT volume."
            self.ui.applyButton.enabled = False
        elif not self.selectedOrganKeysFromParameter():
            self.ui.applyButton.text = "Segment abdomen"
            self.ui.applyButton.toolTip = "Select at least one organ."
            self.ui.applyButton.enabled = False
        else:
            self.ui.applyButton.text = "Segment abdomen"
            self.ui.applyButton.toolTip = "Segment the abdominal organs of the input volume."
            self.ui.applyButton.enabled = True

    def selectedOrganKeysFromParameter(self) -> list:
        text = self._parameterNode.organs if self._parameterNode else ""
        return [k for k in text.split(",") if k]

    # ------------------------------------------------------------------ organ subset and model
    def _populateOrganList(self) -> None:
        for organ in ORGANS:
            pixmap = qt.QPixmap(14, 14)
            pixmap.fill(qt.QColor(*organ.color))
            item = qt.QListWidgetItem(qt.QIcon(pixmap), organ.name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setData(qt.Qt.UserRole, organ.key)
            item.setCheckState(qt.Qt.Checked)
            self.ui.organListWidget.addItem(item)

    def onOrganItemChanged(self, item=None) -> None:
        if self._updatingGUI or self._parameterNode is None:
            return
        keys = []
        for row in range(self.ui.organListWidget.count):
            listItem = self.ui.organListWidget.item(row)
            if listItem.checkState() == qt.Qt.Checked:
                keys.append(listItem.data(qt.Qt.UserRole))
        self._parameterNode.organs = ",".join(keys)

    def setAllOrgansChecked(self, checked: bool) -> None:
        if self._parameterNode is not None:
            self._parameterNode.organs = ALL_ORGAN_KEYS if checked else ""

    def onModelPathChanged(self, path: str) -> None:
        if not self._updatingGUI and self._parameterNode is not None:
            self._parameterNode.modelPath = path

    # ------------------------------------------------------------------ running
    def addLog(self, text: str) -> None:
        """Append a line to the log panel (and Slicer's log)."""
        logging.info(text)
        self.ui.logTextEdit.appendPlainText(text)

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to install the Python packages.", waitCursor=True):
            ensurePythonPackages(self.resourcePath("requirements.txt"), self.addLog)
            self.addLog("All required Python packages are installed.")

    def onApplyButton(self) -> None:
        """Segment abdomen, or Cancel while a segmentation is running."""
        if self.logic.isRunning:
            self.onCancel()
            return
        try:
            ensurePythonPackages(self.resourcePath("requirements.txt"), self.addLog)
        except Exception as exc:
            slicer.util.errorDisplay(f"The segmentation cannot run: {exc}")
            return
        parameters = self._parameterNode
        allowOtherVolume = False
        otherVolume = self.logic.otherVolumeOfSegmentation(parameters.outputSegmentation, parameters.inputVolume)
        if otherVolume is not None:
            if not slicer.util.confirmOkCancelDisplay(
                    f"The segmentation '{parameters.outputSegmentation.GetName()}' belongs to the volume "
                    f"'{otherVolume}', not to '{parameters.inputVolume.GetName()}'.\n\n"
                    "Replace its organ segments with the organs of this volume? Its other segments are kept.\n"
                    "(Cancel, then choose \"Create new segmentation\" to keep it as it is.)",
                    "Replace the organs of another volume?"):
                return
            allowOtherVolume = True
        self.addLog(f"--- Segmenting '{parameters.inputVolume.GetName()}' ---")
        try:
            self._runOutput = self.logic.segment(
                parameters.inputVolume,
                parameters.outputSegmentation,
                device=parameters.device.lower(),
                organs=self.selectedOrganKeysFromParameter(),
                progress=self.onProgress,
                waitForCompletion=False,
                model=parameters.modelPath or None,
                fine=parameters.fineStage,
                keepCoarse=parameters.keepCoarseResult,
                allowOtherVolume=allowOtherVolume,
            )
        except Exception as exc:
            slicer.util.errorDisplay(f"The segmentation could not start: {exc}")
            return
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = "Starting ..."
        self._showResults([])
        self._updateApplyButton()
        self._pollTimer.start()

    def onProgress(self, text: str, fraction: float) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = text

    def onPollTimer(self) -> None:
        try:
            running = self.logic.poll()
        except Exception as exc:
            self._runFinished()
            self.ui.statusLabel.text = "Segmentation failed."
            self.addLog(f"Error: {exc}")
            slicer.util.errorDisplay(f"Segmentation failed: {exc}")
            return
        if running:
            return
        self._runFinished()
        output = self._runOutput
        if output is None or output.GetScene() is None:
            return
        info = self.logic.lastRunInfo
        self._parameterNode.outputSegmentation = output
        self.ui.show3DButton.setSegmentationNode(output)
        count = len(info.warnings)
        self.ui.statusLabel.text = f"Done, with {count} warning{'s' if count > 1 else ''}." if count else "Done."
        self.ui.timingLabel.text = f"Last run ('{info.volume_name}'): {info.summary()}"
        self._showResults(info.notes())
        slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume)

    def _showResults(self, notes: list) -> None:
        """Warnings and empty organs of the last run, in the panel (hidden when there are none)."""
        self.ui.resultsLabel.text = "\n".join(notes)
        self.ui.resultsLabel.setVisible(bool(notes))

    def onCancel(self) -> None:
        self.logic.cancel()
        self._runFinished()
        self.ui.statusLabel.text = "Cancelled."

    def _runFinished(self) -> None:
        self._pollTimer.stop()
        self.ui.progressBar.setVisible(False)
        self._updateApplyButton()


#
# AbdomenKDSegTest
#
def sampleCTPath() -> str:
    """The small real CT (6 mm voxels) that ships with the module for the self-test."""
    return os.path.join(_MODULE_DIR, "Resources", "Testing", "ct-abdomen-6mm.nrrd")


class AbdomenKDSegTest(ScriptedLoadableModuleTest):
    """Runs the real pipeline (worker process, bundled model, CPU) on a small real CT."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_small_ct()

    def test_segment_small_ct(self):
        self.delayDisplay("Loading a small abdominal CT")
        ensurePythonPackages(os.path.join(_MODULE_DIR, "Resources", "requirements.txt"))
        volume = slicer.util.loadVolume(sampleCTPath())
        voxelsBefore = slicer.util.arrayFromVolume(volume).copy()
        matrixBefore = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrixBefore)

        self.delayDisplay("Segmenting on the CPU")
        fractions = []
        logic = AbdomenKDSegLogic()
        segmentationNode = logic.segment(volume, device="cpu", progress=lambda text, f: fractions.append(f))

        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentationNode.GetName(), f"{volume.GetName()} organs")
        self.assertEqual(segmentation.GetNumberOfSegments(), len(ORGANS))
        for organ in ORGANS:
            segment = segmentation.GetSegment(organ.key)
            self.assertIsNotNone(segment, organ.key)
            self.assertEqual(segment.GetName(), organ.name)
            for got, want in zip(segment.GetColor(), organ.color_float):
                self.assertAlmostEqual(got, want, places=5)
            self.assertEqual(segment_tag(segment, terminology_tag_name()), organ.terminology_entry())
        self.assertGreater(sum(logic.lastRunInfo.voxel_counts.values()), 0)
        self.assertAlmostEqual(fractions[-1], 1.0)

        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        ids = vtk.vtkStringArray()
        for organ in ORGANS:
            ids.InsertNextValue(organ.key)
        self.assertTrue(slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelmap, volume))
        self.assertEqual(labelmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        labels = slicer.util.arrayFromVolume(labelmap)
        self.assertLessEqual(int(labels.max()), len(ORGANS))

        matrixAfter = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrixAfter)
        self.assertTrue((slicer.util.arrayFromVolume(volume) == voxelsBefore).all())
        for i in range(4):
            for j in range(4):
                self.assertAlmostEqual(matrixAfter.GetElement(i, j), matrixBefore.GetElement(i, j))
        self.delayDisplay("Test passed")
