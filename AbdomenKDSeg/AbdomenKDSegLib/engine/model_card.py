"""The model card of a bundle as one line for the Slicer panel, read without torch or safetensors.

A bundle (:mod:`bundle`) is a safetensors file: 8 bytes (little-endian header length), a JSON
header whose ``__metadata__`` holds the bundle's strings, then the weights. The card is the JSON
document in ``__metadata__["metadata"]``. Reading only the header needs neither torch nor the
safetensors package, so the panel can say which model it will use before any package is
installed, and without loading the weights.

Card fields used (all optional, older cards lack some): ``description`` (what the model is and
what it was trained on), ``data.description`` / ``data.labeled`` / ``data.unlabeled`` (the
training data), ``metrics.validation.<case>.mean_dsc`` (accuracy measured on CT the model never
saw), ``metrics.held_out`` (a string when that was not measured), ``trained`` and ``demonstration``;
for :func:`summary_lines` also ``method.text`` (how it was trained, derived from the recipe),
``recipe.variant``, ``data.generator``, ``labels`` and ``preprocessing``.
"""

from __future__ import annotations

import json
import os
import re
import struct
import textwrap
from pathlib import Path
from typing import Any, Union

from ..resources import DEFAULT_BUNDLE_NAME, MODEL_ENV, default_model_path  # noqa: F401  (re-exported)

PathLike = Union[str, "os.PathLike[str]"]

#: Same value as :data:`bundle.FORMAT` (bundle imports torch, so it is repeated here; a test checks it).
FORMAT = "abdomen-kdseg-bundle"
#: A header larger than this is not a bundle's (a bundle's header is a few hundred kB at most).
MAX_HEADER_BYTES = 64 * 2**20


class ModelCardError(ValueError):
    """The file is not a readable AbdomenKDSeg model bundle."""




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


#: Width of the label column of :func:`summary_lines`.
_LABEL = 11
_WIDTH = 120


def _row(label: str, text: str) -> list[str]:
    """``label`` then ``text`` wrapped to the summary's width, continuation lines indented."""
    return textwrap.wrap(text, width=_WIDTH, initial_indent=f"{label:<{_LABEL}}",
                         subsequent_indent=" " * _LABEL, break_on_hyphens=False) or [label]


def _what(card: dict[str, Any]) -> str:
    """How the model was trained: ``method.text`` of the card, else its recipe variant."""
    if card.get("trained") is False:
        return "UNTRAINED (random weights): its segmentation is meaningless"
    method = card.get("method")
    if isinstance(method, dict) and isinstance(method.get("text"), str) and method["text"].strip():
        return method["text"].strip()
    recipe = card.get("recipe")
    if isinstance(recipe, dict) and recipe.get("variant"):
        return f"training recipe variant {recipe['variant']} (the card does not say more)"
    description = str(card.get("description") or "").strip()
    return textwrap.shorten(description, 200, placeholder=" ...") if description else "not stated in its model card"


def _span(names: list[Any]) -> str:
    """``A_0001..0034`` for a sorted list of case names (the shared prefix said once)."""
    names = [str(n) for n in names]
    if len(names) < 2:
        return ", ".join(names)
    first, last = names[0], names[-1]
    stem = re.match(r"(.*?)(\d+)$", first)
    if stem and last.startswith(stem.group(1)) and last[len(stem.group(1)):].isdigit():
        return f"{first}..{last[len(stem.group(1)):]}"
    return f"{first}..{last}"


def _data(card: dict[str, Any]) -> str:
    """The training data in one sentence: counts, and how the generated cases were made."""
    data = card.get("data") or {}
    generator = data.get("generator") or {}
    labeled, unlabeled = data.get("labeled"), data.get("unlabeled") or 0
    if isinstance(labeled, int) and generator.get("source") and generator.get("train_targets"):
        text = (f"{labeled} labeled CT, " + (f"{unlabeled} unlabeled CT" if unlabeled else "no unlabeled CT")
                + f": generated from ONE real CT ({generator['source']}) deformed onto "
                f"{len(generator['train_targets'])} FLARE22 label maps ({_span(generator['train_targets'])}), "
                f"{generator.get('variants_per_label_map', '?')} renderings each")
        extra = [entry for entry in (generator.get("sets") or [])[1:] if isinstance(entry, dict)]
        if extra:
            text += f" (+{sum(int(e.get('training_cases', 0)) for e in extra)} weighted)"
        if generator["source"] in (data.get("labeled_cases") or []):
            text += ", plus that CT"
        if generator.get("heldout_targets"):
            text += f"; held out: {_span(generator['heldout_targets'])}"
        return text
    return _trained_on(card).removeprefix("trained on ")


