"""The body mask: it keeps every organ of a real CT, drops the scanner table and the air, refuses
images with nothing to segment, and the predictor keeps no label outside it."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AbdomenKDSegLib.engine.body_mask import BodyMask, body_mask, check_has_body
from AbdomenKDSegLib.engine.geometry import to_canonical
from AbdomenKDSegLib.engine.image_io import NonCTWarning, read_image
from AbdomenKDSegLib.engine.inference import Predictor
from AbdomenKDSegLib.errors import InputError

from engine_helpers import SAMPLE_CT, SAMPLE_LABELS, make_tiny_bundle


def _canonical(path) -> tuple[np.ndarray, tuple[float, float, float]]:
    image, geom = to_canonical(sitk.ReadImage(str(path)))
    return sitk.GetArrayFromImage(image), geom.canonical_spacing_zyx


@pytest.fixture(scope="module")
def sample():
    return _canonical(SAMPLE_CT)


def phantom(table_gap_mm: float = 9.0, lung: bool = True) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(Z, Y, X) = (30, 80, 90) at 3 x 2 x 2 mm: air, an elliptic soft-tissue body (Y axis anterior ->
    posterior) with an air-filled 'lung' inside, and a 10 mm table slab of 300 HU ``table_gap_mm`` behind it."""
    spacing = (3.0, 2.0, 2.0)
    z, y, x = np.meshgrid(np.arange(30), np.arange(80), np.arange(90), indexing="ij")
    volume = np.full((30, 80, 90), -1000, np.int16)
    body = ((y - 35) / 25.0) ** 2 + ((x - 45) / 35.0) ** 2 < 1  # posterior edge at y = 60
    volume[body] = 40
    if lung:
        volume[((y - 30) / 8.0) ** 2 + ((x - 30) / 8.0) ** 2 < 1] = -850
    top = 60 + int(round(table_gap_mm / spacing[1]))
    volume[:, top:top + 5, 5:85] = 300
    return volume, spacing


def test_mask_of_the_sample_ct_keeps_every_labeled_organ_voxel_and_drops_the_table(sample):
    volume, spacing = sample
    labels, _ = _canonical(SAMPLE_LABELS)
    mask = body_mask(volume, spacing)
    full = mask.full()
    assert full.shape == volume.shape and full.dtype == bool
    assert np.count_nonzero(labels) > 70_000
    assert np.count_nonzero((labels > 0) & ~full) == 0  # every labeled voxel is inside the body
    voxel_ml = float(np.prod(spacing)) / 1000
    outside_tissue_ml = np.count_nonzero((volume > -500) & ~full) * voxel_ml
    assert outside_tissue_ml > 100  # the scanner table (and cushions) drop out
    assert 15_000 < mask.volume_ml < 35_000  # a torso, not the 41 L field of view
    assert np.count_nonzero(full) * voxel_ml == pytest.approx(mask.volume_ml, rel=0.05)


def test_body_mask_is_fast(sample):
    volume, spacing = sample
    body_mask(volume, spacing)
    started = time.perf_counter()
    check_has_body(volume, spacing).full()
    assert time.perf_counter() - started < 0.5  # ~30 ms on 2 cores


def test_table_below_the_body_is_excluded_and_the_lung_kept():
    volume, spacing = phantom()
    mask = body_mask(volume, spacing).full()
    assert not mask[:, 65:70].any()  # the table slab
    assert mask[:, 30, 30].all()  # the air-filled lung inside the body (holes filled slice by slice)
    assert mask[volume == 40].all()
    assert not mask[:, :, :3].any() and not mask[:, :5].any()  # air around the body


def test_mask_pieces_agree():
    volume, spacing = phantom()
    mask = body_mask(volume, spacing)
    assert isinstance(mask, BodyMask)
    box = (slice(3, 20), slice(10, 71), slice(0, 50))
    np.testing.assert_array_equal(mask.full(box), mask.full()[box])
    coarse = mask.on_grid((96, 96, 96))
    assert coarse.shape == (96, 96, 96) and coarse[48, 40, 48] and not coarse[48, 2, 48]
    labels = np.ones(volume.shape, np.uint8)
    mask.apply(labels, box)
    assert labels[box][~mask.full(box)].max() == 0 and labels[:3].min() == 1  # only the box changed


