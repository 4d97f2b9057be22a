"""DSC and NSD (FLARE22 protocol) on analytic shapes with hand-computed answers and on real label maps."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenKDSegLib.engine.organs import BY_KEY, BY_VALUE, ORGANS
from AbdomenKDSegLib.errors import InputError
from AbdomenKDSegLib.evaluation import metrics as M

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FLARE_CASE = DATA / "flare22-labels" / "FLARE22_Tr_0014.nii.gz"  # the smallest map (512x512x71)

LIVER, AORTA = BY_KEY["liver"], BY_KEY["aorta"]


def corner_bit(d0: int, d1: int, d2: int) -> int:
    return 1 << (7 - (4 * d0 + 2 * d1 + d2))


def code_of(corners) -> int:
    return sum(corner_bit(*c) for c in corners)


# ---------------------------------------------------------------------------------------- surfel areas
# Areas of the elementary marching-cubes pieces for voxel spacing (s0, s1, s2), derived by hand:
#   one corner inside: triangle through the 3 half-edges -> 1/8 * sqrt(s0²s1² + s0²s2² + s1²s2²)
#   two corners along axis a: rectangle s_a x (half-diagonal of the other two) -> s_a/2 * sqrt(s_b² + s_c²)
#   four corners of a face normal to axis a: flat square -> s_b * s_c


def triangle_area(s):
    s0, s1, s2 = s
    return math.sqrt((s0 * s1) ** 2 + (s0 * s2) ** 2 + (s1 * s2) ** 2) / 8


def edge_area(s, axis):
    b, c = (s[i] for i in range(3) if i != axis)
    return s[axis] / 2 * math.hypot(b, c)


def face_area(s, axis):
    b, c = (s[i] for i in range(3) if i != axis)
    return b * c


SPACINGS = [(1.0, 1.0, 1.0), (2.5, 0.8, 0.7), (0.65, 0.9, 4.0)]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_area_table_elementary_pieces(spacing):
    table = M.surfel_area_table(spacing)
    assert table[0] == 0 and table[255] == 0
    for corner in itertools.product((0, 1), repeat=3):
        assert table[code_of([corner])] == pytest.approx(triangle_area(spacing))
        assert table[255 - code_of([corner])] == pytest.approx(triangle_area(spacing))
    for axis in range(3):
        for fixed in itertools.product((0, 1), repeat=2):
            pair = []
            for v in (0, 1):
                c = list(fixed)
                c.insert(axis, v)
                pair.append(tuple(c))
            assert table[code_of(pair)] == pytest.approx(edge_area(spacing, axis))
        for v in (0, 1):
            face = [c for c in itertools.product((0, 1), repeat=3) if c[axis] == v]
            assert table[code_of(face)] == pytest.approx(face_area(spacing, axis))
    # Two diagonal corners of a face are two separate triangles (the classic case table).
    assert table[code_of([(1, 1, 0), (1, 0, 1)])] == pytest.approx(2 * triangle_area(spacing))


def test_area_table_three_corners_of_a_face():
    """Corners (1,1,1), (1,1,0), (1,0,1): the pentagon through the half-edges P1=(.5,1,1), P2=(.5,1,0),
    P3=(1,.5,0), P4=(1,0,.5), P5=(.5,0,1) split into triangles P1P2P5 (area 1/2, in the plane x0=1/2),
    P2P3P5 (|(-1/4,-1/4,-1/4)| = sqrt(3)/4) and P3P4P5 (sqrt(3)/8), at unit spacing."""
    table = M.surfel_area_table((1, 1, 1))
    assert table[code_of([(1, 1, 1), (1, 1, 0), (1, 0, 1)])] == pytest.approx(0.5 + 3 * math.sqrt(3) / 8)


def test_area_table_symmetries():
    """Complement and the 48 symmetries of the cube (spacing permuted alike) leave the area unchanged."""
    spacing = (2.5, 0.8, 0.7)
    table = M.surfel_area_table(spacing)
    assert np.allclose(table, table[::-1])  # code 255 - c is the complement of c
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((0, 1), repeat=3):
            moved = M.surfel_area_table([spacing[i] for i in perm])
            for code in range(256):
                corners = [c for c in itertools.product((0, 1), repeat=3) if code & corner_bit(*c)]
                new = code_of([tuple(c[i] ^ flips[i] for i in perm) for c in corners])
                assert table[code] == pytest.approx(moved[new])


def test_area_table_matches_vtk_marching_cubes():
    """Regenerate every configuration with <= 4 inside corners with VTK's marching cubes."""
    vtk = pytest.importorskip("vtk")
    from vtk.util import numpy_support

    spacing = (2.5, 0.8, 0.7)
    table = M.surfel_area_table(spacing)
    for code in range(256):
        if bin(code).count("1") > 4:
            continue
        values = np.zeros(8)
        for d0, d1, d2 in itertools.product((0, 1), repeat=3):
            if code & corner_bit(d0, d1, d2):
                values[d0 + 2 * d1 + 4 * d2] = 1.0  # VTK point id: x fastest; x = array axis 0
        image = vtk.vtkImageData()
        image.SetDimensions(2, 2, 2)
        image.SetSpacing(*spacing)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(values, deep=1))
        mc = vtk.vtkMarchingCubes()
        mc.SetInputData(image)
        mc.SetValue(0, 0.5)
        mc.Update()
        area = 0.0
        if mc.GetOutput().GetNumberOfCells():
            mass = vtk.vtkMassProperties()
            mass.SetInputData(mc.GetOutput())
            mass.Update()
            area = mass.GetSurfaceArea()
        assert table[code] == pytest.approx(area, rel=1e-6), code  # VTK points are float32


