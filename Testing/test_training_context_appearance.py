"""Context randomisation of generated CT: re-filled stomach/duodenum (fluid, oral contrast, air-fluid
level) and a fat layer around the organs (training/appearance.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from AbdomenKDSegLib.errors import InputError
from AbdomenKDSegLib.training.appearance import (
    FAT_HU,
    LUMEN_FLUID_HU,
    ORAL_CONTRAST_HU,
    AppearanceRanges,
    apply_appearance,
    draw_appearance,
    fat_halo,
    fill_hollow_organs,
)

SPACING = (2.0, 1.0, 1.0)  # (z, y, x) mm


def _stomach_phantom() -> tuple[torch.Tensor, torch.Tensor]:
    """Soft tissue 40 HU with a 'stomach' box (label 11) of 30 HU, and a kidney box (label 2) elsewhere."""
    image = torch.full((12, 40, 40), 40.0)
    labels = torch.zeros((12, 40, 40), dtype=torch.uint8)
    labels[2:10, 5:25, 5:25] = 11
    image[2:10, 5:25, 5:25] = 30.0
    labels[3:9, 28:36, 28:36] = 2
    image[3:9, 28:36, 28:36] = 35.0
    return image, labels


def test_hollow_fill_paints_the_lumen_with_gas_in_front_and_keeps_the_wall_and_labels():
    image, labels = _stomach_phantom()
    before = image.clone()
    fill = {"content": "fluid", "hu": 10.0, "gas_fraction": 0.25, "wall_mm": 2.0}
    out = fill_hollow_organs(image, labels, SPACING, fill, torch.Generator().manual_seed(0))
    assert torch.equal(image, before)  # the input is not modified
    # lumen: the box eroded by 2 mm = 1 slice in z, 2 voxels in y/x -> z 3..8, y 7..22, x 7..22
    lumen = out[3:9, 7:23, 7:23]
    gas = lumen < -500
    # the gas sits in front (low Y: the canonical Y axis runs anterior -> posterior), a quarter of the depth
    rows_with_gas = gas.any(dim=(0, 2)).nonzero()[:, 0]
    assert rows_with_gas.min() == 0 and rows_with_gas.max() == 3  # 16 rows deep, level 0.25 -> 4 rows
    assert float(lumen[:, 4:, :].mean()) == pytest.approx(10.0, abs=1.5)
    # the wall keeps the organ's own value, everything outside the organ is untouched, labels unchanged
    assert torch.all(out[2, 5:25, 5:25] == 30.0) and torch.all(out[2:10, 5, 5:25] == 30.0)
    assert torch.equal(out[labels != 11], before[labels != 11])


def test_hollow_fill_without_gas_and_a_missing_organ():
    image, labels = _stomach_phantom()
    labels[labels == 11] = 12  # only a duodenum now; the stomach is absent and must not fail
    fill = {"content": "oral_contrast", "hu": 300.0, "gas_fraction": 0.0, "wall_mm": 2.0}
    out = fill_hollow_organs(image, labels, SPACING, fill, torch.Generator().manual_seed(0))
    lumen = out[3:9, 7:23, 7:23]
    assert float(lumen.min()) > 250 and float(lumen.mean()) == pytest.approx(300.0, abs=2.0)


def test_fat_halo_turns_soft_tissue_next_to_organs_into_fat_and_leaves_organs_and_far_tissue():
    image, labels = _stomach_phantom()
    texture = torch.zeros_like(image)
    out = fat_halo(image, labels, SPACING, 4.0, -100.0, texture)
    # 2 voxels outside the kidney box in x (2 mm): fat; the kidney and tissue 15 voxels away: unchanged
    assert float(out[5, 31, 26]) == pytest.approx(-100.0, abs=5.0)
    assert torch.equal(out[labels > 0], image[labels > 0])
    assert float(out[5, 38, 0]) == 40.0
    # gas and bone next to an organ are not soft tissue: they stay
    image[5, 31, 26] = -900.0
    assert float(fat_halo(image, labels, SPACING, 4.0, -100.0, texture)[5, 31, 26]) == -900.0


def test_context_draws_are_off_by_default_and_leave_the_other_draws_unchanged():
    on = replace(AppearanceRanges(), hollow_fill_probability=1.0, fat_halo_probability=1.0)
    contents = set()
    for seed in range(40):
        base = draw_appearance(np.random.default_rng(seed), 3.0)
        assert base.hollow_fill is None and base.fat_halo_mm is None and base.fat_hu is None
        d = draw_appearance(np.random.default_rng(seed), 3.0, on)
        # the context is drawn after everything else: phase, HU, noise ... are those of the default draw
        assert replace(d, hollow_fill=None, fat_halo_mm=None, fat_hu=None) == base
        fill = d.hollow_fill
        contents.add(fill["content"])
        lo, hi = ORAL_CONTRAST_HU if fill["content"] == "oral_contrast" else LUMEN_FLUID_HU
        assert lo <= fill["hu"] <= hi and 0.0 <= fill["gas_fraction"] <= 0.5 and 2.0 <= fill["wall_mm"] <= 4.0
        assert on.fat_halo_mm[0] <= d.fat_halo_mm <= on.fat_halo_mm[1] and FAT_HU[0] <= d.fat_hu <= FAT_HU[1]
    assert contents == {"fluid", "oral_contrast"}


def test_apply_appearance_uses_the_context_draws():
    image, labels = _stomach_phantom()
    look = replace(draw_appearance(np.random.default_rng(1), 1.0), noise_hu=0.0, blur_mm=0.0, clip=False,
                   texture_hu={}, soft_tissue_shift=0.0)
    plain = apply_appearance(image, labels, SPACING, {11: 30.0, 2: 35.0}, look, torch.Generator().manual_seed(0),
                             source_thickness_mm=1.0)
    ctx = replace(look, hollow_fill={"content": "fluid", "hu": 5.0, "gas_fraction": 0.3, "wall_mm": 2.0},
                  fat_halo_mm=3.0, fat_hu=-90.0)
    out = apply_appearance(image, labels, SPACING, {11: 30.0, 2: 35.0}, ctx, torch.Generator().manual_seed(0),
                           source_thickness_mm=1.0)
    assert float(out[5, 7:11, 7:23].mean()) < -500 < float(plain[5, 7:11, 7:23].mean())  # anterior gas
    assert float(out[5, 31, 26]) < -50 < float(plain[5, 31, 26])  # fat beside the kidney


def test_cli_rejects_a_context_probability_outside_0_1(tmp_path):
    from AbdomenKDSegLib.cli import main

    with pytest.raises(InputError, match="--hollow-fill"):
        main(["--debug", "make-training-set", "--source-image", "a", "--source-labels", "b", "--targets", "c",
              "--out", str(tmp_path), "--hollow-fill", "1.5"])
    with pytest.raises(InputError, match="--fat-halo P"):
        main(["--debug", "make-training-set", "--source-image", "a", "--source-labels", "b", "--targets", "c",
              "--out", str(tmp_path), "--fat-halo-mm", "2-6"])