def _organs(card: dict[str, Any]) -> str:
    labels = [entry for entry in card.get("labels") or [] if isinstance(entry, dict)]
    if not labels:
        return "not stated in its model card"
    names = ", ".join(str(entry.get("name", entry.get("key", "?"))).lower() for entry in labels)
    return f"{len(labels)}: {names}"


def _size(value: Any) -> str:
    return "x".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _input(card: dict[str, Any]) -> str:
    """The input preprocessing in one line (what a user must give and what the model sees)."""
    pre = card.get("preprocessing")
    if not isinstance(pre, dict) or not pre:
        return "preprocessing not stated in its model card"
    parts = ["CT in HU" + (f", {pre['orientation']} axes (no resampling)" if pre.get("orientation") else "")]
    window = pre.get("hu_window")
    if isinstance(window, (list, tuple)) and len(window) == 2:
        parts.append(f"clipped to [{window[0]:g}, {window[1]:g}] HU and z-scored per window")
    sizes = []
    if pre.get("coarse_size_zyx"):
        sizes.append(f"coarse {_size(pre['coarse_size_zyx'])}")
    if pre.get("fine_size_zyx"):
        sizes.append(f"fine crop {_size(pre['fine_size_zyx'])} (box x{pre.get('crop_padding', '?')})")
    if pre.get("window_zyx"):
        sizes.append(f"windows {_size(pre['window_zyx'])} overlap {pre.get('window_overlap', '?')}")
    if pre.get("min_z_extent_mm"):
        sizes.append(f"Z padded to {pre['min_z_extent_mm']:g} mm")
    return "; ".join(parts + [", ".join(sizes)] if sizes else parts)


def _accuracy(card: dict[str, Any]) -> list[str]:
    """One or two lines: mean DSC per unseen validation case, then the held-out generated split."""
    metrics = card.get("metrics") or {}
    validation = metrics.get("validation") if isinstance(metrics.get("validation"), dict) else {}
    scores = []
    for case, dsc in validation_scores(card):
        organs = validation[case].get("organs_scored")
        scores.append(f"{dsc:.2f} {case}" + (f" ({len(organs)} organs)" if isinstance(organs, list) else ""))
    lines = _row("accuracy", "unseen CT, mean DSC: " + ", ".join(scores)) if scores else \
        _row("accuracy", accuracy_text(card))
    heldout = metrics.get("heldout_synthetic_mean_dsc")
    if isinstance(heldout, dict) and isinstance(heldout.get("mean"), (int, float)):
        lines += _row("", f"held-out generated CT, mean DSC: {heldout['mean']:.2f} "
                          "(synthetic: not real-world accuracy)")
    return lines


def summary_lines(card: dict[str, Any], file_info: dict[str, Any] | None = None) -> list[str]:
    """A short human summary of a model card (about a dozen lines), for ``abdomen-kdseg model-info``.

    A pure function of the card and of ``file_info``, facts about the file the caller found:
    ``path``, ``format_version``, ``sha256``, ``verified`` (checksum of weights and card matched),
    ``bytes`` (file size), ``dtypes`` (storage dtypes of the weights), ``parameters``
    (``{"coarse": n, "fine": n}``). Missing facts are left out.
    """
    info = file_info or {}
    lines: list[str] = []
    path = info.get("path")
    if path:
        lines.append(f"{'model':<{_LABEL}}{path}")  # never wrapped: a path stays one piece
    if info.get("format_version") or info.get("sha256"):
        checked = {True: "checksum verified (weights and model card)", False: "checksum NOT verified"}.get(
            info.get("verified"), "checksum not checked")
        lines += _row("bundle", f"format {info.get('format_version', '?')}, SHA-256 "
                                f"{str(info.get('sha256', '?'))[:16]}..., {checked}")
    lines += _row("what", _what(card))
    if card.get("trained") is not False:
        lines += _row("trained on", _data(card))
    lines += _row("organs", _organs(card))
    lines += _row("input", _input(card))
    if card.get("trained") is not False:
        lines += _accuracy(card)
    size = []
    params = info.get("parameters")
    if isinstance(params, dict) and params:
        size.append(" + ".join(f"{stage} {n / 1e6:.2f} M" for stage, n in params.items()) + " parameters")
    if info.get("dtypes"):
        size.append(f"{'/'.join(info['dtypes'])} storage (computed in float32)")
    if isinstance(info.get("bytes"), int):
        size.append(f"{info['bytes'] / 1e6:.1f} MB")
    if size:
        lines += _row("size", ", ".join(size))
    if is_demonstration(card):
        lines += _row("note", "demonstration model, not for clinical use")
    return lines
