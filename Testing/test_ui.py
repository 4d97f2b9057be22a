"""The Slicer module file and its Qt Designer UI: every widget the code uses exists, controls are complete.

Slicer's GUI (qt, ctk, the application) is not available here, so the .ui file is parsed as XML and
AbdomenKDSeg.py as Python source; one test loads the module file in a subprocess where torch and
the other engine packages cannot be imported, with stand-ins for the Slicer GUI base classes only.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_FILE = REPO / "AbdomenKDSeg" / "AbdomenKDSeg.py"
UI_FILE = REPO / "AbdomenKDSeg" / "Resources" / "UI" / "AbdomenKDSeg.ui"


# ----------------------------------------------------------------------------- parsing helpers
def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def prop(widget: ET.Element, name: str):
    """Value of a widget property: str, bool, int or list of strings (None if absent)."""
    for p in widget.findall("property"):
        if p.get("name") == name:
            child = p[0]
            if child.tag == "bool":
                return child.text == "true"
            if child.tag == "number":
                return int(child.text)
            if child.tag == "stringlist":
                return [s.text for s in child.findall("string")]
            return child.text or ""
    return None


def combo_items(widget: ET.Element) -> list[str]:
    return [item.find("property/string").text for item in widget.findall("item")]


def descendants(container: ET.Element) -> set[str]:
    return {w.get("name") for w in container.iter("widget")} - {container.get("name")}


@pytest.fixture(scope="module")
def module_ast() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def ui_names_used(tree: ast.Module) -> set[str]:
    """Every ``X`` in ``self.ui.X`` in the module."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def parameter_fields(tree: ast.Module) -> dict[str, str]:
    """Annotated fields of the parameter node wrapper class: name -> annotation source."""
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AbdomenKDSegParameterNode")
    assert any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


# ----------------------------------------------------------------------------- tests
def test_every_widget_used_by_the_module_exists_in_the_ui(module_ast):
    used = ui_names_used(module_ast)
    missing = sorted(used - set(ui_widgets()))
    assert not missing, f"self.ui names missing from {UI_FILE.name}: {missing}"
    assert len(used) >= 10  # the parser did find the widget's uses


@pytest.mark.parametrize("name, cls", [
    ("inputVolumeSelector", "qMRMLNodeComboBox"),
    ("outputSegmentationSelector", "qMRMLNodeComboBox"),
    ("deviceComboBox", "QComboBox"),
    ("organListWidget", "QListWidget"),
    ("selectAllOrgansButton", "QPushButton"),
    ("selectNoOrgansButton", "QPushButton"),
    ("applyButton", "QPushButton"),
    ("progressBar", "QProgressBar"),
    ("statusLabel", "QLabel"),
    ("show3DButton", "qMRMLSegmentationShow3DButton"),
    ("logCollapsibleButton", "ctkCollapsibleButton"),
    ("logTextEdit", "QPlainTextEdit"),
    ("timingLabel", "QLabel"),
    ("resultsLabel", "QLabel"),
    ("advancedCollapsibleButton", "ctkCollapsibleButton"),
    ("modelPathLineEdit", "ctkPathLineEdit"),
    ("fineStageCheckBox", "QCheckBox"),
    ("keepCoarseCheckBox", "QCheckBox"),
    ("modelInfoLabel", "QLabel"),
    ("demonstrationNoteLabel", "QLabel"),
    ("volumesTableWidget", "QTableWidget"),
    ("packagesCollapsibleButton", "ctkCollapsibleButton"),
    ("packagesLabel", "QLabel"),
    ("installDependenciesButton", "QPushButton"),
    ("reinstallPackagesButton", "QPushButton"),
])
def test_required_control_is_present(name, cls):
    widgets = ui_widgets()
    assert name in widgets, f"{name} missing from the UI"
    assert widgets[name].get("class") == cls