# ------------------------------------------------------------------------------------- box surfaces


def box_mask(shape, lo, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, a + n) for a, n in zip(lo, size))] = True
    return mask


def corner_area(spacing, cats):
    """Area at a grid corner given, per axis, 'one' (1 of the 2 voxels inside) or 'both'."""
    ones = [a for a in range(3) if cats[a] == "one"]
    if len(ones) == 1:
        return face_area(spacing, ones[0])
    if len(ones) == 2:
        return edge_area(spacing, next(a for a in range(3) if a not in ones))
    return triangle_area(spacing)


def box_corner_categories(n):
    """Per axis, the grid corners of a box of n voxels: 2 see one voxel, n - 1 see two."""
    return {"one": 2, "both": n - 1}


def test_box_total_surface_area():
    """Sum of surfel areas of a box = flat faces + bevelled edges + corner triangles (by counting)."""
    spacing, size = (2.5, 0.8, 0.7), (4, 5, 6)
    a = box_mask((10, 11, 12), (2, 3, 3), size)
    expected = 0.0
    for cats in itertools.product(("one", "both"), repeat=3):
        if "one" in cats:
            count = math.prod(box_corner_categories(n)[c] for n, c in zip(size, cats))
            expected += count * corner_area(spacing, cats)
    sd = M.surface_distances(a, a, spacing)
    assert sd.areas_ref.sum() == pytest.approx(expected)
    assert np.all(sd.distances_ref_to_pred == 0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_box_shifted_one_voxel(axis):
    """Box moved by one voxel along ``axis`` (spacing s): every surfel maps onto the other surface at
    distance s, so NSD(tol = s) = 1. With tol below every spacing only coinciding grid corners count:
    the corners on the box's side faces (parallel to the shift) at the n - 1 interior positions plus the
    far end along the shift, each with its own area (see ``corner_area``)."""
    spacing = [(2.0, 0.8, 0.7), (0.8, 2.0, 0.7), (0.7, 0.8, 2.0)][axis]
    size = (4, 5, 6)
    lo = [2, 3, 3]
    a = box_mask((10, 11, 12), lo, size)
    lo[axis] += 1
    b = box_mask((10, 11, 12), lo, size)

    assert M.normalized_surface_dice(a, b, spacing, tolerance_mm=2.0) == 1.0
    assert M.normalized_surface_dice(a, b, spacing, tolerance_mm=1.99) < 1.0

    total = overlap = 0.0
    for cats in itertools.product(("one", "both"), repeat=3):
        if "one" not in cats:
            continue
        counts = [box_corner_categories(n)[c] for n, c in zip(size, cats)]
        total += math.prod(counts) * corner_area(spacing, cats)
        # Shared corners: along the shift axis positions 1..n ("both" at 1..n-1, "one" at n only);
        # on the other axes any position, but at least one of them must be on a face ("one").
        counts[axis] = size[axis] - 1 if cats[axis] == "both" else 1
        if any(cats[i] == "one" for i in range(3) if i != axis):
            overlap += math.prod(counts) * corner_area(spacing, cats)
    # By symmetry the prediction contributes the same shared area as the reference.
    assert M.normalized_surface_dice(a, b, spacing, tolerance_mm=0.5) == pytest.approx(overlap / total)


def test_surface_distances_match_brute_force():
    """Distances from the SimpleITK distance map equal pairwise Euclidean distances between surfels."""
    rng = np.random.default_rng(3)
    a = np.zeros((9, 10, 11), bool)
    b = np.zeros_like(a)
    a[2:7, 2:8, 3:9] = rng.random((5, 6, 6)) < 0.8
    b[3:8, 1:7, 2:9] = rng.random((5, 6, 7)) < 0.8
    spacing = (2.5, 0.8027344, 0.7)
    sd = M.surface_distances(a, b, spacing)
    pa, pb = surfel_points(a, spacing), surfel_points(b, spacing)
    expected = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)
    assert np.allclose(np.sort(sd.distances_ref_to_pred), np.sort(expected), atol=1e-5)


