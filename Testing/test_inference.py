"""Coarse-to-fine predictor: window weights, window layout, geometry, orientation invariance, devices."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AbdomenKDSegLib.engine.geometry import centered_box
from AbdomenKDSegLib.engine.image_io import read_image
from AbdomenKDSegLib.engine.inference import (
    EmptyCoarseWarning,
    Predictor,
    gaussian_importance,
    resolve_device,
    segment_file,
    window_starts,
)
from AbdomenKDSegLib.errors import UsageError

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


@pytest.mark.parametrize("shape", [(96, 64, 96), (96, 96, 96), (40, 50, 70)])
def test_sliding_window_blends_window_softmaxes_with_gaussian_weights(shape):
    """One window (the fine crop), two along Y (the coarse 96^3) and a padded small volume: the
    Gaussian-weighted average of the window outputs, renormalised over the classes."""
    from AbdomenKDSegLib.engine.sliding_window import sliding_window_probabilities

    rng = np.random.default_rng(3)
    window, outputs = (96, 64, 96), []

    def network(x):
        raw = rng.uniform(0.1, 1.0, (1, 3) + x.shape[2:]).astype(np.float32)
        outputs.append(raw.copy())  # the function may weight the returned array in place
        return raw

    volume = rng.uniform(-1000, 400, shape).astype(np.float32)
    got = sliding_window_probabilities(network, volume, window, 0.5, (-500, 500))
    padded = tuple(max(n, w) for n, w in zip(shape, window))
    starts = [window_starts(n, w) for n, w in zip(padded, window)]
    weight = gaussian_importance(window)
    total, norm = np.zeros((3,) + padded, np.float64), np.zeros(padded, np.float64)
    positions = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    assert len(positions) == len(outputs)
    for (z, y, x), original in zip(positions, outputs):
        sl = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
        total[(slice(None),) + sl] += original[0] * weight
        norm[sl] += weight
    expected = total / norm
    expected /= expected.sum(axis=0, keepdims=True)
    lo = [(p - n) // 2 for p, n in zip(padded, shape)]
    expected = expected[(slice(None),) + tuple(slice(a, a + n) for a, n in zip(lo, shape))]
    assert got.shape == (3,) + shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_coarse_stage_runs_two_windows(tiny_predictor):
    calls = []
    tiny_predictor.progress = lambda stage, f: calls.append((stage, f))
    canonical = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_CT)))
    probs, labels = tiny_predictor.predict_coarse(canonical)
    assert probs.shape == (14, 96, 96, 96) and labels.shape == (96, 96, 96)
    np.testing.assert_allclose(probs.sum(0), np.ones((96, 96, 96)), atol=1e-5, rtol=0)
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
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
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


# ----------------------------------------------------------------------------- keep the coarse result
@pytest.fixture(scope="module")
def oblique_storage():
    """The sample CT stored in another axis order (ASL): the coarse map must be mapped back exactly."""
    return sitk.DICOMOrient(read_image(SAMPLE_CT), "ASL")


@pytest.fixture(scope="module")
def coarse_only(tiny_predictor, oblique_storage):
    """The coarse-only mode's label map (Z, Y, X) of that image: what the kept coarse result must equal."""
    labels, info = tiny_predictor.predict(oblique_storage, fine=False)
    assert info.coarse_image is None  # the main output already is the coarse result
    return sitk.GetArrayFromImage(labels)


def test_keep_coarse_returns_the_coarse_only_result_with_the_input_geometry(tiny_predictor, oblique_storage,
                                                                             coarse_only, monkeypatch):
    calls = []
    real = tiny_predictor.coarse_full_resolution
    monkeypatch.setattr(tiny_predictor, "coarse_full_resolution", lambda *a: calls.append(1) or real(*a))
    plain, plain_info = tiny_predictor.predict(oblique_storage)
    assert calls == [] and plain_info.coarse_image is None  # not asked: not computed
    assert "coarse_upsample" not in plain_info.timings

    labels, info = tiny_predictor.predict(oblique_storage, keep_coarse=True)
    assert calls == [1]
    coarse = info.coarse_image
    assert coarse.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(coarse, oblique_storage)
    arr = sitk.GetArrayFromImage(coarse)
    assert arr.max() <= 13
    np.testing.assert_array_equal(arr, coarse_only)
    assert len(np.unique(arr)) >= 3  # a real label map, not a constant
    # the main (fine) output is not changed by the option, and does differ from the coarse one
    fine = sitk.GetArrayFromImage(labels)
    np.testing.assert_array_equal(fine, sitk.GetArrayFromImage(plain))
    assert_same_geometry(labels, oblique_storage)
    assert (fine != arr).any()
    assert info.coarse_labels is None and info.timings["coarse_upsample"] > 0


