"""Model bundles: one ``.safetensors`` file holding the coarse and fine student and their metadata.

Layout of a bundle file:
- tensors ``coarse.<parameter name>`` and ``fine.<parameter name>`` (the students' state dicts;
  float32 or float16 storage, always loaded as float32);
- safetensors header metadata (str -> str): ``format`` = ``abdomen-kdseg-bundle``,
  ``format_version`` (``"2"``), ``sha256`` of the whole bundle (see :func:`bundle_sha256`: the
  tensors, then the model card) and ``metadata``, a JSON document with the architecture of both
  networks, the label table, the preprocessing settings, the training recipe and data summary,
  and measured metrics (the model card).

The checksum covers the model card as well as the weights: a card edited after saving (e.g. its
``preprocessing.hu_window``, which changes the result) fails the checksum like edited weights.
The card is hashed in a canonical serialisation (:func:`canonical_card_json`), so only its
content counts, not the whitespace or key order of the header text. The SHA-256 is also the
identity of the bundle (:attr:`ModelBundle.sha256`, the key of the CPU runtimes' graph cache).

Format version 1 (until 2026-12) hashed the tensors only; such a bundle is refused with a message
saying how to convert it once, keeping its weights and card::

    python -m AbdomenKDSegLib.engine.bundle upgrade OLD.safetensors [NEW.safetensors]

(:func:`upgrade_bundle`; without NEW the file is replaced in place, atomically).

safetensors never unpickles, so a bundle from an untrusted source cannot run code. Loading
verifies the format, the checksum and the architecture, and raises :class:`BundleError` with a
message naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic_files import atomic_path
from ..errors import BundleError
from ..resources import DEFAULT_BUNDLE_NAME, MODEL_ENV, default_model_path  # noqa: F401  (re-exported)
from .networks import NetworkConfig, ResidualUSENet
from .organs import NUM_CLASSES, ORGANS

FORMAT = "abdomen-kdseg-bundle"
FORMAT_VERSION = "2"
#: Older versions :func:`upgrade_bundle` converts to :data:`FORMAT_VERSION`.
UPGRADABLE_VERSIONS = ("1",)

PathLike = Union[str, "os.PathLike[str]"]

#: Preprocessing settings of the paper, stored in every bundle and read by the predictor.
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "coarse_size_zyx": [96, 96, 96],
    "fine_size_zyx": [96, 64, 96],
    "window_zyx": [96, 64, 96],
    "window_overlap": 0.5,
    "hu_window": [-300.0, 300.0],
    "crop_padding": 1.1,
    "fallback_box_mm_zyx": [240.0, 160.0, 240.0],
    "orientation": "LPS",
}


@dataclass
class ModelBundle:
    """A loaded bundle: the two student networks (eval mode, float32) and their metadata."""

    coarse: torch.nn.Module
    fine: torch.nn.Module
    metadata: dict[str, Any]
    sha256: str
    path: Path | None = None
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PREPROCESSING))

    @property
    def trained(self) -> bool:
        """False for a bundle of untrained (randomly initialised) weights."""
        return bool(self.metadata.get("trained", False))


def default_bundle_path() -> Path:
    """The model used when none is given: ``$ABDOMENKDSEG_MODEL`` or the bundled default."""
    return default_model_path()


def label_table() -> list[dict[str, Any]]:
    """The organ table as stored in bundles (value, key, name)."""
    return [{"value": o.value, "key": o.key, "name": o.name} for o in ORGANS]


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> Any:
    """A ``hashlib.sha256`` object fed with the tensors in name order (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors only (name, dtype, shape and raw bytes of each, in name order).

    This is the checksum of format version 1; version 2 bundles record :func:`bundle_sha256`.
    """
    return _tensor_digest(tensors).hexdigest()


def canonical_card_json(card: dict[str, Any]) -> str:
    """The model card as canonical JSON: sorted keys, no whitespace, non-ASCII kept as UTF-8."""
    return json.dumps(card, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def bundle_sha256(tensors: dict[str, torch.Tensor], card: dict[str, Any]) -> str:
    """SHA-256 of a version-2 bundle: the tensors as in :func:`tensors_sha256`, then ``card|`` and
    the card's :func:`canonical_card_json` (UTF-8), in the same digest."""
    digest = _tensor_digest(tensors)
    digest.update(b"card|")
    digest.update(canonical_card_json(card).encode("utf-8"))
    return digest.hexdigest()


def save_bundle(
    path: PathLike,
    coarse: torch.nn.Module,
    fine: torch.nn.Module,
    coarse_config: NetworkConfig,
    fine_config: NetworkConfig,
    metadata: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a bundle atomically (temporary file + rename). Returns the path written.

    ``metadata`` is the model card (``trained``, ``recipe``, ``data``, ``metrics``, ...); the
    architecture, label table and preprocessing are added here.
    """
    tensors: dict[str, torch.Tensor] = {}
    for prefix, net in (("coarse", coarse), ("fine", fine)):
        for name, value in net.state_dict().items():
            value = value.detach().to("cpu")
            if value.is_floating_point():
                value = value.to(dtype)
            tensors[f"{prefix}.{name}"] = value.contiguous()
    card = dict(metadata or {})
    card.setdefault("trained", False)
    card["architecture"] = {"coarse": coarse_config.to_dict(), "fine": fine_config.to_dict()}
    card["labels"] = label_table()
    card.setdefault("preprocessing", dict(DEFAULT_PREPROCESSING))
    return write_bundle(path, tensors, card)


def write_bundle(path: PathLike, tensors: dict[str, torch.Tensor], card: dict[str, Any]) -> Path:
    """Write ``tensors`` (stored as they are) and the complete model ``card`` as a bundle of the
    current format, atomically (temporary file + rename). Returns the path written.

    :func:`save_bundle` builds both from the networks; this is the path for re-saving a bundle's
    own tensors with an edited card (the checksum is recomputed over both).
    """
    card = json.loads(canonical_card_json(card))  # a JSON document, exactly as it will be read back
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sha256": bundle_sha256(tensors, card),
        "metadata": json.dumps(card, sort_keys=True),
    }
    out = Path(path)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=header)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a bundle gets a normal new file's mode
    return out


def _read_header(p: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Header strings and parsed card of any bundle version (format checked, version not)."""
    if not p.is_file():
        raise BundleError(f"model bundle not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise BundleError(f"corrupt model bundle {p}: not a readable safetensors file ({exc})") from exc
    if header.get("format") != FORMAT:
        raise BundleError(f"{p} is not an AbdomenKDSeg model bundle (format {header.get('format')!r})")
    try:
        card = json.loads(header["metadata"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise BundleError(f"corrupt model bundle {p}: unreadable metadata ({exc})") from exc
    if not isinstance(card, dict):
        raise BundleError(f"corrupt model bundle {p}: its metadata is not a model card")
    return header, card


def read_bundle_metadata(path: PathLike) -> tuple[dict[str, str], dict[str, Any]]:
    """Header strings and the parsed model card of a bundle, without loading the weights.

    The card is not verified here (that needs the weights: :func:`verify_bundle`).
    """
    p = Path(path)
    header, card = _read_header(p)
    version = header.get("format_version")
    if version in UPGRADABLE_VERSIONS:
        raise BundleError(
            f"{p} is a model bundle of the older format version {version}, whose checksum does not cover "
            f"its model card; this version reads format {FORMAT_VERSION}. Convert it once (weights and card "
            f"kept): python -m AbdomenKDSegLib.engine.bundle upgrade {p} NEW.safetensors"
        )
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{p}: bundle format version {version!r} is not supported (this version reads {FORMAT_VERSION})"
        )
    return header, card


def _read_tensors(p: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:
        raise BundleError(f"corrupt model bundle {p}: cannot read weights ({exc})") from exc


def verify_bundle(path: PathLike) -> tuple[dict[str, str], dict[str, Any], dict[str, torch.Tensor]]:
    """Header strings, model card and tensors of a bundle whose checksum (weights and card) matches.

    Raises :class:`BundleError` for a missing, foreign, older-format, corrupt or modified file.
    """
    p = Path(path)
    header, card = read_bundle_metadata(p)
    tensors = _read_tensors(p)
    digest = bundle_sha256(tensors, card)
    if digest != header.get("sha256"):
        raise BundleError(
            f"model bundle {p} failed its checksum (SHA-256 {digest[:12]}... != recorded "
            f"{str(header.get('sha256'))[:12]}...): the file is corrupted or was modified (its model card "
            "or weights)"
        )
    return header, card, tensors


def upgrade_bundle(path: PathLike, out: PathLike | None = None) -> Path:
    """Re-save an older-format bundle (version 1) in the current format, same tensors and card.

    The old checksum (tensors only) is verified first. ``out`` defaults to ``path`` (replaced
    atomically). Also ``python -m AbdomenKDSegLib.engine.bundle upgrade OLD [NEW]``.
    """
    p = Path(path)
    header, card = _read_header(p)
    version = header.get("format_version")
    if version == FORMAT_VERSION:
        raise BundleError(f"{p} is already a model bundle of format version {FORMAT_VERSION}")
    if version not in UPGRADABLE_VERSIONS:
        raise BundleError(f"{p}: bundle format version {version!r} cannot be converted")
    tensors = _read_tensors(p)
    if tensors_sha256(tensors) != header.get("sha256"):
        raise BundleError(f"model bundle {p} failed its (version {version}) checksum: the file is corrupted "
                          "or was modified; not converted")
    return write_bundle(out if out is not None else p, tensors, card)


def load_bundle(path: PathLike | None = None, device: torch.device | str = "cpu") -> ModelBundle:
    """Load and verify a bundle (default: :func:`default_bundle_path`) onto ``device``."""
    p = Path(path) if path is not None else default_bundle_path()
    header, card, tensors = verify_bundle(p)
    digest = header["sha256"]
    labels = card.get("labels")
    if labels != label_table():
        raise BundleError(f"model bundle {p} was trained for another label table: {labels}")
    nets = {}
    for stage in ("coarse", "fine"):
        nets[stage] = _build_stage(p, card, stage, tensors, device)
    return ModelBundle(
        coarse=nets["coarse"],
        fine=nets["fine"],
        metadata=card,
        sha256=digest,
        path=p,
        preprocessing={**DEFAULT_PREPROCESSING, **card.get("preprocessing", {})},
    )


def _build_stage(
    path: Path, card: dict[str, Any], stage: str, tensors: dict[str, torch.Tensor], device: torch.device | str
) -> torch.nn.Module:
    """Build one stage's network from the card and load its weights, checking they match."""
    try:
        config = NetworkConfig.from_dict(card["architecture"][stage])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"model bundle {path}: invalid {stage} architecture ({exc})") from exc
    if config.num_classes != NUM_CLASSES:
        raise BundleError(
            f"model bundle {path}: {stage} network has {config.num_classes} outputs, expected {NUM_CLASSES}"
        )
    with torch.device("meta"):  # no memory and no random initialisation: the weights replace it all
        net = ResidualUSENet(config)
    prefix = f"{stage}."
    state = {k[len(prefix):]: v.float() if v.is_floating_point() else v for k, v in tensors.items()
             if k.startswith(prefix)}
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            details.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} vs "
                           f"{tuple(expected[k].shape)})")
        raise BundleError(
            f"model bundle {path}: {stage} weights do not match the architecture {config.to_dict()}: "
            + "; ".join(details)
        )
    net.load_state_dict(state, strict=True, assign=True)
    return net.to(device).eval()


def _main(argv: list[str] | None = None) -> int:
    """``python -m AbdomenKDSegLib.engine.bundle upgrade OLD [NEW]``: convert an older-format bundle."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m AbdomenKDSegLib.engine.bundle",
                                     description="Model bundle maintenance.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrade", help=f"re-save an older bundle in format version {FORMAT_VERSION} "
                                        "(same weights and model card)")
    up.add_argument("old", type=Path)
    up.add_argument("new", type=Path, nargs="?", default=None, help="output file (default: replace OLD)")
    args = parser.parse_args(argv)
    try:
        written = upgrade_bundle(args.old, args.new)
    except BundleError as exc:
        print(f"error: {exc}")
        return 1
    print(f"wrote {written} (format version {FORMAT_VERSION})")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
