"""AbdomenKDSegLogic on real MRML (slicer-core): results, organ subsets, reuse, saving, cancel, errors.

Every segmentation runs the real worker process (``python -m AbdomenKDSegLib.slicer.worker``) and the real
engine. The main run uses the bundled default model when it exists (else a tiny random bundle)
and is shared by several tests; the other runs use a tiny random bundle to stay fast.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import torch
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from AbdomenKDSegLib.engine.bundle import default_bundle_path
from AbdomenKDSegLib.engine.inference import segment_file
from AbdomenKDSegLib.engine.organs import BY_KEY, ORGANS
from AbdomenKDSegLib.errors import BundleError, InputError
from AbdomenKDSegLib.request import ProgressMap, SegmentRequest
from AbdomenKDSegLib.slicer import worker as worker_module
from AbdomenKDSegLib.slicer.logic import (
    STAGES,
    AbdomenKDSegLogic,
    SegmentationCancelled,
    WorkerError,
    registerSegmentationConverters,
    segmentTag,
    terminologyTagName,
)
from AbdomenKDSegLib.slicer.worker_client import WorkerSettings, worker_environment

from conftest import load_volume
from engine_helpers import SAMPLE_CT, make_tiny_bundle
from logic_helpers import SMALL_CT, scene_state

# SNOMED CT codes written down independently of the organ table (DESIGN.md §3).
SNOMED = {
    "liver": ("10200004", None), "right_kidney": ("64033007", "24028007"), "spleen": ("78961009", None),
    "pancreas": ("15776009", None), "aorta": ("15825003", None), "inferior_vena_cava": ("64131007", None),
    "right_adrenal_gland": ("23451007", "24028007"), "left_adrenal_gland": ("23451007", "7771000"),
    "gallbladder": ("28231008", None), "esophagus": ("32849002", None), "stomach": ("69695003", None),
    "duodenum": ("38848004", None), "left_kidney": ("64033007", "7771000"),
}
FLARE_ORDER = ["liver", "right_kidney", "spleen", "pancreas", "aorta", "inferior_vena_cava",
               "right_adrenal_gland", "left_adrenal_gland", "gallbladder", "esophagus", "stomach",
               "duodenum", "left_kidney"]


# ----------------------------------------------------------------------------- helpers
def new_scene():
    registerSegmentationConverters()
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    return scene


def segment_ids(node) -> list[str]:
    seg = node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def export_labels(scene, segmentation_node, ids, reference_volume) -> tuple[np.ndarray, vtk.vtkMatrix4x4]:
    """Label array (K, J, I) of the segments ``ids`` (value = position in ``ids`` + 1) and its IJK->RAS."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    array_ids = vtk.vtkStringArray()
    for segment_id in ids:
        array_ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, array_ids, node, reference_volume)
    labels = slicer.util.arrayFromVolume(node).copy()
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    scene.RemoveNode(node)
    return labels, matrix


def matrix_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def volume_matrix(volume) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return matrix_array(matrix)


def run_options_line(log_lines: list[str]) -> str:
    """The logged options of the (first) run: the persistent worker's request, or the one-shot command."""
    return next(line for line in log_lines if line.startswith(("Worker request ", "Starting worker:"))
                and "--input " in line)


def temp_dir_of(log_lines: list[str]) -> Path:
    """The worker's exchange folder, read from the logged request (or command line)."""
    return Path(run_options_line(log_lines).split("--input ")[1].split()[0]).parent


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def make_logic(log_lines: list | None = None) -> AbdomenKDSegLogic:
    logic = AbdomenKDSegLogic()
    logic.threads = torch.get_num_threads()  # same thread count as in-process references
    logic.logCallback = (log_lines.append if log_lines is not None else lambda text: None)
    return logic


# ----------------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.safetensors", seed=7)


