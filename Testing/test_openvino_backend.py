"""Tests of AbdomenKDSegLib.runtimes.openvino_backend: OpenVINO gives PyTorch's probabilities and label maps.

Expectations are PyTorch's own eager results on the same weights (softmax of the network's logits)
and what the caches leave on disk. OpenVINO's oneDNN kernels sum in another order than PyTorch, so
probabilities agree within 1e-3 rather than bit for bit. Skipped as a whole when openvino is not
installed (``pip install -e '.[openvino]'``).
What both runtime backends share is tested on both in test_runtime_backends.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AbdomenKDSegLib.engine.inference import BACKENDS, Predictor
from AbdomenKDSegLib.engine.networks import build_network, student_config
from AbdomenKDSegLib.runtimes import openvino_backend

from engine_helpers import SAMPLE_CT, make_tiny_bundle, private_runtime_cache, tiny_student, torch_probabilities

pytestmark = pytest.mark.skipif(
    not openvino_backend.available(), reason="openvino is not installed (pip install -e '.[openvino]')"
)

TINY_WINDOW = (16, 16, 32)
SHA = "fedcba9876543210" * 4
#: Largest probability difference accepted against PyTorch (float32, other summation order).
TOLERANCE = 1e-3


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets an empty graph cache and one thread (the test machine has 2 shared cores)."""
    yield from private_runtime_cache(tmp_path, monkeypatch)


def test_repeated_calls_give_identical_results():
    """Intermediate memory is released after every call; the next call must not depend on it,
    and each call writes into its own array (an earlier result is never overwritten)."""
    net = tiny_student(seed=4)
    runner = openvino_backend.make_runner(net, TINY_WINDOW, SHA, "fine")
    x1, x2 = (torch.randn((1, 1) + TINY_WINDOW, generator=torch.Generator().manual_seed(s)) for s in (5, 6))
    first = runner(x1)
    kept = first.clone()
    second = runner(x2)
    torch.testing.assert_close(first, kept, atol=0, rtol=0)
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(runner(x1), first, atol=0, rtol=0)


@pytest.mark.slow
def test_real_size_student_window_matches_pytorch():
    """The paper's student (32..512 features, 5 stages) on one 96x64x96 window."""
    torch.manual_seed(0)
    net = build_network(student_config()).eval()
    window = (96, 64, 96)
    x = torch.randn((1, 1) + window, generator=torch.Generator().manual_seed(2))
    probs = openvino_backend.make_runner(net, window, None, "fine")(x)
    expected = torch_probabilities(net, x)
    assert (probs - expected).abs().max().item() < TOLERANCE
    assert (probs.argmax(dim=1) == expected.argmax(dim=1)).float().mean().item() > 0.9999


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.safetensors", seed=3)


def test_auto_backend_prefers_openvino_on_cpu(tiny_bundle):
    assert Predictor(tiny_bundle, device="cpu", backend="auto").backend == "openvino"
    assert Predictor(tiny_bundle, device="cpu", backend="onnx").backend == "onnx"
    assert Predictor(tiny_bundle, device="cpu", backend="torch").backend == "torch"
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        Predictor(tiny_bundle, device="cpu", backend="tensorrt")


def test_cli_offers_every_backend():
    from AbdomenKDSegLib.cli import build_parser

    args = build_parser().parse_args(["segment", "in.nii.gz", "out.nii.gz", "--backend", "openvino"])
    assert args.backend == "openvino"
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    option = next(a for a in sub.choices["segment"]._actions if "--backend" in a.option_strings)
    assert tuple(option.choices) == BACKENDS


def test_sample_ct_same_probabilities_as_pytorch(tiny_bundle):
    """Coarse sliding-window probabilities on the 3 mm sample CT, tiny random student, both backends."""
    image = sitk.ReadImage(str(SAMPLE_CT))
    ov_pred = Predictor(tiny_bundle, device="cpu", backend="openvino")
    torch_pred = Predictor(tiny_bundle, device="cpu", backend="torch")
    volume = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[:, :96, :96]
    p_ov = ov_pred.sliding_window_probabilities("coarse", volume)
    p_torch = torch_pred.sliding_window_probabilities("coarse", volume)
    assert p_ov.shape == p_torch.shape == (14,) + tuple(volume.shape)
    assert np.abs(p_ov - p_torch).max() < TOLERANCE


@pytest.mark.slow
def test_sample_ct_same_label_map_as_pytorch_with_the_bundled_model():
    """The bundled trained model on the sample CT: the label maps of both backends agree.

    (Random weights leave many near-ties between classes, where 1e-4 differences flip voxels;
    a trained model has few: 1 voxel of 1.38 M differed with the first trained model, 15 with the
    cpu_synthetic model, which is less confident on this non-contrast scan.)
    """
    image = sitk.ReadImage(str(SAMPLE_CT))
    labels_ov, info = Predictor(None, device="cpu", backend="openvino").predict(image)
    labels_torch, _ = Predictor(None, device="cpu", backend="torch").predict(image)
    a, b = sitk.GetArrayFromImage(labels_ov), sitk.GetArrayFromImage(labels_torch)
    assert info.device == "cpu" and a.shape == b.shape == tuple(reversed(image.GetSize()))
    assert len(np.unique(b)) > 10  # a real segmentation, not an all-background map
    assert np.count_nonzero(a != b) <= 5e-5 * a.size
