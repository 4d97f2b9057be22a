"""Shared helpers for the engine tests: data paths, tiny model bundles, small synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from AbdomenKDSegLib.engine.bundle import save_bundle
from AbdomenKDSegLib.engine.networks import build_network, student_config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SAMPLE_CT = DATA / "ct-abdomen-3mm" / "image.nii.gz"
SAMPLE_LABELS = DATA / "ct-abdomen-3mm" / "labels-flare13.nii.gz"
DICOM_DIR = DATA / "ct-upper-abdomen-dicom"
FLARE_LABELS = DATA / "flare22-labels"


def make_tiny_bundle(path: Path, seed: int = 0, base_features: int = 4, trained: bool = False,
                     metadata: dict | None = None) -> Path:
    """A bundle of two narrow random students (fast on CPU) with the real architecture family.

    ``metadata``: more model-card fields (they replace the defaults ``trained`` and ``description``).
    """
    torch.manual_seed(seed)
    cfg = student_config(base_features=base_features, max_features=8 * base_features)
    coarse, fine = build_network(cfg), build_network(cfg)
    card = {"trained": trained, "description": "tiny test bundle", **(metadata or {})}
    return save_bundle(path, coarse, fine, cfg, cfg, card)


def tiny_student(seed: int = 0) -> torch.nn.Module:
    """A 3-stage student of 4..16 features in eval mode: the CPU runtime backends' test network."""
    torch.manual_seed(seed)
    return build_network(student_config(base_features=4, max_features=16, n_stages=3)).eval()


def torch_probabilities(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PyTorch's eager softmax probabilities of ``net`` on ``x``: the reference for other runtimes."""
    with torch.inference_mode():
        return torch.softmax(net(x), dim=1)


def private_runtime_cache(tmp_path: Path, monkeypatch):  # noqa: ANN201 (generator)
    """Body of an autouse fixture: an empty graph cache per test and one torch thread meanwhile."""
    from AbdomenKDSegLib.runtimes import onnx_backend

    monkeypatch.setenv(onnx_backend.CACHE_ENV, str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_ct(size_xyz=(40, 36, 24), spacing=(2.0, 2.0, 3.0), seed: int = 0) -> sitk.Image:
    """A small CT-like phantom: air outside, a soft-tissue ellipsoid body with a brighter blob (HU)."""
    rng = np.random.default_rng(seed)
    x, y, z = size_xyz
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, z), np.linspace(-1, 1, y), np.linspace(-1, 1, x), indexing="ij")
    body = (xx / 0.9) ** 2 + (yy / 0.8) ** 2 < 1
    arr = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, body.shape)
    arr[((xx - 0.3) ** 2 + yy**2 + zz**2) < 0.15] = 120.0
    image = sitk.GetImageFromArray(arr.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-40.0, -30.0, 10.0))
    return image


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    """Size, spacing, origin and direction equal (floats to 1e-6)."""
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