@pytest.fixture(scope="module")
def tiny_reference(tiny_bundle, tmp_path_factory) -> np.ndarray:
    """The engine's label map (Z, Y, X) of the sample CT with the tiny bundle."""
    out = tmp_path_factory.mktemp("ref") / "tiny.nrrd"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny bundle is untrained, and says so
        segment_file(SAMPLE_CT, out, model=tiny_bundle, device="cpu")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out)))


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """One full run of the logic on the sample CT (default model if bundled) + the engine's own result."""
    model = default_bundle_path()
    if not model.is_file():
        model = make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "stand-in.safetensors", seed=1)
    scene = new_scene()
    volume = load_volume(scene, SAMPLE_CT, "CT abdomen")
    voxels_before = slicer.util.arrayFromVolume(volume).copy()
    matrix_before = volume_matrix(volume)
    logs, progress = [], []
    logic = make_logic(logs)
    logic.threads = 1
    started = time.perf_counter()
    node = logic.segment(volume, device="cpu", model=model, progress=lambda t, f: progress.append((t, f)),
                         waitForCompletion=False)
    # The engine's own result, computed here while the worker runs (one thread each: same arithmetic).
    reference_path = tmp_path_factory.mktemp("ref") / "labels.nrrd"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            segment_file(SAMPLE_CT, reference_path, model=model, device="cpu")
    finally:
        torch.set_num_threads(threads)
    logic.wait()
    seconds = time.perf_counter() - started
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_path)))
    return SimpleNamespace(scene=scene, volume=volume, node=node, logic=logic, logs=logs, progress=progress,
                           reference=reference, voxels_before=voxels_before, matrix_before=matrix_before,
                           seconds=seconds, model=model)


# ----------------------------------------------------------------------------- main run
def test_output_node_is_new_and_named_after_the_volume(main_run):
    assert main_run.node.IsA("vtkMRMLSegmentationNode")
    assert main_run.node.GetScene() is main_run.scene
    assert main_run.node.GetName() == "CT abdomen organs"
    assert main_run.node.GetDisplayNode() is not None
    assert main_run.scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1


def test_segments_have_names_colors_and_terminology(main_run):
    assert segment_ids(main_run.node) == FLARE_ORDER
    segmentation = main_run.node.GetSegmentation()
    terminology = slicer.vtkSlicerTerminologiesModuleLogic()
    for value, key in enumerate(FLARE_ORDER, start=1):
        organ = BY_KEY[key]
        segment = segmentation.GetSegment(key)
        assert segment.GetName() == organ.name
        assert segment.GetLabelValue() == value
        np.testing.assert_allclose(segment.GetColor(), np.array(organ.color) / 255.0, atol=1e-6)
        tag = segmentTag(segment, "TerminologyEntry")
        assert tag == organ.terminology_entry()
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminology.DeserializeTerminologyEntry(tag, entry)
        assert entry.GetCategoryObject().GetCodeValue() == "123037004"
        type_code, modifier = SNOMED[key]
        assert entry.GetTypeObject().GetCodingSchemeDesignator() == "SCT"
        assert entry.GetTypeObject().GetCodeValue() == type_code
        assert (entry.GetTypeModifierObject().GetCodeValue() or None) == modifier


def test_labelmap_export_equals_engine_label_map(main_run):
    labels, matrix = export_labels(main_run.scene, main_run.node, FLARE_ORDER, main_run.volume)
    assert labels.shape == main_run.reference.shape
    assert np.array_equal(labels, main_run.reference)
    np.testing.assert_allclose(matrix_array(matrix), volume_matrix(main_run.volume), atol=1e-6)
    counts = np.bincount(main_run.reference.ravel(), minlength=14)
    assert main_run.logic.lastRunInfo.voxelCounts == {v: int(counts[v]) for v in range(1, 14) if counts[v]}


def test_segmentation_geometry_is_the_input_volume_geometry(main_run):
    volume, segmentation = main_run.volume, main_run.node.GetSegmentation()
    expected = slicer.vtkSegmentationConverter.SerializeImageGeometry(
        _ijk_to_ras(volume), volume.GetImageData())
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert segmentation.GetConversionParameter(name) == expected
    image = segmentation.GetSegment("liver").GetRepresentation("Binary labelmap")
    to_world = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(to_world)
    np.testing.assert_allclose(matrix_array(to_world), volume_matrix(volume), atol=1e-6)
    dims = volume.GetImageData().GetDimensions()
    assert tuple(image.GetExtent()) == (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)


def _ijk_to_ras(volume) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return matrix


def test_input_volume_is_unchanged(main_run):
    assert np.array_equal(slicer.util.arrayFromVolume(main_run.volume), main_run.voxels_before)
    np.testing.assert_array_equal(volume_matrix(main_run.volume), main_run.matrix_before)
    assert main_run.volume.GetStorageNode() is None  # the temporary file was not attached to it


