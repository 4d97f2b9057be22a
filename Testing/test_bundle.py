"""Model bundles: round trip, checksum, architecture and format checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from AbdomenKDSegLib.bundle import default_bundle_path, load_bundle, read_bundle_metadata, tensors_sha256
from AbdomenKDSegLib.errors import BundleError
from AbdomenKDSegLib.networks import student_config

from engine_helpers import make_tiny_bundle


@pytest.fixture()
def tiny(tmp_path):
    return make_tiny_bundle(tmp_path / "tiny.safetensors", seed=1)


def test_round_trip_gives_identical_outputs(tiny, tmp_path):
    torch.manual_seed(1)
    from AbdomenKDSegLib.networks import build_network

    cfg = student_config(base_features=4, max_features=32)
    reference = build_network(cfg).eval()  # same seed as make_tiny_bundle -> same coarse weights
    bundle = load_bundle(tiny)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bundle.coarse(x), reference(x))
    assert not bundle.trained and bundle.metadata["architecture"]["coarse"] == cfg.to_dict()
    assert [entry["value"] for entry in bundle.metadata["labels"]] == list(range(1, 14))


def test_default_bundle_loads_and_has_a_model_card():
    path = default_bundle_path()
    assert path.is_file(), "the default model must ship with the module"
    header, card = read_bundle_metadata(path)
    assert card["architecture"]["coarse"]["mobile"] is True
    assert "trained" in card
    bundle = load_bundle(path)
    assert sum(p.numel() for p in bundle.coarse.parameters()) == pytest.approx(5.23e6, rel=0.01)


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_corrupt_bundle(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(BundleError, match="corrupt model bundle"):
        load_bundle(path)


def test_truncated_bundle(tiny):
    data = tiny.read_bytes()
    tiny.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(tiny)


def test_modified_weights_fail_the_checksum(tiny):
    data = bytearray(tiny.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor's bytes
    tiny.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(tiny)


def _rewrite(path, card_update=None, tensors_update=None, header_update=None):
    header, card = read_bundle_metadata(path)
    tensors = load_file(str(path))
    if card_update:
        card.update(card_update)
    if tensors_update:
        tensors = tensors_update(tensors)
    header = {**header, "metadata": json.dumps(card), "sha256": tensors_sha256(tensors), **(header_update or {})}
    save_file(tensors, str(path), metadata=header)


def test_architecture_mismatch(tiny):
    _, card = read_bundle_metadata(tiny)
    arch = card["architecture"]
    arch["fine"]["base_features"] = 8
    _rewrite(tiny, {"architecture": arch})
    with pytest.raises(BundleError, match="fine weights do not match the architecture"):
        load_bundle(tiny)


def test_invalid_architecture_and_foreign_label_table(tiny):
    _, card = read_bundle_metadata(tiny)
    arch = card["architecture"]
    arch["coarse"]["bogus"] = 1
    _rewrite(tiny, {"architecture": arch})
    with pytest.raises(BundleError, match="invalid coarse architecture"):
        load_bundle(tiny)
    arch["coarse"].pop("bogus")
    _rewrite(tiny, {"architecture": arch, "labels": [{"value": 1, "key": "liver", "name": "Liver"}]})
    with pytest.raises(BundleError, match="another label table"):
        load_bundle(tiny)


@pytest.mark.parametrize(
    "header, message",
    [({"format_version": "99"}, "format version"), ({"format": "other"}, "not an AbdomenKDSeg model bundle")],
)
def test_wrong_format_and_version(tiny, header, message):
    _rewrite(tiny, header_update=header)
    with pytest.raises(BundleError, match=message):
        load_bundle(tiny)


def test_missing_tensor_is_an_architecture_error(tiny):
    _rewrite(tiny, tensors_update=lambda t: {k: v for k, v in t.items() if not k.startswith("coarse.output")})
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tiny)
