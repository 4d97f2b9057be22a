"""The custom CPU backward of stride-1 depthwise 3D convolutions equals PyTorch's own gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from AbdomenKDSegLib.engine.depthwise_conv import DepthwiseConv3d, DepthwiseConv3dFunction, use_fast_backward
from AbdomenKDSegLib.engine.networks import DepthwiseSeparableConv3d, build_network, student_config


def _reference_grads(conv: DepthwiseConv3d, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    w = conv.weight.detach().clone().requires_grad_(True)
    b = conv.bias.detach().clone().requires_grad_(True)
    y = F.conv3d(x, w, b, stride=conv.stride, padding=conv.padding, groups=conv.groups)
    return (y, *torch.autograd.grad(y, (x, w, b), grad_out))


@pytest.mark.parametrize("batch,channels,shape", [(1, 4, (6, 5, 7)), (3, 2, (9, 4, 8))])
def test_gradients_equal_pytorch_reference(batch, channels, shape):
    torch.manual_seed(0)
    conv = DepthwiseConv3d(channels)
    x = torch.randn(batch, channels, *shape, requires_grad=True)
    assert use_fast_backward(x, conv)
    y = conv(x)
    assert y.grad_fn is not None and "DepthwiseConv3dFunction" in type(y.grad_fn).__name__
    grad_out = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, conv.weight, conv.bias), grad_out)
    y_ref, gx_ref, gw_ref, gb_ref = _reference_grads(conv, x, grad_out)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, gb_ref)


def test_gradcheck_in_double_precision():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 4, 6, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, 3, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(DepthwiseConv3dFunction.apply, (x, w, b))


def test_native_path_where_the_custom_backward_does_not_apply():
    conv = DepthwiseConv3d(4, stride=2)
    x = torch.randn(1, 4, 8, 8, 8, requires_grad=True)
    assert not use_fast_backward(x, conv)  # stride 2: PyTorch's backward is already fast
    conv1 = DepthwiseConv3d(4)
    with torch.no_grad():
        assert not use_fast_backward(x, conv1)  # inference
        torch.testing.assert_close(conv1(x), F.conv3d(x, conv1.weight, conv1.bias, padding=1, groups=4))


def test_student_uses_it_and_keeps_its_state_dict_keys():
    net = build_network(student_config(base_features=4, n_stages=3))
    convs = [m for m in net.modules() if isinstance(m, DepthwiseSeparableConv3d)]
    assert convs and all(isinstance(m.depthwise, DepthwiseConv3d) for m in convs)
    assert any(k.endswith("depthwise.weight") for k in net.state_dict())
    # one training step's gradients equal those of a copy running PyTorch's own depthwise backward
    torch.manual_seed(2)
    x = torch.randn(1, 1, 16, 16, 16)
    ref = build_network(student_config(base_features=4, n_stages=3))
    ref.load_state_dict(net.state_dict())
    for m in ref.modules():
        if isinstance(m, DepthwiseConv3d):
            m.forward = lambda inp, m=m: torch.nn.Conv3d.forward(m, inp)
    net(x).square().mean().backward()
    ref(x).square().mean().backward()
    for (name, a), (_, b) in zip(net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
