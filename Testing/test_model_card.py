"""The model line of the Slicer panel: read from a bundle's card without torch, honest about accuracy.

Bundles are real ones (``make_tiny_bundle`` + card fields, and the shipped default model); the
card is read from the safetensors header by :mod:`AbdomenKDSegLib.engine.model_card`, which imports
neither torch nor safetensors (checked in a subprocess where both are blocked).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from AbdomenKDSegLib.engine import model_card
from AbdomenKDSegLib.engine.bundle import (
    DEFAULT_BUNDLE_NAME,
    FORMAT,
    MODEL_ENV,
    default_bundle_path,
    read_bundle_metadata,
)

from engine_helpers import REPO, make_tiny_bundle

#: The card fields of the new default model (benchmarks/default_model_card.py writes them).
NEW_CARD = {
    "trained": True,
    "description": ("CPU demonstration model, recipe cpu_synthetic (the paper's method, 60+60 epochs, adam), "
                    "trained on CT generated from one real CT. Not for clinical use."),
    "data": {"description": "23 labeled CT, no unlabeled CT: 22 generated from ONE real labeled CT", "labeled": 23},
    "metrics": {"validation": {"ct-abdomen-contrast-ircadb01": {"mean_dsc": 0.6123, "organs_scored": [1, 2, 3, 13]},
                               "ct-abdomen-slab-amos0001": {"mean_dsc": 0.4477}},
                "training_case": {"mean_dsc_12_present_organs": 0.91}},
}
#: The card of the first default model: no validation, a "not measured" note.
OLD_CARD = {
    "trained": True,
    "description": "CPU demonstration model (recipe cpu_default): trained on ONE labeled CT; not for clinical use",
    "data": {"labeled": 1, "unlabeled": 0},
    "metrics": {"held_out": "not measured: no labeled CT other than the training case is available",
                "training_case": {"mean_dsc_12_present_organs": 0.6834}},
}


def test_card_is_read_from_the_header_exactly_as_the_engine_reads_it(tmp_path):
    path = make_tiny_bundle(tmp_path / "my-model.safetensors", trained=True, metadata=NEW_CARD)
    assert model_card.read_model_card(path) == read_bundle_metadata(path)[1]
    assert (model_card.FORMAT, model_card.DEFAULT_BUNDLE_NAME, model_card.MODEL_ENV) == (
        FORMAT, DEFAULT_BUNDLE_NAME, MODEL_ENV)
    assert model_card.default_model_path() == default_bundle_path()


def test_line_of_a_new_card_shows_name_description_and_validation_dsc(tmp_path):
    path = make_tiny_bundle(tmp_path / "my-model.safetensors", trained=True, metadata=NEW_CARD)
    line, demonstration = model_card.describe_model(path)
    assert demonstration is True
    assert line.startswith("my-model: CPU demonstration model, recipe cpu_synthetic")
    assert "trained on CT generated from one real CT" in line
    assert "mean DSC on unseen CT: 0.61 (ct-abdomen-contrast-ircadb01), 0.45 (ct-abdomen-slab-amos0001)" in line
    assert "0.91" not in line  # the fit on the training case is not accuracy
    assert "\n" not in line and line.count("mean DSC") == 1


def test_dsc_figures_already_in_the_description_are_not_repeated(tmp_path):
    card = {**NEW_CARD, "description": NEW_CARD["description"].replace(
        "Not for clinical use.",
        "measured on unseen real CT: mean DSC 0.61 (IRCAD), 0.45 (AMOS). Not for clinical use.")}
    path = make_tiny_bundle(tmp_path / "m.safetensors", trained=True, metadata=card)
    line, _ = model_card.describe_model(path)
    assert line.count("DSC") == 1 and "0.61 (IRCAD)" in line


def test_line_of_an_old_card_says_accuracy_was_not_measured(tmp_path):
    path = make_tiny_bundle(tmp_path / "old.safetensors", trained=True, metadata=OLD_CARD)
    line, demonstration = model_card.describe_model(path)
    assert demonstration is True
    assert line == ("old: CPU demonstration model (recipe cpu_default): trained on ONE labeled CT; not for "
                    "clinical use; accuracy on unseen CT: not measured.")
    assert "0.68" not in line


def test_card_without_description_falls_back_to_its_training_data(tmp_path):
    path = make_tiny_bundle(tmp_path / "plain.safetensors", trained=True,
                            metadata={"description": "", "data": {"labeled": 40, "unlabeled": 10}})
    line, demonstration = model_card.describe_model(path)
    assert line == ("plain: trained on 40 labeled and 10 unlabeled CT; accuracy on unseen CT: not stated in its "
                    "model card.")
    assert demonstration is False
    path = make_tiny_bundle(tmp_path / "flagged.safetensors", trained=True,
                            metadata={"description": "Research model", "demonstration": True,
                                      "data": {"description": "50 FLARE22 cases: details"}})
    line, demonstration = model_card.describe_model(path)
    assert demonstration is True and line.startswith("flagged: Research model;")


def test_untrained_missing_and_foreign_files(tmp_path):
    line, demonstration = model_card.describe_model(make_tiny_bundle(tmp_path / "random.safetensors"))
    assert "UNTRAINED" in line and not demonstration
    line, _ = model_card.describe_model(tmp_path / "absent.safetensors")
    assert line.startswith("Model file not found")
    other = tmp_path / "other.safetensors"
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    other.write_bytes(len(header).to_bytes(8, "little") + header)
    assert model_card.describe_model(other)[0] == "other.safetensors is not an AbdomenKDSeg model bundle"
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    assert "not a model bundle" in model_card.describe_model(tmp_path / "junk.safetensors")[0]


def test_shipped_model_is_described_as_a_demonstration():
    line, demonstration = model_card.describe_model()
    _, card = read_bundle_metadata(default_bundle_path())
    assert demonstration is ("demonstration" in card.get("description", "").lower() or card.get("demonstration"))
    assert line.startswith("abdomen-kdseg-default: ") and ("DSC" in line or "not measured" in line)


def test_model_card_module_needs_neither_torch_nor_safetensors(tmp_path):
    path = make_tiny_bundle(tmp_path / "m.safetensors", trained=True, metadata=OLD_CARD)
    script = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torch", "safetensors", "numpy", "SimpleITK"}:
                    raise ImportError(name + " is blocked")
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, sys.argv[2])
        from AbdomenKDSegLib.engine import model_card
        print(model_card.describe_model(sys.argv[1])[0])
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(REPO / "AbdomenKDSeg")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("accuracy on unseen CT: not measured.")


@pytest.mark.parametrize("text, expected", [("CPU Demonstration model", True), ("clinical model", False)])
def test_demonstration_flag(text, expected):
    assert model_card.is_demonstration({"description": text}) is expected


# ------------------------------------------------------------------ model-info and the shipped card (issue 14)
def _model_info(capsys, *args):
    from AbdomenKDSegLib.cli import main

    code = main(["model-info", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_model_info_prints_a_short_summary_of_the_shipped_model(capsys):
    code, out, _ = _model_info(capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert 8 <= len(lines) <= 18 and max(map(len, lines)) <= 120
    text = " ".join(out.split())
    assert str(default_bundle_path()) in out
    assert "format 2" in text and "checksum verified (weights and model card)" in text
    assert "recipe cpu_synthetic" in text and "FSL" in text and "no unlabeled data" in text
    assert "161 labeled CT, no unlabeled CT" in text and "FLARE22_Tr_0041..0050" in text  # held out
    assert "2 renderings each (+80 weighted), plus that CT" in text  # the three merged generated sets
    assert "shipped: 0.5/0.5 weight average of this run and that model" in text  # weight average
    assert "0.90 ct-abdomen-contrast-ircadb01" in text and "0.54 ct-abdomen-slab-amos0001" in text
    assert "Z padded to 100 mm" in text  # min_z_extent_mm
    assert "[-300, 300] HU" in text and "float16" in text and "13: liver" in text
    assert "not for clinical use" in text and "--json" in lines[-1]


def test_model_info_json_is_the_whole_card(capsys):
    code, out, _ = _model_info(capsys, "--json")
    assert code == 0
    assert json.loads(out) == read_bundle_metadata(default_bundle_path())[1]


def test_model_info_refuses_a_modified_card(tmp_path, capsys):
    path = make_tiny_bundle(tmp_path / "m.safetensors", trained=True, metadata=NEW_CARD)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"[-300.0, 300.0]", b"[-900.0, 900.0]", 1))  # same length: header still valid
    assert data != path.read_bytes()
    for args in ([str(path)], [str(path), "--json"]):
        code, out, err = _model_info(capsys, *args)
        assert code == 1 and out == "" and "failed its checksum" in err and "model card" in err


def test_summary_is_a_pure_function_of_the_card(tmp_path):
    card = {**read_bundle_metadata(make_tiny_bundle(tmp_path / "t.safetensors", trained=True,
                                                   metadata=NEW_CARD))[1],
            "method": {"text": "recipe x: FSL, the student alone"}}
    lines = model_card.summary_lines(card)
    text = "\n".join(lines)
    assert lines[0].startswith("what") and "recipe x: FSL" in lines[0]
    assert "0.61 ct-abdomen-contrast-ircadb01 (4 organs), 0.45 ct-abdomen-slab-amos0001" in text
    assert "23 labeled CT, no unlabeled CT" in text and "0.91" not in text
    assert "format" not in text  # no file facts given, none invented
    untrained = model_card.summary_lines({"trained": False, "recipe": {"variant": "fsl"}})
    assert "UNTRAINED" in untrained[0] and not any(line.startswith("accuracy") for line in untrained)
    assert "variant fsl" in model_card.summary_lines({"recipe": {"variant": "fsl"}})[0]


def _card_tool(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import default_model_card

    return default_model_card


def test_shipped_card_states_the_fsl_recipe_and_no_unlabeled_data():
    _, card = read_bundle_metadata(default_bundle_path())
    assert "paper's method" not in json.dumps(card)
    assert card["method"]["recipe"] == "cpu_synthetic_context"
    assert card["method"]["variant"] == card["recipe"]["variant"] == "fsl"
    assert card["method"]["teachers"] == 0 and card["method"]["unlabeled_data"] is False
    assert "FSL" in card["description"] and "no unlabeled data" in card["description"]
    data = card["data"]
    assert data["unlabeled"] == 0 and "unlabeled_cases" not in data
    assert data["labeled"] == len(data["labeled_cases"]) == 161
    assert data["generator"]["heldout_targets"] == [f"FLARE22_Tr_{i:04d}" for i in range(41, 51)]
    assert not set(data["labeled_cases"]) & {f"{t}_v{v}" for t in data["generator"]["heldout_targets"]
                                                  for v in (0, 1, 2, 3)}


def test_shipped_card_text_is_derived_from_the_recipe(monkeypatch):
    """The card's description, method and data are what benchmarks/default_model_card.py derives
    from the recipe file, the generator's report and the measured figures (nothing hand-written)."""
    tool = _card_tool(monkeypatch)
    _, card = read_bundle_metadata(default_bundle_path())
    name = card["method"]["recipe"]
    recipe = tool.run_recipe(name, card["recipe"])
    derived = tool.card_text(card, name, recipe, json.loads(tool.GENERATOR_REPORT.read_text()))
    assert {key: card[key] for key in derived} == json.loads(json.dumps(derived))
    results = json.loads((REPO / "benchmarks" / "results" / "default_model.json").read_text())
    assert results["description"] == card["description"] and results["validation"] == card["metrics"]["validation"]
    with pytest.raises(SystemExit, match="not the recipe of this run"):
        tool.run_recipe("cpu_default", card["recipe"])


