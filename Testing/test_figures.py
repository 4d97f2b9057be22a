"""The 3D organ-surface figure (figures.render3d): surfaces in patient millimetres, orientation, PNG panels."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, from its IHDR chunk."""
    data = path.read_bytes()[:24]
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def two_organ_labels(tmp_path_factory) -> Path:
    """Liver box on the patient's right (low LPS x), spleen box on the left, in an RAS-stored file."""
    import numpy as np
    import SimpleITK as sitk

    labels = np.zeros((30, 40, 50), np.uint8)  # (Z, Y, X)
    labels[8:20, 10:30, 5:20] = 1   # x 5..19: patient's right in LPS
    labels[10:18, 15:28, 32:45] = 3  # x 32..44: patient's left
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((2.0, 2.0, 3.0))
    image.SetOrigin((-50.0, -40.0, 100.0))
    stored = sitk.DICOMOrient(image, "RAS")  # stored flipped: rendering must undo it
    path = tmp_path_factory.mktemp("render") / "labels.nii.gz"
    sitk.WriteImage(stored, str(path))
    return path


def test_surfaces_are_in_patient_millimetres(two_organ_labels):
    import numpy as np
    import SimpleITK as sitk

    from AbdomenKDSegLib.figures.render3d import canonical_labels, organ_surfaces

    labels, spacing, origin = canonical_labels(sitk.ReadImage(str(two_organ_labels)))
    assert spacing == (2.0, 2.0, 3.0) and origin == (-50.0, -40.0, 100.0)
    surfaces = {s.value: s for s in organ_surfaces(labels, spacing, origin)}
    assert set(surfaces) == {1, 3}
    lo, hi = surfaces[1].points.min(axis=0), surfaces[1].points.max(axis=0)
    # box voxels x 5..19, y 10..29, z 8..19: faces half a voxel outside the outer voxel centres
    expected_lo = np.array([-50 + 4.5 * 2, -40 + 9.5 * 2, 100 + 7.5 * 3])
    expected_hi = np.array([-50 + 19.5 * 2, -40 + 29.5 * 2, 100 + 19.5 * 3])
    np.testing.assert_allclose(lo, expected_lo, atol=1.6)
    np.testing.assert_allclose(hi, expected_hi, atol=1.6)


@pytest.mark.parametrize("backend", ["auto", "matplotlib"])
def test_front_view_shows_patient_right_on_the_left(two_organ_labels, backend):
    import numpy as np
    import SimpleITK as sitk

    from AbdomenKDSegLib.engine.organs import BY_KEY
    from AbdomenKDSegLib.figures.render3d import canonical_labels, organ_surfaces, render_view

    labels, spacing, origin = canonical_labels(sitk.ReadImage(str(two_organ_labels)))
    rgb, used = render_view(organ_surfaces(labels, spacing, origin), "anterior", (300, 300), backend)
    assert rgb.shape == (300, 300, 3) and (backend == "auto" or used == "matplotlib")

    def columns_of(key):
        color = np.array(BY_KEY[key].color, float)
        hue = rgb.astype(float) / np.maximum(rgb.max(axis=2, keepdims=True), 1)  # shading-invariant
        close = np.abs(hue - color / color.max()).max(axis=2) < 0.08
        assert close.sum() > 200, f"{key} not visible"
        return np.nonzero(close)[1].mean()

    assert columns_of("liver") < columns_of("spleen")


def test_render_figure_writes_a_png_with_ct_panels(two_organ_labels, tmp_path):
    import SimpleITK as sitk

    from AbdomenKDSegLib.figures.render3d import render_figure

    ct = sitk.Cast(sitk.ReadImage(str(two_organ_labels)), sitk.sitkInt16) * 100 - 50
    ct_path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct, str(ct_path))
    out = render_figure(two_organ_labels, tmp_path / "figure.png", image_path=ct_path, size=200)
    width, height = png_size(out)
    assert width > 3 * height  # four panels side by side


def _blend_mask(rgb, organ_key: str, background_hu: float):
    """Pixels of ``rgb`` showing ``organ_key`` blended at alpha 0.5 over a CT of ``background_hu``."""
    import numpy as np

    from AbdomenKDSegLib.engine.organs import BY_KEY
    from AbdomenKDSegLib.figures.preview import DISPLAY_HU

    gray = np.clip((background_hu - DISPLAY_HU[0]) / (DISPLAY_HU[1] - DISPLAY_HU[0]), 0, 1)
    expected = (0.5 * gray + 0.5 * np.array(BY_KEY[organ_key].color_float)) * 255
    return np.abs(rgb.astype(float) - expected).max(axis=2) <= 2


def test_preview_is_radiological_and_needs_no_matplotlib(two_organ_labels, tmp_path, monkeypatch):
    """Patient right (liver) on the left of the picture, superior (the aorta's top) up on the coronal
    panel, the true aspect ratio, the legend of the organs present; drawn without matplotlib."""
    import sys

    import numpy as np
    import SimpleITK as sitk
    from PIL import Image

    from AbdomenKDSegLib.figures.preview import overlay_panel, save_preview

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it would raise
    labels = sitk.ReadImage(str(two_organ_labels))
    ct = sitk.Cast(labels, sitk.sitkInt16) * 0 + 40  # a constant 40 HU CT on the same grid
    out = save_preview(ct, labels, tmp_path / "preview.png", title="phantom")
    rgb = np.asarray(Image.open(out).convert("RGB"))
    liver, spleen = _blend_mask(rgb, "liver", 40.0), _blend_mask(rgb, "spleen", 40.0)
    assert liver.sum() > 200 and spleen.sum() > 200
    assert np.nonzero(liver)[1].min() < np.nonzero(spleen)[1].min()  # first panel: right on the left

    column = np.zeros((10, 4), np.uint8)
    column[0] = 5  # aorta in the first (inferior) row of a coronal slice
    panel = overlay_panel(np.full((10, 4), 40.0), column, aspect=3.0, height=60, flip_rows=True)
    assert panel.shape == (60, 8, 3)  # 10 rows x 3 mm high, 4 columns x 1 mm wide: 30 x 4 mm -> 60 x 8 px
    aorta = _blend_mask(panel, "aorta", 40.0)
    assert aorta[-6:].all() and not aorta[:-6].any()  # superior up: the first row is drawn at the bottom
