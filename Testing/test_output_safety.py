"""The logic never loses a user's work, and it says what happened in terms of the volume (real MRML).

Re-running into a segmentation replaces only the organ segments this module made (segment tag
``AbdomenKDSeg.organ`` plus their terminology) and keeps every other segment; a segmentation
that belongs to another volume is filled only when allowed; warnings and errors name the volume,
not the worker's temporary file, each once. Every run is a real worker run on the small CT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import slicer
import torch
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from AbdomenKDSegLib.engine.organs import BY_KEY, ORGANS
from AbdomenKDSegLib.errors import InputError
from AbdomenKDSegLib.slicer.logic import (
    INPUT_VOLUME_ATTRIBUTE,
    ORGAN_TAG,
    AbdomenKDSegLogic,
    OtherVolumeError,
    RunInfo,
    organOfSegment,
    segmentTag,
    terminologyCodes,
    terminologyTagName,
)

from conftest import load_volume
from engine_helpers import make_tiny_bundle
from logic_helpers import SMALL_CT, scene_state

ORGAN_KEYS = [o.key for o in ORGANS]
TUMOR_ENTRY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^Morphologically "
               "Altered Structure~SCT^108369006^Tumor~^^~Anatomic codes - DICOM master list~^^~^^")


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.safetensors", seed=7)


def make_logic(logs: list | None = None) -> AbdomenKDSegLogic:
    logic = AbdomenKDSegLogic()
    logic.threads = torch.get_num_threads()
    logic.logCallback = logs.append if logs is not None else (lambda text: None)
    return logic


def segment_ids(node) -> list[str]:
    seg = node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def labelmap_of(node, segment_id: str) -> np.ndarray:
    """A copy of the voxels of one segment's binary labelmap (its shared layer: voxel == label value)."""
    segment = node.GetSegmentation().GetSegment(segment_id)
    image = segment.GetRepresentation("Binary labelmap")
    values = vtk_to_numpy(image.GetPointData().GetScalars()).copy()
    return values == segment.GetLabelValue()