@pytest.mark.parametrize("make, words", [
    (lambda rng: rng.normal(-1000, 20, (24, 40, 40)), "no body found: no voxels of soft tissue (-150 to 250 HU)"),
    (lambda rng: np.full((24, 40, 40), 7.0), "every voxel has the value 7: there is no image to segment"),
    (lambda rng: np.full((24, 40, 40), -1024.0), "every voxel has the value -1024"),
    (lambda rng: np.where(rng.random((24, 40, 40)) < 0.001, 30.0, -1000.0), "no body found: only"),
    (lambda rng: np.where(phantom()[0][:24, :40, :40] > 0, 1500.0, -1000.0), "no body found: no voxels"),
], ids=["noisy air", "constant", "constant air", "specks in air", "bone or metal only"])
def test_nothing_to_segment_is_refused(make, words):
    volume = make(np.random.default_rng(0)).astype(np.int16)
    with pytest.raises(InputError) as info:
        check_has_body(volume, (3.0, 2.0, 2.0), name="scan.nii.gz")
    assert str(info.value).startswith("scan.nii.gz: ") and words in str(info.value)
    assert "is this a CT of a patient?" in str(info.value) or "no image to segment" in str(info.value)


def test_an_image_without_air_is_not_judged_by_hu(sample):
    volume, spacing = sample
    shifted = volume + 1500  # no air any more (a wrong rescale): validate_ct warns, it is not refused
    mask = check_has_body(shifted, spacing)
    assert mask.sub.all()


# ----------------------------------------------------------------------------- in the predictor
def _everything_is(value: int):
    """A stand-in network: probability 1 for class ``value`` everywhere (so the old code labelled air)."""
    def run(batch: torch.Tensor) -> torch.Tensor:
        probs = torch.zeros((1, 14) + tuple(batch.shape[2:]))
        probs[:, value] = 1.0
        return probs

    return run


@pytest.fixture(scope="module")
def liver_everywhere(tmp_path_factory):
    predictor = Predictor(make_tiny_bundle(tmp_path_factory.mktemp("m") / "tiny.safetensors"), device="cpu",
                          backend="torch")
    predictor.runners = {"coarse": _everything_is(1), "fine": _everything_is(1)}
    return predictor


def _image(volume: np.ndarray, spacing_zyx) -> sitk.Image:
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    return image


@pytest.mark.parametrize("fine", [True, False])
def test_no_label_outside_the_body(liver_everywhere, fine):
    volume, spacing = phantom()
    mask = body_mask(volume, spacing).full()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels, info = liver_everywhere.predict(_image(volume, spacing), fine=fine, keep_coarse=fine)
    arr = sitk.GetArrayFromImage(labels)
    assert arr[~mask].max() == 0  # no organ in the air or on the table
    assert (arr[mask] == 1).mean() > 0.5
    if fine:
        assert sitk.GetArrayFromImage(info.coarse_image)[~mask].max() == 0
        # the crop box comes from the coarse labels inside the body: it leaves the table out
        assert info.crop_box[1].stop <= 66
    assert info.timings["body"] < 1.0


def test_mr_like_image_warns_and_still_runs(liver_everywhere, tmp_path):
    rng = np.random.default_rng(1)
    volume, spacing = phantom(lung=False)
    mr = np.where(volume > -500, 800.0, 30.0) + rng.normal(0, 20, volume.shape)
    path = tmp_path / "mr.nii.gz"
    sitk.WriteImage(_image(np.clip(mr, 0, 1500).astype(np.float32), spacing), str(path))
    with pytest.warns(NonCTWarning, match="do not look like a CT"):
        image = read_image(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels, _ = liver_everywhere.predict(image)
    assert labels.GetSize() == image.GetSize()  # its 'body' is the whole field of view (no air): it runs


def test_predict_refuses_an_image_without_body_before_the_networks(liver_everywhere):
    calls = []
    real = liver_everywhere.runners
    liver_everywhere.runners = {s: (lambda b, s=s: calls.append(s) or real[s](b)) for s in real}
    try:
        volume = np.random.default_rng(2).normal(-1000, 20, (24, 40, 40)).astype(np.int16)
        with pytest.raises(InputError, match="no body found"):
            liver_everywhere.predict(_image(volume, (3.0, 2.0, 2.0)))
        with pytest.raises(InputError, match="no body found"):
            liver_everywhere.predict_canonical(volume, (3.0, 2.0, 2.0))
    finally:
        liver_everywhere.runners = real
    assert calls == []
