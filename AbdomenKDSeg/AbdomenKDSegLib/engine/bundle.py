"""Model bundles: one ``.safetensors`` file holding the coarse and fine student and their metadata.

Layout of a bundle file:
- tensors ``coarse.<parameter name>`` and ``fine.<parameter name>`` (the students' state dicts;
  float32 or float16 storage, always loaded as float32);
- optionally, uint8 tensors ``graph.<stage>`` and ``graph.<stage>.weights``: each stage's exported
  ONNX graph without its weights and the names of those weights (:mod:`runtimes.bundle_graphs`), so
  the CPU runtimes run without PyTorch (the shipped bundle has them; without them PyTorch exports
  the graphs at first use);
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
(numpy only; PyTorch is imported where networks are built) verifies the format, the checksum and
the architecture, and raises :class:`BundleError` with a
message naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Union

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ..atomic_files import atomic_path
from ..errors import BundleError
from ..resources import DEFAULT_BUNDLE_NAME, MODEL_ENV, default_model_path  # noqa: F401  (re-exported)
from .organs import NUM_CLASSES, ORGANS
from .preprocess import Preprocessing

if TYPE_CHECKING:  # PyTorch is imported only where networks are built or saved
    import torch

    from .networks import NetworkConfig

FORMAT = "abdomen-kdseg-bundle"
FORMAT_VERSION = "2"
#: Older versions :func:`upgrade_bundle` converts to :data:`FORMAT_VERSION`.
UPGRADABLE_VERSIONS = ("1",)
STAGES = ("coarse", "fine")
#: Prefix of the optional uint8 tensors holding each stage's ONNX graph (:mod:`runtimes.bundle_graphs`).
GRAPH_PREFIX = "graph."

PathLike = Union[str, "os.PathLike[str]"]
#: A tensor as stored: numpy array (torch tensors are accepted where bundles are written).
Tensor = Any

#: numpy dtype -> the PyTorch dtype name hashed for it (the checksum was defined on torch tensors).
_HASH_DTYPE = {np.dtype(t): f"torch.{n}" for t, n in (
    (np.float16, "float16"), (np.float32, "float32"), (np.float64, "float64"), (np.int64, "int64"),
    (np.int32, "int32"), (np.int16, "int16"), (np.int8, "int8"), (np.uint8, "uint8"), (np.bool_, "bool"))}


@dataclass
class ModelBundle:
    """A loaded, verified bundle: its tensors (numpy, as stored), model card and checksum.

    ``graph(stage)``: the stage's stored ONNX graph (weights stripped) or None. The PyTorch networks
    are built only when asked for: :meth:`network` (a new float32 eval module on ``device`` per
    call), or :attr:`coarse`/:attr:`fine` (one CPU module each, built once and kept).
    """

    tensors: dict[str, np.ndarray]
    metadata: dict[str, Any]
    sha256: str
    path: Path | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    _networks: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def trained(self) -> bool:
        """False for a bundle of untrained (randomly initialised) weights."""
        return bool(self.metadata.get("trained", False))

    def stage_tensors(self, stage: str) -> dict[str, np.ndarray]:
        """``stage``'s weights by parameter name (prefix removed), as stored (float16 or float32)."""
        prefix = f"{stage}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def graph(self, stage: str) -> bytes | None:
        """``stage``'s stored ONNX graph without its weights, or None (the bundle has none)."""
        data = self.tensors.get(GRAPH_PREFIX + stage)
        return None if data is None else data.tobytes()

    def network(self, stage: str, device: Any = "cpu") -> torch.nn.Module:
        """A new PyTorch network of ``stage`` (float32, eval mode) on ``device``; needs PyTorch."""
        return _build_stage(self.path, self.metadata, stage, self.stage_tensors(stage), device)

    def _cached(self, stage: str) -> torch.nn.Module:
        if stage not in self._networks:
            self._networks[stage] = self.network(stage)
        return self._networks[stage]

    @property
    def coarse(self) -> torch.nn.Module:
        """The coarse network on the CPU (built on first use, then kept)."""
        return self._cached("coarse")

    @property
    def fine(self) -> torch.nn.Module:
        """The fine network on the CPU (built on first use, then kept)."""
        return self._cached("fine")


def default_bundle_path() -> Path:
    """The model used when none is given: ``$ABDOMENKDSEG_MODEL`` or the bundled default."""
    return default_model_path()


def label_table() -> list[dict[str, Any]]:
    """The organ table as stored in bundles (value, key, name)."""
    return [{"value": o.value, "key": o.key, "name": o.name} for o in ORGANS]


def _as_numpy(t: Tensor) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    return t.detach().cpu().contiguous().numpy()  # a torch tensor


def _tensor_digest(tensors: Mapping[str, Tensor]) -> Any:
    """A ``hashlib.sha256`` object fed with the tensors in name order (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        a = _as_numpy(tensors[name])
        dtype = _HASH_DTYPE.get(a.dtype)
        if dtype is None:
            raise BundleError(f"tensor {name}: dtype {a.dtype} cannot be stored in a bundle")
        digest.update(f"{name}|{dtype}|{tuple(a.shape)}|".encode())
        digest.update(np.ascontiguousarray(a).tobytes() if a.size else b"")
    return digest


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the tensors only (name, dtype, shape and raw bytes of each, in name order).

    This is the checksum of format version 1; version 2 bundles record :func:`bundle_sha256`.
    """
    return _tensor_digest(tensors).hexdigest()


