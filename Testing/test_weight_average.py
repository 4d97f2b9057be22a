"""Weight averaging of a continued student with its starting point (training/weight_average.py)."""

from __future__ import annotations

import pytest
import torch

from AbdomenKDSegLib.engine.networks import build_network, student_config
from AbdomenKDSegLib.errors import BundleError
from AbdomenKDSegLib.training.weight_average import average_into, average_state_dicts


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network(student_config(base_features=4, max_features=8, n_stages=3, encoder_blocks=[1, 1, 1]))


def test_average_is_the_weighted_mean_of_every_float_tensor_and_keeps_integer_buffers():
    start, run = _net(0), _net(1)
    a = {k: v.clone() for k, v in start.state_dict().items()}
    b = {k: v.clone() for k, v in run.state_dict().items()}
    mixed = average_state_dicts(a, b, 0.25)
    assert set(mixed) == set(b)
    floats = [k for k, v in b.items() if v.is_floating_point()]
    assert floats
    for key in floats:
        torch.testing.assert_close(mixed[key], 0.75 * a[key] + 0.25 * b[key])
    for key in set(b) - set(floats):
        assert torch.equal(mixed[key], b[key])
    # the inputs are not changed; the ends of the range give the networks themselves
    assert all(torch.equal(a[k], start.state_dict()[k]) for k in a)
    assert all(torch.equal(average_state_dicts(a, b, 1.0)[k], b[k]) for k in floats)
    assert all(torch.equal(average_state_dicts(a, b, 0.0)[k], a[k]) for k in floats)


def test_average_into_changes_the_run_network_and_its_output():
    start, run = _net(0), _net(1)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        before = run.eval()(x)
        average_into(run, start, 0.5)
        after = run(x)
    assert not torch.allclose(before, after)
    key = next(k for k, v in start.state_dict().items() if v.is_floating_point())
    torch.testing.assert_close(run.state_dict()[key], 0.5 * start.state_dict()[key] + 0.5 * _net(1).state_dict()[key])


def test_mismatched_networks_and_weights_are_refused_by_name():
    a, b = _net(0).state_dict(), _net(1).state_dict()
    key = next(iter(b))
    with pytest.raises(BundleError, match="different architectures"):
        average_state_dicts(a, {k: v for k, v in b.items() if k != key}, 0.5)
    weight = next(k for k, v in b.items() if v.ndim > 1)
    with pytest.raises(BundleError, match=f"cannot average {weight}"):
        average_state_dicts(a, {**b, weight: torch.zeros(2, 2)}, 0.5)
    with pytest.raises(BundleError, match=r"\[0, 1\]"):
        average_state_dicts(a, b, 1.5)
