"""Finish a trained run into the shipped default model: measure it, write its model card, install it.

    python benchmarks/default_model_card.py RUN_DIR --data GENERATED_DIR [MORE_DIRS] [--recipe NAME]
        [--average-with-start W] [--install]
    python benchmarks/default_model_card.py --rewrite-card [BUNDLE] [--recipe NAME] [--report REPORT]

Measures RUN_DIR/model.safetensors on real CT it never saw (the two validation cases of
../shared/data, see validate_model.py) and on the generated held-out split (GENERATED_DIR/heldout),
and its fit on the unwarped training CT (../shared/data/ct-abdomen-3mm, a *training* case: fitting,
not accuracy). The card's description, method and data text are derived (:func:`card_text`) from
the run's recipe (Resources/recipes/NAME.yaml, checked to be the recipe recorded in the run's card:
its ``variant`` field and its own settings), the generator's report (GENERATED_DIR/report.json) and
the measured figures, not written by hand. ``--average-with-start W`` measures and ships the weight
average W x run + (1 - W) x the bundle the run started from (its recipe's ``init_from``), and the card
says so. With ``--install`` the bundle is written (float16
storage) to AbdomenKDSeg/Resources/Models/abdomen-kdseg-default.safetensors and the (merged)
generator report to benchmarks/results/generated_training_set_report.json. Prints a table and
writes benchmarks/results/default_model.json (``--out``) and, beside it, default_model_validation.json
(every validation and held-out case, from validate_model.py). The figures are measured on the
float16-stored weights that are shipped.

``--rewrite-card`` re-derives the text of an existing bundle's card (default: the shipped one)
without retraining or re-measuring: same tensors (bit for bit), same measured figures, the text
rebuilt by :func:`card_text` from the card, the recipe file and the generator's report
(benchmarks/results/generated_training_set_report.json, the committed copy of the run's), written
in the current bundle format; the text fields of ``--out`` are updated to match.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
import torch
from validate_model import print_report, validate

from AbdomenKDSegLib.engine.bundle import (
    FORMAT_VERSION,
    default_bundle_path,
    load_bundle,
    read_bundle_metadata,
    save_bundle,
    upgrade_bundle,
    verify_bundle,
    write_bundle,
)
from AbdomenKDSegLib.engine.inference import segment_file
from AbdomenKDSegLib.engine.networks import NetworkConfig
from AbdomenKDSegLib.errors import BundleError
from AbdomenKDSegLib.evaluation.metrics import score_images
from AbdomenKDSegLib.runtimes.bundle_graphs import embed_graphs
from AbdomenKDSegLib.training.recipe import Recipe, Variant, load_recipe
from AbdomenKDSegLib.training.weight_average import average_into

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ct-abdomen-3mm"
RECIPES = REPO / "Resources" / "recipes"
#: The generator's report of the shipped model's training set (a copy of GENERATED_DIR/report.json).
GENERATOR_REPORT = REPO / "benchmarks" / "results" / "generated_training_set_report.json"
#: What the real source CT of the generator is (../shared/data/README.md).
SOURCE_NOTES = {
    "ct-abdomen-3mm": "TotalSegmentator test CT, 3 mm, non-contrast, labels made by TotalSegmentator",
}
#: Short names of the validation cases (../shared/data/README.md); others are shown by their folder name.
CASE_NAMES = {
    "ct-abdomen-contrast-ircadb01": "IRCAD 3D-IRCADb-01 #1",
    "ct-abdomen-slab-amos0001": "AMOS 0001 slab",
}


def training_seconds(run: Path) -> dict[str, float]:
    """Wall-clock seconds of each stage, summed from RUN/<stage>/epochs.csv."""
    out = {}
    for stage in ("coarse", "fine"):
        with open(run / stage / "epochs.csv") as f:
            out[stage] = round(sum(float(row["seconds"]) for row in csv.DictReader(f)), 1)
    return out


#: Recipe keys given on the command line rather than in the file (``train --init-from``): not compared.
COMMAND_LINE_KEYS = ("init_from",)


def run_recipe(name: str, card_recipe: dict, recipes: Path = RECIPES) -> Recipe:
    """The recipe file ``recipes/<name>.yaml``, checked to be the recipe the run recorded in its card
    (but for :data:`COMMAND_LINE_KEYS`)."""
    recipe = load_recipe(recipes / f"{name}.yaml")
    recorded = Recipe.from_dict(card_recipe).to_dict()
    differing = sorted(k for k in set(recorded) | set(recipe.to_dict())
                       if k not in COMMAND_LINE_KEYS and recorded.get(k) != recipe.to_dict().get(k))
    if differing:
        raise SystemExit(f"recipe {name} is not the recipe of this run: {', '.join(differing)} differ "
                         "(give the right one with --recipe)")
    return recipe


def _variant_label(variant: Variant) -> str:
    """The variant's place in the paper: its proposed method, its fully supervised baseline, an ablation."""
    if variant.name == "proposed":
        return "the paper's proposed method"
    kind = "fully supervised baseline" if variant.name == "fsl" else "ablation"
    return f"{variant.name.upper()}, the paper's {kind} (Table 3), not its proposed method"