def test_card_method_follows_the_recipe_variant(monkeypatch):
    tool = _card_tool(monkeypatch)
    from AbdomenKDSegLib.training.recipe import load_recipe

    proposed = tool.method_card("proposed", load_recipe(tool.RECIPES / "proposed.yaml"))
    assert proposed["teachers"] == 2 and proposed["unlabeled_data"] is True
    assert "proposed method" in proposed["text"] and "labeled and unlabeled data" in proposed["text"]
    fsl = tool.method_card("cpu_synthetic", load_recipe(tool.RECIPES / "cpu_synthetic.yaml"))
    assert fsl["text"].startswith("recipe cpu_synthetic: FSL") and "7+13 epochs, Adam" in fsl["text"]


def test_fine_tuned_card_names_the_model_it_started_from(monkeypatch, tmp_path):
    """A run trained with ``--init-from`` records that bundle's checksum, method and scores, and the card's
    method text says so; the recipe check ignores the command-line ``init_from`` path."""
    tool = _card_tool(monkeypatch)
    from AbdomenKDSegLib.training.recipe import load_recipe

    start = tool.initialised_from(default_bundle_path())
    header, shipped = read_bundle_metadata(default_bundle_path())
    assert start["sha256"] == header["sha256"] and start["method"] == shipped["method"]["text"]
    assert set(start["validation_mean_dsc"]) == set(shipped["metrics"]["validation"])
    recipe = load_recipe(tool.RECIPES / "cpu_synthetic_continue.yaml")
    recorded = {**recipe.to_dict(), "init_from": str(tmp_path / "elsewhere.safetensors")}
    assert tool.run_recipe("cpu_synthetic_continue", recorded).to_dict() == recipe.to_dict()
    card = {"data": {"labeled_cases": []}, "training": {"initialised_from": start}}
    text = tool.card_text(card, "cpu_synthetic_continue", recipe, json.loads(tool.GENERATOR_REPORT.read_text()))
    assert text["method"]["initialised_from"] == header["sha256"]
    assert f"started from the weights of the previous default model (bundle {header['sha256'][:12]}" \
        in text["method"]["text"]
    assert f"(bundle {header['sha256'][:12]}, recipe {start['recipe']})" in text["method"]["text"]
    assert "1+18 epochs" in text["method"]["text"]