def add_user_segment(node, segment_id: str, name: str, volume) -> None:
    """A non-empty segment a user drew: a 5x5x5 block in its own labelmap, coded "Tumor"."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(5, 5, 5)
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    image.SetExtent(10, 14, 10, 14, 10, 14)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().GetScalars().Fill(1)
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetColor(1.0, 1.0, 0.0)
    segment.SetTag(terminologyTagName(), TUMOR_ENTRY)
    segment.AddRepresentation("Binary labelmap", image)
    assert node.GetSegmentation().AddSegment(segment, segment_id)


# ----------------------------------------------------------------------------- re-running into a segmentation
@pytest.fixture()
def first_run(mrml_scene, tiny_bundle):
    volume = load_volume(mrml_scene, SMALL_CT, "CT")
    node = make_logic().segment(volume, device="cpu", model=tiny_bundle)
    return volume, node, {key: labelmap_of(node, key) for key in ORGAN_KEYS}


def test_organ_segments_carry_the_module_tag_and_the_node_its_volume(first_run):
    volume, node, _ = first_run
    assert node.GetName() == "CT organs"
    assert node.GetAttribute(INPUT_VOLUME_ATTRIBUTE) == volume.GetID()
    for key in ORGAN_KEYS:
        segment = node.GetSegmentation().GetSegment(key)
        assert segmentTag(segment, ORGAN_TAG) == key
        assert organOfSegment(segment, key) is BY_KEY[key]


def test_rerun_keeps_user_segments_and_replaces_organs_without_duplicates(first_run, tiny_bundle):
    volume, node, organs_before = first_run
    add_user_segment(node, "tumor", "My tumor", volume)
    tumor_before = labelmap_of(node, "tumor")
    assert tumor_before.sum() == 125
    # An organ segment the user changed into something else (renamed, re-coded) is the user's now.
    relabelled = node.GetSegmentation().GetSegment("gallbladder")
    relabelled.SetName("My cyst")
    relabelled.SetTag(terminologyTagName(), TUMOR_ENTRY)
    cyst_before = labelmap_of(node, "gallbladder")
    logs: list[str] = []
    result = make_logic(logs).segment(volume, node, device="cpu", model=tiny_bundle)
    assert result is node
    ids = segment_ids(node)
    assert "tumor" in ids and node.GetSegmentation().GetSegment("tumor").GetName() == "My tumor"
    assert np.array_equal(labelmap_of(node, "tumor"), tumor_before)
    assert node.GetSegmentation().GetSegment("gallbladder").GetName() == "My cyst"
    assert np.array_equal(labelmap_of(node, "gallbladder"), cyst_before)
    organ_ids = [i for i in ids if organOfSegment(node.GetSegmentation().GetSegment(i), i) is not None]
    assert len(organ_ids) == len(ORGANS)  # each organ once: replaced, not duplicated
    names = [node.GetSegmentation().GetSegment(i).GetName() for i in organ_ids]
    assert sorted(names) == sorted(o.name for o in ORGANS)
    assert len(ids) == len(ORGANS) + 2
    new_gallbladder = next(i for i in organ_ids if segmentTag(node.GetSegmentation().GetSegment(i),
                                                               ORGAN_TAG) == "gallbladder")
    assert new_gallbladder != "gallbladder"  # the user's segment keeps its ID
    for key in ORGAN_KEYS:  # the same model on the same CT: the same organs
        segment_id = new_gallbladder if key == "gallbladder" else key
        assert np.array_equal(labelmap_of(node, segment_id), organs_before[key]), key


def test_rerun_with_an_organ_subset_replaces_every_organ_segment_of_the_module(first_run, tiny_bundle):
    volume, node, organs_before = first_run
    add_user_segment(node, "tumor", "My tumor", volume)
    make_logic().segment(volume, node, device="cpu", model=tiny_bundle, organs=["liver", "spleen"])
    assert segment_ids(node) == ["tumor", "liver", "spleen"]
    assert np.array_equal(labelmap_of(node, "liver"), organs_before["liver"])


def test_segments_of_an_earlier_version_without_the_tag_are_still_replaced(first_run, tiny_bundle):
    volume, node, _ = first_run
    for key in ORGAN_KEYS:
        node.GetSegmentation().GetSegment(key).RemoveTag(ORGAN_TAG)
    assert all(organOfSegment(node.GetSegmentation().GetSegment(k), k) is not None for k in ORGAN_KEYS)
    make_logic().segment(volume, node, device="cpu", model=tiny_bundle)
    assert segment_ids(node) == ORGAN_KEYS


def test_the_organ_tag_survives_saving_as_seg_nrrd(first_run, tmp_path, mrml_scene):
    _, node, _ = first_run
    path = tmp_path / "organs.seg.nrrd"
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(str(path))
    assert writer.WriteData(node)
    loaded = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(loaded)
    for key in ORGAN_KEYS:
        segment = loaded.GetSegmentation().GetSegment(key)
        assert segmentTag(segment, ORGAN_TAG) == key and organOfSegment(segment, key) is BY_KEY[key]


def test_organ_of_segment_rules(mrml_scene):
    liver = BY_KEY["liver"]
    segment = slicer.vtkSegment()
    assert organOfSegment(segment, "liver") is None  # no terminology: a user's "liver"
    segment.SetTag(terminologyTagName(), liver.terminology_entry())
    assert organOfSegment(segment, "liver") is liver  # an earlier version's segment
    assert organOfSegment(segment, "Segment_1") is None
    segment.SetTag(ORGAN_TAG, "liver")
    assert organOfSegment(segment, "Segment_1") is liver
    renamed_meaning = liver.terminology_entry().replace("^Liver~", "^Hepar~")
    segment.SetTag(terminologyTagName(), renamed_meaning)
    assert organOfSegment(segment, "x") is liver  # codes, not meanings, are compared
    segment.SetTag(terminologyTagName(), TUMOR_ENTRY)
    assert organOfSegment(segment, "liver") is None
    assert terminologyCodes("") == ()


# ----------------------------------------------------------------------------- other volumes
def test_other_volume_is_detected_from_the_attribute_and_the_reference_geometry(mrml_scene):
    ct_a = load_volume(mrml_scene, SMALL_CT, "CT A")
    ct_b = load_volume(mrml_scene, SMALL_CT, "CT B")
    other = AbdomenKDSegLogic.otherVolumeOfSegmentation
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "new")
    assert other(empty, ct_a) is None and other(None, ct_a) is None
    drawn_on_b = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn on B")
    drawn_on_b.SetReferenceImageGeometryParameterFromVolumeNode(ct_b)  # as the Segment Editor does
    assert other(drawn_on_b, ct_a) == "CT B" and other(drawn_on_b, ct_b) is None
    filled_for_a = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "filled for A")
    filled_for_a.SetAttribute(INPUT_VOLUME_ATTRIBUTE, ct_a.GetID())
    assert other(filled_for_a, ct_b) == "CT A" and other(filled_for_a, ct_a) is None
    ct_a_id = ct_a.GetID()
    mrml_scene.RemoveNode(ct_a)
    assert other(filled_for_a, ct_b) == f"{ct_a_id} (no longer in the scene)"


def test_a_segmentation_of_another_volume_is_filled_only_when_allowed(first_run, mrml_scene, tiny_bundle):
    ct_a, node, _ = first_run
    ct_b = load_volume(mrml_scene, SMALL_CT, "CT B")
    add_user_segment(node, "tumor", "My tumor", ct_a)
    before = scene_state(mrml_scene)
    logic = make_logic()
    with pytest.raises(OtherVolumeError, match="'CT organs' belongs to volume 'CT', not to 'CT B'"):
        logic.segment(ct_b, node, device="cpu", model=tiny_bundle)
    assert scene_state(mrml_scene) == before and not logic.isRunning
    logic.segment(ct_b, node, device="cpu", model=tiny_bundle, allowOtherVolume=True)
    assert node.GetAttribute(INPUT_VOLUME_ATTRIBUTE) == ct_b.GetID()
    assert AbdomenKDSegLogic.otherVolumeOfSegmentation(node, ct_b) is None
    assert AbdomenKDSegLogic.otherVolumeOfSegmentation(node, ct_a) == "CT B"
    assert "tumor" in segment_ids(node) and len(segment_ids(node)) == len(ORGANS) + 1


# ----------------------------------------------------------------------------- warnings and errors name the volume
def test_a_warning_names_the_volume_once_and_the_run_info_says_the_runtime(mrml_scene, tiny_bundle):
    volume = load_volume(mrml_scene, SMALL_CT, "CT shifted")
    array = slicer.util.arrayFromVolume(volume)
    array += 1500  # no air any more: not a CT in Hounsfield units
    slicer.util.arrayFromVolumeModified(volume)
    logs: list[str] = []
    logic = make_logic(logs)
    logic.segment(volume, device="cpu", model=tiny_bundle)
    info = logic.lastRunInfo
    non_ct = [line for line in logs if "do not look like a CT" in line]
    assert len(non_ct) == 1, non_ct  # once: not also the worker's stderr copy
    assert non_ct[0].startswith("Warning: volume 'CT shifted': intensities")
    assert all("input.nrrd" not in line and "AbdomenKDSeg-" not in line for line in logs
               if not line.startswith(("Starting worker:", "Worker request ")))
    assert info.volumeName == "CT shifted"
    assert any(w.startswith("volume 'CT shifted': intensities") for w in info.warnings)
    assert len(info.warnings) == len(set(info.warnings))
    assert info.emptyOrgans == [o.name for o in ORGANS if o.value not in info.voxelCounts]
    assert info.notes()[:len(info.warnings)] == [f"Warning: {w}" for w in info.warnings]
    assert info.backend in ("torch", "onnx", "openvino")
    assert " on CPU" in info.summary()
    assert any(line.startswith("Segmentation of 'CT shifted' finished in") for line in logs)


def test_a_worker_error_names_the_volume(mrml_scene, tiny_bundle):
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "tiny")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 4)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    image.GetPointData().GetScalars().Fill(-1000)
    volume.SetAndObserveImageData(image)
    with pytest.raises(InputError) as caught:
        make_logic().segment(volume, device="cpu", model=tiny_bundle)
    message = str(caught.value)
    assert message.startswith("volume 'tiny': volume too small") and "input.nrrd" not in message


def test_run_info_summary_and_notes():
    info = RunInfo(device="cuda", backend="torch", timings={"coarse": 1.0, "read": 0.01}, totalSeconds=3.04,
                   warnings=["volume 'CT': oblique"], emptyOrgans=["Gallbladder"])
    assert info.summary() == "3.0 s, PyTorch on CUDA (coarse 1.0 s)"
    assert RunInfo(device="cpu", backend="openvino", totalSeconds=1).summary() == "1.0 s, OpenVINO on CPU"
    assert info.notes() == ["Warning: volume 'CT': oblique", "Not found in this image (empty segments): Gallbladder"]
