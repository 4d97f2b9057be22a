"""Tests of AbdomenKDSegLib.engine.networks: architecture (METHOD.md §1), parameter counts, init, FLOPs.

Expected values are computed independently here (analytic parameter / MAC formulas written from
METHOD.md) or taken from the paper / METHOD reference figures; full-width teachers are only built on
the "meta" device (no memory, no compute) and never run.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from AbdomenKDSegLib.engine import networks as N

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import flops  # noqa: E402  (benchmarks/flops.py: the FLOP accounting)

from AbdomenKDSegLib.errors import InputError

torch.set_num_threads(1)

CONFIGS = {"S": N.student_config, "T1": N.teacher1_config, "T2": N.teacher2_config}
TINY = [(4, 3), (8, 4), (6, 5)]  # (base_features, n_stages)


# --------------------------------------------------------------------------------------------------
# Independent analytic formulas (written from METHOD.md, not from networks.py)


def _block_conv_params(cin: int, cout: int, mobile: bool) -> int:
    if mobile:  # depthwise 3^3 (groups=cin, bias) + pointwise 1^3 (bias)
        return cin * 27 + cin + cin * cout + cout
    return cin * cout * 27 + cout


def analytic_params(cfg: N.NetworkConfig) -> int:
    feats = [min(cfg.base_features * 2**s, cfg.max_features) for s in range(cfg.n_stages)]
    blocks = cfg.encoder_blocks or [s + 1 for s in range(cfg.n_stages)]
    norm = lambda c: 2 * c  # noqa: E731  InstanceNorm3d affine
    total = cfg.in_channels * feats[0] * 27 + feats[0] + norm(feats[0])  # initial plain conv + IN
    cin = feats[0]
    for s, (cout, nb) in enumerate(zip(feats, blocks)):
        for b in range(nb):
            stride = 2 if (s > 0 and b == 0) else 1
            c_in = cin if b == 0 else cout
            total += _block_conv_params(c_in, cout, cfg.mobile) + norm(cout)
            total += _block_conv_params(cout, cout, cfg.mobile) + norm(cout)
            if stride != 1 or c_in != cout:
                total += c_in * cout + norm(cout)  # 1x1x1 projection, no bias
        cin = cout
    for s in range(cfg.n_stages - 2, -1, -1):
        cb, cs = feats[s + 1], feats[s]
        total += cb * cs * 8  # transposed k2 or resize-conv k2, both bias=False
        h = max(1, cs // cfg.se_reduction)
        total += cs * h + h + h * cs + cs  # SE: two Linear with bias
        total += _block_conv_params(2 * cs, cs, cfg.mobile) + norm(cs)
        total += _block_conv_params(cs, cs, cfg.mobile) + norm(cs)
    return total + feats[0] * cfg.num_classes  # output 1^3 conv, no bias


def analytic_conv_macs(cfg: N.NetworkConfig, zyx: tuple) -> int:
    """Multiply-accumulates of all convs (incl. transposed / resize-conv) and SE Linear layers for one
    (1, 1, *zyx) input; norms, activations, biases and pooling are not MACs."""
    feats = [min(cfg.base_features * 2**s, cfg.max_features) for s in range(cfg.n_stages)]
    blocks = cfg.encoder_blocks or [s + 1 for s in range(cfg.n_stages)]
    vox = [math.prod(zyx) // 8**s for s in range(cfg.n_stages)]

    def bconv(cin: int, cout: int, out_vox: int) -> int:
        if cfg.mobile:
            return out_vox * (cin * 27 + cin * cout)
        return out_vox * cin * cout * 27

    macs = vox[0] * cfg.in_channels * feats[0] * 27
    cin = feats[0]
    for s, (cout, nb) in enumerate(zip(feats, blocks)):
        for b in range(nb):
            c_in = cin if b == 0 else cout
            macs += bconv(c_in, cout, vox[s]) + bconv(cout, cout, vox[s])
            if (s > 0 and b == 0) or c_in != cout:
                macs += vox[s] * c_in * cout
        cin = cout
    for s in range(cfg.n_stages - 2, -1, -1):
        cb, cs = feats[s + 1], feats[s]
        # transposed conv: per input voxel cb*cs*8; resize-conv: per output voxel cb*cs*8
        macs += (vox[s + 1] if cfg.upsampling == "transposed" else vox[s]) * cb * cs * 8
        macs += 2 * (2 * cs * max(1, cs // cfg.se_reduction))  # SE (2 Linear) applied twice
        macs += bconv(2 * cs, cs, vox[s]) + bconv(cs, cs, vox[s])
    return macs + vox[0] * feats[0] * cfg.num_classes


def _meta_build(cfg: N.NetworkConfig) -> nn.Module:
    with torch.device("meta"):
        return N.build_network(cfg)


# --------------------------------------------------------------------------------------------------
# Parameter counts


def test_full_width_parameter_counts_match_method_reference():
    counts = {k: N.count_parameters(_meta_build(f())) for k, f in CONFIGS.items()}
    print("\nparameter counts:", {k: f"{v} ({v / 1e6:.3f} M)" for k, v in counts.items()})
    assert abs(counts["S"] / 5.23e6 - 1) < 0.01
    assert abs(counts["T1"] / 92.06e6 - 1) < 0.01
    assert counts["T1"] == counts["T2"]
    for k, f in CONFIGS.items():
        assert counts[k] == analytic_params(f()), k
    # paper: 189.3 M trained in total
    assert abs(sum(counts.values()) / 189.3e6 - 1) < 0.01


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("base,n_stages", TINY)
def test_tiny_parameter_counts_match_analytic(kind, base, n_stages):
    cfg = CONFIGS[kind](base_features=base, n_stages=n_stages)
    assert N.count_parameters(N.build_network(cfg)) == analytic_params(cfg)


def test_encoder_blocks_and_max_features_change_structure():
    cfg = N.teacher1_config(base_features=8, n_stages=4, encoder_blocks=[1, 1, 2, 1], max_features=32)
    net = N.build_network(cfg)
    assert [len(stage) for stage in net.encoder] == [1, 1, 2, 1]
    assert cfg.stage_features == [8, 16, 32, 32]
    assert N.count_parameters(net) == analytic_params(cfg)


# --------------------------------------------------------------------------------------------------
# Structure details


def test_student_structure_mobile_convs_and_plain_layers():
    net = N.build_network(N.student_config(base_features=8, n_stages=3))
    assert type(net.initial.conv) is nn.Conv3d and net.initial.conv.bias is not None
    first = net.encoder[1][0]
    assert isinstance(first.conv1, N.DepthwiseSeparableConv3d)
    dw, pw = first.conv1.depthwise, first.conv1.pointwise
    assert dw.stride == (2, 2, 2) and dw.groups == dw.in_channels == 8 and dw.out_channels == 8
    assert dw.kernel_size == (3, 3, 3) and dw.bias is not None
    assert pw.stride == (1, 1, 1) and pw.kernel_size == (1, 1, 1) and pw.bias is not None
    proj = first.shortcut[0]
    assert type(proj) is nn.Conv3d and proj.kernel_size == (1, 1, 1) and proj.stride == (2, 2, 2)
    assert proj.bias is None and isinstance(first.shortcut[1], nn.InstanceNorm3d)
    assert isinstance(net.encoder[0][0].shortcut, nn.Identity)  # stage 0: stride 1, 8 -> 8
    assert isinstance(net.encoder[1][1].shortcut, nn.Identity)
    for up in net.upsample:
        assert isinstance(up, nn.ConvTranspose3d) and up.bias is None and up.stride == (2, 2, 2)
    assert net.output.bias is None and net.output.kernel_size == (1, 1, 1)
    for m in net.modules():
        if isinstance(m, nn.InstanceNorm3d):
            assert m.affine and m.eps == 1e-5
        if isinstance(m, nn.LeakyReLU):
            assert m.negative_slope == 0.01


def test_teacher_structure_plain_convs_and_upsampling():
    t1 = N.build_network(N.teacher1_config(base_features=8, n_stages=3))
    t2 = N.build_network(N.teacher2_config(base_features=8, n_stages=3))
    assert not any(isinstance(m, N.DepthwiseSeparableConv3d) for m in t1.modules())
    conv1 = t1.encoder[2][0].conv1
    assert type(conv1) is nn.Conv3d and conv1.stride == (2, 2, 2) and conv1.bias is not None
    assert all(isinstance(u, nn.ConvTranspose3d) for u in t1.upsample)
    assert all(isinstance(u, N.ResizeConv3d) for u in t2.upsample)
    assert all(u.conv.kernel_size == (2, 2, 2) and u.conv.bias is None for u in t2.upsample)
    assert len(t1.upsample) == len(t1.se) == len(t1.decoder) == 2


def test_resize_conv_is_trilinear_x2_then_right_padded_kernel2_conv():
    torch.manual_seed(0)
    rc = N.ResizeConv3d(3, 2)
    x = torch.randn(1, 3, 3, 4, 5)
    up = F.interpolate(x, size=(6, 8, 10), mode="trilinear", align_corners=True)
    expected = F.conv3d(F.pad(up, (0, 1, 0, 1, 0, 1)), rc.conv.weight)
    assert torch.allclose(rc(x), expected, atol=1e-5)
    # identical to PyTorch's Conv3d(kernel 2, padding='same') (METHOD's wording)
    same = nn.Conv3d(3, 2, 2, padding="same", bias=False)
    same.weight.data.copy_(rc.conv.weight)
    with pytest.warns(UserWarning, match="same"):
        assert torch.allclose(rc(x), same(up), atol=1e-5)
    # align_corners=True keeps the corner values of the input
    assert torch.allclose(up[..., 0, 0, 0], x[..., 0, 0, 0])
    assert torch.allclose(up[..., -1, -1, -1], x[..., -1, -1, -1])


def test_residual_se_formula():
    torch.manual_seed(0)
    se = N.ResidualSE(16, 8)
    lin1, lin2 = se.fc[0], se.fc[2]
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (16, 2, 16)
    x = torch.randn(2, 16, 3, 4, 5)
    m = x.mean(dim=(2, 3, 4))
    s = torch.relu(F.linear(F.leaky_relu(F.linear(m, lin1.weight, lin1.bias), 0.01), lin2.weight, lin2.bias))
    assert torch.allclose(se(x), x * s[:, :, None, None, None] + x, atol=1e-6)


def test_same_se_instance_applied_to_upsampled_and_skip():
    net = N.build_network(N.student_config(base_features=8, n_stages=4))
    assert sum(isinstance(m, N.ResidualSE) for m in net.modules()) == 3
    calls = {i: [] for i in range(3)}
    hooks = [se.register_forward_hook(lambda m, i, o, k=k: calls[k].append(tuple(i[0].shape)))
             for k, se in enumerate(net.se)]
    with torch.no_grad():
        net(torch.randn(1, 1, 16, 8, 16))
    for h in hooks:
        h.remove()
    # deepest level first: C_skip 32 at 1/4 size, then 16 at 1/2, then 8 at full size
    for k, (c, f) in enumerate([(32, 4), (16, 2), (8, 1)]):
        assert calls[k] == [(1, c, 16 // f, 8 // f, 16 // f)] * 2


# --------------------------------------------------------------------------------------------------
# Forward / backward


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("base,n_stages", TINY)
def test_tiny_forward_shapes_and_backward(kind, base, n_stages):
    torch.manual_seed(0)
    net = N.build_network(CONFIGS[kind](base_features=base, n_stages=n_stages, num_classes=5))
    d = 2 ** (n_stages - 1)
    x = torch.randn(2, 1, d, 2 * d, d)
    y = net(x)
    assert y.shape == (2, 5, d, 2 * d, d) and torch.isfinite(y).all()
    y.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing
    assert net.initial.conv.weight.grad.abs().sum() > 0


def test_inference_mode_and_channels_last_3d_match():
    torch.manual_seed(0)
    for f in CONFIGS.values():
        net = N.build_network(f(base_features=4, n_stages=3)).eval()
        x = torch.randn(1, 1, 8, 12, 16)
        with torch.inference_mode():
            a = net(x)
            b = net(x.contiguous(memory_format=torch.channels_last_3d))
            net_cl = net.to(memory_format=torch.channels_last_3d)
            c = net_cl(x.contiguous(memory_format=torch.channels_last_3d))
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)


def test_invalid_input_sizes_raise():
    net = N.build_network(N.student_config(base_features=4, n_stages=4))
    with pytest.raises(InputError, match=r"20"):
        net(torch.zeros(1, 1, 16, 20, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.zeros(1, 1, 12, 16, 16))
    with pytest.raises(ValueError, match="shape"):
        net(torch.zeros(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="shape"):
        net(torch.zeros(1, 16, 16, 16))


# --------------------------------------------------------------------------------------------------
# Init


def test_xavier_normal_init_on_convs_defaults_elsewhere():
    torch.manual_seed(0)
    net = N.build_network(N.student_config())  # full-width student, 5.2 M params
    pw = net.encoder[4][1].conv1.pointwise.weight  # 512 x 512 x 1^3
    expected = math.sqrt(2.0 / (512 + 512))
    assert abs(pw.std().item() / expected - 1) < 0.02 and abs(pw.mean().item()) < 0.05 * expected
    dw = net.encoder[4][1].conv1.depthwise.weight  # 512 x 1 x 3^3: fan_in 27, fan_out 512*27
    assert abs(dw.std().item() / math.sqrt(2.0 / (27 + 512 * 27)) - 1) < 0.05
    for m in net.modules():
        if isinstance(m, nn.Conv3d) and m.bias is not None:
            assert torch.all(m.bias == 0)
    # ConvTranspose3d keeps kaiming_uniform(a=sqrt(5)): U(-b, b), b = 1/sqrt(fan_in), fan_in = C_out*8
    up = net.upsample[0].weight  # (512, 256, 2, 2, 2)
    bound = 1 / math.sqrt(256 * 8)
    assert up.abs().max().item() <= bound
    assert abs(up.std().item() / (bound / math.sqrt(3)) - 1) < 0.02
    # resize-conv conv gets Xavier: (out, in, 2, 2, 2)
    t2 = N.build_network(N.teacher2_config(base_features=16, n_stages=3))
    w = t2.upsample[0].conv.weight  # (C_skip=32, C_below=64, 2, 2, 2)
    assert abs(w.std().item() / N.xavier_normal_std(w) - 1) < 0.05
    assert abs(N.xavier_normal_std(w) - math.sqrt(2.0 / (64 * 8 + 32 * 8))) < 1e-12


# --------------------------------------------------------------------------------------------------
# Config


def test_config_round_trip_and_errors():
    cfg = N.student_config(base_features=8, n_stages=3, encoder_blocks=[1, 2, 1])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert N.NetworkConfig.from_dict(d) == cfg
    assert d["mobile"] is True and d["upsampling"] == "transposed"
    assert N.teacher2_config().to_dict()["upsampling"] == "resize"
    assert N.teacher1_config().mobile is False and N.teacher1_config().upsampling == "transposed"
    with pytest.raises(ValueError, match="bogus_key"):
        N.NetworkConfig.from_dict({**d, "bogus_key": 1})
    with pytest.raises(ValueError, match="upsampling"):
        N.NetworkConfig(upsampling="nearest")
    with pytest.raises(ValueError, match="encoder_blocks"):
        N.NetworkConfig(n_stages=3, encoder_blocks=[1, 2])
    with pytest.raises(ValueError, match="n_stages"):
        N.NetworkConfig(n_stages=1)


# --------------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_measure_flops_matches_analytic_conv_macs(kind):
    cfg = CONFIGS[kind](base_features=8, n_stages=4)
    net = _meta_build(cfg)
    assert flops.measure_flops(net, (1, 1, 16, 8, 24)) == 2 * analytic_conv_macs(cfg, (16, 8, 24))


def test_student_test_time_flops_vs_paper():
    r = flops.student_test_time_flops()
    expected_window = 2 * analytic_conv_macs(N.student_config(), (96, 64, 96))
    assert r["flops_per_window"] == expected_window
    assert r["flops_total"] == 3 * expected_window
    print(
        f"\nstudent test-time (2 coarse + 1 fine windows of 96x64x96): {r['flops_total']} FLOPs "
        f"= {r['gflops_total']:.2f} GFLOPs = {r['gmacs_total']:.2f} GMACs; "
        f"one 96^3 input: {r['gmacs_single_96cube']:.3f} GMACs; paper (ptflops): {r['paper_g']} G"
    )
    assert 10 < r["gmacs_total"] < 200  # generous: depends on counting convention
    # The paper's 21.7 G equals the conv MACs of one 96x96x96 input (ptflops reports MACs).
    assert abs(r["gmacs_single_96cube"] - 21.7) < 0.1


# --------------------------------------------------------------------------------------------------
# Export friendliness


def test_torch_export_and_onnx_of_tiny_student():
    net = N.build_network(N.student_config(base_features=4, n_stages=3)).eval()
    x = torch.randn(1, 1, 8, 8, 12)
    ep = torch.export.export(net, (x,))
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), net(x), atol=1e-5)
    pytest.importorskip("onnx")
    buf = io.BytesIO()
    torch.onnx.export(net, (x,), buf, dynamo=False, input_names=["image"], output_names=["logits"])
    assert len(buf.getvalue()) > 1000