def _networks(variant: Variant) -> str:
    if not variant.student:
        return f"{variant.n_teachers} cross-teaching students, no teacher"
    if variant.n_teachers == 0:
        return "student alone, no teachers"
    return f"student and {variant.n_teachers} teacher{'s' if variant.n_teachers > 1 else ''}"


def method_card(recipe_name: str, recipe: Recipe) -> dict:
    """How the model was trained, from the recipe alone: its ``variant`` (per stage) and its settings."""
    variants = {stage: recipe.stage_variant(stage) for stage in ("coarse", "fine")}
    fine = variants["fine"]
    uses_unlabeled = any(v.unlabeled for v in variants.values())
    details = [_networks(fine), "labeled and unlabeled data" if uses_unlabeled else "no unlabeled data"]
    if fine.kd or fine.psv or fine.cross_teaching:  # the losses are worth naming
        details.insert(0, fine.description)
    parts = [f"{_variant_label(fine)}: {', '.join(details)}"]
    if variants["coarse"].name != fine.name:
        parts.append(f"coarse stage {variants['coarse'].name} ({variants['coarse'].description})")
    epochs = {stage: recipe.stage_epochs(stage) for stage in ("coarse", "fine")}
    optimizer = {"adam": "Adam", "sgd": "SGD"}.get(recipe.optimizer, recipe.optimizer)
    parts.append(f"{epochs['coarse']}+{epochs['fine']} epochs, {optimizer} lr {recipe.lr:g}, "
                 f"{'x'.join(map(str, recipe.patch_size))} patches")
    return {
        "recipe": recipe_name,
        "variant": fine.name,
        "coarse_variant": variants["coarse"].name,
        "teachers": fine.n_teachers,
        "unlabeled_data": uses_unlabeled,
        "epochs": epochs,
        "text": f"recipe {recipe_name}: " + "; ".join(parts),
    }


def _span(names: list) -> str:
    return f"{names[0]}..{names[-1]}" if len(names) > 1 else ", ".join(names)


def merge_reports(reports: list[dict]) -> dict:
    """One generator report from several sets rendered from the same fits (``make-training-set`` with
    other weights and ``--first-variant``, merged into one data folder): the first set's report with
    every set's cases and a ``sets`` list (seed, variants, first variant, ranges, training cases)."""
    if len(reports) == 1:
        return reports[0]
    first = reports[0]
    for other in reports[1:]:
        if other["fit_dice_mean"] != first["fit_dice_mean"] or other["source_image"] != first["source_image"]:
            raise SystemExit("the generated sets were not rendered from the same anatomy transfers")
    merged = dict(first)
    merged["cases"] = sorted((case for r in reports for case in r["cases"]), key=lambda c: c["case"])
    merged["sets"] = [{"seed": r["seed"], "variants": r["variants"], "first_variant": r.get("first_variant", 0),
                       "render_ranges": r.get("render_ranges", "defaults"),
                       "appearance_ranges": r.get("appearance_ranges", "defaults"),
                       "training_cases": sum(1 for c in r["cases"] if c["split"] == "train")} for r in reports]
    return merged


def _weights(pairs: list) -> str:
    return "/".join(f"{name} {weight:g}" for name, weight in pairs if weight)


def _set_text(entry: dict) -> str:
    """How an extra generated set was weighted, from its recorded ranges."""
    parts = []
    render, look = entry["render_ranges"], entry["appearance_ranges"]
    if isinstance(render, dict):
        lo, hi = render["slab_mm"]
        t_lo, t_hi = render["slice_thickness_mm"]
        parts += [f"fields of view {_weights(render['fov_probabilities'])}", f"slabs {lo:g}-{hi:g} mm",
                  f"slices {t_lo:g}-{t_hi:g} mm"]
    if isinstance(look, dict):
        parts.append(f"phases {_weights(look['phase_probabilities'])}")
        if look.get("hollow_fill_probability"):
            parts.append(f"stomach/duodenum re-filled (fluid or oral contrast, air-fluid level) "
                         f"{look['hollow_fill_probability']:g}")
        if look.get("fat_halo_probability"):
            lo, hi = look.get("fat_halo_mm", (2.0, 8.0))
            parts.append(f"fat layer {lo:g}-{hi:g} mm around organs {look['fat_halo_probability']:g}")
    return (f"plus {entry['training_cases']} renderings (variant {entry['first_variant']}, seed {entry['seed']}) "
            f"weighted to {', '.join(parts) or 'the default draws'}")


