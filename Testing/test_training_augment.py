"""Augmentation "v4" (METHOD.md §3) in torch: identities, normalisation, sizes, axis caveat, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from AbdomenKDSegLib.engine.preprocess import clip_and_zscore
from AbdomenKDSegLib.training.augment import (
    AugmentV4,
    centre_pad,
    compose_theta,
    elastic_grid,
    gaussian_kernel1d,
    identity_grid,
    rotation_matrix,
)
from AbdomenKDSegLib.training.recipe import AugmentConfig

torch.set_num_threads(1)
OFF = dict(elastic_p=0.0, scale_p=0.0, rotate_p=0.0, noise_std_max=0.0, brightness_p=0.0)


def phantom(shape=(20, 16, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(-1000, 1000, shape, generator=g).float()
    label = torch.zeros(shape, dtype=torch.long)
    label[5:15, 4:12, 6:14] = 3
    label[8:12, 6:10, 8:12] = 7
    return image, label


def make(patch, seed=0, **cfg):
    return AugmentV4(AugmentConfig(**cfg), patch, (-300.0, 300.0), 14, 1e-5, torch.Generator().manual_seed(seed))


def test_all_off_is_crop_clip_zscore_and_one_hot():
    image, label = phantom()
    aug = make((20, 16, 20), pad_factor=1.0, **OFF)
    x, y = aug(image, label)
    assert x.shape == (1, 20, 16, 20) and y.shape == (14, 20, 16, 20)
    assert torch.allclose(x, clip_and_zscore(image[None], -300.0, 300.0), atol=1e-6)
    assert torch.equal(y.argmax(0), label)
    assert torch.allclose(y.sum(0), torch.ones(20, 16, 20), atol=1e-6)
    assert y.max() == pytest.approx(1.0) and y[0][label == 3].max() < 1e-6  # only +1e-7 on background


def test_identity_elastic_field_reproduces_the_volume():
    shape = (12, 10, 14)
    grid = elastic_grid(shape, torch.zeros(1, 3, 16, 16, 16), sigma=1.7)
    assert torch.allclose(grid, identity_grid(shape), atol=1e-6)
    vol = torch.randn(1, 2, *shape)
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    assert torch.allclose(out, vol, atol=1e-5)


def test_elastic_grid_is_rescaled_to_unit_range():
    g = torch.Generator().manual_seed(0)
    grid = elastic_grid((20, 16, 24), torch.rand(1, 3, 16, 16, 16, generator=g) * 2 - 1, sigma=2.0)
    flat = grid.reshape(-1, 3)
    assert torch.allclose(flat.min(0).values, -torch.ones(3)) and torch.allclose(flat.max(0).values, torch.ones(3))


def test_gaussian_kernel_size_and_normalisation():
    k = gaussian_kernel1d(1.5)
    assert k.numel() == 2 * int(4 * 1.5 + 0.5) + 1 == 13
    assert k.sum().item() == pytest.approx(1.0) and k.argmax().item() == 6


def test_rotations_are_proper():
    for axis in range(3):
        r = rotation_matrix(axis, 12.0)
        assert torch.allclose(r @ r.t(), torch.eye(3), atol=1e-6)
        assert torch.det(r).item() == pytest.approx(1.0, abs=1e-6)
        assert r[axis, axis].item() == pytest.approx(1.0)


def _hand_rotation(about: str, degrees: float) -> np.ndarray:
    """Rotation in affine_grid (x = X = W, y = Y = H, z = Z = D) coordinates, written out by hand."""
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    return {"W": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "H": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "D": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[about]


def test_rotation_composition_is_the_references_order():
    # reference: R(about D) R(about H) R(about W) S, i.e. the depth rotation outermost
    angles_xyz, scale_xyz = (11.0, -7.0, 13.0), (1.7, 0.9, 1.1)
    expected = (_hand_rotation("D", 13.0) @ _hand_rotation("H", -7.0) @ _hand_rotation("W", 11.0)
                @ np.diag(scale_xyz))
    got = compose_theta(angles_xyz, scale_xyz).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    reversed_order = (_hand_rotation("W", 11.0) @ _hand_rotation("H", -7.0) @ _hand_rotation("D", 13.0)
                      @ np.diag(scale_xyz))
    assert np.abs(got - reversed_order).max() > 1e-2  # the order matters for these angles


def test_drawn_theta_uses_the_reference_composition():
    aug = make((16, 8, 16), seed=5, scale_p=1.0, rotate_p=1.0)
    theta, diag, angles = aug._draw_theta()
    assert all(a != 0.0 for a in angles)
    np.testing.assert_allclose(theta.numpy(), compose_theta(angles, diag).numpy(), atol=1e-7)


def test_full_augmentation_soft_labels_stay_normalised_and_sizes_hold():
    image, label = phantom((24, 20, 24))
    aug = make((16, 8, 16), seed=3, elastic_p=1.0, scale_p=1.0, rotate_p=1.0, brightness_p=1.0)
    for _ in range(3):
        x, y = aug(image, label)
        assert x.shape == (1, 16, 8, 16) and y.shape == (14, 16, 8, 16)
        assert torch.isfinite(x).all() and (y >= 0).all()
        assert torch.allclose(y.sum(0), torch.ones(16, 8, 16), atol=1e-5)
        assert aug.last_params["padded_shape"] == (24, 20, 24)  # already >= round(1.25 * patch)
    assert "elastic_sigma" in aug.last_params and 1.5 <= aug.last_params["elastic_sigma"] <= 2.0


def test_small_volume_is_padded_to_125_percent_of_patch():
    image, label = phantom((10, 8, 10))
    aug = make((16, 8, 16), **OFF)
    x, y = aug(image, label)
    assert aug.last_params["padded_shape"] == (20, 10, 20)
    assert x.shape == (1, 16, 8, 16) and y.shape == (14, 16, 8, 16)


def test_unlabeled_case_has_no_target_and_patch_is_zscored():
    image, _ = phantom()
    x, y = make((16, 8, 16), seed=1, noise_std_max=0.0, brightness_p=0.0)(image, None)
    assert y is None
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def test_same_seed_same_output_and_generator_state_resumes():
    image, label = phantom()
    a, b = make((16, 8, 16), seed=5), make((16, 8, 16), seed=5)
    xa, ya = a(image, label)
    xb, yb = b(image, label)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    state = a.generator.get_state()
    x1, _ = a(image, label)
    a.generator.set_state(state)
    x2, _ = a(image, label)
    assert torch.equal(x1, x2)


def _extent(mask, axis):
    other = tuple(a for a in range(3) if a != axis)
    idx = torch.nonzero(mask.sum(dim=other) > 0)
    return int(idx.max() - idx.min() + 1)


@pytest.mark.parametrize("convention, squashed", [("reference", 2), ("labelled", 0)])
def test_scale_axis_caveat(convention, squashed):
    # a cube of label 1; the "z" factor U(0.5, 2) fixed at 2 (theta > 1 zooms out: the object halves)
    shape = (32, 32, 32)
    image = torch.zeros(shape)
    label = torch.zeros(shape, dtype=torch.long)
    label[8:24, 8:24, 8:24] = 1
    aug = make(shape, pad_factor=1.0, scale_p=1.0, scale_major=(2.0, 2.0), scale_minor=(1.0, 1.0),
               scale_axis=convention, elastic_p=0.0, rotate_p=0.0, noise_std_max=0.0, brightness_p=0.0)
    _, y = aug(image, label)
    mask = y.argmax(0) == 1
    extents = [_extent(mask, a) for a in range(3)]
    assert extents[squashed] in (8, 9)
    assert all(extents[a] == 16 for a in range(3) if a != squashed)


def test_centre_pad_is_symmetric():
    v = torch.ones(1, 3, 4, 5)
    out = centre_pad(v, (6, 4, 8), value=0.0)
    assert out.shape == (1, 6, 4, 8)
    assert out[0, 1:4, :, 1:6].eq(1).all() and out.sum() == 60


def test_config_is_dataclass_with_reference_values():
    cfg = AugmentConfig()
    assert dataclasses.asdict(cfg)["scale_major"] == (0.5, 2.0) and cfg.scale_minor == (0.8, 1.25)
    assert (cfg.elastic_p, cfg.scale_p, cfg.rotate_p, cfg.brightness_p) == (0.5, 0.5, 0.5, 0.5)
    assert cfg.rotate_deg == 15.0 and cfg.noise_std_max == 0.1 and cfg.brightness == (0.75, 1.25)
