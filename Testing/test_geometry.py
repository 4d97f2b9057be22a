"""Canonical orientation round trips and fine-stage crop-box arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenKDSegLib.engine.geometry import centered_box, crop_box, from_canonical, orientation_code, to_canonical
from AbdomenKDSegLib.engine.preprocess import Preprocessing

from engine_helpers import assert_same_geometry, synthetic_ct

PRE = Preprocessing()


@pytest.mark.parametrize("code", ["LPS", "RAS", "RAI", "PSL", "SLA", "IRP"])
def test_canonical_round_trip_restores_voxels_and_geometry(code):
    base = synthetic_ct()
    image = sitk.DICOMOrient(base, code)
    assert orientation_code(image) == code
    canonical, geom = to_canonical(image)
    assert orientation_code(canonical) == "LPS"
    # canonical arrays are the same whatever the storage order
    np.testing.assert_array_equal(sitk.GetArrayFromImage(canonical), sitk.GetArrayFromImage(base))
    back = from_canonical(sitk.GetArrayFromImage(canonical), geom)
    assert_same_geometry(back, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_canonical_axes_follow_patient_axes():
    image = sitk.DICOMOrient(synthetic_ct(size_xyz=(30, 20, 10), spacing=(1.0, 2.0, 3.0)), "RAS")
    canonical, geom = to_canonical(image)
    # (Z, Y, X) = (S, P, L) with the matching spacings
    assert geom.canonical_spacing_zyx == (3.0, 2.0, 1.0)
    np.testing.assert_allclose(np.array(canonical.GetDirection()).reshape(3, 3), np.eye(3))


def test_crop_box_hand_computed():
    mask = np.zeros((10, 10, 10), bool)
    mask[2:6, 4:5, 0:10] = True  # z 0.2..0.6, y 0.4..0.5, x 0..1 (normalised)
    box = crop_box(mask, (100, 50, 20), (1.0, 1.0, 1.0), PRE.crop_padding, PRE.fallback_box_mm_zyx)
    # z: centre 0.4, half 0.2*1.1=0.22 -> [0.18, 0.62] -> voxels [18, 62)
    # y: centre 0.45, half 0.055 -> [0.395, 0.505] -> [floor(19.75)=19, ceil(25.25)=26)
    # x: [0-0.05, 1+0.05] clipped to [0, 1] -> [0, 20)
    assert box == (slice(18, 62), slice(19, 26), slice(0, 20))


def test_crop_box_clips_at_volume_edge():
    mask = np.zeros((8, 8, 8), bool)
    mask[0:2, 6:8, 3] = True
    box = crop_box(mask, (80, 16, 8), (1.0, 1.0, 1.0), PRE.crop_padding, PRE.fallback_box_mm_zyx)
    assert box[0].start == 0 and box[1].stop == 16
    assert box[0] == slice(0, 21)  # [0, 0.25] -> centre .125 half .1375 -> [0, .2625]*80 = 21
    assert box[2] == slice(2, 5)  # [.375, .5] -> [.36875, .50625] * 8 = [2.95, 4.05] -> outward [2, 5)


def test_empty_mask_gives_centred_fallback_box_in_mm():
    box = crop_box(np.zeros((4, 4, 4), bool), (200, 300, 300), (2.0, 1.0, 1.0), PRE.crop_padding,
                   PRE.fallback_box_mm_zyx)
    # 240 mm / 2 mm = 120 slices centred in 200; 160 mm -> 160 of 300; 240 of 300
    assert box == (slice(40, 160), slice(70, 230), slice(30, 270))
    small = centered_box((50, 40, 30), (3.0, 3.0, 3.0), (240.0, 160.0, 240.0))
    assert small == (slice(0, 50), slice(0, 40), slice(0, 30))  # clipped to the volume
