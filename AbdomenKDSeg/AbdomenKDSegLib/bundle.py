"""Model bundles: one ``.safetensors`` file holding the coarse and fine student and their metadata.

Layout of a bundle file:
- tensors ``coarse.<parameter name>`` and ``fine.<parameter name>`` (the students' state dicts;
  float32 or float16 storage, always loaded as float32);
- safetensors header metadata (str -> str): ``format`` = ``abdomen-kdseg-bundle``,
  ``format_version``, ``sha256`` of the tensors (see :func:`tensors_sha256`) and ``metadata``,
  a JSON document with the architecture of both networks, the label table, the preprocessing
  settings, the training recipe and data summary, and measured metrics (the model card).

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

from .errors import BundleError
from .image_io import make_temp_beside
from .networks import NetworkConfig, ResidualUSENet
from .organs import NUM_CLASSES, ORGANS

FORMAT = "abdomen-kdseg-bundle"
FORMAT_VERSION = "1"
DEFAULT_BUNDLE_NAME = "abdomen-kdseg-default.safetensors"
#: Environment variable that overrides the bundled default model.
MODEL_ENV = "ABDOMENKDSEG_MODEL"

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
    env = os.environ.get(MODEL_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "Resources" / "Models" / DEFAULT_BUNDLE_NAME


def label_table() -> list[dict[str, Any]]:
    """The organ table as stored in bundles (value, key, name)."""
    return [{"value": o.value, "key": o.key, "name": o.name} for o in ORGANS]


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sha256": tensors_sha256(tensors),
        "metadata": json.dumps(card, sort_keys=True),
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_beside(out, ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def read_bundle_metadata(path: PathLike) -> tuple[dict[str, str], dict[str, Any]]:
    """Header strings and the parsed model card of a bundle, without loading the weights."""
    p = Path(path)
    if not p.is_file():
        raise BundleError(f"model bundle not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise BundleError(f"corrupt model bundle {p}: not a readable safetensors file ({exc})") from exc
    if header.get("format") != FORMAT:
        raise BundleError(f"{p} is not an AbdomenKDSeg model bundle (format {header.get('format')!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{p}: bundle format version {header.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    try:
        card = json.loads(header["metadata"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise BundleError(f"corrupt model bundle {p}: unreadable metadata ({exc})") from exc
    return header, card


def load_bundle(path: PathLike | None = None, device: torch.device | str = "cpu") -> ModelBundle:
    """Load and verify a bundle (default: :func:`default_bundle_path`) onto ``device``."""
    p = Path(path) if path is not None else default_bundle_path()
    header, card = read_bundle_metadata(p)
    try:
        tensors = load_file(str(p), device="cpu")
    except Exception as exc:
        raise BundleError(f"corrupt model bundle {p}: cannot read weights ({exc})") from exc
    digest = tensors_sha256(tensors)
    if digest != header.get("sha256"):
        raise BundleError(
            f"model bundle {p} failed its checksum (SHA-256 {digest[:12]}... != recorded "
            f"{str(header.get('sha256'))[:12]}...): the file is corrupted or was modified"
        )
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