def test_progress_reaches_one_through_the_engine_stages(main_run):
    fractions = [f for _, f in main_run.progress]
    texts = {t for t, _ in main_run.progress}
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == pytest.approx(1.0)
    assert {"Saving input volume", "Coarse segmentation", "Fine segmentation", "Importing segments"} <= texts


def test_temporary_files_are_removed_and_run_info_kept(main_run):
    assert not temp_dir_of(main_run.logs).exists()
    info = main_run.logic.lastRunInfo
    assert info.device == "cpu"
    assert {"coarse", "fine"} <= set(info.timings)
    assert 0 < info.totalSeconds <= main_run.seconds
    assert not main_run.logic.isRunning


def test_saving_to_seg_nrrd_keeps_names_colors_terminology(main_run, tmp_path):
    path = tmp_path / "organs.seg.nrrd"
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(str(path))
    assert writer.WriteData(main_run.node)
    scene = main_run.scene
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    assert segment_ids(loaded) == FLARE_ORDER
    for key in FLARE_ORDER:
        a, b = main_run.node.GetSegmentation().GetSegment(key), loaded.GetSegmentation().GetSegment(key)
        assert b.GetName() == a.GetName()
        np.testing.assert_allclose(b.GetColor(), a.GetColor(), atol=1e-6)
        assert segmentTag(b, terminologyTagName()) == BY_KEY[key].terminology_entry()
    labels, _ = export_labels(scene, loaded, FLARE_ORDER, main_run.volume)
    assert np.array_equal(labels, main_run.reference)
    scene.RemoveNode(loaded)


def test_show_in_3d_builds_surfaces_inside_the_volume(main_run):
    logic, node = main_run.logic, main_run.node
    present = [k for k in FLARE_ORDER if (main_run.reference == BY_KEY[k].value).any()]
    logic.showIn3D(node, True)
    bounds = [0.0] * 6
    main_run.volume.GetRASBounds(bounds)
    for key in present:
        surface = node.GetSegmentation().GetSegment(key).GetRepresentation("Closed surface")
        assert surface is not None and surface.GetNumberOfPoints() > 0
        points = vtk_to_numpy(surface.GetPoints().GetData())
        assert (points.min(axis=0) >= np.array(bounds[0::2]) - 3.0).all()
        assert (points.max(axis=0) <= np.array(bounds[1::2]) + 3.0).all()
    logic.showIn3D(node, False)
    assert node.GetSegmentation().GetSegment(present[0]).GetRepresentation("Closed surface") is None


def test_parameter_node_is_a_scene_singleton(mrml_scene):
    logic = AbdomenKDSegLogic()
    first = logic.getParameterNode(mrml_scene)
    assert first.IsA("vtkMRMLScriptedModuleNode") and first.GetAttribute("ModuleName") == "AbdomenKDSeg"
    assert logic.getParameterNode(mrml_scene) is first


# ----------------------------------------------------------------------------- subsets and reuse
@pytest.fixture(scope="module")
def subset_run(tiny_bundle):
    """Organs chosen by key, display name and label value, written into an existing segmentation."""
    scene = new_scene()
    volume = load_volume(scene, SAMPLE_CT, "CT")
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My organs")
    output.GetSegmentation().AddEmptySegment("old", "Old segment")
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Other")
    other.GetSegmentation().AddEmptySegment("keep", "Keep me")
    before = scene_state(scene)
    result = make_logic().segment(volume, output, organs=["liver", "Left kidney", 5], device="cpu",
                                  model=tiny_bundle)
    after = scene_state(scene)
    return SimpleNamespace(scene=scene, volume=volume, output=output, other=other, before=before, after=after,
                           result=result)


def test_organ_subset_gives_only_the_chosen_organs(subset_run, tiny_reference):
    assert segment_ids(subset_run.output) == ["old", "liver", "aorta", "left_kidney"]  # "old": the user's
    labels, _ = export_labels(subset_run.scene, subset_run.output, ["liver", "aorta", "left_kidney"],
                              subset_run.volume)
    expected = np.zeros_like(tiny_reference)
    for index, value in enumerate((1, 5, 13), start=1):
        expected[tiny_reference == value] = index
    assert np.array_equal(labels, expected)


