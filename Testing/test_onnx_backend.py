"""Tests of AbdomenKDSegLib.runtimes.onnx_backend: ONNX Runtime gives PyTorch's probabilities and label maps.

Expectations are PyTorch's own eager results on the same weights (softmax of the network's logits),
and cache behaviour observable on disk. Skipped as a whole when onnxruntime is not installed
(``pip install -e '.[onnx]'``).
What both runtime backends share is tested on both in test_runtime_backends.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AbdomenKDSegLib.engine.inference import Predictor
from AbdomenKDSegLib.engine.networks import build_network, student_config
from AbdomenKDSegLib.runtimes import onnx_backend

from engine_helpers import SAMPLE_CT, make_tiny_bundle, private_runtime_cache, tiny_student, torch_probabilities

pytestmark = pytest.mark.skipif(
    not onnx_backend.available(), reason="onnxruntime is not installed (pip install -e '.[onnx]')"
)

TINY_WINDOW = (16, 16, 32)
SHA = "0123456789abcdef" * 4


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets an empty graph cache and one thread (the test machine has 2 shared cores)."""
    yield from private_runtime_cache(tmp_path, monkeypatch)


def test_available_is_true_when_onnxruntime_imports():
    assert onnx_backend.available() is True


@pytest.mark.slow
def test_real_size_student_window_matches_pytorch():
    """The paper's student (32..512 features, 5 stages) on one 96x64x96 window."""
    torch.manual_seed(0)
    net = build_network(student_config()).eval()
    window = (96, 64, 96)
    x = torch.randn((1, 1) + window, generator=torch.Generator().manual_seed(2))
    probs = onnx_backend.make_runner(net, window, None, "fine")(x)
    assert (probs - torch_probabilities(net, x)).abs().max().item() < 1e-4


def test_cache_key_separates_stage_window_and_weights():
    names = {
        onnx_backend.cache_name(SHA, "coarse", (96, 64, 96)),
        onnx_backend.cache_name(SHA, "fine", (96, 64, 96)),
        onnx_backend.cache_name(SHA, "coarse", (96, 96, 96)),
        onnx_backend.cache_name("f" * 64, "coarse", (96, 64, 96)),
    }
    assert len(names) == 4
    assert torch.__version__.replace("+", "_") in onnx_backend.cache_name(SHA, "coarse", (96, 64, 96))


def test_no_hash_means_no_cache_file():
    net = tiny_student()
    onnx_backend.make_runner(net, TINY_WINDOW, None, "coarse")(torch.randn((1, 1) + TINY_WINDOW))
    assert not onnx_backend.cache_dir().exists() or not list(onnx_backend.cache_dir().iterdir())


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.safetensors", seed=3)


def test_auto_backend_picks_onnx_on_cpu_without_openvino(tiny_bundle, monkeypatch):
    from AbdomenKDSegLib.runtimes import openvino_backend

    monkeypatch.setattr(openvino_backend, "available", lambda: False)
    assert Predictor(tiny_bundle, device="cpu", backend="auto").backend == "onnx"
    assert Predictor(tiny_bundle, device="cpu", backend="torch").backend == "torch"


def test_sample_ct_same_probabilities_and_labels_as_pytorch(tiny_bundle):
    """Whole pipeline on the 3 mm sample CT with a tiny random student bundle, both backends."""
    image = sitk.ReadImage(str(SAMPLE_CT))
    onnx_pred = Predictor(tiny_bundle, device="cpu", backend="onnx")
    torch_pred = Predictor(tiny_bundle, device="cpu", backend="torch")
    assert (onnx_pred.backend, torch_pred.backend) == ("onnx", "torch")

    volume = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[:, :96, :96]
    p_onnx = onnx_pred.sliding_window_probabilities("coarse", volume)
    p_torch = torch_pred.sliding_window_probabilities("coarse", volume)
    assert p_onnx.shape == p_torch.shape == (14,) + tuple(volume.shape)
    assert np.abs(p_onnx - p_torch).max() < 1e-4

    labels_onnx, _ = onnx_pred.predict(image)
    labels_torch, _ = torch_pred.predict(image)
    a, b = sitk.GetArrayFromImage(labels_onnx), sitk.GetArrayFromImage(labels_torch)
    assert a.shape == b.shape == tuple(reversed(image.GetSize()))
    # Random weights can leave near-ties between classes: allow a tiny fraction of flipped voxels.
    assert np.mean(a != b) < 1e-3