def data_card(report: dict, data: dict, uses_unlabeled: bool) -> dict:
    """What the model was trained on: the run's case lists (``data`` of its card) and the generator's
    ``report``. Unlabeled cases are listed only if the recipe used them."""
    labeled = list(data.get("labeled_cases", []))
    generated = {case["case"] for case in report["cases"] if case["split"] == "train"}
    train_targets = sorted(name for name, fit in report["fits"].items() if fit["split"] == "train")
    heldout = sorted(name for name, fit in report["fits"].items() if fit["split"] == "heldout")
    n_generated = sum(1 for name in labeled if name in generated)
    real = [name for name in labeled if name not in generated]
    source = Path(report["source_image"]).parent.name
    phases: dict = {}
    fovs: dict = {}
    for case in report["cases"]:
        if case["split"] == "train":
            phases[case["appearance"]["phase"]] = phases.get(case["appearance"]["phase"], 0) + 1
            fovs[case["render"]["fov"]] = fovs.get(case["render"]["fov"], 0) + 1
    unlabeled = list(data.get("unlabeled_cases", [])) if uses_unlabeled else []
    unlabeled_text = (f"{len(unlabeled)} unlabeled CT" if unlabeled else "no unlabeled CT")
    note = SOURCE_NOTES.get(source)
    text = (f"{len(labeled)} labeled CT, {unlabeled_text}: {n_generated} generated by "
            f"`abdomen-kdseg make-training-set` (seed {report['seed']}) from ONE real labeled CT "
            f"({source}{': ' + note if note else ''}) deformed onto {len(train_targets)} hand-drawn FLARE22 "
            f"label maps ({_span(train_targets)}), {report['variants']} renderings each with random contrast "
            "phase, texture, noise, blur, spacing and field of view")
    for entry in report.get("sets", [])[1:]:
        text += ", " + _set_text(entry)
    if source in real:
        text += ", plus that CT itself"
    others = [name for name in real if name != source]
    if others:
        text += f", plus {len(others)} other labeled CT ({', '.join(others)})"
    if heldout:
        text += f"; label maps {_span(heldout)} held out (not trained on)"
    out = {key: value for key, value in data.items() if key not in ("unlabeled", "unlabeled_cases")}
    out.update({
        "description": text,
        "labeled": len(labeled),
        "unlabeled": len(unlabeled),
        "generator": {"seed": report["seed"], "variants_per_label_map": report["variants"],
                      "source": source, "train_targets": train_targets,
                      "fit_dice_mean": report["fit_dice_mean"], "phases": phases, "fields_of_view": fovs,
                      "heldout_targets": heldout},
    })
    if report.get("sets"):
        out["generator"]["sets"] = report["sets"]
    if unlabeled:
        out["unlabeled_cases"] = unlabeled
    return out


def initialised_from(path: Path) -> dict:
    """What a fine-tuned run started from (``train --init-from``): the bundle's checksum and card text,
    read before the new model replaces it."""
    header, card = read_bundle_metadata(path)
    return {"bundle": path.name, "sha256": header["sha256"], "recipe": card.get("method", {}).get("recipe"),
            "method": card.get("method", {}).get("text", ""), "data": card.get("data", {}).get("description", ""),
            "validation_mean_dsc": {case: res.get("mean_dsc") for case, res in
                                    (card.get("metrics") or {}).get("validation", {}).items()},
            "previous": card.get("training", {}).get("initialised_from")}