def test_existing_output_node_is_reused_and_other_nodes_untouched(subset_run):
    run = subset_run
    assert run.result is run.output and run.output.GetName() == "My organs"
    assert segment_ids(run.output)[0] == "old"  # a segment this module did not make is kept
    assert run.output.GetSegmentation().GetSegment("old").GetName() == "Old segment"
    after = {entry[0]: entry for entry in run.after}
    for entry in run.before:
        if entry[0] != run.output.GetID():
            assert after[entry[0]] == entry, f"node {entry[2]} was modified"
    added = set(after) - {entry[0] for entry in run.before}
    assert added <= {run.output.GetDisplayNodeID()}  # at most the output's display node
    assert run.other.GetSegmentation().GetNthSegment(0).GetName() == "Keep me"


# ----------------------------------------------------------------------------- cancel
def test_cancel_stops_a_running_worker_within_two_seconds(mrml_scene, tiny_bundle):
    volume = load_volume(mrml_scene, SAMPLE_CT, "CT")
    before = scene_state(mrml_scene)
    logs, texts = [], []
    logic = make_logic(logs)
    logic.workerExtraArgs = ["--debug-delay", "120"]  # a worker that is still busy when cancelled
    node = logic.segment(volume, device="cpu", model=tiny_bundle, waitForCompletion=False,
                         progress=lambda t, f: texts.append(t))
    deadline = time.monotonic() + 60
    while "Waiting" not in texts:
        assert logic.poll() and time.monotonic() < deadline
        time.sleep(0.05)
    pid = logic.workerPid
    started = time.perf_counter()
    assert logic.cancel()
    assert time.perf_counter() - started < 2.0
    assert process_gone(pid)
    assert not logic.isRunning and logic.poll() is False
    assert node.GetScene() is None  # the node created for this run is removed again
    assert scene_state(mrml_scene) == before
    assert not temp_dir_of(logs).exists()


def test_cancel_during_a_real_run_leaves_no_partial_segments(mrml_scene, tiny_bundle):
    volume = load_volume(mrml_scene, SAMPLE_CT, "CT")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My organs")
    output.GetSegmentation().AddEmptySegment("old", "Old segment")
    before = scene_state(mrml_scene)
    logic = make_logic()
    seen = {}

    def cancel_in_coarse_stage(text, fraction):
        if text == "Coarse segmentation" and "pid" not in seen:
            seen["pid"], seen["t"] = logic.workerPid, time.perf_counter()
            logic.cancel()

    with pytest.raises(SegmentationCancelled):
        logic.segment(volume, output, device="cpu", model=tiny_bundle, progress=cancel_in_coarse_stage)
    assert time.perf_counter() - seen["t"] < 2.0
    assert process_gone(seen["pid"])
    assert segment_ids(output) == ["old"]
    assert scene_state(mrml_scene) == before


# ----------------------------------------------------------------------------- errors
def _assert_one_error(scene, call, error, match):
    before = scene_state(scene)
    with pytest.raises(error, match=match) as caught:
        call()
    assert scene_state(scene) == before
    return str(caught.value)


def test_2d_volume_is_rejected(mrml_scene, tiny_bundle):
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "slice")
    image = vtk.vtkImageData()
    image.SetDimensions(64, 64, 1)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    volume.SetAndObserveImageData(image)
    message = _assert_one_error(mrml_scene, lambda: make_logic().segment(volume, model=tiny_bundle),
                                InputError, "2D")
    assert "'slice'" in message and "64x64x1" in message


def test_volume_without_image_data_is_rejected(mrml_scene, tiny_bundle):
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    _assert_one_error(mrml_scene, lambda: make_logic().segment(volume, model=tiny_bundle),
                      InputError, "'empty' has no image data")


def test_label_map_input_is_rejected(mrml_scene, tiny_bundle):
    labels = load_volume(mrml_scene, SAMPLE_CT, "labels", labelmap=True)
    _assert_one_error(mrml_scene, lambda: make_logic().segment(labels, model=tiny_bundle),
                      InputError, "not a scalar CT volume")


def test_missing_model_file(mrml_scene, tmp_path):
    volume = load_volume(mrml_scene, SAMPLE_CT, "CT")
    missing = tmp_path / "nowhere.safetensors"
    _assert_one_error(mrml_scene, lambda: make_logic().segment(volume, model=missing),
                      BundleError, "model file not found")


def test_corrupt_model_file_reported_by_the_worker(mrml_scene, tmp_path):
    volume = load_volume(mrml_scene, SAMPLE_CT, "CT")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My organs")
    output.GetSegmentation().AddEmptySegment("old", "Old segment")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    message = _assert_one_error(mrml_scene, lambda: make_logic().segment(volume, output, model=corrupt),
                                BundleError, "corrupt")
    assert str(corrupt) in message
    assert segment_ids(output) == ["old"]


