"""Model bundles: round trip, checksum (weights and model card), architecture and format checks."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from AbdomenKDSegLib.engine.bundle import (
    FORMAT,
    FORMAT_VERSION,
    bundle_sha256,
    default_bundle_path,
    load_bundle,
    read_bundle_metadata,
    tensors_sha256,
    upgrade_bundle,
    verify_bundle,
)
from AbdomenKDSegLib.engine.networks import student_config
from AbdomenKDSegLib.errors import BundleError

from engine_helpers import REPO, make_tiny_bundle


@pytest.fixture()
def tiny(tmp_path):
    return make_tiny_bundle(tmp_path / "tiny.safetensors", seed=1)


def test_round_trip_gives_identical_outputs(tiny, tmp_path):
    torch.manual_seed(1)
    from AbdomenKDSegLib.engine.networks import build_network

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


def test_shipped_bundle_is_format_2_verified_over_weights_and_card():
    path = default_bundle_path()
    header, card, tensors = verify_bundle(path)
    assert header["format_version"] == "2"
    assert header["sha256"] == bundle_sha256(tensors, card) == load_bundle(path).sha256
    assert {t.dtype for t in tensors.values() if t.dtype.kind == "f"} == {np.dtype(np.float16)}  # shipped as fp16
    assert 19e6 < path.stat().st_size < 23e6  # the stored graphs add ~0.14 MB, not a second copy of the weights
    bundle = load_bundle(path)
    assert all(bundle.graph(stage) for stage in ("coarse", "fine"))  # CPU runs need no PyTorch


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
    header = {**header, "metadata": json.dumps(card), "sha256": bundle_sha256(tensors, card),
              **(header_update or {})}
    save_file(tensors, str(path), metadata=header)


def _edit_header_strings(path, edit):
    """Rewrite the safetensors header of ``path`` in place (``edit`` changes its ``__metadata__``
    dict), keeping the tensor bytes: what a hand edit of the model card does."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    edit(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size:])


def _edit_card(path, edit):
    def change(strings):
        card = json.loads(strings["metadata"])
        edit(card)
        strings["metadata"] = json.dumps(card, indent=1)
    _edit_header_strings(path, change)


def test_edited_model_card_fails_the_checksum(tiny):
    """Issue 14: a card edited in the header (the HU window changes the result) is refused like
    modified weights, for every part of the card."""
    header, original = read_bundle_metadata(tiny)
    _edit_card(tiny, lambda card: card["preprocessing"].__setitem__("hu_window", [-1000.0, 1000.0]))
    assert read_bundle_metadata(tiny)[0]["sha256"] == header["sha256"]  # the recorded checksum is unchanged
    with pytest.raises(BundleError, match=r"failed its checksum.*modified \(its model card or weights\)"):
        load_bundle(tiny)
    for edit in (lambda card: card["labels"][0].__setitem__("name", "Lever"),
                 lambda card: card["architecture"]["fine"].__setitem__("se_reduction", 4),
                 lambda card: card.__setitem__("description", "a clinical model")):
        _edit_card(tiny, lambda card: (card.clear(), card.update(json.loads(json.dumps(original)))))
        load_bundle(tiny)  # back to the original content: verifies again
        _edit_card(tiny, edit)
        with pytest.raises(BundleError, match="checksum"):
            verify_bundle(tiny)


def test_checksum_covers_card_content_not_its_layout(tiny):
    """The card is hashed canonically: re-serialising the same content (indentation, key order)
    still verifies; the checksum is the bundle's identity and differs with the card."""
    before = load_bundle(tiny).sha256
    _edit_card(tiny, lambda card: None)  # same content, other whitespace
    assert load_bundle(tiny).sha256 == before
    header, card, tensors = verify_bundle(tiny)
    assert header["sha256"] == before == bundle_sha256(tensors, card) != tensors_sha256(tensors)
    assert bundle_sha256(tensors, {**card, "description": "other"}) != before


def _as_version_1(path):
    """Rewrite a bundle in format version 1 (checksum of the tensors only), as older releases wrote."""
    _, card = read_bundle_metadata(path)
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": "1",
                                            "sha256": tensors_sha256(tensors),
                                            "metadata": json.dumps(card, sort_keys=True)})
    return card


def test_version_1_bundle_is_refused_with_how_to_convert_it(tiny, tmp_path):
    reference = load_bundle(tiny)
    card = _as_version_1(tiny)
    with pytest.raises(BundleError, match=r"older format version 1.*does not cover its model card") as err:
        load_bundle(tiny)
    assert f"python -m AbdomenKDSegLib.engine.bundle upgrade {tiny}" in str(err.value)
    converted = upgrade_bundle(tiny, tmp_path / "v2.safetensors")
    bundle = load_bundle(converted)
    assert bundle.metadata == card and read_bundle_metadata(converted)[0]["format_version"] == FORMAT_VERSION == "2"
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bundle.fine(x), reference.fine(x), rtol=0, atol=0)
    with pytest.raises(BundleError, match="already"):
        upgrade_bundle(converted)


def test_upgrade_command_converts_in_place_and_refuses_a_modified_old_bundle(tiny):
    _as_version_1(tiny)
    _edit_card(tiny, lambda card: None)
    data = bytearray(tiny.read_bytes())
    data[-10] ^= 0xFF  # modified weights: the old checksum fails, nothing is converted
    tiny.with_name("bad.safetensors").write_bytes(bytes(data))
    run = [sys.executable, "-m", "AbdomenKDSegLib.engine.bundle", "upgrade"]
    env_path = str(REPO / "AbdomenKDSeg")
    proc = subprocess.run(run + [str(tiny)], capture_output=True, text=True, timeout=120, cwd=env_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "format version 2" in proc.stdout and load_bundle(tiny).metadata["trained"] is False
    proc = subprocess.run(run + [str(tiny.with_name("bad.safetensors"))], capture_output=True, text=True,
                          timeout=120, cwd=env_path)
    assert proc.returncode == 1 and "checksum" in proc.stdout and "not converted" in proc.stdout


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
