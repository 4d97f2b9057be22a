"""The training-set generator on small phantoms: anatomy transfer, determinism, geometry, organs, ranges."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AbdomenKDSegLib.errors import InputError
from AbdomenKDSegLib.training.anatomy_transfer import (
    STRETCH_RANGE,
    FitSettings,
    GridVolume,
    fit_transfer,
    nearest_on_grid,
    project_affine,
    read_grid_volume,
)
from AbdomenKDSegLib.training.appearance import PHASE_HU, AppearanceRanges, draw_appearance
from AbdomenKDSegLib.training.data import find_cases
from AbdomenKDSegLib.training.make_training_set import (
    GeneratorOptions,
    RenderRanges,
    clamp_interval,
    draw_render,
    make_training_set,
    parse_heldout,
    parse_range,
    parse_weights,
)

torch.set_num_threads(1)
QUICK = FitSettings(levels=((8.0, 16.0, 15), (4.0, 8.0, 10)), affine_iterations=10)
ORGANS = {1: ((0.55, 0.45, 0.35), (0.22, 0.2, 0.18)),  # liver: centre (z, y, x) fraction, radii fraction
          3: ((0.55, 0.5, 0.72), (0.12, 0.12, 0.1)),  # spleen
          2: ((0.4, 0.62, 0.3), (0.1, 0.08, 0.07)),  # right kidney
          13: ((0.4, 0.62, 0.7), (0.1, 0.08, 0.07)),  # left kidney
          5: ((0.5, 0.6, 0.5), (0.35, 0.04, 0.04))}  # aorta


def phantom_labels(shape, shift=(0.0, 0.0, 0.0), scale=1.0) -> np.ndarray:
    """Ellipsoid organs (Z, Y, X) in a box; ``shift`` in fractions of the box."""
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij"), -1)
    labels = np.zeros(shape, np.uint8)
    for value, (centre, radii) in ORGANS.items():
        c = np.asarray(centre) + np.asarray(shift)
        inside = (((grid - c) / (np.asarray(radii) * scale)) ** 2).sum(-1) <= 1.0
        labels[inside] = value
    return labels


def write(array: np.ndarray, path: Path, spacing, origin=(0.0, 0.0, 0.0), flip: bool = False) -> Path:
    """Write a (Z, Y, X) array as NIfTI; ``flip`` stores it RAS-like (direction diag(-1, -1, 1))."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    image.SetOrigin(tuple(float(v) for v in reversed(origin)))
    if flip:
        image = sitk.Flip(image, [True, True, False], flipAboutOrigin=False)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    shape, spacing = (40, 36, 44), (6.0, 6.0, 6.0)
    labels = phantom_labels(shape)
    rng = np.random.default_rng(0)
    body = np.zeros(shape, bool)
    body[:, 3:-3, 3:-3] = True
    image = np.where(body, -80.0, -1000.0) + rng.normal(0, 10, shape)
    hu = {1: 55, 3: 45, 2: 30, 13: 30, 5: 40}
    for value, mean in hu.items():
        image[labels == value] = mean + rng.normal(0, 8, int((labels == value).sum()))
    src_img = write(image.astype(np.int16), root / "source.nii.gz", spacing)
    src_lab = write(labels, root / "source_labels.nii.gz", spacing)
    targets = root / "targets"
    targets.mkdir()
    for i, (shift, scale) in enumerate((((0.03, -0.02, 0.02), 1.1), ((-0.02, 0.03, -0.03), 0.9),
                                        ((0.0, 0.0, 0.04), 1.0))):
        tl = phantom_labels((30, 40, 40), shift, scale)
        tl[12:20, 18:21, 19:22] = 10  # an esophagus, absent from the source
        write(tl, targets / f"case_{i + 1:04d}.nii.gz", (7.0, 5.0, 5.0), origin=(10.0, -5.0, 8.0), flip=True)
    return {"root": root, "image": src_img, "labels": src_lab, "targets": targets}


def options(inputs, out: Path, **kw) -> GeneratorOptions:
    base = GeneratorOptions(source_image=inputs["image"], source_labels=inputs["labels"], targets=inputs["targets"],
                            out=out, variants=2, heldout=("0003",), seed=7, workers=1, previews=1, fit=QUICK,
                            render=RenderRanges(inplane_spacing_mm=(4.0, 6.0), slice_spacing_mm=(4.0, 6.0)))
    return replace(base, **kw)


@pytest.fixture(scope="module")
def generated(inputs):
    out = inputs["root"] / "out_a"
    return out, make_training_set(options(inputs, out))