def test_worker_crash_gives_one_clear_message(mrml_scene, tiny_bundle):
    volume = load_volume(mrml_scene, SAMPLE_CT, "CT")
    logs = []
    logic = make_logic(logs)
    logic.workerExtraArgs = ["--debug-crash"]
    message = _assert_one_error(mrml_scene, lambda: logic.segment(volume, model=tiny_bundle),
                                WorkerError, "stopped unexpectedly")
    assert "SIGSEGV" in message and "Segmentation fault" in message
    assert not logic.isRunning
    assert not temp_dir_of(logs).exists()


def test_worker_that_cannot_start(mrml_scene, tiny_bundle, tmp_path):
    volume = load_volume(mrml_scene, SAMPLE_CT, "CT")
    logic = make_logic()
    logic.pythonExecutable = str(tmp_path / "no-python")
    _assert_one_error(mrml_scene, lambda: logic.segment(volume, model=tiny_bundle),
                      WorkerError, "could not start the worker")


def test_invalid_arguments(mrml_scene, tiny_bundle):
    volume = load_volume(mrml_scene, SAMPLE_CT, "CT")
    logic = make_logic()
    _assert_one_error(mrml_scene, lambda: logic.segment(volume, organs=["kidneys"]), ValueError, "unknown organ")
    _assert_one_error(mrml_scene, lambda: logic.segment(volume, organs=[]), ValueError, "no organ selected")
    _assert_one_error(mrml_scene, lambda: logic.segment(volume, device="tpu"), ValueError, "unknown device")
    _assert_one_error(mrml_scene, lambda: logic.segment(volume, volume), ValueError, "not a segmentation node")
    _assert_one_error(mrml_scene, lambda: logic.segment(None), InputError, "no input volume")


def test_second_run_while_running_is_refused(mrml_scene, tiny_bundle):
    volume = load_volume(mrml_scene, SAMPLE_CT, "CT")
    logic = make_logic()
    logic.workerExtraArgs = ["--debug-delay", "120"]
    logic.segment(volume, model=tiny_bundle, waitForCompletion=False)
    try:
        with pytest.raises(RuntimeError, match="already running"):
            logic.segment(volume, model=tiny_bundle)
    finally:
        logic.cancel()


# ----------------------------------------------------------------------------- worker protocol
def _run_worker(segment, *extra):
    stream = io.StringIO()
    args = worker_module.parse_args(["--input", "in.nrrd", "--output", "out.nrrd", *extra])
    code = worker_module.run(args, worker_module.EventWriter(stream), segment=segment)
    return code, [json.loads(line) for line in stream.getvalue().splitlines()]


def test_worker_reports_progress_and_result_as_json_lines():
    calls = {}

    def fake_segment(request, progress):
        calls.update(inp=request.input, out=request.output, model=request.model, device=request.device,
                     fine=request.fine, organs=request.organs)
        for fraction in (0.0, 0.5, 0.5, 1.0):
            progress("coarse", fraction)
        return SimpleNamespace(output_path=request.output, device="cpu", timings={"coarse": 1.5},
                               voxel_counts={1: 10, 13: 2}, warnings=["careful"], backend="openvino")

    code, events = _run_worker(fake_segment, "--organs", "1, liver,13", "--no-fine", "--device", "cpu")
    assert code == 0
    assert calls == {"inp": Path("in.nrrd"), "out": Path("out.nrrd"), "model": None, "device": "cpu", "fine": False,
                     "organs": (1, 13)}
    assert [e["event"] for e in events] == ["started", "progress", "progress", "progress", "done"]
    assert [e["fraction"] for e in events if e["event"] == "progress"] == [0.0, 0.5, 1.0]
    assert events[-1] == {"event": "done", "output": "out.nrrd", "device": "cpu", "backend": "openvino",
                          "timings": {"coarse": 1.5}, "voxel_counts": {"1": 10, "13": 2}, "warnings": ["careful"]}


@pytest.mark.parametrize("exc, kind, code, text", [
    (InputError("input x.nrrd is 2D"), "InputError", 2, "input x.nrrd is 2D"),
    (BundleError("model bundle not found: m"), "BundleError", 2, "model bundle not found: m"),
    (RuntimeError("boom"), "RuntimeError", 1, "RuntimeError: boom"),
    (ModuleNotFoundError("No module named 'torch'", name="torch"), "ImportError", 1, "PyTorch extension"),
])
def test_worker_turns_exceptions_into_one_error_event(exc, kind, code, text):
    def failing(*args, **kwargs):
        raise exc

    got, events = _run_worker(failing)
    assert got == code
    assert events[-1]["event"] == "error" and events[-1]["type"] == kind and text in events[-1]["message"]
    assert [e["event"] for e in events].count("error") == 1