def test_controls_are_configured_as_designed():
    w = ui_widgets()
    assert prop(w["inputVolumeSelector"], "nodeTypes") == ["vtkMRMLScalarVolumeNode"]
    assert prop(w["inputVolumeSelector"], "showChildNodeTypes") is False  # no label maps as input
    out = w["outputSegmentationSelector"]
    assert prop(out, "nodeTypes") == ["vtkMRMLSegmentationNode"]
    assert prop(out, "noneEnabled") is True and prop(out, "noneDisplay") == "Create new segmentation"
    assert combo_items(w["deviceComboBox"]) == ["Auto", "CPU", "CUDA"]
    assert prop(w["applyButton"], "text") == "Segment abdomen"
    assert prop(w["logTextEdit"], "readOnly") is True
    assert {"logTextEdit"} <= descendants(w["logCollapsibleButton"])
    assert prop(w["logCollapsibleButton"], "collapsed") is True
    assert {"modelPathLineEdit", "fineStageCheckBox"} <= descendants(w["advancedCollapsibleButton"])
    assert prop(w["advancedCollapsibleButton"], "collapsed") is True
    assert prop(w["fineStageCheckBox"], "checked") is True
    assert "keepCoarseCheckBox" in descendants(w["advancedCollapsibleButton"])
    assert prop(w["keepCoarseCheckBox"], "checked") is False
    assert "coarse" in prop(w["keepCoarseCheckBox"], "toolTip")


def form_cells(layout: ET.Element) -> dict[str, tuple[int, int]]:
    """Widget name -> (row, column) of the widgets placed directly in a QFormLayout."""
    return {item.find("widget").get("name"): (int(item.get("row")), int(item.get("column")))
            for item in layout.findall("item") if item.find("widget") is not None}


def test_keep_coarse_check_box_is_under_the_fine_stage_one():
    layout = next(x for x in ET.parse(UI_FILE).getroot().iter("layout") if x.get("name") == "advancedFormLayout")
    cells = form_cells(layout)
    assert len(set(cells.values())) == len(cells), "two widgets in the same form cell"
    row, column = cells["fineStageCheckBox"]
    assert cells["keepCoarseCheckBox"] == (row + 1, column)
    assert cells["keepCoarseLabel"] == (row + 1, 0)


def test_keep_coarse_is_passed_to_the_logic_and_needs_the_fine_stage(module_ast):
    """The widget passes keepCoarseResult=<parameter> to logic.segment and enables the box from fineStage."""
    segment_calls = [n for n in ast.walk(module_ast) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                     and n.func.attr == "segment"]
    keywords = {k.arg: ast.unparse(k.value) for call in segment_calls for k in call.keywords}
    assert keywords.get("keepCoarseResult") == "parameters.keepCoarseResult"
    enabling = [n for n in ast.walk(module_ast) if isinstance(n, ast.Assign)
                and any(ast.unparse(t) == "self.ui.keepCoarseCheckBox.enabled" for t in n.targets)]
    assert [ast.unparse(n.value) for n in enabling] == ["self._parameterNode.fineStage"]


def test_parameter_names_in_the_ui_match_the_parameter_node(module_ast, loaded_module):
    fields = parameter_fields(module_ast)
    choices = loaded_module["device_choices"]  # DEVICE_CHOICES, from the engine's device table
    bound = {prop(w, "SlicerParameterName"): w for w in ui_widgets().values() if prop(w, "SlicerParameterName")}
    assert set(bound) == {"inputVolume", "outputSegmentation", "device", "fineStage", "keepCoarseResult"}
    for name, widget in bound.items():
        assert name in fields, f"SlicerParameterName {name} is not a parameter node field"
        cls, annotation = widget.get("class"), fields[name]
        if cls == "qMRMLNodeComboBox":
            assert prop(widget, "nodeTypes") == [annotation]
        elif cls == "QCheckBox":
            assert annotation == "bool"
        elif cls == "QComboBox":
            assert annotation == "Annotated[str, Choice(DEVICE_CHOICES)]"
            assert combo_items(widget) == choices
        else:
            pytest.fail(f"no parameter connector for {cls}")
    assert {"organs", "modelPath"} <= set(fields)  # edited by the widget code, not by a connector


