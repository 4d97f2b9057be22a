"""3D Slicer module "Abdominal Organs" (AbdomenKDSeg): 13 abdominal organs in CT with a distilled student.

Thin layer over the engine: the GUI (:class:`AbdomenKDSegWidget`) edits a parameter node and
drives :class:`AbdomenKDSegLib.slicer.logic.AbdomenKDSegLogic` (re-exported here as
``AbdomenKDSegLogic``), which runs the network in a separate worker process. Nothing here
imports torch or the other engine dependencies at module load time, so the module appears in
Slicer before those packages are installed; they are installed on first use, in steps: the
required packages, the CPU runtimes (OpenVINO, ONNX Runtime), then torch through the PyTorch
extension only for GPU use (:func:`AbdomenKDSegLib.dependencies.ensure_packages`). The self-test
never installs anything.

User-visible strings are translatable (``_()`` / ``translate`` of ``slicer.i18n``, with a
pass-through fallback where that is unavailable, e.g. slicer-core in the tests).

No ``from __future__ import annotations`` here, unlike the engine: Slicer's parameterNodeWrapper
evaluates the parameter class's annotations, which must then be real objects, not strings.
"""

import logging
import os
import sys
import tempfile
import unittest
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

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer before 5.4, or slicer-core without the application's i18n module
    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:  # Slicer adds it; this also covers unusual launch setups
    sys.path.insert(0, _MODULE_DIR)

from AbdomenKDSegLib import dependencies
from AbdomenKDSegLib.engine import model_card
from AbdomenKDSegLib.engine.organs import ORGANS
from AbdomenKDSegLib.request import DEVICE_NAMES, DEVICES
from AbdomenKDSegLib.slicer.logic import (  # noqa: F401  (re-exported for scripting)
    AbdomenKDSegLogic,
    SegmentationCancelled,
    WorkerError,
    segmentTag,
    terminologyTagName,
)

#: The device combo box's items, saved as such in the parameter node ("Auto", "CPU", "CUDA").
DEVICE_CHOICES = [DEVICE_NAMES[d] for d in DEVICES]
ALL_ORGAN_KEYS = ",".join(o.key for o in ORGANS)


#
# AbdomenKDSeg
#
class AbdomenKDSeg(ScriptedLoadableModule):
    """Module description shown in Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Abdominal Organs")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["AbdomenKDSeg team (Independent)"]
        self.parent.helpText = _("""