def test_progress_map_turns_stages_into_increasing_overall_fractions():
    order = [("export", 0), ("started", 0), ("orient", 0), ("coarse", 0), ("coarse", 1), ("fine", 0.5),
             ("fine", 1), ("resample", 1), ("done", 1), ("import", 0), ("import", 1)]
    progress = ProgressMap(STAGES)
    overall = [progress(s, f)[1] for s, f in order]
    assert overall == sorted(overall) and overall[0] == 0.0 and overall[-1] == 1.0
    assert progress("coarse", 0.5) == ("Coarse segmentation", 1.0)  # never back
    assert ProgressMap(STAGES)("coarse", 0.5)[0] == "Coarse segmentation"
    assert progress("something_new", 0.5) == ("Something new", 1.0)


def test_worker_command_lists_the_options():
    logic = AbdomenKDSegLogic()
    logic.threads = 3
    request = SegmentRequest("/t/in.nrrd", "/t/out.nrrd", model="/m.safetensors", device="cuda",
                             organs=["liver", "aorta"], fine=False, threads=logic.threads)
    cmd = logic.workerSettings().command(request, serve=False)
    assert cmd[:3] == [logic.pythonExecutable, "-m", "AbdomenKDSegLib.slicer.worker"]
    assert cmd[3:] == ["--input", "/t/in.nrrd", "--output", "/t/out.nrrd", "--device", "cuda",
                       "--organs", "1,5", "--model", "/m.safetensors", "--no-fine", "--threads", "3",
                       "--parent-pid", str(os.getpid()), "--watch-stdin"]
    all_organs = logic.workerSettings().command(SegmentRequest("i", "o", organs=list(ORGANS)), serve=False)
    assert "--organs" not in all_organs and "--model" not in all_organs
    serve = logic.workerSettings().command(request, serve=True)
    assert serve[3:] == ["--serve", "--threads", "3", "--parent-pid", str(os.getpid()), "--watch-stdin"]
    env = worker_environment()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(__file__).resolve().parents[1] / "AbdomenKDSeg")


def test_worker_exits_when_its_parent_dies():
    import subprocess
    import sys

    launcher = ("import os, subprocess, sys\n"
                "p = subprocess.Popen([sys.executable, '-m', 'AbdomenKDSegLib.slicer.worker', '--input', 'in.nrrd',"
                " '--output', 'out.nrrd', '--debug-delay', '120', '--parent-pid', str(os.getpid())],"
                " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                "print(p.pid)\n")
    parent = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=60, check=True)
    pid = int(parent.stdout)
    deadline = time.monotonic() + 10
    while not process_gone(pid):
        assert time.monotonic() < deadline, "orphaned worker still running"
        time.sleep(0.1)


def test_self_test_ct_shipped_with_the_module(mrml_scene, tiny_bundle):
    """The module's self-test input: the real sample CT averaged to 6 mm, and it runs through the logic."""
    small = sitk.ReadImage(str(SMALL_CT))
    full = sitk.ReadImage(str(SAMPLE_CT), sitk.sitkFloat32)
    averaged = np.clip(sitk.GetArrayFromImage(sitk.BinShrink(full, [2, 2, 2])), -1024, 3071)  # 2x2x2 means
    assert np.abs(sitk.GetArrayFromImage(small) - averaged).max() <= 0.5  # stored as rounded int16
    volume = load_volume(mrml_scene, SMALL_CT, "CT 6 mm")
    node = make_logic().segment(volume, device="cpu", model=tiny_bundle)
    assert segment_ids(node) == FLARE_ORDER
    labels, matrix = export_labels(mrml_scene, node, FLARE_ORDER, volume)
    assert labels.shape == (56, 50, 61)
    np.testing.assert_allclose(matrix_array(matrix), volume_matrix(volume), atol=1e-6)