def card_text(card: dict, recipe_name: str, recipe: Recipe, report: dict) -> dict:
    """The text fields of a model card (``description``, ``method``, ``data``), derived from the recipe,
    the generator's report and the figures already measured in ``card["metrics"]`` (none invented).
    A fine-tuned model (``card["training"]["initialised_from"]``) names the model it started from."""
    method = method_card(recipe_name, recipe)
    start = card.get("training", {}).get("initialised_from")
    if start:
        method["initialised_from"] = start["sha256"]
        # the starting model's own method text stays in its card; here only its bundle and recipe
        method["text"] += (f"; started from the weights of the previous default model (bundle {start['sha256'][:12]}, "
                           f"recipe {start['recipe']})")
    averaged = card.get("training", {}).get("weight_average")
    if averaged:
        method["weight_average"] = averaged
        method["text"] += (f"; shipped: {averaged['run_weight']:g}/{1 - averaged['run_weight']:g} "
                           "weight average of this run and that model")
    data = data_card(report, card.get("data", {}), method["unlabeled_data"])
    on_cpu = "no GPU" in str(card.get("training", {}).get("hardware", ""))
    validation = (card.get("metrics") or {}).get("validation") or {}
    measured = ", ".join(f"{res['mean_dsc']:.2f} ({CASE_NAMES.get(case, case)}, {len(res['organs_scored'])} organs)"
                         for case, res in validation.items())
    description = (f"{'CPU demonstration' if on_cpu else 'Demonstration'} model, {method['text']}; trained on "
                   f"{data['labeled']} labeled CT generated from one real CT"
                   f"{' and ' + str(data['unlabeled']) + ' unlabeled CT' if data['unlabeled'] else ''}; "
                   + (f"measured on unseen real CT: mean DSC {measured}" if measured
                      else "accuracy on unseen CT: not measured") + ". Not for clinical use.")
    return {"description": description, "method": method, "data": data, "demonstration": True}


def _text_fields(card: dict) -> dict:
    return {"data": card["data"], "method": card["method"], "description": card["description"]}


