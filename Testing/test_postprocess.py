"""Largest connected component per class, checked against SimpleITK on real FLARE22 labels."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from AbdomenKDSegLib.engine.postprocess import largest_component_per_class

from engine_helpers import FLARE_LABELS


def _largest_per_class_sitk(labels: np.ndarray) -> np.ndarray:
    """Independent reference: per label, SimpleITK 26-connected components, keep the largest."""
    out = np.zeros_like(labels)
    for value in np.unique(labels):
        if value == 0:
            continue
        cc = sitk.ConnectedComponent(sitk.GetImageFromArray((labels == value).astype(np.uint8)), True)
        largest = sitk.GetArrayFromImage(sitk.RelabelComponent(cc)) == 1
        out[largest] = value
    return out


def test_detached_blob_is_removed_on_real_flare_labels():
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(FLARE_LABELS / "FLARE22_Tr_0001.nii.gz"))).astype(np.uint8)
    ref = ref[:, 100:400, 100:400]  # keep the test fast; all organs stay inside
    noisy = ref.copy()
    noisy[0:3, 0:4, 0:4] = 1  # a detached liver blob in a corner
    kidney_z = np.flatnonzero((ref == 2).any(axis=(1, 2)))
    noisy[kidney_z[0], 290:293, 290:293] = 2  # and a kidney fragment far away
    cleaned = largest_component_per_class(noisy)
    np.testing.assert_array_equal(cleaned, _largest_per_class_sitk(noisy))
    assert cleaned[0:3, 0:4, 0:4].max() == 0
    assert cleaned[kidney_z[0], 290:293, 290:293].max() == 0
    # the organs themselves are untouched where they were already one piece
    for value in (1, 3, 13):
        assert (cleaned == value).sum() == (_largest_per_class_sitk(ref) == value).sum()


def test_connectivity_26_keeps_diagonal_neighbours_and_empty_input():
    labels = np.zeros((5, 5, 5), np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = 5  # corner-touching: one 26-component
    labels[4, 4, 0] = 5  # separate
    out = largest_component_per_class(labels)
    assert out[0, 0, 0] == out[1, 1, 1] == 5 and out[4, 4, 0] == 0
    six = largest_component_per_class(labels, connectivity=6)
    assert (six == 5).sum() == 1
    assert not largest_component_per_class(np.zeros((4, 4, 4), np.uint8)).any()