Fully automatic segmentation of 13 abdominal organs in CT (liver, kidneys, spleen, pancreas, aorta,
inferior vena cava, adrenal glands, gallbladder, esophagus, stomach, duodenum) with a small
coarse-to-fine student network distilled from two cross-teaching teachers.
<p><b>The bundled model is a demonstration model</b>: it was trained on the CPU on data derived from a
single real labeled CT (the TotalSegmentator test CT), not on a clinical training set. It is not for
clinical use; its accuracy measured on unseen CT is stated in the README. The panel shows the loaded
model's name, what it was trained on and its measured accuracy, from the model file's card; another
model file can be chosen under <i>Advanced</i>.</p>
Select a CT volume and press <b>Segment abdomen</b>. The organs are written into a segmentation
(named, colored and coded with SNOMED CT terminology), by default a new one named after the volume.
Running again into an existing segmentation replaces only the organ segments this module made:
segments you added are kept, and the module asks before it fills a segmentation of another
volume. Warnings (e.g. a partial field of view), organs not found and each organ's volume in mL are
shown under the button. The network runs in a separate process:
<b>Cancel</b> stops it at once and a crash cannot affect Slicer. On first use a few small Python packages and
the CPU runtimes OpenVINO and ONNX Runtime are installed; PyTorch (through the PyTorch extension) is
needed only for GPU use. The <i>Packages</i> section shows what is installed.
See the <a href="https://github.com/AbdomenKDSeg/SlicerAbdomenKDSeg">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
The method is described in: Jae Won Choi, "Knowledge Distillation from Cross Teaching Teachers for
Efficient Semi-Supervised Abdominal Organ Segmentation in CT", MICCAI FLARE 2022 challenge
(Fast and Low-resource semi-supervised Abdominal oRgan sEgmentation), LNCS 13816.
The organ labels follow the FLARE22 challenge (https://flare22.grand-challenge.org/).
The self-test CT comes from the TotalSegmentator test data (Apache-2.0).
""")


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
PYTORCH_EXTENSION = "PyTorch"


def offerPyTorchExtension() -> None:
    """The PyTorch extension is missing: offer to install it from the Extensions Index.

    Always raises DependencyError: without the extension there is no torch in this session
    (after installing it Slicer must be restarted).
    """
    manual = _("This module needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
               "then restart Slicer.")
    try:
        manager = slicer.app.extensionsManagerModel()
    except AttributeError:
        manager = None
    if manager is None or not hasattr(manager, "installExtensionFromServer"):
        raise dependencies.DependencyError(manual)
    if manager.isExtensionInstalled(PYTORCH_EXTENSION):
        raise dependencies.DependencyError(
            _("The PyTorch extension is installed but not loaded yet: restart Slicer, then segment again."))
    if not slicer.util.confirmOkCancelDisplay(
            _("The segmentation needs PyTorch, which Slicer gets from the PyTorch extension. It is not "
              "installed.\n\nInstall the PyTorch extension now? Slicer must be restarted afterwards."),
            _("Install the PyTorch extension?")):
        raise dependencies.DependencyError(manual)
    try:
        installed = manager.installExtensionFromServer(PYTORCH_EXTENSION, False)
    except Exception as exc:  # network, server or API differences between Slicer versions
        logging.warning(f"Installing the PyTorch extension failed: {exc}")
        installed = False
    if not installed:
        raise dependencies.DependencyError(_("Installing the PyTorch extension failed. ") + manual)
    raise dependencies.DependencyError(
        _("The PyTorch extension was installed: restart Slicer, then segment again."))


def ensurePyTorch(log=print) -> None:
    """Make sure torch is installed, through the PyTorch extension (asks the user first)."""
    if dependencies.torch_available():
        return
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        offerPyTorchExtension()
        return
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if not torchLogic.torchInstalled():
        log(_("PyTorch is required. Installing it (this may take several minutes) ..."))
        torch = torchLogic.installTorch(askConfirmation=True,
                                        torchVersionRequirement=dependencies.TORCH_REQUIREMENT)
        if torch is None:
            raise dependencies.DependencyError(
                _("PyTorch is required for the segmentation but was not installed."))


def requirementsFiles() -> tuple:
    """(required, optional) requirement files of the module."""
    resources = os.path.join(_MODULE_DIR, "Resources")
    return (os.path.join(resources, dependencies.REQUIRED_FILE),
            os.path.join(resources, dependencies.OPTIONAL_FILE))


def ensurePythonPackages(requirementsPath: str, optionalPath: Optional[str] = None, log=print,
                         optional: Optional[bool] = None, reinstall: bool = False, gpu: bool = False):
    """Install what is missing, in steps: required packages, CPU runtimes, then torch (PyTorch
    extension) only for GPU use (``gpu``) or when no CPU runtime could be installed.

    ``optional``: None installs the CPU runtimes together with the required packages (first use)
    or when none is installed; their failure is a warning in the returned report. Raises
    DependencyError when a required package stays missing.
    """
    constraintsPath = os.path.join(tempfile.gettempdir(), "AbdomenKDSeg-pip-constraints.txt")
    return dependencies.ensure_packages(
        requirementsPath,
        optionalPath,
        confirm=lambda message: slicer.util.confirmOkCancelDisplay(message, _("Python packages")),
        install=slicer.util.pip_install,
        constraints_file=constraintsPath,
        log=log,
        ensure_torch=lambda: ensurePyTorch(log),
        optional=optional,
        reinstall=reinstall,
        gpu=gpu,
    )


def missingRequiredPackages(requirementsPath: Optional[str] = None) -> list:
    """Texts of the required packages that are missing or too old, and of a missing CPU runtime (OpenVINO
    or ONNX Runtime; PyTorch also does, slower)."""
    path = requirementsPath or requirementsFiles()[0]
    missing = [status.text() for status in dependencies.package_status(path)
               if status.required and not status.satisfied]
    if not dependencies.cpu_runtime_available(requirementsFiles()[1]) and not dependencies.torch_available():
        missing.append(_("a CPU runtime: openvino or onnxruntime"))
    return missing


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
        self._modelInfoKey = None

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
        self.ui.volumesTableWidget.setVisible(False)
        self.ui.demonstrationNoteLabel.setVisible(False)
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
        self.ui.reinstallPackagesButton.connect("clicked(bool)", self.onReinstallPackages)
        self.ui.packagesCollapsibleButton.connect("contentsCollapsed(bool)", self.onPackagesCollapsed)
        self.ui.selectAllOrgansButton.connect("clicked(bool)", lambda checked=False: self.setAllOrgansChecked(True))
        self.ui.selectNoOrgansButton.connect("clicked(bool)", lambda checked=False: self.setAllOrgansChecked(False))
        self.ui.organListWidget.connect("itemChanged(QListWidgetItem*)", self.onOrganItemChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.outputSegmentationSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.ui.show3DButton.setSegmentationNode)

        self.initializeParameterNode()
        self.updateModelInfo()
        self.updatePackagesList()

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
            self.updateModelInfo()
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
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running segmentation.")
            self.ui.applyButton.enabled = True
        elif not self._parameterNode or not self._parameterNode.inputVolume:
            self.ui.applyButton.text = _("Segment abdomen")
            self.ui.applyButton.toolTip = _("Select an input CT volume.")
            self.ui.applyButton.enabled = False
        elif not self.selectedOrganKeysFromParameter():
            self.ui.applyButton.text = _("Segment abdomen")
            self.ui.applyButton.toolTip = _("Select at least one organ.")
            self.ui.applyButton.enabled = False
        else:
            self.ui.applyButton.text = _("Segment abdomen")
            self.ui.applyButton.toolTip = _("Segment the abdominal organs of the input volume.")
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
        self.updateModelInfo()

    def updateModelInfo(self) -> None:
        """The model line (name, training data, measured accuracy) and the demonstration note."""
        path = (self._parameterNode.modelPath if self._parameterNode else "") or str(model_card.default_model_path())
        try:
            key = (path, os.path.getmtime(path))
        except OSError:
            key = (path, None)
        if key == self._modelInfoKey:
            return
        self._modelInfoKey = key
        line, demonstration = model_card.describe_model(path)
        self.ui.modelInfoLabel.text = line
        self.ui.modelInfoLabel.toolTip = _("Model file: {path}").format(path=path)
        self.ui.demonstrationNoteLabel.setVisible(demonstration)

    # ------------------------------------------------------------------ packages
    def onPackagesCollapsed(self, collapsed: bool) -> None:
        if not collapsed:
            self.updatePackagesList()

    def updatePackagesList(self) -> None:
        """What is installed: one line per package, name and version or "not installed"."""
        required, optional = self.resourcePath("requirements.txt"), self.resourcePath("requirements-optional.txt")
        try:
            lines = [status.text() for status in dependencies.package_status(required, optional)]
        except Exception as exc:  # a broken installation must not break the panel
            lines = [_("Cannot list the packages: {error}").format(error=exc)]
        self.ui.packagesLabel.text = "\n".join(lines)

    # ------------------------------------------------------------------ running
    def addLog(self, text: str) -> None:
        """Append a line to the log panel (and Slicer's log)."""
        logging.info(text)
        self.ui.logTextEdit.appendPlainText(text)

    def installPackages(self, optional: Optional[bool] = None, reinstall: bool = False) -> None:
        """Run the install steps; CPU runtimes that fail are shown as a warning, not an error. PyTorch
        is installed only for GPU use (device CUDA, or Auto on a computer with an NVIDIA driver)."""
        device = self._parameterNode.device.lower() if self._parameterNode is not None else "auto"
        gpu = device == "cuda" or (device == "auto" and dependencies.cuda_driver_present())
        try:
            report = ensurePythonPackages(self.resourcePath("requirements.txt"),
                                          self.resourcePath("requirements-optional.txt"), self.addLog,
                                          optional=optional, reinstall=reinstall, gpu=gpu)
        finally:
            self.updatePackagesList()
        if report.warnings:
            slicer.util.warningDisplay("\n\n".join(report.warnings), _("CPU runtimes not installed"))

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages."), waitCursor=True):
            self.installPackages(optional=True)
            self.addLog(_("All required Python packages are installed."))

    def onReinstallPackages(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to reinstall the Python packages."), waitCursor=True):
            self.installPackages(optional=True, reinstall=True)
            self.addLog(_("Python packages reinstalled."))

    def onApplyButton(self) -> None:
        """Segment abdomen, or Cancel while a segmentation is running."""
        if self.logic.isRunning:
            self.onCancel()
            return
        try:
            self.installPackages()
        except Exception as exc:
            slicer.util.errorDisplay(_("The segmentation cannot run: {error}").format(error=exc))
            return
        parameters = self._parameterNode
        allowOtherVolume = False
        otherVolume = self.logic.otherVolumeOfSegmentation(parameters.outputSegmentation, parameters.inputVolume)
        if otherVolume is not None:
            if not slicer.util.confirmOkCancelDisplay(
                    _("The segmentation '{segmentation}' belongs to the volume '{other}', not to '{volume}'.\n\n"
                      "Replace its organ segments with the organs of this volume? Its other segments are kept.\n"
                      "(Cancel, then choose \"Create new segmentation\" to keep it as it is.)").format(
                        segmentation=parameters.outputSegmentation.GetName(), other=otherVolume,
                        volume=parameters.inputVolume.GetName()),
                    _("Replace the organs of another volume?")):
                return
            allowOtherVolume = True
        self.addLog(_("--- Segmenting '{volume}' ---").format(volume=parameters.inputVolume.GetName()))
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
                keepCoarseResult=parameters.keepCoarseResult,
                allowOtherVolume=allowOtherVolume,
            )
        except Exception as exc:
            slicer.util.errorDisplay(_("The segmentation could not start: {error}").format(error=exc))
            return
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.text = _("Starting ...")
        self._showResults([])
        self._showVolumes([])
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
            self.ui.statusLabel.text = _("Segmentation failed.")
            self.addLog(_("Error: {error}").format(error=exc))
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=exc))
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
        if count == 0:
            self.ui.statusLabel.text = _("Done.")
        elif count == 1:
            self.ui.statusLabel.text = _("Done, with 1 warning.")
        else:
            self.ui.statusLabel.text = _("Done, with {count} warnings.").format(count=count)
        self.ui.timingLabel.text = _("Last run ('{volume}'): {summary}").format(volume=info.volumeName,
                                                                             summary=info.summary())
        self._showResults(info.notes())
        self._showVolumes(info.volumeRows())
        self._showVolumeRanges(info.organTable())
        slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume)

    def _showResults(self, notes: list) -> None:
        """Warnings and empty organs of the last run, in the panel (hidden when there are none)."""
        self.ui.resultsLabel.text = "\n".join(notes)
        self.ui.resultsLabel.setVisible(bool(notes))

    def _showVolumes(self, rows: list) -> None:
        """Organ volumes (mL) of the last run in the table; organs not found say so (hidden when empty)."""
        table = self.ui.volumesTableWidget
        table.setRowCount(len(rows))
        for row, (organ, volume) in enumerate(rows):
            table.setItem(row, 0, qt.QTableWidgetItem(organ))
            item = qt.QTableWidgetItem(volume if volume != "not found" else _("not found"))
            item.setTextAlignment(qt.Qt.AlignRight | qt.Qt.AlignVCenter)
            table.setItem(row, 1, item)
        table.resizeColumnToContents(0)
        table.setVisible(bool(rows))

    def _showVolumeRanges(self, organRows: list) -> None:
        """Third column of the volume table: each organ's FLARE22 1st-99th percentile range (scaled by
        the field of view) and LOW/HIGH outside it (rows as :meth:`RunInfo.organTable`, the CLI's table)."""
        table = self.ui.volumesTableWidget
        table.setColumnCount(3)
        table.setHorizontalHeaderLabels([_("Organ"), _("Volume (mL)"), _("FLARE22 range (mL)")])
        byName = {row.organ.name: row for row in organRows}
        for index in range(table.rowCount):
            row = byName.get(table.item(index, 0).text() if table.item(index, 0) else "")
            if row is None:
                continue
            text = row.range_text + ({"low": _("  LOW"), "high": _("  HIGH")}.get(row.status, ""))
            item = qt.QTableWidgetItem(text)
            item.setToolTip(row.flag_text or _("Inside the range of the 50 FLARE22 reference label maps."))
            if row.flagged:
                item.setForeground(qt.QBrush(qt.QColor("orange")))
            table.setItem(index, 2, item)
        table.resizeColumnToContents(1)

    def onCancel(self) -> None:
        self.logic.cancel()
        self._runFinished()
        self.ui.statusLabel.text = _("Cancelled.")

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
        missing = missingRequiredPackages()
        if missing:  # the self-test never installs packages (no network on test machines)
            message = _("AbdomenKDSeg self-test skipped: these Python packages are not installed: {packages}. "
                        "Install them in the module's Packages section, then run the test again.").format(
                            packages="; ".join(missing))
            logging.warning(message)
            self.delayDisplay(message)
            raise unittest.SkipTest(message)
        self.delayDisplay(_("Loading a small abdominal CT"))
        volume = slicer.util.loadVolume(sampleCTPath())
        voxelsBefore = slicer.util.arrayFromVolume(volume).copy()
        matrixBefore = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrixBefore)

        self.delayDisplay(_("Segmenting on the CPU"))
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
            self.assertEqual(segmentTag(segment, terminologyTagName()), organ.terminology_entry())
        self.assertGreater(sum(logic.lastRunInfo.voxelCounts.values()), 0)
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
        self.delayDisplay(_("Test passed"))