def test_custom_widgets_are_declared_and_scene_is_connected():
    root = ET.parse(UI_FILE).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if not c.startswith("Q")}
    assert custom <= declared, f"undeclared custom widgets: {custom - declared}"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == root.findtext("class") == "AbdomenKDSeg"
    connected = {(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                 for c in root.iter("connection")}
    for selector in ("inputVolumeSelector", "outputSegmentationSelector"):
        assert ("AbdomenKDSeg", "mrmlSceneChanged(vtkMRMLScene*)", selector, "setMRMLScene(vtkMRMLScene*)") \
            in connected


def test_widget_loads_the_ui_file_and_requirements_that_exist(module_ast):
    resources = set()
    for node in ast.walk(module_ast):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "resourcePath" and node.args and isinstance(node.args[0], ast.Constant)):
            resources.add(node.args[0].value)
    assert {"UI/AbdomenKDSeg.ui", "requirements.txt", "requirements-optional.txt"} <= resources
    for relative in resources:
        assert (REPO / "AbdomenKDSeg" / "Resources" / relative).is_file(), relative


LOAD_SCRIPT = textwrap.dedent("""
    import importlib.abc, importlib.util, json, sys, types, typing

    BLOCKED = {"torch", "cc3d", "fastremap", "safetensors", "qt", "ctk"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    # Stand-ins for the Slicer application's GUI layer (absent from slicer-core), nothing else.
    sys.modules["qt"] = types.ModuleType("qt")
    sys.modules["ctk"] = types.ModuleType("ctk")
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
    scripted.ScriptedLoadableModule = ScriptedLoadableModule
    scripted.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {})
    scripted.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (), {})
    sys.modules["slicer.ScriptedLoadableModule"] = scripted
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    class Choice:
        def __init__(self, choices):
            self.choices = list(choices)
    def parameterNodeWrapper(cls):
        cls.hints = typing.get_type_hints(cls, include_extras=True)  # what Slicer's wrapper evaluates
        return cls
    wrapper.Choice, wrapper.parameterNodeWrapper = Choice, parameterNodeWrapper
    sys.modules["slicer.parameterNodeWrapper"] = wrapper

    spec = importlib.util.spec_from_file_location("AbdomenKDSeg", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parent = types.SimpleNamespace()
    module.AbdomenKDSeg(parent)
    hints = module.AbdomenKDSegParameterNode.hints
    print(json.dumps({
        "title": parent.title, "categories": parent.categories, "help": parent.helpText,
        "contributors": parent.contributors,
        "ack": parent.acknowledgementText,
        "hints": {k: getattr(v, "__name__", str(v)) for k, v in hints.items()},
        "device_choices": hints["device"].__metadata__[0].choices,
        "logic": module.AbdomenKDSegLogic.__module__,
        "heavy_imported": sorted(m for m in ("torch", "cc3d", "fastremap", "safetensors", "SimpleITK")
                                 if m in sys.modules),
    }))
""")


@pytest.fixture(scope="module")
def loaded_module() -> dict:
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(MODULE_FILE)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_module_loads_without_torch_or_engine_packages(loaded_module):
    assert loaded_module["heavy_imported"] == []
    assert loaded_module["logic"] == "AbdomenKDSegLib.slicer.logic"  # the logic is the engine's, re-exported


def test_module_description(loaded_module):
    assert loaded_module["title"] == "Abdominal Organs"  # plain language; the module name stays AbdomenKDSeg
    assert loaded_module["categories"] == ["Segmentation"]
    assert loaded_module["contributors"] == ["AbdomenKDSeg team (Independent)"]
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", c) for c in loaded_module["contributors"])  # "Name (Organization)"
    help_text = " ".join(loaded_module["help"].split())
    assert "demonstration model" in help_text and "single real labeled CT" in help_text
    assert "accuracy measured on unseen CT is stated in the README" in help_text
    assert "DSC" not in help_text  # figures are left to the README and the model's card
    ack = " ".join(loaded_module["ack"].split())
    assert "Choi" in ack and "FLARE" in ack
    assert ("Knowledge Distillation from Cross Teaching Teachers for Efficient Semi-Supervised Abdominal "
            "Organ Segmentation in CT") in ack
    assert "13 abdominal organs" in " ".join(loaded_module["help"].split())


def test_parameter_node_annotations_evaluate(loaded_module):
    hints = loaded_module["hints"]
    assert hints["inputVolume"] == "vtkMRMLScalarVolumeNode"
    assert hints["outputSegmentation"] == "vtkMRMLSegmentationNode"
    assert hints["fineStage"] == "bool" and hints["organs"] == "str" and hints["modelPath"] == "str"
    assert hints["keepCoarseResult"] == "bool"
    assert loaded_module["device_choices"] == ["Auto", "CPU", "CUDA"]


