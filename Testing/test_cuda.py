"""The CUDA paths, run where a GPU is present (skipped otherwise): depthwise gradients against the
CPU's fast backward, the trained model on the GPU against the CPU, GPU memory reporting,
mixed-precision training with resume, the training pipeline and ``torchrun`` with NCCL on one GPU."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_training_loop import data_dir, synthetic_cases, tiny_recipe, weights_of  # noqa: F401 (fixture)

from AbdomenKDSegLib.engine.depthwise_conv import DepthwiseConv3d
from AbdomenKDSegLib.training.trainer import StageTrainer

from engine_helpers import SAMPLE_CT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_tf32():
    """Full fp32 convolutions and matrix products on the GPU (TF32 would differ by ~1e-3)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_depthwise_gradients_on_cuda_match_the_cpu_fast_backward(no_tf32):
    torch.manual_seed(0)
    conv = DepthwiseConv3d(8, 3)
    gpu_conv = copy.deepcopy(conv).cuda()
    x = torch.randn(2, 8, 12, 10, 14)
    g = torch.randn(2, 8, 12, 10, 14)
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    (conv(xc) * g).sum().backward()  # CPU: DepthwiseConv3dFunction's backward
    (gpu_conv(xg) * g.cuda()).sum().backward()  # CUDA: PyTorch's own
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu_conv.weight.grad.cpu(), conv.weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gpu_conv.bias.grad.cpu(), conv.bias.grad, rtol=1e-4, atol=1e-3)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def test_trained_model_on_cuda_agrees_with_the_cpu():
    """The bundled model, fp16 autocast on the GPU vs fp32 PyTorch on the CPU, on the real sample CT."""
    from AbdomenKDSegLib.engine.image_io import read_image
    from AbdomenKDSegLib.engine.inference import Predictor

    image = read_image(SAMPLE_CT)
    cpu, cpu_info = Predictor(device="cpu", backend="torch").predict(image)
    gpu, info = Predictor(device="cuda").predict(image)
    assert info.device == "cuda" and info.backend == "torch" and cpu_info.gpu_peak_mb is None
    assert 0 < info.gpu_peak_mb < 8192
    a, b = sitk.GetArrayFromImage(cpu), sitk.GetArrayFromImage(gpu)
    assert gpu.GetSize() == image.GetSize() and gpu.GetDirection() == image.GetDirection()
    disagree = float((a != b).mean())
    organs = [v for v in np.unique(a) if v]
    dices = {int(v): dice(a == v, b == v) for v in organs}
    print(f"CUDA vs CPU: {disagree:.2e} of voxels differ; per-organ DSC {dices}; GPU peak {info.gpu_peak_mb:.0f} MiB")
    assert len(organs) >= 8  # the trained model finds the organs of the sample
    assert disagree < 1e-4  # measured on an H200: 6.5e-6 (9 of 1.38 M voxels)
    assert min(dices.values()) > 0.999


def test_cuda_out_of_memory_retries_on_the_cpu():
    """A GPU too small for one window: a DeviceFallbackWarning, then PyTorch's CPU result."""
    from AbdomenKDSegLib.engine.image_io import read_image
    from AbdomenKDSegLib.engine.inference import DeviceFallbackWarning, Predictor

    image = read_image(SAMPLE_CT)
    expected, _ = Predictor(device="cpu", backend="torch").predict(image)
    predictor = Predictor(device="cuda")  # the weights (~40 MB) are on the GPU now
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 32 * 2**20) / total)
    try:
        with pytest.warns(DeviceFallbackWarning, match="CUDA ran out of memory; retrying on the CPU"):
            labels, info = predictor.predict(image)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert info.device == "cpu" and info.gpu_peak_mb is None and predictor.device == "cpu"
    a, b = sitk.GetArrayFromImage(expected), sitk.GetArrayFromImage(labels)
    assert (a != b).mean() < 1e-5


def test_segment_file_on_cuda_reports_gpu_memory(tmp_path, capsys):
    from AbdomenKDSegLib.cli import print_summary
    from AbdomenKDSegLib.engine.inference import segment_file

    result = segment_file(SAMPLE_CT, tmp_path / "seg.nii.gz", device="cuda")
    assert result.device == "cuda" and result.gpu_peak_mb > 0
    print_summary(result)
    assert f"GPU peak {result.gpu_peak_mb:.0f} MiB" in capsys.readouterr().out
    assert sitk.ReadImage(str(result.output_path)).GetSize() == sitk.ReadImage(str(SAMPLE_CT)).GetSize()


def test_mixed_precision_training_on_cuda_resumes(tmp_path):
    """AMP (GradScaler) on the GPU: finite losses, the weights move, and a run stopped at step 3 and
    resumed ends bitwise where the uninterrupted run ends (deterministic algorithms, as the pipeline sets)."""
    cases = synthetic_cases(tmp_path / "cache", 2, 2)
    recipe = tiny_recipe(checkpoint_every_steps=0)
    assert recipe.amp
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        def trainer(folder: Path) -> StageTrainer:
            return StageTrainer("coarse", recipe, cases["labeled"], cases["unlabeled"], folder,
                                torch.device("cuda"), progress=False)

        full = trainer(tmp_path / "full")
        assert full.use_amp
        full.start(resume=False)
        init = {k: v.cpu() for k, v in weights_of(full.nets).items()}
        assert full.run() is True and full.global_step == 8
        part = trainer(tmp_path / "part")
        part.start(resume=False)
        assert part.run(max_steps=3) is False
        resumed = trainer(tmp_path / "part")
        assert resumed.start(resume=True) is True and resumed.global_step == 3
        assert resumed.scaler.get_scale() == part.scaler.get_scale()
        assert resumed.run() is True and resumed.global_step == 8
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
    a, b = weights_of(full.nets), weights_of(resumed.nets)
    assert all(torch.isfinite(v).all() for v in a.values())
    assert any(not torch.equal(init[k], a[k].cpu()) for k in a)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"resume on CUDA: max |w_full - w_resumed| = {worst:.3g}")
    assert worst == 0.0  # (measured 0 on an H200)
    rows = (tmp_path / "part" / "steps.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 8


def test_training_pipeline_on_cuda_to_a_gpu_segmentation(data_dir, tmp_path):  # noqa: F811 (fixture)
    from AbdomenKDSegLib.engine.bundle import load_bundle
    from AbdomenKDSegLib.engine.inference import segment_file
    from AbdomenKDSegLib.training.pipeline import train

    result = train(tiny_recipe(), data_dir, tmp_path / "run", device="cuda", progress=False)
    assert result.completed and load_bundle(result.bundle).trained
    out = segment_file(data_dir / "imagesTr" / "ct3mm_0000.nii.gz", tmp_path / "seg.nii.gz",
                       model=result.bundle, device="cuda")
    assert out.device == "cuda"
    assert sitk.ReadImage(str(out.output_path)).GetSize() == sitk.ReadImage(str(SAMPLE_CT)).GetSize()


def test_torchrun_with_nccl_on_one_gpu(data_dir, tmp_path):  # noqa: F811 (fixture)
    """The documented multi-GPU launch (torchrun + NCCL), with one process on the one GPU."""
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_recipe().to_dict()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "AbdomenKDSeg"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          "-m", "AbdomenKDSegLib.training.cli", "--config", str(config), "--data", str(data_dir),
                          "--out", str(tmp_path / "run"), "--device", "cuda", "--quiet"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