def test_keep_coarse_follows_the_organ_subset_and_is_ignored_without_fine_stage(tiny_predictor, oblique_storage,
                                                                                coarse_only):
    present = sorted(set(np.unique(coarse_only).tolist()) - {0})
    keep = present[:2]
    _, info = tiny_predictor.predict(oblique_storage, organs=keep, keep_coarse=True)
    expected = np.where(np.isin(coarse_only, keep), coarse_only, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(info.coarse_image), expected)
    labels, info = tiny_predictor.predict(oblique_storage, fine=False, keep_coarse=True)
    assert info.coarse_image is None and info.coarse_labels is None
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), coarse_only)


def test_segment_file_writes_the_coarse_result_beside_the_output(tiny_predictor, oblique_storage, coarse_only,
                                                                 tmp_path):
    source = tmp_path / "ct.nrrd"
    sitk.WriteImage(oblique_storage, str(source))
    (tmp_path / "sub").mkdir()  # an output's folder must exist
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny bundle is untrained, and says so
        result = segment_file(source, tmp_path / "fine.nii.gz", predictor=tiny_predictor,
                              coarse_output=tmp_path / "sub" / "coarse.nrrd")
    assert result.coarse_output_path == tmp_path / "sub" / "coarse.nrrd"
    written = sitk.ReadImage(str(result.coarse_output_path))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(written, oblique_storage)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), coarse_only)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["coarse.nrrd"]  # no temporary left

    assert not any("coarse" in w for w in result.warnings)

    # without the fine stage: no duplicate, a warning says why
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = segment_file(source, tmp_path / "c.nii.gz", predictor=tiny_predictor, fine=False,
                              coarse_output=tmp_path / "c2.nii.gz")
    assert any("already is the coarse result" in w for w in result.warnings)
    assert result.coarse_output_path is None and not (tmp_path / "c2.nii.gz").exists()


@pytest.mark.parametrize("coarse_name, message", [("fine.nii.gz", "same file as the output"),
                                                  ("coarse.png", "unsupported file type"),
                                                  ("folder", "is a folder")])
def test_bad_coarse_output_fails_before_any_work(tmp_path, coarse_name, message):
    (tmp_path / "folder").mkdir()
    with pytest.raises(UsageError, match=message):  # checked before the model is loaded
        segment_file(SAMPLE_CT, tmp_path / "fine.nii.gz", model=tmp_path / "not-loaded.safetensors",
                     coarse_output=tmp_path / coarse_name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_a_short_scan_runs_padded_to_the_minimum_extent_and_comes_back_at_its_own_size(tiny_predictor, monkeypatch):
    """A 72 mm scan (24 slices of 3 mm): both stages see it padded to 100 mm (34 slices) by its end
    slices; the labels (and the kept coarse result) have the input's geometry; with 0 mm nothing is padded."""
    import dataclasses

    from AbdomenKDSegLib.engine import inference

    seen = []
    real = inference.resize_volume
    monkeypatch.setattr(inference, "resize_volume", lambda array, shape, **kw: seen.append(array.shape) or
                        real(array, shape, **kw))
    image = synthetic_ct()  # 40 x 36 x 24 voxels, 2 x 2 x 3 mm
    assert tiny_predictor.preprocessing.min_z_extent_mm == 100.0
    labels, info = tiny_predictor.predict(image, keep_coarse=True)
    assert_same_geometry(labels, image)
    assert_same_geometry(info.coarse_image, image)
    assert seen[0] == (34, 36, 40)  # coarse: the whole scan, padded
    assert seen[1][0] * 3.0 >= 100.0  # fine: the crop, padded
    assert info.crop_box is not None and 0 <= info.crop_box[0].start < info.crop_box[0].stop <= 24
    seen.clear()
    monkeypatch.setattr(tiny_predictor, "preprocessing",
                        dataclasses.replace(tiny_predictor.preprocessing, min_z_extent_mm=0.0))
    unpadded, _ = tiny_predictor.predict(image)
    assert seen[0] == (24, 36, 40) and seen[1][0] <= 24
    assert_same_geometry(unpadded, image)