def test_results_are_shown_in_the_panel_not_only_in_the_log(module_ast):
    """Warnings and empty organs go to a visible label (outside the collapsed sections), as plain text."""
    w = ui_widgets()
    results = w["resultsLabel"]
    for section in ("logCollapsibleButton", "advancedCollapsibleButton"):
        assert "resultsLabel" not in descendants(w[section])
    assert prop(results, "wordWrap") is True
    assert prop(results, "textFormat") == "Qt::PlainText"  # a volume name is never read as HTML
    source = ast.unparse(module_ast)
    assert "self._showResults(info.notes())" in source
    assert "see the log" not in source


def test_widget_asks_before_filling_a_segmentation_of_another_volume(module_ast):
    calls = [n for n in ast.walk(module_ast) if isinstance(n, ast.Call)]
    segment_calls = [n for n in calls if isinstance(n.func, ast.Attribute) and n.func.attr == "segment"]
    keywords = {k.arg: ast.unparse(k.value) for call in segment_calls for k in call.keywords}
    assert keywords.get("allowOtherVolume") == "allowOtherVolume"
    names = {ast.unparse(n.func) for n in calls}
    assert "self.logic.otherVolumeOfSegmentation" in names and "slicer.util.confirmOkCancelDisplay" in names


RESET_SCRIPT = LOAD_SCRIPT.split("parent = types.SimpleNamespace()")[0] + textwrap.dedent("""
    class Volume:
        def __init__(self, node_id):
            self.node_id = node_id
        def GetID(self):
            return self.node_id
    Widget = module.AbdomenKDSegWidget
    widget = Widget.__new__(Widget)  # no Qt here: only the reset rule is exercised
    widget._lastInputVolumeID = None
    widget._parameterNode = types.SimpleNamespace(inputVolume=Volume("vtkMRMLScalarVolumeNode1"),
                                                  outputSegmentation="organs of CT 1")
    steps = [widget._resetOutputOnInputChange(), widget._parameterNode.outputSegmentation]
    steps += [widget._resetOutputOnInputChange(), widget._parameterNode.outputSegmentation]
    widget._parameterNode.inputVolume = Volume("vtkMRMLScalarVolumeNode2")
    steps += [widget._resetOutputOnInputChange(), widget._parameterNode.outputSegmentation]
    steps += [widget._resetOutputOnInputChange(), widget._parameterNode.outputSegmentation]
    print(json.dumps(steps))
""")


