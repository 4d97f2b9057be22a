"""Coarse-to-fine predictor: window weights, window layout, geometry, orientation invariance, devices."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AbdomenKDSegLib.geometry import centered_box
from AbdomenKDSegLib.image_io import read_image
from AbdomenKDSegLib.inference import (
    EmptyCoarseWarning,
    Predictor,
    gaussian_importance,
    resolve_device,
    window_starts,
)

from engine_helpers import DICOM_DIR, SAMPLE_CT, assert_same_geometry, make_tiny_bundle, synthetic_ct


@pytest.fixture(scope="module")
def tiny_predictor(tmp_path_factory):
    path = make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.safetensors", seed=3)
    return Predictor(path, device="cpu")


def test_gaussian_importance_matches_formula():
    w = gaussian_importance((96, 64, 96))
    assert w.shape == (96, 64, 96) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0) and w[48, 32, 48] == pytest.approx(1.0)
    # one sigma (96/8 = 12 voxels) from the centre along Z: exp(-1/2)
    assert w[48 + 12, 32, 48] == pytest.approx(np.exp(-0.5), rel=1e-5)
    # separable: w(z, y, x) = gz(z) gy(y) gx(x)
    assert w[10, 5, 80] == pytest.approx(w[10, 32, 48] * w[48, 5, 48] * w[48, 32, 80], rel=1e-4)
    assert (w > 0).all()


def test_window_starts_half_overlap():
    assert window_starts(96, 64) == [0, 32]  # the coarse 96^3 volume: exactly 2 windows along Y
    assert window_starts(96, 96) == [0]
    starts = window_starts(200, 64)
    assert starts[0] == 0 and starts[-1] == 136
    assert all(b - a <= 32 for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError):
        window_starts(10, 64)


def test_coarse_stage_runs_two_windows(tiny_predictor):
    calls = []
    tiny_predictor.progress = lambda stage, f: calls.append((stage, f))
    canonical = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_CT)))
    probs, labels = tiny_predictor.predict_coarse(canonical)
    assert probs.shape == (14, 96, 96, 96) and labels.shape == (96, 96, 96)
    torch.testing.assert_close(probs.sum(0), torch.ones(96, 96, 96), atol=1e-5, rtol=0)
    assert [c for c in calls if c[0] == "coarse"] == [("coarse", 0.5), ("coarse", 1.0)]


@pytest.mark.parametrize("source", ["nifti", "dicom"])
def test_label_map_has_input_geometry(tiny_predictor, source):
    image = read_image(SAMPLE_CT if source == "nifti" else DICOM_DIR)
    labels, info = tiny_predictor.predict(image)
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(labels, image)
    arr = sitk.GetArrayViewFromImage(labels)
    assert arr.max() <= 13
    assert info.crop_box is not None and set(info.timings) >= {"coarse", "fine"}


@pytest.mark.parametrize("code", ["RAS", "LPS", "ASL"])
def test_same_segmentation_in_physical_space_whatever_the_storage_order(tiny_predictor, code):
    reference = read_image(SAMPLE_CT)  # stored RAS-like: direction diag(-1, -1, 1)
    ref_labels, _ = tiny_predictor.predict(reference)
    stored = sitk.DICOMOrient(reference, code)
    labels, _ = tiny_predictor.predict(stored)
    assert_same_geometry(labels, stored)
    # bring the result back onto the reference grid: same physical points, same labels
    back = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    ref_arr = sitk.GetArrayFromImage(ref_labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), ref_arr)
    assert len(np.unique(ref_arr)) >= 3  # a non-trivial label map, not a constant


def test_coarse_only_mode_and_organ_subset(tiny_predictor):
    image = read_image(SAMPLE_CT)
    full, _ = tiny_predictor.predict(image, fine=False)
    arr = sitk.GetArrayFromImage(full)
    present = sorted(set(np.unique(arr).tolist()) - {0})
    keep = present[:2]
    subset, _ = tiny_predictor.predict(image, fine=False, organs=keep)
    sub = sitk.GetArrayFromImage(subset)
    assert set(np.unique(sub).tolist()) <= {0, *keep}
    np.testing.assert_array_equal(sub[np.isin(arr, keep)], arr[np.isin(arr, keep)])


def test_empty_coarse_mask_warns_and_uses_fallback(tiny_predictor):
    def background_only(batch):
        probs = torch.zeros((1, 14) + tuple(batch.shape[2:]))
        probs[:, 0] = 1.0
        return probs

    real = tiny_predictor.runners["coarse"]
    tiny_predictor.runners["coarse"] = background_only
    try:
        image = synthetic_ct(size_xyz=(200, 180, 100), spacing=(1.0, 1.0, 2.0))
        with pytest.warns(EmptyCoarseWarning, match="no organ"):
            _, info = tiny_predictor.predict(image)
    finally:
        tiny_predictor.runners["coarse"] = real
    # 240 x 160 x 240 mm (Z, Y, X) centred, clipped: Z 100 slices of 2 mm, Y 160 of 180, X 200 (all)
    assert info.crop_box == centered_box((100, 180, 200), (2.0, 1.0, 1.0), (240.0, 160.0, 240.0))
    assert info.crop_box == (slice(0, 100), slice(10, 170), slice(0, 200))


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(tmp_path):
    path = make_tiny_bundle(tmp_path / "t.safetensors", seed=5)
    image = read_image(SAMPLE_CT)
    cpu, _ = Predictor(path, device="cpu").predict(image)
    gpu, info = Predictor(path, device="cuda").predict(image)
    assert info.device == "cuda"
    a, b = sitk.GetArrayFromImage(cpu), sitk.GetArrayFromImage(gpu)
    assert (a != b).mean() < 0.01  # fp16 autocast on GPU: near-ties may flip