def surfel_points(mask, spacing):
    """mm coordinates of grid corners whose 2x2x2 neighbourhood is mixed (explicit windows)."""
    padded = np.pad(mask, 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2, 2, 2))
    mixed = windows.any(axis=(3, 4, 5)) & ~windows.all(axis=(3, 4, 5))
    return np.argwhere(mixed) * np.asarray(spacing)


def surfel_codes(mask):
    padded = np.pad(mask, 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2, 2, 2)).astype(np.int64)
    weights = np.array([corner_bit(*c) for c in itertools.product((0, 1), repeat=3)]).reshape(2, 2, 2)
    return (windows * weights).sum(axis=(3, 4, 5))


def brute_force_nsd(a, b, spacing, tol):
    """Independent NSD: surfels from explicit 2x2x2 windows, pairwise distances, table areas."""
    table = M.surfel_area_table(spacing)
    codes_a, codes_b = surfel_codes(a), surfel_codes(b)
    border_a = (codes_a != 0) & (codes_a != 255)
    border_b = (codes_b != 0) & (codes_b != 255)
    pa = np.argwhere(border_a) * np.asarray(spacing)
    pb = np.argwhere(border_b) * np.asarray(spacing)
    dist = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    area_a, area_b = table[codes_a[border_a]], table[codes_b[border_b]]
    close = area_a[dist.min(1) <= tol].sum() + area_b[dist.min(0) <= tol].sum()
    return close / (area_a.sum() + area_b.sum())


# ------------------------------------------------------------------------------------------- spheres


def ball(shape, spacing, center_mm, radius_mm):
    idx = np.indices(shape, dtype=float)
    return sum((idx[a] * spacing[a] - center_mm[a]) ** 2 for a in range(3)) <= radius_mm ** 2


