"""Recipes: paper defaults, YAML overrides, unknown keys, the shipped Table 3 recipe files, the CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from AbdomenKDSegLib.training.cli import parse_overrides, register_cli, resolve_recipe_path
from AbdomenKDSegLib.training.recipe import VARIANTS, Recipe, RecipeError, load_recipe
from AbdomenKDSegLib.training.trainer import network_configs

RECIPES = Path(__file__).resolve().parents[1] / "Resources" / "recipes"


def test_defaults_are_the_papers_values():
    r = Recipe()
    assert (r.lr, r.momentum, r.nesterov, r.weight_decay, r.poly_power) == (0.01, 0.99, True, 3e-5, 0.9)
    assert (r.epochs, r.batch_size, r.lambda_dis, r.lambda_ssl) == (1000, 1, 10.0, 0.1)
    assert (r.focal_alpha, r.focal_gamma, r.dice_smooth) == (0.5, 2.0, 1e-5)
    assert r.coarse_size == (96, 96, 96) and r.patch_size == r.fine_size == (96, 64, 96)
    assert r.hu_window == (-300.0, 300.0) and r.fine_padding == 1.1
    assert r.augment.name == "v4" and r.augment.scale_axis == "reference"
    assert r.unlabeled_kl_weight == "reference" and r.variant == "proposed"


def test_yaml_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("epochs: 7\nlr: 1e-3\naugment:\n  scale_axis: labelled\nfine_size: [64, 48, 64]\n"
                    "patch_size: [64, 48, 64]\n")
    r = load_recipe(path)
    assert r.epochs == 7 and r.lr == 0.001 and r.augment.scale_axis == "labelled"
    assert r.fine_size == (64, 48, 64) and r.augment.elastic_p == 0.5
    path.write_text("epoch: 7\n")
    with pytest.raises(RecipeError, match="unknown key.*epoch"):
        load_recipe(path)
    path.write_text("augment:\n  sclae_axis: labelled\n")
    with pytest.raises(RecipeError, match="sclae_axis"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="integer"):
        Recipe.from_dict({"epochs": 1.5})
    with pytest.raises(RecipeError, match="unknown variant"):
        Recipe.from_dict({"variant": "nope"})
    with pytest.raises(RecipeError, match="larger than fine_size"):
        Recipe.from_dict({"patch_size": [96, 96, 96]})


@pytest.mark.parametrize("name", ["proposed", "fsl", "fsl_fine", "kd_single", "ssl_single_kd",
                                  "ssl_single_psv", "ssl_single_kd_psv", "cts", "ctt_psv", "ctt_kd",
                                  "ctt_sd", "cpu_small", "cpu_proposed", "cpu_default",
                                  "cpu_synthetic", "cpu_synthetic_continue", "cpu_synthetic_slab",
                                  "cpu_synthetic_context"])
def test_shipped_recipes_load(name):
    r = load_recipe(RECIPES / f"{name}.yaml")
    expected_fine = {"fsl_fine": "fsl", "cpu_small": "proposed", "cpu_proposed": "proposed",
                     "cpu_default": "fsl", "cpu_synthetic": "fsl", "cpu_synthetic_continue": "fsl",
                     "cpu_synthetic_slab": "fsl", "cpu_synthetic_context": "fsl"}.get(name, name)
    assert r.stage_variant("fine").name == expected_fine
    cpu_fsl = ("cpu_default", "cpu_synthetic", "cpu_synthetic_continue", "cpu_synthetic_slab",
               "cpu_synthetic_context")
    coarse = "fsl" if name == "fsl" or name in cpu_fsl else "proposed"
    assert r.stage_variant("coarse").name == coarse


def test_variant_switches_match_table3():
    table = {  # (teachers, students incl. S, SSL, KD, PSV, cross teaching)
        "fsl": (0, 1, False, False, False, False),
        "kd_single": (1, 1, False, True, False, False),
        "ssl_single_kd": (1, 1, True, True, False, False),
        "ssl_single_psv": (1, 1, True, False, True, False),
        "ssl_single_kd_psv": (1, 1, True, True, True, False),
        "cts": (0, 2, True, False, False, True),
        "ctt_psv": (2, 1, True, False, True, True),
        "ctt_kd": (2, 1, True, True, False, True),
        "ctt_sd": (2, 1, True, True, True, True),
        "proposed": (2, 1, True, True, True, True),
    }
    assert set(table) == set(VARIANTS)
    for name, row in table.items():
        v = VARIANTS[name]
        configs = network_configs(Recipe(), v)
        n_teachers = sum(1 for c in configs.values() if not c.mobile)
        n_students = sum(1 for c in configs.values() if c.mobile)
        assert (n_teachers, n_students, v.unlabeled, v.kd, v.psv, v.cross_teaching) == row, name
    proposed = network_configs(Recipe(), VARIANTS["proposed"])
    assert (proposed["T1"].upsampling, proposed["T2"].upsampling) == ("transposed", "resize")
    same = network_configs(Recipe(), VARIANTS["ctt_sd"])
    assert same["T1"].upsampling == same["T2"].upsampling == "transposed"
    cts = network_configs(Recipe(), VARIANTS["cts"])
    assert cts["T1"].upsampling == "transposed" and cts["T2"].upsampling == "resize"
    assert VARIANTS["cts"].export == "T1"  # the transposed-conv student is used at inference


def test_cli_parses_train_command():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register_cli(sub)
    args = parser.parse_args(["train", "--config", "proposed", "--data", "d", "--out", "o", "--resume",
                              "--set", "epochs=3", "--set", "augment.elastic_p=0"])
    assert args.resume and args.func is not None
    assert parse_overrides(args.set) == {"epochs": 3, "augment": {"elastic_p": 0}}
    assert resolve_recipe_path("cpu_small") == RECIPES / "cpu_small.yaml"


def test_optimizer_switch_builds_the_named_optimizer():
    from AbdomenKDSegLib.training.trainer import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = make_optimizer(params, Recipe())
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.01, 0.99, True, 3e-5)
    adam = make_optimizer(params, Recipe.from_dict({"optimizer": "adam", "lr": 0.002}))
    assert isinstance(adam, torch.optim.Adam)
    assert (adam.param_groups[0]["lr"], adam.param_groups[0]["weight_decay"]) == (0.002, 3e-5)
    assert load_recipe(RECIPES / "cpu_default.yaml").optimizer == "adam"
    with pytest.raises(RecipeError, match="optimizer must be one of"):
        Recipe.from_dict({"optimizer": "rmsprop"})
    with pytest.raises(RecipeError, match="lr must be > 0"):
        Recipe.from_dict({"lr": 0.0})