def test_a_new_input_volume_resets_the_output_to_create_new():
    proc = subprocess.run([sys.executable, "-c", RESET_SCRIPT, str(MODULE_FILE)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    steps = json.loads(proc.stdout.strip().splitlines()[-1])
    # first sight of the parameter node (e.g. a loaded scene): its output is kept; same input: kept;
    # another input volume: back to None ("Create new segmentation"), once.
    assert steps == [False, "organs of CT 1", False, "organs of CT 1", True, None, False, None]


def test_model_line_packages_and_volumes_in_the_panel(module_ast):
    """The model line and the demonstration note in the (open) Inputs section; packages in their own section."""
    w = ui_widgets()
    inputs = descendants(w["inputsCollapsibleButton"])
    assert {"modelInfoLabel", "demonstrationNoteLabel"} <= inputs
    assert prop(w["inputsCollapsibleButton"], "collapsed") in (None, False)
    assert prop(w["modelInfoLabel"], "textFormat") == "Qt::PlainText" and prop(w["modelInfoLabel"], "wordWrap")
    note = prop(w["demonstrationNoteLabel"], "text")
    assert note.startswith("Demonstration model: not for clinical use") and "README" in note
    packages = w["packagesCollapsibleButton"]
    assert prop(packages, "text") == "Packages" and prop(packages, "collapsed") is True
    assert {"packagesLabel", "installDependenciesButton", "reinstallPackagesButton"} <= descendants(packages)
    assert prop(w["reinstallPackagesButton"], "text") == "Reinstall"
    assert "installDependenciesButton" not in descendants(w["advancedCollapsibleButton"])
    for section in ("logCollapsibleButton", "advancedCollapsibleButton", "packagesCollapsibleButton"):
        assert "volumesTableWidget" not in descendants(w[section])
    columns = [c.find("property/string").text for c in w["volumesTableWidget"].findall("column")]
    assert columns == ["Organ", "Volume (mL)"]
    source = ast.unparse(module_ast)
    assert "self._showVolumes(info.volumeRows())" in source
    assert "model_card.describe_model(path)" in source
    assert "self.ui.demonstrationNoteLabel.setVisible(demonstration)" in source
    assert "dependencies.package_status(required, optional)" in source
    assert "reinstall=True" in source


DISPLAY_CALLS = {"errorDisplay", "warningDisplay", "infoDisplay", "confirmOkCancelDisplay", "delayDisplay",
                 "tryWithErrorDisplay"}


def _translated(node: ast.AST) -> bool:
    """``_("...")``, ``_("...").format(...)``, ``translate(...)``, a variable, or text joined from those."""
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("_", "translate"):
            return True
        if isinstance(func, ast.Attribute) and func.attr in ("format", "join"):
            return _translated(func.value) or func.attr == "join"
        return True  # another call computes the text (e.g. a model card line)
    if isinstance(node, ast.BinOp):
        return _translated(node.left) and _translated(node.right)
    return not isinstance(node, (ast.Constant, ast.JoinedStr))


def test_user_visible_strings_are_translatable(module_ast):
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "from slicer.i18n import tr as _" in source and "from slicer.i18n import translate" in source
    untranslated = []
    for node in ast.walk(module_ast):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DISPLAY_CALLS:
            texts = node.args[:2] if node.func.attr == "confirmOkCancelDisplay" else node.args[:1]
            untranslated += [ast.unparse(t) for t in texts if not _translated(t)]
        if isinstance(node, ast.Assign):
            for target in node.targets:
                name = ast.unparse(target)
                if (name.startswith(("self.ui.", "self.parent.")) and name.split(".")[-1] in (
                        "text", "toolTip", "title", "helpText", "acknowledgementText")
                        and not _translated(node.value)):
                    untranslated.append(name)
    assert not untranslated, f"user-visible strings without _(): {untranslated}"
    cls = next(n for n in module_ast.body if isinstance(n, ast.ClassDef) and n.name == "AbdomenKDSeg")
    assert "translate('qSlicerAbstractCoreModule', 'Segmentation')" in ast.unparse(cls)


SELF_TEST_SCRIPT = LOAD_SCRIPT.split("parent = types.SimpleNamespace()")[0].replace(
    'scripted.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (), {})',
    textwrap.dedent("""
    import unittest
    class ScriptedLoadableModuleTest(unittest.TestCase):
        shown = []
        def delayDisplay(self, message, msec=None):
            self.shown.append(message)
    scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    """)) + textwrap.dedent("""
    import importlib.metadata, slicer
    real_version = importlib.metadata.version
    def version(name):  # a test machine without fastremap (PyTorch is not needed on the CPU)
        if name == "fastremap":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)
    importlib.metadata.version = version
    def no_pip(*args, **kwargs):
        raise AssertionError("the self-test must never install packages")
    slicer.util.pip_install = no_pip
    slicer.mrmlScene = slicer.vtkMRMLScene()  # real MRML (slicer-core)
    result = unittest.TestResult()
    module.AbdomenKDSegTest("runTest").run(result)
    print(json.dumps({"skipped": [reason for _, reason in result.skipped],
                      "errors": [text for _, text in result.errors + result.failures],
                      "shown": ScriptedLoadableModuleTest.shown, "testsRun": result.testsRun}))
""")


def test_self_test_skips_with_a_clear_message_when_a_package_is_missing():
    proc = subprocess.run([sys.executable, "-c", SELF_TEST_SCRIPT, str(MODULE_FILE)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == [] and result["testsRun"] == 1
    assert len(result["skipped"]) == 1
    reason = result["skipped"][0]
    assert reason.startswith("AbdomenKDSeg self-test skipped: these Python packages are not installed: fastremap")
    assert "Packages section" in reason
    assert result["shown"] == [reason]  # shown in Slicer too, and nothing was loaded or run