def test_project_affine_is_a_rotation_times_clamped_stretches():
    shear = np.array([[2.0, 0.3, 0.0], [0.0, 0.5, 0.1], [0.0, 0.0, -1.0]])  # also a mirror
    a = project_affine(shear)
    s = np.linalg.svd(a, compute_uv=False)
    assert s.min() >= STRETCH_RANGE[0] - 1e-9 and s.max() <= STRETCH_RANGE[1] + 1e-9
    assert np.linalg.det(a) > 0


def test_fit_moves_source_organs_onto_the_target():
    src_lab = GridVolume(phantom_labels((36, 36, 36)), (6.0, 6.0, 6.0), (0.0, 0.0, 0.0))
    tgt_lab = GridVolume(phantom_labels((36, 36, 36), (0.06, -0.05, 0.04), 1.15), (6.0, 6.0, 6.0), (0.0, 0.0, 0.0))
    before = {v: 2 * ((src_lab.array == v) & (tgt_lab.array == v)).sum()
              / ((src_lab.array == v).sum() + (tgt_lab.array == v).sum()) for v in ORGANS}
    transfer = fit_transfer(src_lab, tgt_lab, sorted(ORGANS), FitSettings(levels=((6.0, 12.0, 40),),
                                                                            affine_iterations=30))
    assert np.mean(list(transfer.dice.values())) > 0.85
    assert np.mean(list(transfer.dice.values())) > np.mean(list(before.values())) + 0.2


def test_output_is_a_training_folder_with_matching_geometry(generated):
    out, report = generated
    files = find_cases(out)  # what `train --data` reads
    assert len(files.labeled) == 2 * 2 + 1  # 2 training targets x 2 variants + the unwarped source
    for case in files.labeled:
        image, labels = sitk.ReadImage(str(case.image)), sitk.ReadImage(str(case.label))
        assert image.GetSize() == labels.GetSize()
        assert np.allclose(image.GetSpacing(), labels.GetSpacing())
        assert np.allclose(image.GetOrigin(), labels.GetOrigin())
        assert np.allclose(image.GetDirection(), labels.GetDirection())
        values = np.unique(sitk.GetArrayViewFromImage(labels))
        assert values.min() >= 0 and values.max() <= 13
        hu = sitk.GetArrayViewFromImage(image)
        if case.case_id.startswith("case_"):  # rendered (the unwarped source is copied as it is)
            assert hu.min() >= -1024 and hu.max() <= 3071
    held = sorted((out / "heldout" / "imagesTs").glob("*_0000.nii.gz"))
    assert [p.name for p in held] == ["case_0003_v0_0000.nii.gz"]
    assert not any("case_0003" in c.case_id for c in files.labeled)  # held-out targets never in imagesTr
    assert len(list((out / "previews").glob("*.png"))) == 1
    assert set(report["fits"]) == {"case_0001", "case_0002", "case_0003"}


def test_every_target_organ_appears_in_a_full_field_of_view(inputs, tmp_path):
    full = RenderRanges(fov_probabilities=(("target", 1.0),), inplane_spacing_mm=(4.0, 5.0),
                        slice_spacing_mm=(4.0, 5.0))
    report = make_training_set(options(inputs, tmp_path / "full", variants=1, render=full, previews=0,
                                       include_source=False))
    for entry in report["cases"]:
        assert set(entry["organs"]) == set(ORGANS) | {10}  # the source's organs + the target's esophagus


def test_same_seed_same_cases_other_seed_other_cases(inputs, generated, tmp_path):
    out_a, _ = generated
    out_b = tmp_path / "b"
    make_training_set(options(inputs, out_b))
    out_c = tmp_path / "c"
    make_training_set(options(inputs, out_c, seed=8))
    name = "imagesTr/case_0001_v1_0000.nii.gz"
    a, b, c = (sitk.GetArrayFromImage(sitk.ReadImage(str(o / name))) for o in (out_a, out_b, out_c))
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_rerun_reuses_fits_and_cases(inputs, generated):
    out, _ = generated
    stamps = {p: p.stat().st_mtime_ns for p in list(out.rglob("*.nii.gz")) + list(out.rglob("*.npz"))}
    make_training_set(options(inputs, out))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_appearance_draws_stay_in_their_ranges():
    ranges = AppearanceRanges()
    phases = set()
    for seed in range(200):
        d = draw_appearance(np.random.default_rng(seed), 2.0, ranges)
        phases.add(d.phase)
        for value, hu in d.organ_hu.items():
            lo, hi = PHASE_HU[d.phase][value]
            assert lo <= hu <= hi
        assert ranges.noise_hu[0] <= d.noise_hu <= ranges.noise_hu[1]
        assert ranges.blur_mm[0] <= d.blur_mm <= ranges.blur_mm[1]
    assert phases == set(PHASE_HU)
    # contrast moves the kidneys and the aorta most: their arterial means exceed the non-contrast ones
    for value in (2, 5, 13):
        assert PHASE_HU["arterial"][value][0] > PHASE_HU["non_contrast"][value][1]


