"""Partial field of view: one warning, naming the scan's head-to-foot extent, from the engine to the panel.

A 20-slice slab (60 mm) of the real sample CT goes through the engine (``segment_file``) and
through the Slicer logic on real MRML (worker process); the whole sample CT (336 mm, lung bases
to pelvis) gets no such warning. The logic's run info also carries the organ volumes in mL.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenKDSegLib.engine.inference import MIN_ABDOMEN_EXTENT_MM, field_of_view_warning, segment_file
from AbdomenKDSegLib.engine.organs import BY_KEY, ORGANS

from conftest import load_volume
from engine_helpers import SAMPLE_CT, SAMPLE_LABELS, make_tiny_bundle


def partial_warnings(texts) -> list[str]:
    return [t for t in texts if t.startswith("partial field of view")]


@pytest.fixture(scope="module")
def slab_path(tmp_path_factory):
    """Slices 40..59 of the sample CT (3 mm): a 60 mm slab through the upper abdomen."""
    image = sitk.ReadImage(str(SAMPLE_CT))
    assert image.GetSpacing()[2] == 3.0
    path = tmp_path_factory.mktemp("slab") / "slab.nrrd"
    sitk.WriteImage(image[:, :, 40:60], str(path))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def test_rule_on_label_maps():
    labels = np.zeros((112, 20, 20), np.uint8)  # 336 mm at 3 mm
    labels[30:80, 5:10, 5:10] = BY_KEY["liver"].value
    assert field_of_view_warning(labels, (3.0, 1.0, 1.0)) is None
    labels[-1, 5:10, 5:10] = BY_KEY["liver"].value  # the liver dome clipped: common, no warning
    labels[0, 12:15, 12:15] = BY_KEY["aorta"].value  # the aorta always reaches both ends
    assert field_of_view_warning(labels, (3.0, 1.0, 1.0)) is None
    labels[0, 5:10, 5:10] = BY_KEY["stomach"].value  # solid organs cut at both ends: a slab
    text = field_of_view_warning(labels, (3.0, 1.0, 1.0))
    assert text.startswith("partial field of view: the scan covers 336 mm from head to foot;")
    assert "liver, stomach reach its first or last slice" in text and "aorta" not in text
    short = field_of_view_warning(np.zeros((20, 8, 8), np.uint8), (3.0, 0.8, 0.8))
    assert short == (f"partial field of view: the scan covers only 60 mm from head to foot, less than the "
                     f"{MIN_ABDOMEN_EXTENT_MM:.0f} mm a whole abdomen needs. Organs may be cut off at the edges "
                     "of the scan: their segments and volumes can be incomplete.")


def test_reference_labels_of_the_whole_sample_ct_give_no_warning():
    labels = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(SAMPLE_LABELS)), "LPS"))
    assert field_of_view_warning(labels, (3.0, 3.0, 3.0)) is None


def test_engine_warns_once_on_a_slab(slab_path, tiny_model, tmp_path):
    with pytest.warns(UserWarning):
        result = segment_file(slab_path, tmp_path / "labels.nrrd", model=tiny_model, device="cpu")
    found = partial_warnings(result.warnings)
    assert len(found) == 1 and "covers only 60 mm from head to foot" in found[0]


def test_logic_shows_the_warning_once_and_the_organ_volumes(mrml_scene, slab_path, tiny_model):
    from AbdomenKDSegLib.slicer.logic import AbdomenKDSegLogic

    volume = load_volume(mrml_scene, slab_path, "Upper abdomen slab")
    logic = AbdomenKDSegLogic()
    output = logic.segment(volume, device="cpu", model=str(tiny_model))
    info = logic.lastRunInfo
    found = partial_warnings(info.warnings)
    assert len(found) == 1 and "60 mm" in found[0]
    assert sum(note.count("partial field of view") for note in info.notes()) == 1
    # volumes: voxel counts x the volume's voxel size (mL), organ order, only organs found
    voxel_ml = float(np.prod(volume.GetSpacing())) / 1000.0
    expected = {o.name: info.voxelCounts[o.value] * voxel_ml for o in ORGANS if info.voxelCounts.get(o.value)}
    assert info.volumesMl == pytest.approx(expected)
    assert list(info.volumesMl) == [o.name for o in ORGANS if o.name in expected]
    rows = info.volumeRows()
    assert rows[: len(expected)] == [(name, f"{ml:.1f}") for name, ml in expected.items()]
    assert rows[len(expected):] == [(name, "not found") for name in info.emptyOrgans]
    assert len(rows) == len(ORGANS)
    assert output.GetSegmentation().GetNumberOfSegments() == len(ORGANS)
