"""Training data folder validation and the per-stage preprocessing cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenKDSegLib.engine.geometry import crop_box
from AbdomenKDSegLib.errors import InputError
from AbdomenKDSegLib.training.data import (
    build_coarse_cache,
    build_fine_cache,
    find_cases,
    kfold_train_indices,
    read_case,
    resize_labels,
    validate_label_values,
)
from AbdomenKDSegLib.training.recipe import Recipe


def _image(array, spacing=(2.0, 2.0, 3.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetDirection([float(d) for d in direction])
    img.SetOrigin((10.0, -5.0, 2.0))
    return img


def _phantom(shape=(20, 24, 28)):
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ct = np.full(shape, -1000, dtype=np.int16)
    body = ((y - 12) ** 2 + (x - 14) ** 2) < 100
    ct[body] = 40
    label = np.zeros(shape, dtype=np.uint8)
    label[5:12, 8:14, 6:12] = 1
    label[12:16, 10:16, 16:22] = 3
    return ct, label


def make_folder(root: Path, n_labeled=2, n_unlabeled=1, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    for sub in ("imagesTr", "labelsTr", "unlabeled"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ct, label = _phantom()
    for i in range(n_labeled):
        sitk.WriteImage(_image(ct, direction=direction), str(root / "imagesTr" / f"case{i}_0000.nii.gz"))
        sitk.WriteImage(_image(label, direction=direction), str(root / "labelsTr" / f"case{i}.nii.gz"))
    for i in range(n_unlabeled):
        sitk.WriteImage(_image(ct, direction=direction), str(root / "unlabeled" / f"u{i}_0000.nii.gz"))
    return root


def test_find_cases(tmp_path):
    files = find_cases(make_folder(tmp_path))
    assert [c.case_id for c in files.labeled] == ["case0", "case1"]
    assert [c.case_id for c in files.unlabeled] == ["u0"] and files.unlabeled[0].label is None


def test_missing_pairs_are_errors(tmp_path):
    root = make_folder(tmp_path)
    (root / "labelsTr" / "case1.nii.gz").unlink()
    with pytest.raises(InputError, match="have no label.*case1"):
        find_cases(root)
    make_folder(root)
    (root / "imagesTr" / "case0_0000.nii.gz").unlink()
    with pytest.raises(InputError, match="have no image.*case0"):
        find_cases(root)
    make_folder(root)
    os.replace(root / "imagesTr" / "case0_0000.nii.gz", root / "imagesTr" / "case0_0001.nii.gz")
    with pytest.raises(InputError, match="single-channel"):
        find_cases(root)
    other = make_folder(tmp_path / "x")
    (other / "labelsTr").rename(tmp_path / "y")
    with pytest.raises(InputError, match="no labelsTr"):
        find_cases(other)


def test_wrong_label_values_and_geometry(tmp_path):
    root = make_folder(tmp_path)
    ct, label = _phantom()
    bad = label.astype(np.int16)
    bad[0, 0, 0] = 14
    sitk.WriteImage(_image(bad), str(root / "labelsTr" / "case0.nii.gz"))
    files = find_cases(root)
    with pytest.raises(InputError, match=r"outside 0\.\.13.*14"):
        read_case(files.labeled[0])
    sitk.WriteImage(_image(label, spacing=(2.0, 2.0, 2.5)), str(root / "labelsTr" / "case1.nii.gz"))
    with pytest.raises(InputError, match="does not match image.*spacing"):
        read_case(files.labeled[1])
    with pytest.raises(InputError, match="non-integer"):
        validate_label_values(np.array([0.0, 1.5]), "x")
    assert validate_label_values(np.array([0.0, 13.0]), "x").dtype == np.uint8


def test_read_case_is_canonical(tmp_path):
    # an RAS-stored copy (x and y flipped) must come out as the LPS-stored original
    ct, label = _phantom()
    lps = make_folder(tmp_path / "lps", 1, 0)
    ras = tmp_path / "ras"
    for sub in ("imagesTr", "labelsTr"):
        (ras / sub).mkdir(parents=True)
    flip = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    sitk.WriteImage(_image(ct[:, ::-1, ::-1].copy(), direction=flip), str(ras / "imagesTr" / "c_0000.nii.gz"))
    sitk.WriteImage(_image(label[:, ::-1, ::-1].copy(), direction=flip), str(ras / "labelsTr" / "c.nii.gz"))
    a_img, a_lab, _ = read_case(find_cases(lps).labeled[0])
    b_img, b_lab, _ = read_case(find_cases(ras).labeled[0])
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)


def test_resize_labels_is_order_one():
    labels = np.array([0, 0, 5, 5], dtype=np.uint8).reshape(1, 1, 4)
    # positions 0, .5, 1, 1.5, 2, 2.5, 3: at 1.5 classes 0 and 5 tie at 0.5 -> the lower class wins
    out = resize_labels(labels, (1, 1, 7))
    assert out.ravel().tolist() == [0, 0, 0, 0, 5, 5, 5]
    same = np.random.default_rng(0).integers(0, 14, (4, 5, 6)).astype(np.uint8)
    assert np.array_equal(resize_labels(same, same.shape), same)


def test_kfold_partitions_labeled_cases():
    n = 11
    vals = []
    for fold in range(5):
        train = kfold_train_indices(n, 5, fold, 12345)
        vals.append(sorted(set(range(n)) - set(train)))
    assert sorted(sum(vals, [])) == list(range(n))
    assert sorted(len(v) for v in vals) == [2, 2, 2, 2, 3]
    assert kfold_train_indices(n, 5, -1) == list(range(n))
    assert vals[0] != list(range(len(vals[0])))  # shuffled


def test_coarse_and_fine_cache(tmp_path):
    root = make_folder(tmp_path / "data", 1, 1)
    recipe = Recipe(coarse_size=(16, 16, 16), fine_size=(16, 8, 16), patch_size=(16, 8, 16),
                    min_z_extent_mm=0.0)  # the reference: no padding of the 60 mm phantom
    files = find_cases(root)
    cases = build_coarse_cache(list(files.labeled + files.unlabeled), tmp_path / "cache", recipe)
    image, label = cases[0].load()
    assert image.shape == label.shape == (16, 16, 16) and image.dtype == np.int16
    assert set(np.unique(label)) == {0, 1, 3}
    meta = cases[0].meta()
    assert meta["canonical_shape"] == [20, 24, 28] and meta["geometry"]["canonical_spacing"] == [2.0, 2.0, 3.0]
    assert cases[1].label_path is None and cases[1].load()[1] is None
    stamp = cases[0].image_path.stat().st_mtime_ns
    again = build_coarse_cache(list(files.labeled), tmp_path / "cache", recipe)
    assert again[0].image_path.stat().st_mtime_ns == stamp  # reused, not rewritten
    # fine: labeled crop from the ground truth, unlabeled crop from a given coarse mask
    mask = np.zeros((16, 16, 16), dtype=np.uint8)
    mask[4:8, 4:8, 4:8] = 2
    np.save(tmp_path / "u0.npy", mask)
    fine = build_fine_cache(list(files.labeled + files.unlabeled), tmp_path / "cache", recipe,
                            {"u0": tmp_path / "u0.npy"})
    ct, label = _phantom()
    box = crop_box(label > 0, label.shape, (3.0, 2.0, 2.0), 1.1, (240.0, 160.0, 240.0))
    assert json.loads(fine[0].meta_path.read_text())["box"] == [[s.start, s.stop] for s in box]
    assert fine[0].load()[0].shape == (16, 8, 16)
    ubox = crop_box(mask > 0, label.shape, (3.0, 2.0, 2.0), 1.1, (240.0, 160.0, 240.0))
    assert fine[1].meta()["box"] == [[s.start, s.stop] for s in ubox]
    with pytest.raises(InputError, match="no coarse prediction"):
        build_fine_cache(list(files.unlabeled), tmp_path / "cache2", recipe, {})


def test_short_scans_are_padded_with_their_end_slices_like_at_inference(tmp_path):
    root = make_folder(tmp_path / "data", 1, 0)  # a 20-slice phantom, 3 mm slices: 60 mm
    recipe = Recipe(coarse_size=(16, 16, 16), fine_size=(16, 8, 16), patch_size=(16, 8, 16), min_z_extent_mm=90.0)
    coarse = build_coarse_cache(find_cases(root).labeled, tmp_path / "cache", recipe)
    assert coarse[0].meta()["canonical_shape"] == [30, 24, 28]  # 90 mm / 3 mm
    ct, label = _phantom()
    image, small_label = coarse[0].load()
    padded = np.pad(label, ((5, 5), (0, 0), (0, 0)), mode="edge")
    from AbdomenKDSegLib.training.data import resize_labels

    assert np.array_equal(small_label, resize_labels(padded, (16, 16, 16)))
    unpadded = build_coarse_cache(find_cases(root).labeled, tmp_path / "cache0",
                                  Recipe(coarse_size=(16, 16, 16), min_z_extent_mm=0.0))
    assert not np.array_equal(unpadded[0].load()[1], small_label)
    fine = build_fine_cache(find_cases(root).labeled, tmp_path / "cache", recipe)
    box = crop_box(padded > 0, padded.shape, (3.0, 2.0, 2.0), 1.1, (240.0, 160.0, 240.0))
    assert fine[0].meta()["box"] == [[s.start, s.stop] for s in box]
