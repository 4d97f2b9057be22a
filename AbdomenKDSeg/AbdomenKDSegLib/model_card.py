"""The model card of a bundle as one line for the Slicer panel, read without torch or safetensors.

A bundle (:mod:`bundle`) is a safetensors file: 8 bytes (little-endian header length), a JSON
header whose ``__metadata__`` holds the bundle's strings, then the weights. The card is the JSON
document in ``__metadata__["metadata"]``. Reading only the header needs neither torch nor the
safetensors package, so the panel can say which model it will use before any package is
installed, and without loading the weights.

Card fields used (all optional, older cards lack some): ``description`` (what the model is and
what it was trained on), ``data.description`` / ``data.labeled`` / ``data.unlabeled`` (the
training data), ``metrics.validation.<case>.mean_dsc`` (accuracy measured on CT the model never
saw), ``metrics.held_out`` (a string when that was not measured), ``trained`` and ``demonstration``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, "os.PathLike[str]"]

#: Same values as :mod:`bundle` (which imports torch, so they are repeated here; a test checks them).
FORMAT = "abdomen-kdseg-bundle"
DEFAULT_BUNDLE_NAME = "abdomen-kdseg-default.safetensors"
MODEL_ENV = "ABDOMENKDSEG_MODEL"
#: A header larger than this is not a bundle's (a bundle's header is a few hundred kB at most).
MAX_HEADER_BYTES = 64 * 2**20


class ModelCardError(ValueError):
    """The file is not a readable AbdomenKDSeg model bundle."""


def default_model_path() -> Path:
    """The model the module uses when none is chosen: ``$ABDOMENKDSEG_MODEL`` or the bundled one."""
    env = os.environ.get(MODEL_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "Resources" / "Models" / DEFAULT_BUNDLE_NAME


def read_model_card(path: PathLike) -> dict[str, Any]:
    """The model card (parsed JSON) of a bundle file, from its header only."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelCardError(f"{p.name} is not a model bundle (too short)")
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER_BYTES:
                raise ModelCardError(f"{p.name} is not a model bundle (no safetensors header)")
            header = json.loads(f.read(size).decode("utf-8"))
    except OSError as exc:
        raise ModelCardError(f"cannot read the model file {p}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"{p.name} is not a model bundle (unreadable header)") from exc
    strings = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(strings, dict) or strings.get("format") != FORMAT:
        raise ModelCardError(f"{p.name} is not an AbdomenKDSeg model bundle")
    try:
        card = json.loads(strings.get("metadata", "{}"))
    except json.JSONDecodeError as exc:
        raise ModelCardError(f"{p.name}: unreadable model card") from exc
    return card if isinstance(card, dict) else {}


def model_name(path: PathLike, card: dict[str, Any]) -> str:
    """The card's ``name``, else the file name without ``.safetensors``."""
    name = card.get("name")
    if isinstance(name, str) and name.strip():
        return name.strip()
    stem = Path(path).name
    return stem[: -len(".safetensors")] if stem.endswith(".safetensors") else stem


def is_demonstration(card: dict[str, Any]) -> bool:
    """True for a demonstration model: flag ``demonstration`` or "demonstration" in the description."""
    if card.get("demonstration") is True:
        return True
    return "demonstration" in str(card.get("description", "")).lower()


def validation_scores(card: dict[str, Any]) -> list[tuple[str, float]]:
    """(case, mean DSC) measured on CT the model never saw: ``metrics.validation.<case>.mean_dsc``."""
    validation = (card.get("metrics") or {}).get("validation")
    out = []
    if isinstance(validation, dict):
        for case, result in validation.items():
            if isinstance(result, dict) and isinstance(result.get("mean_dsc"), (int, float)):
                out.append((str(case), float(result["mean_dsc"])))
    return out


def _trained_on(card: dict[str, Any]) -> str:
    """What the model was trained on, for cards without a description."""
    data = card.get("data") or {}
    if isinstance(data.get("description"), str) and data["description"].strip():
        return "trained on " + _first_clause(data["description"])
    labeled, unlabeled = data.get("labeled"), data.get("unlabeled")
    if isinstance(labeled, int):
        return f"trained on {labeled} labeled" + (f" and {unlabeled} unlabeled" if unlabeled else "") + " CT"
    return "training data not stated in its model card"


def _first_clause(text: str) -> str:
    """The text up to its first colon or semicolon (the summary part of a long description)."""
    return re.split(r"[:;]", text, maxsplit=1)[0].strip().rstrip(".")


def accuracy_text(card: dict[str, Any]) -> str:
    """Measured accuracy on unseen CT, or a plain statement that it was not measured."""
    scores = validation_scores(card)
    if scores:
        return "mean DSC on unseen CT: " + ", ".join(f"{dsc:.2f} ({case})" for case, dsc in scores)
    held_out = (card.get("metrics") or {}).get("held_out")
    if isinstance(held_out, (int, float)):
        return f"mean DSC on held-out CT: {float(held_out):.2f}"
    if isinstance(held_out, str) and held_out.startswith("not measured"):
        return "accuracy on unseen CT: not measured"
    return "accuracy on unseen CT: not stated in its model card"


def card_line(path: PathLike, card: dict[str, Any]) -> str:
    """One line: model name, what it is and was trained on, and its measured accuracy.

    The card's ``description`` is shown as it is; the validation mean DSCs are added unless the
    description already quotes DSC figures.
    """
    name = model_name(path, card)
    if card.get("trained") is False:
        return f"{name}: UNTRAINED (random weights): its segmentation is meaningless"
    description = str(card.get("description") or "").strip().rstrip(".")
    parts = [description or _trained_on(card)]
    if not (description and "DSC" in description and validation_scores(card)):
        parts.append(accuracy_text(card))
    return f"{name}: " + "; ".join(parts) + "."


def describe_model(path: PathLike | None = None) -> tuple[str, bool]:
    """(line for the panel, demonstration?) of a bundle (default: :func:`default_model_path`).

    Never raises: a missing or unreadable file gives a line saying so.
    """
    p = Path(path) if path else default_model_path()
    if not p.is_file():
        return f"Model file not found: {p}", False
    try:
        card = read_model_card(p)
    except ModelCardError as exc:
        return str(exc), False
    return card_line(p, card), is_demonstration(card)