def sphere_fraction_within(radius, offset, tol):
    """Continuous answer: fraction of a sphere's area within ``tol`` of the same sphere moved by ``offset``.
    A point at polar angle t is at | sqrt(R² - 2Rd cos t + d²) - R | from the other sphere, and area
    is uniform in cos t (Archimedes), so the fraction is half the length of the admissible cos t range."""
    r, d = radius, offset
    lo = max(-1.0, (r * r + d * d - (r + tol) ** 2) / (2 * r * d))
    hi = min(1.0, (r * r + d * d - (r - max(0.0, tol)) ** 2) / (2 * r * d))
    return max(0.0, hi - lo) / 2


@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.5), (1.0, 0.5, 0.5)])
def test_two_spheres(spacing):
    radius, offset = 10.0, 4.0
    shape = tuple(int(math.ceil((2 * radius + offset + 6) / s)) for s in spacing)
    center = np.array([radius + 3.0] * 3)
    a = ball(shape, spacing, center, radius)
    b = ball(shape, spacing, center + np.array([offset, 0, 0]), radius)
    # Lens volume pi (4R + d)(2R - d)² / 12 over the ball volume 4/3 pi R³.
    lens = math.pi * (4 * radius + offset) * (2 * radius - offset) ** 2 / 12
    assert M.dice(a, b) == pytest.approx(lens / (4 / 3 * math.pi * radius ** 3), abs=0.01)
    # The shift is a whole number of voxels: every surfel has its image at exactly ``offset``.
    assert M.normalized_surface_dice(a, b, spacing, offset) == 1.0
    # Surfels sit on grid corners within h (half a voxel diagonal) of the true sphere, so the discrete
    # NSD lies between the continuous fractions at tol - 2h and tol + 2h.
    h = 0.5 * math.sqrt(sum(s * s for s in spacing))
    for tol in (1.0, 2.0, 3.0):
        nsd = M.normalized_surface_dice(a, b, spacing, tol)
        assert sphere_fraction_within(radius, offset, tol - 2 * h) <= nsd
        assert nsd <= sphere_fraction_within(radius, offset, tol + 2 * h)
    nsds = [M.normalized_surface_dice(a, b, spacing, t) for t in (0.5, 1.0, 2.0, 3.0)]
    assert nsds == sorted(nsds) and nsds[0] < nsds[-1] < 1.0


def test_permuting_axes_permutes_nothing():
    """Scoring the transposed masks with the spacing permuted alike gives the same NSD (the official
    script runs on (X, Y, Z) arrays, we run on (Z, Y, X))."""
    rng = np.random.default_rng(0)
    a = ball((20, 22, 24), (2.5, 0.8, 0.7), (25, 9, 8), 7) ^ (rng.random((20, 22, 24)) < 0.02)
    b = ball((20, 22, 24), (2.5, 0.8, 0.7), (27, 8, 9), 7)
    spacing = (2.5, 0.8, 0.7)
    nsd = M.normalized_surface_dice(a, b, spacing, 2.0)
    assert 0 < nsd < 1
    flipped = M.normalized_surface_dice(a.transpose(2, 1, 0), b.transpose(2, 1, 0), spacing[::-1], 2.0)
    assert flipped == pytest.approx(nsd, abs=1e-12)


# -------------------------------------------------------------------------------------- FLARE22 rules


def dsc_nsd(score):
    return (score.dsc, score.nsd)


def test_empty_organ_rules():
    spacing = (2.5, 0.8, 0.8)
    empty = np.zeros((8, 8, 8), np.uint8)
    some = empty.copy()
    some[2:5, 2:5, 2:5] = LIVER.value
    assert dsc_nsd(M.score_organ(empty, empty, LIVER, spacing)) == (1.0, 1.0)
    assert dsc_nsd(M.score_organ(empty, some, LIVER, spacing)) == (0.0, 0.0)
    assert dsc_nsd(M.score_organ(some, empty, LIVER, spacing)) == (0.0, 0.0)
    assert dsc_nsd(M.score_organ(some, some, LIVER, spacing)) == (1.0, 1.0)