def canonical_card_json(card: dict[str, Any]) -> str:
    """The model card as canonical JSON: sorted keys, no whitespace, non-ASCII kept as UTF-8."""
    return json.dumps(card, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def bundle_sha256(tensors: Mapping[str, Tensor], card: dict[str, Any]) -> str:
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
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a bundle of two PyTorch networks atomically (temporary file + rename); needs PyTorch.

    ``metadata`` is the model card (``trained``, ``recipe``, ``data``, ``metrics``, ...); the
    architecture, label table and preprocessing (default :class:`Preprocessing`) are added here.
    ``dtype``: storage of floating-point weights (default float32). Returns the path written.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    tensors: dict[str, np.ndarray] = {}
    for prefix, net in (("coarse", coarse), ("fine", fine)):
        for name, value in net.state_dict().items():
            value = value.detach().to("cpu")
            if value.is_floating_point():
                value = value.to(dtype)
            tensors[f"{prefix}.{name}"] = value.contiguous().numpy()
    card = dict(metadata or {})
    card.setdefault("trained", False)
    card["architecture"] = {"coarse": coarse_config.to_dict(), "fine": fine_config.to_dict()}
    card["labels"] = label_table()
    card.setdefault("preprocessing", Preprocessing().to_dict())
    return write_bundle(path, tensors, card)


def write_bundle(path: PathLike, tensors: Mapping[str, Tensor], card: dict[str, Any]) -> Path:
    """Write ``tensors`` (stored as they are: numpy arrays or torch tensors) and the complete model
    ``card`` as a bundle of the current format, atomically (temporary file + rename).

    :func:`save_bundle` builds both from the networks; this is the path for re-saving a bundle's
    own tensors with an edited card or added graphs (the checksum is recomputed over both).
    """
    arrays = {name: np.ascontiguousarray(_as_numpy(t)) for name, t in tensors.items()}
    card = json.loads(canonical_card_json(card))  # a JSON document, exactly as it will be read back
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sha256": bundle_sha256(arrays, card),
        "metadata": json.dumps(card, sort_keys=True),
    }
    out = Path(path)
    with atomic_path(out) as tmp:
        save_file(arrays, str(tmp), metadata=header)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a bundle gets a normal new file's mode
    return out


def _read_header(p: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Header strings and parsed card of any bundle version (format checked, version not)."""
    if not p.is_file():
        raise BundleError(f"model bundle not found: {p}")
    try:
        with safe_open(str(p), framework="numpy") as f:
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


def _read_tensors(p: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(p))
    except Exception as exc:
        raise BundleError(f"corrupt model bundle {p}: cannot read weights ({exc})") from exc


def verify_bundle(path: PathLike) -> tuple[dict[str, str], dict[str, Any], dict[str, np.ndarray]]:
    """Header strings, model card and tensors (numpy) of a bundle whose checksum (weights, graphs
    and card) matches.

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


def load_bundle(path: PathLike | None = None) -> ModelBundle:
    """Load and verify a bundle (default: :func:`default_bundle_path`); PyTorch is not imported.

    Checks the checksum, the label table and the number of classes. A bundle without stored
    graphs needs PyTorch for any run, so its weights are checked against the architecture here
    (which imports PyTorch); one with graphs is checked when a graph is completed with its weights.
    """
    p = Path(path) if path is not None else default_bundle_path()
    header, card, tensors = verify_bundle(p)
    labels = card.get("labels")
    if labels != label_table():
        raise BundleError(f"model bundle {p} was trained for another label table: {labels}")
    for stage in STAGES:
        arch = card.get("architecture", {}).get(stage) if isinstance(card.get("architecture"), dict) else None
        if not isinstance(arch, dict):
            raise BundleError(f"model bundle {p}: invalid {stage} architecture (missing)")
        classes = arch.get("num_classes", NUM_CLASSES)
        if classes != NUM_CLASSES:
            raise BundleError(f"model bundle {p}: {stage} network has {classes} outputs, expected {NUM_CLASSES}")
    bundle = ModelBundle(tensors=tensors, metadata=card, sha256=header["sha256"], path=p,
                         preprocessing=Preprocessing.from_dict(card.get("preprocessing")))
    if any(bundle.graph(stage) is None for stage in STAGES):
        for stage in STAGES:
            bundle._networks[stage] = bundle.network(stage)
    return bundle


def _build_stage(
    path: Path | None, card: dict[str, Any], stage: str, state: dict[str, np.ndarray], device: Any
) -> torch.nn.Module:
    """Build one stage's PyTorch network from the card and load its weights, checking they match."""
    import torch

    from .networks import NetworkConfig, ResidualUSENet

    try:
        config = NetworkConfig.from_dict(card["architecture"][stage])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"model bundle {path}: invalid {stage} architecture ({exc})") from exc
    with torch.device("meta"):  # no memory and no random initialisation: the weights replace it all
        net = ResidualUSENet(config)
    weights = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    expected = net.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            details.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(weights[k].shape)} vs "
                           f"{tuple(expected[k].shape)})")
        raise BundleError(
            f"model bundle {path}: {stage} weights do not match the architecture {config.to_dict()}: "
            + "; ".join(details)
        )
    net.load_state_dict(weights, strict=True, assign=True)
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
