"""Resizing (trilinear, align_corners=True, slab-wise, numpy) and intensity windowing, against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from AbdomenKDSegLib.engine.preprocess import (
    Preprocessing,
    clip_and_zscore,
    pad_to_min_size,
    pad_z_to_extent,
    resize_argmax,
    resize_volume,
    z_padding,
)


@pytest.mark.parametrize("out_shape", [(7, 5, 9), (20, 3, 4), (1, 6, 6), (33, 17, 12)])
def test_slabwise_resize_equals_whole_volume_interpolate(out_shape):
    rng = np.random.default_rng(1)
    src = rng.normal(size=(11, 8, 10)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(src)[None, None], size=out_shape, mode="trilinear",
                             align_corners=True)[0, 0]
    got = resize_volume(src, out_shape, slab=3)
    assert got.shape == out_shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-5)


def test_resize_keeps_linear_functions_exact_and_integer_input():
    # trilinear interpolation reproduces a linear function exactly, whatever the sizes
    z, y, x = np.meshgrid(np.arange(6), np.arange(5), np.arange(7), indexing="ij")
    src = (3 * z - 2 * y + x + 100).astype(np.int16)
    out = resize_volume(src, (11, 9, 13))
    zo, yo, xo = np.meshgrid(np.linspace(0, 5, 11), np.linspace(0, 4, 9), np.linspace(0, 6, 13), indexing="ij")
    np.testing.assert_allclose(out, 3 * zo - 2 * yo + xo + 100, atol=1e-4)


def test_resize_round_trip_on_shared_grid_points():
    # sizes n and 2n-1 share every sample point of the smaller grid (align_corners=True)
    rng = np.random.default_rng(2)
    src = rng.normal(size=(5, 6, 4)).astype(np.float32)
    up = resize_volume(src, (9, 11, 7))
    back = resize_volume(up, (5, 6, 4))
    np.testing.assert_allclose(back, src, atol=1e-5)


def test_resize_argmax_matches_full_interpolation():
    rng = np.random.default_rng(3)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(4, 6, 5, 7)).astype(np.float32)), dim=0)
    full = F.interpolate(probs[None], size=(13, 9, 10), mode="trilinear", align_corners=True)[0]
    labels = resize_argmax(probs.numpy(), (13, 9, 10), slab=4)
    assert labels.dtype == np.uint8 and labels.shape == (13, 9, 10)
    # ties could differ by rounding; random data has none at this precision
    np.testing.assert_array_equal(labels, full.argmax(0).numpy())


def test_resize_rejects_bad_rank():
    with pytest.raises(ValueError, match="Z, Y, X"):
        resize_volume(np.zeros((4, 4)), (2, 2, 2))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_clip_and_zscore(kind):
    values = [-1000.0, -300.0, 0.0, 300.0, 2000.0]
    x = np.array(values, np.float32) if kind == "numpy" else torch.tensor(values)
    out = np.asarray(clip_and_zscore(x, -300.0, 300.0))
    clipped = np.array([-300.0, -300.0, 0.0, 300.0, 300.0])
    np.testing.assert_allclose(out, (clipped - clipped.mean()) / (clipped.std() + 1e-5), rtol=1e-6)
    const = np.full((3, 3), 50.0, np.float32) if kind == "numpy" else torch.full((3, 3), 50.0)
    assert np.abs(np.asarray(clip_and_zscore(const, -300.0, 300.0))).max() == 0  # constant: no division by 0


def test_clip_and_zscore_numpy_equals_torch_on_ct():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 400, size=(20, 16, 24)).astype(np.float32)
    got = clip_and_zscore(x, -300.0, 300.0)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, clip_and_zscore(torch.from_numpy(x), -300.0, 300.0).numpy(), atol=2e-6)


def test_pad_to_min_size_pads_with_air_and_recovers_region():
    vol = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    padded, region = pad_to_min_size(vol, (5, 3, 6))
    assert padded.shape == (5, 3, 6)
    np.testing.assert_array_equal(padded[region], vol)
    assert (padded[0] == -1024).all() and (padded[:, :, 0] == -1024).all()


def test_resize_argmax_shortcut_is_exact_on_real_organ_shapes():
    """Cells whose corners agree are filled without interpolation: results must equal the full resize."""
    import SimpleITK as sitk

    from engine_helpers import FLARE_LABELS

    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(FLARE_LABELS / "FLARE22_Tr_0002.nii.gz")))
    z, y, x = np.nonzero(lab)
    crop = torch.from_numpy(lab[z.min():z.max() + 1, y.min():y.max() + 1, x.min():x.max() + 1].astype(np.int64))
    onehot = F.one_hot(crop, 14).permute(3, 0, 1, 2).float()[None]
    probs = F.interpolate(onehot, size=(24, 16, 24), mode="trilinear", align_corners=True)[0]
    probs = probs + 0.05 * torch.rand(probs.shape, generator=torch.Generator().manual_seed(0))
    probs = probs / probs.sum(0, keepdim=True)
    out_shape = (40, 70, 90)
    full = F.interpolate(probs[None], size=out_shape, mode="trilinear", align_corners=True)[0].argmax(0).numpy()
    fast = resize_argmax(probs.numpy(), out_shape, slab=7, chunk=1000)  # small slabs/chunks exercise the loops
    assert len(np.unique(full)) >= 10
    assert (fast != full).mean() < 1e-4  # float rounding may only flip exact ties


def test_z_padding_reaches_the_minimum_extent_split_evenly():
    assert z_padding(11, 5.0, 100.0) == (4, 5)  # 55 mm -> 20 slices = 100 mm
    assert z_padding(20, 5.0, 100.0) == (0, 0)  # exactly long enough
    assert z_padding(300, 0.8, 100.0) == (0, 0)
    assert z_padding(10, 3.0, 0.0) == (0, 0)  # 0: the paper's behaviour
    lo, hi = z_padding(7, 1.6, 100.0)
    assert (7 + lo + hi) * 1.6 >= 100.0 > (6 + lo + hi) * 1.6 and abs(lo - hi) <= 1


def test_pad_z_to_extent_repeats_end_slices_and_recovers_the_scan():
    vol = np.arange(3 * 2 * 2, dtype=np.int16).reshape(3, 2, 2)
    padded, region = pad_z_to_extent(vol, 10.0, 60.0)
    assert padded.shape == (6, 2, 2) and region == slice(1, 4)
    assert np.array_equal(padded[region], vol)
    assert np.array_equal(padded[0], vol[0])
    assert np.array_equal(padded[-1], vol[-1]) and np.array_equal(padded[-2], vol[-1])
    same, whole = pad_z_to_extent(vol, 30.0, 60.0)
    assert same is vol and whole == slice(0, 3)  # long enough: no copy


def test_min_z_extent_is_in_the_model_card_block_and_old_cards_get_the_default():
    pre = Preprocessing(min_z_extent_mm=0.0)
    assert pre.to_dict()["min_z_extent_mm"] == 0.0
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    old = {k: v for k, v in Preprocessing().to_dict().items() if k != "min_z_extent_mm"}
    assert Preprocessing.from_dict(old).min_z_extent_mm == Preprocessing().min_z_extent_mm == 100.0
