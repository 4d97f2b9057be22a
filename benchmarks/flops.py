"""Parameter and FLOP table for the student (S) and the teachers (T1, T2); writes JSON.

Networks are built on the "meta" device, so nothing is computed and the script takes seconds.
Two counting conventions are reported, both in multiply-accumulates (MACs):

* ``conv_gmacs``: torch FlopCounterMode / 2 (convs, transposed convs and SE Linear layers only);
* ``ptflops_like_gmacs``: emulation of ptflops' module hooks (the paper's tool): conv MACs plus
  conv biases, InstanceNorm (2 per element, affine), LeakyReLU/ReLU (1 per element) and Linear.

Usage: python benchmarks/flops.py [--out benchmarks/results/flops.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from AbdomenKDSegLib.engine.networks import (
    build_network,
    count_parameters,
    student_config,
    teacher1_config,
    teacher2_config,
)
from AbdomenKDSegLib.engine.preprocess import Preprocessing

SHAPES = {"window_96x64x96": (1, 1, 96, 64, 96), "cube_96": (1, 1, 96, 96, 96)}

# Paper (Table 5 / text): student 21.7 G "FLOPs" for coarse + fine inference, counted with ptflops.
PAPER_STUDENT_GFLOPS = 21.7


def _module_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def measure_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on a zero input of input_shape (B, C, Z, Y, X).

    Uses torch.utils.flop_counter.FlopCounterMode, which counts only matmul/conv-like ops
    (2 FLOPs per multiply-accumulate; norms, activations, biases, SE pooling not counted).
    Works with a model on the "meta" device (no real compute).
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(tuple(int(n) for n in input_shape), device=_module_device(model))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def student_test_time_flops(model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """FLOPs of the student at test time: two coarse windows + one fine window of (1, 1, 96, 64, 96).

    The coarse 96^3 volume gives 2 sliding windows of 96x64x96 (50% overlap along Y); the fine crop is
    one window. If model is None a full-width student is built on the meta device (no real compute).
    FlopCounterMode counts 2 FLOPs per multiply-accumulate (conv/matmul only); ptflops, which the paper
    used, reports MACs. The paper's 21.7 G equals the conv MACs of ONE 96x96x96 input (also returned,
    as ``gmacs_single_96cube``), not of the three test-time windows.
    """
    if model is None:
        with torch.device("meta"):
            model = build_network(student_config())
    shape: Tuple[int, ...] = (1, 1) + tuple(Preprocessing().window_zyx)
    per_window = measure_flops(model, shape)
    cube = measure_flops(model, (1, 1, 96, 96, 96))
    n_windows = 3
    total = per_window * n_windows
    return {
        "window_shape": list(shape),
        "n_windows": n_windows,
        "flops_per_window": per_window,
        "flops_total": total,
        "macs_total": total // 2,
        "gflops_total": total / 1e9,
        "gmacs_total": total / 2e9,
        "flops_single_96cube": cube,
        "gmacs_single_96cube": cube / 2e9,
        "paper_g": PAPER_STUDENT_GFLOPS,
    }


def ptflops_like_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs counted the way ptflops' pytorch hooks count them (conv on output voxels, deconv on input)."""
    total = [0]

    def hook(m: nn.Module, inputs, out) -> None:
        x = inputs[0]
        if isinstance(m, nn.Conv3d):
            vox = out.shape[0] * math.prod(out.shape[2:])
            total[0] += math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups) * vox
            total[0] += m.out_channels * vox if m.bias is not None else 0
        elif isinstance(m, nn.ConvTranspose3d):
            vox = x.shape[0] * math.prod(x.shape[2:])
            total[0] += math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups) * vox
        elif isinstance(m, nn.InstanceNorm3d):
            total[0] += x.numel() * (2 if m.affine else 1)
        elif isinstance(m, (nn.LeakyReLU, nn.ReLU)):
            total[0] += out.numel()
        elif isinstance(m, nn.Linear):
            total[0] += x.numel() * m.out_features + (m.out_features if m.bias is not None else 0)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def network_rows() -> Dict[str, Dict[str, object]]:
    rows: Dict[str, Dict[str, object]] = {}
    for name, make in (("S", student_config), ("T1", teacher1_config), ("T2", teacher2_config)):
        with torch.device("meta"):
            net = build_network(make())
        row: Dict[str, object] = {"params": count_parameters(net), "config": make().to_dict()}
        for key, shape in SHAPES.items():
            row[f"{key}_conv_gmacs"] = measure_flops(net, shape) / 2e9
            row[f"{key}_ptflops_like_gmacs"] = ptflops_like_macs(net, shape) / 1e9
        rows[name] = row
    return rows


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/flops.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = network_rows()
    test_time = student_test_time_flops()
    heads = [f"{k} {c}" for k in SHAPES for c in ("conv", "ptfl")]
    print(f"{'net':<4} {'params':>12} " + " ".join(f"{h:>26}" for h in heads) + "   (GMACs)")
    for name, row in rows.items():
        vals = " ".join(
            f"{row[f'{k}_{c}_gmacs']:>26.3f}" for k in SHAPES for c in ("conv", "ptflops_like")
        )
        print(f"{name:<4} {row['params']:>12,d} {vals}")
    train_sum = sum(r["window_96x64x96_conv_gmacs"] for r in rows.values())
    print(f"training S+T1+T2 on one 96x64x96 patch: {train_sum:.1f} GMACs (paper: 443.1 G)")
    print(
        f"student test time, 2 coarse + 1 fine windows: {test_time['gmacs_total']:.2f} GMACs "
        f"({test_time['gflops_total']:.2f} GFLOPs); one 96^3 input: {test_time['gmacs_single_96cube']:.3f} "
        f"GMACs; paper: {PAPER_STUDENT_GFLOPS} G"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"networks": rows, "student_test_time": test_time, "training_sum_window_gmacs": train_sum}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