def _plates(overlap):
    """Reference: 10x10 plate on slice 4. Prediction: the plate on slice 5 plus ``overlap`` voxels of
    slice 4. DSC = 2k / (100 + 100 + k); the two plates are one slice (1 mm) apart."""
    ref = np.zeros((10, 12, 12), np.uint8)
    pred = np.zeros_like(ref)
    ref[4, 1:11, 1:11] = LIVER.value
    pred[5, 1:11, 1:11] = LIVER.value
    pred[4, 1, 1:1 + overlap] = LIVER.value
    return ref, pred


def test_nsd_is_zero_below_dsc_02():
    spacing = (1.0, 1.0, 1.0)  # liver tolerance 5 mm >> 1 mm: surfaces match almost everywhere
    ref, pred = _plates(overlap=10)
    score = M.score_organ(ref, pred, LIVER, spacing)
    assert score.dsc == pytest.approx(2 * 10 / 210) and score.dsc < 0.2
    assert M.normalized_surface_dice(ref == 1, pred == 1, spacing, LIVER.nsd_tolerance_mm) > 0.9
    assert score.nsd == 0.0


def test_nsd_is_computed_at_dsc_02_exactly():
    """DSC = 0.2 exactly is not below 0.2: NSD is the surface Dice (rule is DSC < 0.2)."""
    ref = np.zeros((10, 12, 12), np.uint8)
    pred = np.zeros_like(ref)
    ref[4, 1:11, 1:6] = LIVER.value  # 50 voxels
    pred[4, 1:3, 1:6] = LIVER.value  # 10 voxels shared
    pred[6, 1:9, 1:6] = LIVER.value  # + 40 elsewhere: DSC = 2 * 10 / 100
    score = M.score_organ(ref, pred, LIVER, (1.0, 1.0, 1.0))
    assert score.dsc == 0.2
    assert score.nsd == pytest.approx(M.normalized_surface_dice(ref == 1, pred == 1, (1, 1, 1), 5.0))
    assert score.nsd > 0


def _aorta_maps():
    """Reference aorta on slices 10..20, prediction the same disc on slices 0..30 (axis 0 = axial)."""
    ref = np.zeros((32, 16, 16), np.uint8)
    disc = ball((1, 16, 16), (1, 1, 1), (0, 7.5, 7.5), 4)[0]
    ref[10:21][:, disc] = AORTA.value
    pred = np.zeros_like(ref)
    pred[0:31][:, disc] = AORTA.value
    return ref, pred, int(disc.sum())


def test_tubular_organs_only_score_reference_slices_but_the_last():
    ref, pred, _ = _aorta_maps()
    spacing = (2.5, 0.8, 0.8)
    assert M.tubular_slab((slice(10, 21), slice(0, 1), slice(0, 1))) == slice(10, 20)
    assert dsc_nsd(M.score_organ(ref, pred, AORTA, spacing)) == (1.0, 1.0)
    # Slice 20 (last labeled) is not scored: removing it from the prediction changes nothing ...
    cut = pred.copy()
    cut[20] = 0
    assert dsc_nsd(M.score_organ(ref, cut, AORTA, spacing)) == (1.0, 1.0)
    # ... while slices 10 and 19 are: removing one of 10 scored slices gives DSC 2*9/(10+9).
    for z in (10, 19):
        cut = pred.copy()
        cut[z] = 0
        assert M.score_organ(ref, cut, AORTA, spacing).dsc == pytest.approx(18 / 19)


def test_non_tubular_organ_scores_all_slices():
    ref, pred, _ = _aorta_maps()
    ref[ref > 0] = LIVER.value
    pred[pred > 0] = LIVER.value
    assert M.score_organ(ref, pred, LIVER, (2.5, 0.8, 0.8)).dsc == pytest.approx(2 * 11 / (11 + 31))


