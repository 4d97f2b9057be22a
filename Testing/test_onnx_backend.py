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


def test_stored_graphs_keep_weights_and_card_and_run_without_export(tmp_path, monkeypatch):
    """embed_graphs: the same tensors and card plus the weight-less graphs; the graph completed from the
    bundle's own weights gives PyTorch's probabilities, and nothing is exported."""
    from AbdomenKDSegLib.engine.bundle import GRAPH_PREFIX, load_bundle, verify_bundle
    from AbdomenKDSegLib.runtimes import bundle_graphs

    plain = make_tiny_bundle(tmp_path / "tiny.safetensors", seed=3)
    stored = bundle_graphs.embed_graphs(plain, tmp_path / "stored.safetensors")
    _, card_a, tensors_a = verify_bundle(plain)
    _, card_b, tensors_b = verify_bundle(stored)
    assert card_a == card_b and set(tensors_b) - set(tensors_a) == {
        f"{GRAPH_PREFIX}{s}{w}" for s in ("coarse", "fine") for w in ("", ".weights")}
    assert all(tensors_a[k].tobytes() == tensors_b[k].tobytes() for k in tensors_a)
    bundle = load_bundle(stored)
    assert bundle_graphs.weight_names(bundle, "coarse")  # the weights are not stored twice
    assert len(bundle.graph("coarse")) < sum(v.nbytes for v in bundle.stage_tensors("coarse").values())

    def no_export(*args, **kwargs):
        raise AssertionError("a stored graph must not be exported")

    monkeypatch.setattr(onnx_backend, "export_onnx", no_export)
    predictor = Predictor(bundle, device="cpu", backend="onnx")
    window = bundle.preprocessing.window_zyx
    x = np.random.default_rng(0).normal(size=(1, 1) + tuple(window)).astype(np.float32)
    got = predictor.runners["coarse"](x)
    expected = torch_probabilities(load_bundle(plain).coarse, torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4