def test_merged_generator_sets_are_named_in_the_data_card(monkeypatch):
    """A run on two merged generated sets: the card lists every case and says how the second was weighted."""
    tool = _card_tool(monkeypatch)
    first = {"seed": 0, "variants": 2, "source_image": "data/ct-abdomen-3mm/image.nii.gz",
             "fit_dice_mean": {"all": 0.95}, "fits": {"FLARE22_Tr_0001": {"split": "train"},
                                                      "FLARE22_Tr_0002": {"split": "heldout"}},
             "cases": [{"case": "FLARE22_Tr_0001_v0", "split": "train", "appearance": {"phase": "arterial"},
                        "render": {"fov": "target"}}]}
    second = {**first, "variants": 1, "first_variant": 2,
              "render_ranges": {"fov_probabilities": [["target", 0.0], ["slab", 1.0]], "slab_mm": [40.0, 100.0],
                                "slice_thickness_mm": [2.5, 5.0]},
              "appearance_ranges": {"phase_probabilities": [["non_contrast", 0.6], ["arterial", 0.4]]},
              "cases": [{"case": "FLARE22_Tr_0001_v2", "split": "train", "appearance": {"phase": "non_contrast"},
                         "render": {"fov": "slab"}}]}
    merged = tool.merge_reports([first, second])
    assert [c["case"] for c in merged["cases"]] == ["FLARE22_Tr_0001_v0", "FLARE22_Tr_0001_v2"]
    assert [s["training_cases"] for s in merged["sets"]] == [1, 1]
    data = tool.data_card(merged, {"labeled_cases": ["FLARE22_Tr_0001_v0", "FLARE22_Tr_0001_v2"]}, False)
    assert data["generator"]["phases"] == {"arterial": 1, "non_contrast": 1}
    assert ("plus 1 renderings (variant 2, seed 0) weighted to fields of view slab 1, slabs 40-100 mm, "
            "slices 2.5-5 mm, phases non_contrast 0.6/arterial 0.4") in data["description"]
    third = {**second, "first_variant": 3, "appearance_ranges": {
        "phase_probabilities": [["non_contrast", 1.0]], "hollow_fill_probability": 0.7,
        "fat_halo_probability": 0.5, "fat_halo_mm": [2.0, 8.0]},
        "cases": [{"case": "FLARE22_Tr_0001_v3", "split": "train", "appearance": {"phase": "non_contrast"},
                   "render": {"fov": "slab"}}]}
    data = tool.data_card(tool.merge_reports([first, second, third]), {"labeled_cases": ["FLARE22_Tr_0001_v3"]},
                          False)
    assert ("(variant 3, seed 0) weighted to fields of view slab 1, slabs 40-100 mm, slices 2.5-5 mm, phases "
            "non_contrast 1, stomach/duodenum re-filled (fluid or oral contrast, air-fluid level) 0.7, "
            "fat layer 2-8 mm around organs 0.5") in data["description"]
    assert "phases non_contrast 0.6/arterial 0.4, plus 1 renderings (variant 3" in data["description"]
    assert tool.merge_reports([first]) is first
    with pytest.raises(SystemExit, match="same anatomy transfers"):
        tool.merge_reports([first, {**second, "fit_dice_mean": {"all": 0.5}}])


def test_heldout_means_skip_organs_the_flare_rules_cannot_score(monkeypatch):
    """A tubular organ on one slice of a slab scores NaN (FLARE rules): the means skip it, not become NaN."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import validate_model

    cases = [{"per_organ": {"liver": {"dsc": 0.8}, "esophagus": {"dsc": float("nan")}}, "mean_dsc": 0.8},
             {"per_organ": {"liver": {"dsc": 0.6}, "esophagus": {"dsc": 0.5}}, "mean_dsc": 0.55}]
    assert validate_model._mean_per_organ(cases) == {"liver": 0.7, "esophagus": 0.5, "mean": 0.675}