def test_tubular_slab_is_along_numpy_axis_0():
    """An aorta drawn along numpy axis 2 on one axial slice leaves an empty slab (official: NaN)."""
    ref = np.zeros((6, 8, 30), np.uint8)
    ref[3, 3:5, 2:28] = AORTA.value
    score = M.score_organ(ref, ref.copy(), AORTA, (2.5, 0.8, 0.8))
    assert math.isnan(score.dsc) and math.isnan(score.nsd)


def test_bad_inputs_raise_input_error():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(InputError, match="shape"):
        M.score_label_maps(a, np.zeros((4, 4, 5), np.uint8), (1, 1, 1))
    with pytest.raises(InputError, match="spacing"):
        M.score_label_maps(a, a, (1, 0, 1))
    with pytest.raises(InputError, match="shape"):
        M.surface_distances(a > 0, np.zeros((4, 4), bool), (1, 1, 1))


def test_label_boxes_match_argwhere():
    rng = np.random.default_rng(1)
    labels = np.zeros((9, 7, 8), np.uint16)
    for v in (1, 5, 13, 300):
        z, y, x = rng.integers(0, 7, 3)
        labels[z:z + 2, y:y + 1, x:x + 2] = v
    boxes = M.label_boxes(labels, range(1, 14), chunk_voxels=60)  # forces several slabs
    assert set(boxes) == {1, 5, 13}
    for v, box in boxes.items():
        idx = np.argwhere(labels == v)
        assert box == tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0), idx.max(0)))


# ------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def flare_case():
    if not FLARE_CASE.exists():
        pytest.skip(f"missing {FLARE_CASE}")
    image = sitk.ReadImage(str(FLARE_CASE))
    return sitk.GetArrayFromImage(image), image.GetSpacing()[::-1]


def test_real_label_map_against_itself_scores_one(flare_case):
    labels, spacing = flare_case
    scores = M.score_label_maps(labels, labels.copy(), spacing)
    assert [s.organ.value for s in scores] == [o.value for o in ORGANS]
    assert all(s.dsc == 1.0 and s.nsd == 1.0 for s in scores)
    # The same through the full surface path (no shortcut) for a small organ.
    gland = labels == BY_KEY["left_adrenal_gland"].value
    assert M.normalized_surface_dice(gland, gland.copy(), spacing, 2.0) == 1.0


def erode6(mask):
    """One-voxel erosion with the 6-neighbourhood (outside the array counts as background)."""
    p = np.pad(mask, 1)
    out = p[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for step in (-1, 1):
            out &= np.roll(p, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return out


def test_real_adrenal_eroded_by_one_voxel(flare_case):
    labels, spacing = flare_case
    organ = BY_KEY["right_adrenal_gland"]
    gland = labels == organ.value
    eroded = erode6(gland)
    assert 0 < eroded.sum() < gland.sum()
    pred = labels.copy()
    pred[gland & ~eroded] = 0

    scores = {s.organ.value: s for s in M.score_label_maps(labels, pred, spacing)}
    for value, s in scores.items():
        if value != organ.value:
            assert (s.dsc, s.nsd) == (1.0, 1.0), BY_VALUE[value].key
    got = scores[organ.value]
    assert got.dsc == pytest.approx(2 * eroded.sum() / (gland.sum() + eroded.sum()))
    box = tuple(slice(max(0, int(lo) - 1), int(hi) + 2) for lo, hi in
                zip(np.argwhere(gland).min(0), np.argwhere(gland).max(0)))
    expected = brute_force_nsd(gland[box], eroded[box], spacing, organ.nsd_tolerance_mm)
    assert 0.3 < expected < 1.0  # the erosion is not trivial at a 2 mm tolerance
    assert got.nsd == pytest.approx(expected, abs=1e-9)
    # Other tolerances exercise other distance shells.
    for tol in (0.5, 1.0, 3.0):
        assert M.normalized_surface_dice(gland, eroded, spacing, tol) == pytest.approx(
            brute_force_nsd(gland[box], eroded[box], spacing, tol), abs=1e-9)