def test_render_draws_stay_in_their_ranges(inputs, generated):
    from AbdomenKDSegLib.training.transfer_store import load_transfer

    out, _ = generated
    transfer = load_transfer(out / "transfers" / "case_0001.npz")
    source = read_grid_volume(inputs["image"])
    target = read_grid_volume(inputs["targets"] / "case_0001.nii.gz", check=False)
    ranges = RenderRanges()
    fovs = set()
    for seed in range(60):
        d = draw_render(np.random.default_rng(seed), transfer, source, target, ranges)
        fovs.add(d.fov)
        assert ranges.slice_thickness_mm[0] <= d.slice_thickness_mm <= ranges.slice_thickness_mm[1]
        assert ranges.inplane_spacing_mm[0] <= d.spacing_mm[1] == d.spacing_mm[2] <= ranges.inplane_spacing_mm[1]
        assert d.z_range_mm[1] - d.z_range_mm[0] >= 19.9
        if d.fov == "slab":
            assert d.z_range_mm[1] - d.z_range_mm[0] <= ranges.slab_mm[1] + 1e-6
    assert fovs == {name for name, _ in ranges.fov_probabilities}


def test_nearest_on_grid_keeps_labels_and_blanks_outside():
    vol = GridVolume(np.arange(27, dtype=np.uint8).reshape(3, 3, 3), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    same = nearest_on_grid(vol, (2.0, 2.0, 2.0))
    assert np.array_equal(same.array, vol.array) and same.origin == vol.origin
    wider = nearest_on_grid(vol, (2.0, 2.0, 2.0), np.array([[-4.0, 8.0]] * 3))
    assert wider.shape == (7, 7, 7) and wider.array[0].max() == 0 and wider.array[2, 2, 2] == vol.array[0, 0, 0]


def test_parse_heldout():
    assert parse_heldout("41-43") == ["0041", "0042", "0043"]
    assert parse_heldout("0003, 7") == ["0003", "7"]
    assert parse_heldout("") == []


def test_clamp_interval_never_inverts_or_shrinks_below_the_minimum():
    assert clamp_interval((10.0, 90.0), (0.0, 100.0), 20.0) == (10.0, 90.0)
    assert clamp_interval((-50.0, 40.0), (0.0, 100.0), 20.0) == (0.0, 40.0)
    assert clamp_interval((150.0, 200.0), (0.0, 100.0), 20.0) == (80.0, 100.0)  # wholly outside: nearest end
    assert clamp_interval((-80.0, -60.0), (0.0, 100.0), 20.0) == (0.0, 20.0)
    assert clamp_interval((45.0, 50.0), (0.0, 100.0), 20.0) == (37.5, 57.5)
    assert clamp_interval((0.0, 50.0), (10.0, 15.0), 20.0) == (10.0, 15.0)


def test_above_the_source_top_the_target_organs_and_lung_are_painted():
    from AbdomenKDSegLib.training.anatomy_transfer import Transfer
    from AbdomenKDSegLib.training.appearance import draw_appearance
    from AbdomenKDSegLib.training.make_training_set import RenderDraw, render_case

    shape, sp = (20, 16, 16), (5.0, 5.0, 5.0)
    src_lab = np.zeros(shape, np.uint8)
    src_lab[10:, 4:12, 4:12] = 1  # the source's liver runs into its top slice (z = 95 mm)
    src_img = np.where(src_lab > 0, 50.0, -80.0).astype(np.float32)
    source_image = GridVolume(src_img, sp, (0.0, 0.0, 0.0))
    source_labels = GridVolume(src_lab, sp, (0.0, 0.0, 0.0))
    tgt = np.zeros((30, 16, 16), np.uint8)
    tgt[12:25, 4:12, 4:8] = 1  # the target's liver ends at z = 120 mm, narrower than the source's
    target = GridVolume(tgt, sp, (0.0, 0.0, 0.0))
    transfer = Transfer(np.eye(3), np.zeros(3), torch.zeros(1, 3, 2, 2, 2), target.extent())
    look = replace(draw_appearance(np.random.default_rng(0), 5.0), noise_hu=0.0, blur_mm=0.0,
                   texture_hu={k: 0.0 for k in range(1, 14)}, clip=False)
    draw = RenderDraw("target", (0.0, 145.0), sp, 5.0)
    image, labels, _, _ = render_case(source_image, source_labels, {1: 50.0}, transfer, target, draw, look, 0)
    above = slice(20, 30)  # z > 97.5 mm: beyond the source's top
    assert np.array_equal(labels[above], tgt[above])  # the target's organs, the liver dome included
    lung = (tgt[above] == 0) & (np.broadcast_to(src_lab[-1], labels[above].shape) > 0)
    assert lung.any() and (image[above][lung] < -600).all()  # lung where the source liver would go on
    assert np.array_equal(labels[:20], src_lab)  # inside the source: its own labels


def test_weighted_set_numbers_its_variants_after_the_first_set_and_draws_only_what_it_weights(inputs, tmp_path):
    """A second set that stresses thin non-contrast slabs, mergeable with the first (other case names)."""
    slab = replace(RenderRanges(inplane_spacing_mm=(4.0, 6.0), slice_spacing_mm=(4.0, 6.0)),
                   fov_probabilities=parse_weights("slab=1", [n for n, _ in RenderRanges().fov_probabilities], "fov"),
                   slab_mm=(40.0, 60.0))
    look = replace(AppearanceRanges(), phase_probabilities=parse_weights(
        "non_contrast=1", [n for n, _ in AppearanceRanges().phase_probabilities], "phase"))
    report = make_training_set(options(inputs, tmp_path / "slab", variants=1, first_variant=2, render=slab,
                                       appearance=look, previews=0, include_source=False))
    assert sorted(c["case"] for c in report["cases"]) == ["case_0001_v2", "case_0002_v2", "case_0003_v2"]
    assert report["first_variant"] == 2 and list(report["render_ranges"]["slab_mm"]) == [40.0, 60.0]
    for case in report["cases"]:
        assert case["render"]["fov"] == "slab" and case["appearance"]["phase"] == "non_contrast"
        z = case["render"]["z_range_mm"]
        assert 20.0 - 1e-6 <= z[1] - z[0] <= 60.0 + 1e-6
    assert (tmp_path / "slab" / "imagesTr" / "case_0001_v2_0000.nii.gz").is_file()


def test_default_weights_keep_the_draws_of_earlier_sets():
    """Weights given as options are normalised; the defaults draw exactly what they drew before."""
    phases = [n for n, _ in AppearanceRanges().phase_probabilities]
    doubled = replace(AppearanceRanges(), phase_probabilities=tuple((n, 2 * w) for n, w in
                                                                    AppearanceRanges().phase_probabilities))
    for seed in range(20):
        a = draw_appearance(np.random.default_rng(seed), 2.0)
        assert a == draw_appearance(np.random.default_rng(seed), 2.0, doubled)
        assert a.phase in phases


def test_parse_weights_and_ranges_name_the_bad_item():
    names = ["a", "b", "c"]
    assert parse_weights("b=2, a=0.5", names, "fov") == (("a", 0.5), ("b", 2.0), ("c", 0.0))
    for bad, match in (("d=1", "one of a, b, c"), ("a", "NAME=WEIGHT"), ("a=x", "not a number"),
                       ("a=0", "positive sum"), ("a=-1,b=2", ">= 0")):
        with pytest.raises(InputError, match=match):
            parse_weights(bad, names, "fov")
    assert parse_range("40-80", "--slab-mm") == (40.0, 80.0)
    for bad in ("80-40", "40", "a-b", "0-5"):
        with pytest.raises(InputError, match="--slab-mm"):
            parse_range(bad, "--slab-mm")


def test_fit_key_follows_file_contents_not_timestamps(inputs, tmp_path):
    """A copied (or re-mounted) data folder keeps its fits; a changed label map does not."""
    import os
    import shutil

    from AbdomenKDSegLib.training.transfer_store import fit_key

    target = inputs["targets"] / "case_0001.nii.gz"
    copy = tmp_path / "case_0001.nii.gz"
    shutil.copy(target, copy)
    os.utime(copy, ns=(1, 1))
    assert fit_key(inputs["labels"], copy, QUICK) == fit_key(inputs["labels"], target, QUICK)
    changed = sitk.GetArrayFromImage(sitk.ReadImage(str(target)))
    changed[0, 0, 0] = 3
    write(changed, copy, (7.0, 5.0, 5.0))
    assert fit_key(inputs["labels"], copy, QUICK) != fit_key(inputs["labels"], target, QUICK)