def rewrite_card(bundle_path: Path, recipe_name: str, report_path: Path, out_json: Path | None) -> Path:
    """Re-derive the text of an existing bundle's card; same tensors and figures, current format."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            read_bundle_metadata(bundle_path)
            source = bundle_path
        except BundleError:  # an older format: convert a copy first (verifies its old checksum)
            source = upgrade_bundle(bundle_path, Path(tmp) / "upgraded.safetensors")
        _, card, tensors = verify_bundle(source)
        report = json.loads(report_path.read_text())
        if report["fit_dice_mean"] != card.get("data", {}).get("generator", {}).get("fit_dice_mean"):
            raise SystemExit(f"{report_path} is not the generator report of this model's training set")
        recipe = run_recipe(recipe_name, card.get("recipe", {}))
        card.update(card_text(card, recipe_name, recipe, report))
        target = write_bundle(bundle_path, tensors, card)
    print(f"rewrote the card of {target} (format {FORMAT_VERSION}): {card['description']}")
    if out_json is not None and out_json.is_file():
        results = json.loads(out_json.read_text())
        results.update(_text_fields(card))
        out_json.write_text(json.dumps(results, indent=2))
        print(f"updated the text fields of {out_json}")
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?", help="the training run folder (RUN_DIR/model.safetensors)")
    parser.add_argument("--data", type=Path, nargs="+",
                        help="the generated data folder(s) the run used: several when sets rendered with other "
                             "weights (make-training-set --first-variant) were merged; each one's heldout/ is "
                             "measured, the first's is the card's held-out split")
    parser.add_argument("--install", action="store_true")
    parser.add_argument("--average-with-start", type=float, default=None, metavar="W",
                        help="ship W x the run's weights + (1 - W) x the weights it started from (train "
                             "--init-from), measured as such (training/weight_average.py)")
    parser.add_argument("--recipe", default="cpu_synthetic",
                        help="name of the recipe the run used (Resources/recipes/NAME.yaml; checked against the card)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "default_model.json")
    parser.add_argument("--rewrite-card", type=Path, nargs="?", const=default_bundle_path(), default=None,
                        metavar="BUNDLE", help="re-derive the card text of BUNDLE (default: the shipped model) "
                                               "without retraining or measuring")
    parser.add_argument("--report", type=Path, default=GENERATOR_REPORT,
                        help="with --rewrite-card: the generator's report of the training set")
    args = parser.parse_args()
    if args.rewrite_card is not None:
        rewrite_card(args.rewrite_card, args.recipe, args.report, args.out)
        return 0
    if args.run is None or args.data is None:
        parser.error("RUN_DIR and --data are required (or --rewrite-card)")
    run_bundle = load_bundle(args.run / "model.safetensors")
    start = run_bundle.metadata.get("recipe", {}).get("init_from")
    start_card = initialised_from(Path(start)) if start else None  # before --install replaces that file
    if args.average_with_start is not None:
        if not start:
            parser.error("--average-with-start needs a run that was started with train --init-from")
        start_bundle = load_bundle(Path(start))
        average_into(run_bundle.coarse, start_bundle.coarse, args.average_with_start)
        average_into(run_bundle.fine, start_bundle.fine, args.average_with_start)
    arch = run_bundle.metadata["architecture"]
    configs = NetworkConfig.from_dict(arch["coarse"]), NetworkConfig.from_dict(arch["fine"])
    with tempfile.TemporaryDirectory() as tmp:
        # measure exactly what is shipped: the float16-stored weights
        shipped = save_bundle(Path(tmp) / "model-fp16.safetensors", run_bundle.coarse, run_bundle.fine, *configs,
                              dict(run_bundle.metadata), dtype=torch.float16)
        bundle = load_bundle(shipped)
        started = time.perf_counter()
        result = segment_file(DATA / "image.nii.gz", Path(tmp) / "pred.nii.gz", model=bundle, device="cpu")
        seconds = time.perf_counter() - started
        scores = score_images(sitk.ReadImage(str(DATA / "labels-flare13.nii.gz")),
                              sitk.ReadImage(str(result.output_path)))
        validation = validate(shipped, args.data[0] / "heldout")
        extra_heldout = {folder.name: validate(shipped, folder / "heldout").get("heldout_synthetic_mean")
                         for folder in args.data[1:]}
    per_organ = {s.organ.key: {"dsc": round(float(s.dsc), 4), "nsd": round(float(s.nsd), 4)} for s in scores}
    present = [s for s in scores if s.organ.value != 10]  # esophagus is absent from the reference labels
    mean_dsc = sum(float(s.dsc) for s in present) / len(present)
    card = dict(run_bundle.metadata)
    recipe = run_recipe(args.recipe, card.get("recipe", {}))
    card["training"] = {**card.get("training", {}), "seconds_per_stage": training_seconds(args.run),
                        "hardware": f"{platform.processor() or platform.machine()}, "
                                    f"{torch.get_num_threads()} CPU threads, no GPU"}
    if start_card is not None:
        card["training"]["initialised_from"] = start_card
    if args.average_with_start is not None:
        card["training"]["weight_average"] = {"run_weight": args.average_with_start,
                                              "start_sha256": start_card["sha256"]}
    card["metrics"] = {
        "validation": {case: {k: res[k] for k in ("organs_scored", "per_organ", "mean_dsc", "mean_nsd",
                                                   "empty_organs")}
                       for case, res in validation["validation"].items()},
        "heldout_synthetic_mean_dsc": validation.get("heldout_synthetic_mean"),
        **({"heldout_synthetic_other_sets_mean_dsc": extra_heldout} if extra_heldout else {}),
        "training_case": {"case": "ct-abdomen-3mm (a training case: measures fitting only)",
                          "per_organ": per_organ, "mean_dsc_12_present_organs": round(mean_dsc, 4)},
    }
    generator_report = merge_reports([json.loads((folder / "report.json").read_text()) for folder in args.data])
    card.update(card_text(card, args.recipe, recipe, generator_report))
    report = {"bundle": str(args.run / "model.safetensors"), "segment_seconds_cpu": round(seconds, 2),
              "timings": {k: round(v, 2) for k, v in result.timings.items()}, **card["metrics"],
              "training": card["training"], **_text_fields(card)}
    print_report(validation)
    for name, means in extra_heldout.items():
        print(f"\nheld-out split of {name}: mean DSC {means['mean']:.3f}" if means else f"\n{name}: no held-out cases")
    print(f"\n{'organ':<22}{'DSC':>8}{'NSD':>8}   (training case: fitting, not generalisation)")
    for key, value in per_organ.items():
        print(f"{key:<22}{value['dsc']:>8.3f}{value['nsd']:>8.3f}")
    print(f"mean DSC over the 12 present organs: {mean_dsc:.3f}; "
          f"training seconds {card['training']['seconds_per_stage']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    validation_out = args.out.with_name("default_model_validation.json")
    validation_out.write_text(json.dumps(validation, indent=2))
    if args.install:
        target = save_bundle(default_bundle_path(), run_bundle.coarse, run_bundle.fine, *configs, card,
                             dtype=torch.float16)
        embed_graphs(target)  # the ONNX graphs: CPU segmentation without PyTorch
        GENERATOR_REPORT.write_text(json.dumps(generator_report, indent=1))  # what --rewrite-card re-reads
        print(f"installed {target} (with its ONNX graphs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