# ----------------------------------------------------------------------------- keep the coarse result
@pytest.fixture(scope="module")
def tiny_coarse_reference(tiny_bundle, tmp_path_factory) -> np.ndarray:
    """The engine's coarse-only label map (Z, Y, X) of the sample CT with the tiny bundle."""
    out = tmp_path_factory.mktemp("ref") / "coarse.nrrd"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segment_file(SAMPLE_CT, out, model=tiny_bundle, device="cpu", fine=False)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out)))


@pytest.fixture(scope="module")
def coarse_run(tiny_bundle):
    """Two runs keeping the coarse result; a user's node already bears the coarse result's name."""
    scene = new_scene()
    volume = load_volume(scene, SAMPLE_CT, "CT")
    user_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT organs (coarse)")
    user_node.GetSegmentation().AddEmptySegment("mine", "Mine")
    logs = []
    logic = make_logic(logs)
    logic.keepCoarseResult = True
    output = logic.segment(volume, device="cpu", model=tiny_bundle)
    coarse = logic.lastCoarseSegmentationNode
    segments = [coarse.GetSegmentation().GetSegment(key) for key in segment_ids(coarse)]
    first = SimpleNamespace(
        ids=segment_ids(coarse), labels=export_labels(scene, coarse, FLARE_ORDER, volume),
        segments=[(s.GetName(), s.GetLabelValue(), s.GetColor(), segmentTag(s, terminologyTagName()))
                  for s in segments],
        output_labels=export_labels(scene, output, FLARE_ORDER, volume)[0], state=scene_state(scene))
    # second run: the attribute is off, the per-call override on, the output node reused, two organs
    second_logic = make_logic()
    second_output = second_logic.segment(volume, output, device="cpu", model=tiny_bundle,
                                         organs=["liver", "aorta"], keepCoarseResult=True)
    return SimpleNamespace(scene=scene, volume=volume, user_node=user_node, logic=logic, logs=logs, output=output,
                           coarse=coarse, first=first, second_logic=second_logic, second_output=second_output)


def test_keep_coarse_result_fills_a_second_segmentation(coarse_run, tiny_coarse_reference, tiny_reference):
    run = coarse_run
    coarse = run.coarse
    assert coarse is not None and coarse.GetScene() is run.scene
    assert coarse is not run.user_node and coarse is not run.output
    assert coarse.GetName() == "CT organs (coarse)"
    assert AbdomenKDSegLogic.findCoarseResultNode(run.volume) is coarse
    assert run.first.ids == FLARE_ORDER
    for value, (key, (name, label, color, tag)) in enumerate(zip(FLARE_ORDER, run.first.segments), start=1):
        organ = BY_KEY[key]
        assert name == organ.name and label == value and tag == organ.terminology_entry()
        np.testing.assert_allclose(color, np.array(organ.color) / 255.0, atol=1e-6)
    labels, matrix = run.first.labels
    assert np.array_equal(labels, tiny_coarse_reference)
    np.testing.assert_allclose(matrix_array(matrix), volume_matrix(run.volume), atol=1e-6)
    assert np.array_equal(run.first.output_labels, tiny_reference)  # the main (fine) result is unchanged
    assert not np.array_equal(tiny_reference, tiny_coarse_reference)
    display = coarse.GetDisplayNode()
    assert display is not None and not display.GetVisibility2DFill() and display.GetVisibility2DOutline()
    assert "--coarse-output" in run_options_line(run.logs)


def test_keep_coarse_reuses_only_the_node_it_created(coarse_run, tiny_coarse_reference):
    run = coarse_run
    assert run.second_output is run.output
    assert run.second_logic.lastCoarseSegmentationNode is run.coarse  # reused, not a third node
    assert segment_ids(run.coarse) == ["liver", "aorta"]
    labels, _ = export_labels(run.scene, run.coarse, ["liver", "aorta"], run.volume)
    expected = np.zeros_like(tiny_coarse_reference)
    expected[tiny_coarse_reference == 1], expected[tiny_coarse_reference == 5] = 1, 2
    assert np.array_equal(labels, expected)
    # the user's node of the same name was never touched
    user_entry = next(e for e in run.first.state if e[0] == run.user_node.GetID())
    assert next(e for e in scene_state(run.scene) if e[0] == run.user_node.GetID()) == user_entry
    assert segment_ids(run.user_node) == ["mine"]
    assert run.scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 3


