"""CPU segmentation without PyTorch: a fresh process where ``import torch`` fails segments like PyTorch does.

The shim (a ``sitecustomize`` on PYTHONPATH setting ``sys.modules["torch"] = None``) makes torch
unimportable, and matplotlib too (the base install has neither); the CLI then runs the default model
from the ONNX graphs stored in the bundle with OpenVINO or ONNX Runtime, must not load the networks
module either, and writes the PNG preview with Pillow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenKDSegLib.engine.inference import Predictor
from AbdomenKDSegLib.runtimes import onnx_backend, openvino_backend

from engine_helpers import REPO

CT = REPO / "AbdomenKDSeg" / "Resources" / "Testing" / "ct-abdomen-6mm.nrrd"
SHIM = 'import sys\nsys.modules["torch"] = sys.modules["matplotlib"] = None  # their import raises ImportError\n'
DRIVER = """
import json, sys
from AbdomenKDSegLib.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m, mod in sys.modules.items()
                if mod is not None and (m.split(".")[0] in ("torch", "matplotlib") or m.endswith(".networks")))
print(json.dumps({"code": code, "loaded": loaded}))
"""


@pytest.fixture(scope="module")
def torch_labels() -> np.ndarray:
    labels, _ = Predictor(device="cpu", backend="torch").predict(sitk.ReadImage(str(CT)))
    return sitk.GetArrayFromImage(labels)


@pytest.mark.parametrize("backend", ["auto", "onnx"])
def test_cpu_segmentation_without_torch_equals_the_torch_backend(backend, tmp_path, torch_labels):
    if not (openvino_backend.available() if backend == "auto" else onnx_backend.available()):
        pytest.skip(f"needs {'openvino' if backend == 'auto' else 'onnxruntime'}")
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "sitecustomize.py").write_text(SHIM)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")]),
           "ABDOMENKDSEG_CACHE": str(tmp_path / "cache")}  # an empty cache: nothing exported is read
    env.pop("ABDOMENKDSEG_MODEL", None)
    out, png = tmp_path / "out.nii.gz", tmp_path / "out.png"
    proc = subprocess.run([sys.executable, "-c", DRIVER, "segment", str(CT), str(out), "--backend", backend, "-q",
                           "--preview", str(png)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "loaded": []}, report  # neither torch, matplotlib nor the networks module
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "preparing the CPU runtime" not in proc.stderr  # the stored graphs: no export
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.onnx"))
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert got.shape == torch_labels.shape and np.mean(got != torch_labels) < 1e-3  # near-ties only