def test_no_coarse_node_when_the_option_is_off_or_the_fine_stage_off(subset_run, mrml_scene, tiny_bundle):
    assert AbdomenKDSegLogic.findCoarseResultNode(subset_run.volume) is None  # default: off
    volume = load_volume(mrml_scene, SAMPLE_CT, "CT")
    logs = []
    logic = make_logic(logs)
    logic.keepCoarseResult = True
    node = logic.segment(volume, device="cpu", model=tiny_bundle, fine=False)
    assert "--coarse-output" not in run_options_line(logs)
    assert logic.lastCoarseSegmentationNode is None
    assert mrml_scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1
    assert segment_ids(node) == FLARE_ORDER


def _earlier_coarse_node(scene, volume):
    """A segmentation as an earlier "keep coarse result" run left it, with one segment."""
    from AbdomenKDSegLib.slicer.logic import COARSE_RESULT_ATTRIBUTE

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT organs (coarse)")
    node.SetAttribute(COARSE_RESULT_ATTRIBUTE, volume.GetID())
    node.GetSegmentation().AddEmptySegment("old", "Old segment")
    return node


def test_cancel_with_keep_coarse_leaves_the_scene_unchanged(mrml_scene, tiny_bundle):
    volume = load_volume(mrml_scene, SAMPLE_CT, "CT")
    earlier = _earlier_coarse_node(mrml_scene, volume)
    before = scene_state(mrml_scene)
    texts = []
    logic = make_logic()
    logic.keepCoarseResult = True
    logic.workerExtraArgs = ["--debug-delay", "120"]
    logic.segment(volume, device="cpu", model=tiny_bundle, waitForCompletion=False,
                  progress=lambda t, f: texts.append(t))
    deadline = time.monotonic() + 60
    while "Waiting" not in texts:
        assert logic.poll() and time.monotonic() < deadline
        time.sleep(0.05)
    assert logic.cancel()
    assert scene_state(mrml_scene) == before
    assert segment_ids(earlier) == ["old"]


FAKE_WORKER = '''
import argparse, json, sys
import SimpleITK as sitk
p = argparse.ArgumentParser()
for name in ("--input", "--output", "--device", "--parent-pid", "--model", "--coarse-output", "--threads"):
    p.add_argument(name)
args, _ = p.parse_known_args()
image = sitk.ReadImage(args.input)
labels = sitk.Cast(image * 0 + 1, sitk.sitkUInt8)  # liver everywhere
sitk.WriteImage(labels, args.output)  # but no coarse label map: the import must fail as a whole
print(json.dumps({"event": "done", "output": args.output, "device": "cpu", "timings": {},
                  "voxel_counts": {"1": 1}, "warnings": []}), flush=True)
'''


def test_missing_coarse_label_map_fails_without_touching_any_node(mrml_scene, tmp_path, monkeypatch):
    (tmp_path / "fake_coarse_worker.py").write_text(FAKE_WORKER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    volume = load_volume(mrml_scene, SAMPLE_CT, "CT")
    earlier = _earlier_coarse_node(mrml_scene, volume)
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My organs")
    output.GetSegmentation().AddEmptySegment("mine", "Mine")
    logic = make_logic()
    logic.workerModule = "fake_coarse_worker"
    logic.reuseWorker = False  # the stand-in speaks the one-shot protocol only
    logic.keepCoarseResult = True
    _assert_one_error(mrml_scene, lambda: logic.segment(volume, output, device="cpu"), WorkerError,
                      "coarse.nrrd could not be read")
    assert segment_ids(output) == ["mine"] and segment_ids(earlier) == ["old"]
    _assert_one_error(mrml_scene, lambda: logic.segment(volume, device="cpu"), WorkerError,
                      "could not be read")  # the node created for the run is removed again


def test_worker_passes_the_coarse_output_through():
    calls = {}

    def fake_segment(request, progress):
        calls["coarse_output"] = request.coarse_output
        return SimpleNamespace(output_path=request.output, device="cpu", timings={}, voxel_counts={}, warnings=[],
                               coarse_output_path=request.coarse_output)

    code, events = _run_worker(fake_segment, "--coarse-output", "coarse.nrrd")
    assert code == 0 and calls == {"coarse_output": Path("coarse.nrrd")}
    assert events[-1]["event"] == "done" and events[-1]["coarse_output"] == "coarse.nrrd"
    request = SegmentRequest("/t/in.nrrd", "/t/out.nrrd", device="cpu", coarse_output="/t/coarse.nrrd")
    cmd = WorkerSettings().command(request, serve=False)
    assert cmd[cmd.index("--coarse-output") + 1] == "/t/coarse.nrrd"
