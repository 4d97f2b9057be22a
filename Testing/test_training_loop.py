"""The training loop: bitwise resume, DDP replicas, crash-safe checkpoints, end-to-end on real data."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AbdomenKDSegLib.engine.bundle import load_bundle
from AbdomenKDSegLib.errors import InputError
from AbdomenKDSegLib.training.checkpoint import (
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from AbdomenKDSegLib.training.data import CachedCase
from AbdomenKDSegLib.training.pipeline import stage_checkpoint, train
from AbdomenKDSegLib.training.recipe import Recipe
from AbdomenKDSegLib.training.trainer import StageTrainer

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = {"base_features": 4, "n_stages": 3}


def tiny_recipe(**over) -> Recipe:
    base = dict(epochs=2, student=TINY, teacher=TINY, coarse_size=[32, 32, 32], fine_size=[32, 16, 32],
                patch_size=[32, 16, 32], snapshot_every_epochs=0, deterministic=True)
    base.update(over)
    return Recipe.from_dict(base)


# ---------------------------------------------------------------------------- synthetic cached cases
def synthetic_cases(folder: Path, n_labeled: int, n_unlabeled: int, shape=(32, 32, 32)):
    """Cached cases written directly (image int16 HU, uint8 labels), like the coarse cache."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {"labeled": [], "unlabeled": []}
    for kind, n in (("labeled", n_labeled), ("unlabeled", n_unlabeled)):
        for i in range(n):
            cid = f"{kind[0]}{i}"
            image = rng.integers(-200, 200, shape).astype(np.int16)
            label = np.zeros(shape, np.uint8)
            label[4 + i:20, 6:22, 5:25] = 1 + (i % 13)
            label[10:14, 10:14, 10:14] = 5
            image[label > 0] += 100
            np.save(folder / f"{cid}.image.npy", image)
            lab_path = None
            if kind == "labeled":
                lab_path = folder / f"{cid}.label.npy"
                np.save(lab_path, label)
            meta = folder / f"{cid}.json"
            meta.write_text(json.dumps({"key": {"case": cid}}))
            out[kind].append(CachedCase(cid, kind, folder / f"{cid}.image.npy", lab_path, meta))
    return out


def weights_of(nets):
    return {f"{r}.{k}": v.clone() for r, n in nets.items() for k, v in n.state_dict().items()}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------- RNG and checkpoints
def test_rng_state_round_trip(tmp_path):
    import random

    state = get_rng_state()
    save_checkpoint({"rng": state}, tmp_path / "c.pt")
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_stage_trainer_resumes_bitwise(tmp_path):
    cases = synthetic_cases(tmp_path / "cache", 2, 2)
    recipe = tiny_recipe(checkpoint_every_steps=0)

    def trainer(folder):
        return StageTrainer("coarse", recipe, cases["labeled"], cases["unlabeled"], folder,
                            torch.device("cpu"), progress=False)

    full = trainer(tmp_path / "full")
    full.start(resume=False)
    assert full.run() is True and full.global_step == 8  # 2 epochs x (2 labeled + 2 unlabeled)
    for stop in (3, 4):  # mid-epoch and at an epoch boundary
        part = trainer(tmp_path / f"part{stop}")
        part.start(resume=False)
        assert part.run(max_steps=stop) is False and part.global_step == stop
        resumed = trainer(tmp_path / f"part{stop}")
        assert resumed.start(resume=True) is True and resumed.global_step == stop
        assert resumed.run() is True and resumed.global_step == 8
        assert_bitwise_equal(weights_of(full.nets), weights_of(resumed.nets))
        a, b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
        assert all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)
    rows = (tmp_path / "part3" / "steps.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 8 and [r.split(",")[3] for r in rows[1:5]] == ["labeled", "unlabeled"] * 2
    assert (tmp_path / "part3" / "losses.png").stat().st_size > 1000
    import csv

    def epoch_means(folder):
        rows = list(csv.DictReader((tmp_path / folder / "epochs.csv").open()))
        return [(r["epoch"], r["labeled_total"], r["unlabeled_total"], r["labeled_kl"]) for r in rows]

    assert len(epoch_means("part3")) == 2
    assert epoch_means("part3") == epoch_means("full")  # means include the steps before the stop


def test_init_from_bundle_starts_each_stage_from_its_network(tmp_path):
    """Fine-tuning: the student of each stage starts from the bundle's coarse / fine weights (not
    random), trains from there, and a bundle of another architecture is refused with both named."""
    from engine_helpers import make_tiny_bundle

    bundle_path = make_tiny_bundle(tmp_path / "start.safetensors", seed=7, base_features=4)
    bundle = load_bundle(bundle_path)
    cases = synthetic_cases(tmp_path / "cache", 2, 0)
    tiny = {"base_features": 4, "max_features": 32}  # the tiny bundle's student
    recipe = tiny_recipe(variant="fsl", student=tiny, epochs=1, init_from=str(bundle_path))
    for stage in ("coarse", "fine"):
        t = StageTrainer(stage, recipe, cases["labeled"], [], tmp_path / stage, torch.device("cpu"),
                         progress=False)
        assert_bitwise_equal({k: v for k, v in t.nets["S"].state_dict().items()},
                             dict(getattr(bundle, stage).state_dict()))
        t.start(resume=False)
        assert t.run() is True
        assert any(not torch.equal(a, b) for a, b in zip(t.nets["S"].state_dict().values(),
                                                          getattr(bundle, stage).state_dict().values()))
    random_start = StageTrainer("coarse", tiny_recipe(variant="fsl", student=tiny, epochs=1), cases["labeled"], [],
                                tmp_path / "random", torch.device("cpu"), progress=False)
    assert not torch.equal(next(iter(random_start.nets["S"].state_dict().values())),
                           next(iter(bundle.coarse.state_dict().values())))
    with pytest.raises(InputError, match="does not fit the recipe's S network"):
        StageTrainer("coarse", tiny_recipe(variant="fsl", epochs=1, init_from=str(bundle_path)), cases["labeled"],
                     [], tmp_path / "other", torch.device("cpu"), progress=False)


def test_max_steps_counts_the_steps_of_each_call(tmp_path):
    """run(max_steps=N) trains N more steps from wherever the stage was resumed (not up to step N)."""
    cases = synthetic_cases(tmp_path / "cache", 2, 2)
    recipe = tiny_recipe(checkpoint_every_steps=0)

    def trainer(folder):
        return StageTrainer("coarse", recipe, cases["labeled"], cases["unlabeled"], folder,
                            torch.device("cpu"), progress=False)

    full = trainer(tmp_path / "full")
    full.start(resume=False)
    assert full.run() is True and full.total_steps == 8
    steps = []
    for _ in range(3):
        part = trainer(tmp_path / "part")
        part.start(resume=True)
        finished = part.run(max_steps=3)
        steps.append((part.global_step, finished))
    assert steps == [(3, False), (6, False), (8, True)]
    assert_bitwise_equal(weights_of(full.nets), weights_of(part.nets))


def test_lr_poly_per_epoch_and_ramp_in_log(tmp_path):
    cases = synthetic_cases(tmp_path / "cache", 1, 1)
    recipe = tiny_recipe(epochs=4)
    t = StageTrainer("fine", recipe, cases["labeled"], cases["unlabeled"], tmp_path / "run",
                     torch.device("cpu"), progress=False)
    t.start(resume=False)
    t.run()
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "epochs.csv").open()))
    for row in rows:
        e = int(row["epoch"])
        assert float(row["lr"]) == pytest.approx(0.01 * (1 - e / 4) ** 0.9)
        assert float(row["ramp"]) == pytest.approx(np.exp(-5 * (1 - e / 4) ** 2))
        assert float(row["lambda_dis"]) == pytest.approx(10 * float(row["ramp"]))
    steps = list(csv.DictReader((tmp_path / "run" / "steps.csv").open()))
    assert [r["kind"] for r in steps] == ["labeled", "unlabeled"] * 4
    assert all(r["seg_S"] and r["kl"] and not r["psv"] for r in steps if r["kind"] == "labeled")
    assert all(r["psv"] and r["ct_T1"] and not r["seg_S"] for r in steps if r["kind"] == "unlabeled")


KILL_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from AbdomenKDSegLib.training.data import CachedCase
    from AbdomenKDSegLib.training.recipe import Recipe
    from AbdomenKDSegLib.training.trainer import StageTrainer
    spec = json.loads(sys.argv[1])
    cases = {k: [CachedCase(c[0], k, Path(c[1]), Path(c[2]) if c[2] else None, Path(c[3])) for c in v]
             for k, v in spec["cases"].items()}
    recipe = Recipe.from_dict(spec["recipe"])
    t = StageTrainer("coarse", recipe, cases["labeled"], cases["unlabeled"], Path(spec["out"]),
                     torch.device("cpu"), progress=False)
    t.start(resume=False)
    t.run()
""")


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    cases = synthetic_cases(tmp_path / "cache", 1, 1)
    recipe = tiny_recipe(checkpoint_every_steps=1)
    spec = {"recipe": recipe.to_dict(), "out": str(tmp_path / "run"),
            "cases": {k: [[c.case_id, str(c.image_path), str(c.label_path) if c.label_path else None,
                           str(c.meta_path)] for c in v] for k, v in cases.items()}}
    marker = tmp_path / "paused"
    env = dict(os.environ, ABDOMENKDSEG_TEST_CKPT_PAUSE=f"4096:{marker}:1")  # 2nd save pauses mid-file
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(spec)], env=env)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None, "training process ended before the paused checkpoint write"
            assert time.time() < deadline, "timed out waiting for the checkpoint writer to pause"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    folder = tmp_path / "run"
    partial = Path(marker.read_text())
    assert partial.exists() and partial.parent == folder and partial.stat().st_size >= 4096
    state = load_checkpoint(folder / "checkpoint_latest.pt")  # intact: the first save
    assert state["global_step"] == 1 and state["sampler"]["step"] == 1
    t = StageTrainer("coarse", recipe, cases["labeled"], cases["unlabeled"], folder, torch.device("cpu"),
                     progress=False)
    assert t.start(resume=True) and t.global_step == 1
    assert t.run() is True and t.global_step == 4
    assert not list(folder.glob(".*.tmp"))  # the stale temp file was cleaned up


# ---------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, spec: dict) -> None:
    import torch.distributed as dist

    from AbdomenKDSegLib.training.distributed import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cases = {k: [CachedCase(c[0], k, Path(c[1]), Path(c[2]) if c[2] else None, Path(c[3])) for c in v]
                 for k, v in spec["cases"].items()}
        recipe = Recipe.from_dict(spec["recipe"])
        t = StageTrainer("coarse", recipe, cases["labeled"], cases["unlabeled"], Path(spec["out"]),
                         torch.device("cpu"), dist=DistInfo(rank, world), progress=False)
        t.start(resume=False)
        torch.save(weights_of(t.nets), Path(spec["out"]) / f"init{rank}.pt")
        seen = [t.sampler.batch(0, s) for s in range(t.sampler.steps_per_epoch)]
        t.run(max_steps=4)
        torch.save(weights_of(t.nets), Path(spec["out"]) / f"rank{rank}.pt")
        (Path(spec["out"]) / f"seen{rank}.json").write_text(json.dumps([[b.kind, b.indices] for b in seen]))
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    import torch.multiprocessing as mp

    cases = synthetic_cases(tmp_path / "cache", 4, 2)
    out = tmp_path / "run"
    out.mkdir()
    spec = {"recipe": tiny_recipe(epochs=3).to_dict(), "out": str(out),
            "cases": {k: [[c.case_id, str(c.image_path), str(c.label_path) if c.label_path else None,
                           str(c.meta_path)] for c in v] for k, v in cases.items()}}
    mp.spawn(_ddp_worker, args=(2, _free_port(), spec), nprocs=2, join=True)
    w0, w1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert_bitwise_equal(w0, w1)
    init = torch.load(out / "init0.pt", weights_only=True)
    assert any(not torch.equal(init[k], w0[k]) for k in init)  # it trained
    seen = [json.loads((out / f"seen{r}.json").read_text()) for r in range(2)]
    labeled = sorted(i for s in seen for kind, idx in s if kind == "labeled" for i in idx)
    assert labeled == [0, 1, 2, 3]  # the ranks split the labeled cases of an epoch
    state = load_checkpoint(out / "checkpoint_latest.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["global_step"] == 4


# ---------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """labeled: the 3 mm CT + its labels; unlabeled: the DICOM series (as NIfTI) and a flipped crop."""
    from AbdomenKDSegLib.engine.image_io import read_image

    root = tmp_path_factory.mktemp("data")
    for sub in ("imagesTr", "labelsTr", "unlabeled"):
        (root / sub).mkdir()
    image = sitk.ReadImage(str(DATA / "ct-abdomen-3mm" / "image.nii.gz"))
    sitk.WriteImage(image, str(root / "imagesTr" / "ct3mm_0000.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(DATA / "ct-abdomen-3mm" / "labels-flare13.nii.gz")),
                    str(root / "labelsTr" / "ct3mm.nii.gz"))
    sitk.WriteImage(read_image(DATA / "ct-upper-abdomen-dicom"), str(root / "unlabeled" / "dicom_0000.nii.gz"))
    flipped = sitk.Flip(image, [True, False, False])[:, 10:90, 5:100]
    sitk.WriteImage(flipped, str(root / "unlabeled" / "flipcrop_0000.nii.gz"))
    return root


@pytest.fixture(scope="module")
def uninterrupted_run(data_dir, tmp_path_factory):
    """The tiny recipe trained on the real data in one go (coarse 4 steps, fine 4 steps)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    recipe = tiny_recipe()
    a = train(recipe, data_dir, root / "a", cache_dir=root / "cache", progress=False)
    assert a.completed and a.stages["coarse"]["steps"] == 4 and a.stages["fine"]["steps"] == 4
    return recipe, root / "cache", a


def assert_same_run(a_dir: Path, b_dir: Path) -> None:
    for stage in ("coarse", "fine"):
        sa, sb = stage_checkpoint(a_dir, stage), stage_checkpoint(b_dir, stage)
        assert sa["global_step"] == sb["global_step"] and sb["completed"]
        for role in sa["models"]:
            assert_bitwise_equal(sa["models"][role], sb["models"][role])
    ba, bb = load_bundle(a_dir / "model.safetensors"), load_bundle(b_dir / "model.safetensors")
    for net in ("coarse", "fine"):
        assert_bitwise_equal(getattr(ba, net).state_dict(), getattr(bb, net).state_dict())
    # the model cards differ only in the time of export (so the bundles' checksums differ too)
    assert {**ba.metadata, "created": None} == {**bb.metadata, "created": None}


def test_pipeline_resume_matches_uninterrupted_run(data_dir, tmp_path, uninterrupted_run):
    recipe, cache, a = uninterrupted_run
    b = train(recipe, data_dir, tmp_path / "b", cache_dir=cache, max_steps=3, progress=False)
    assert not b.completed and b.bundle is None
    with pytest.raises(Exception, match="already holds a training run"):
        train(recipe, data_dir, tmp_path / "b", cache_dir=cache, progress=False)
    b = train(recipe, data_dir, tmp_path / "b", resume=True, cache_dir=cache, progress=False)
    assert b.completed
    assert_same_run(a.out_dir, tmp_path / "b")
    ba = load_bundle(a.bundle)  # same weights and card as b's (assert_same_run)
    assert ba.trained
    assert ba.preprocessing.coarse_size_zyx == (32, 32, 32) and ba.preprocessing.window_zyx == (32, 16, 32)
    assert ba.metadata["preprocessing"] == recipe.preprocessing.to_dict()  # the recipe's settings, stored


def test_pipeline_max_steps_with_resume_advances_across_stages(data_dir, tmp_path, uninterrupted_run):
    """--max-steps N --resume repeated: N more steps each call (coarse, then fine), then the bundle."""
    recipe, cache, a = uninterrupted_run
    progress = []
    for _ in range(3):
        b = train(recipe, data_dir, tmp_path / "b", resume=True, cache_dir=cache, max_steps=3, progress=False)
        progress.append((b.completed, b.steps_run, b.stopped_at))
    assert progress == [(False, 3, "coarse step 3 of 4"), (False, 3, "fine step 2 of 4"), (True, 2, None)]
    assert b.bundle == tmp_path / "b" / "model.safetensors"
    assert_same_run(a.out_dir, tmp_path / "b")
    with pytest.raises(ValueError, match="max_steps"):
        train(recipe, data_dir, tmp_path / "c", cache_dir=cache, max_steps=0, progress=False)


def test_train_command_max_steps_resume_exit_codes(data_dir, tmp_path, uninterrupted_run, capsys):
    """The command: exit 3 ("stopped, resumable") until the run completes, then 0 and the bundle."""
    import yaml

    from AbdomenKDSegLib.training.cli import main

    recipe, cache, a = uninterrupted_run
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    argv = ["--config", str(config), "--data", str(data_dir), "--out", str(tmp_path / "run"), "--cache",
            str(cache), "--max-steps", "2", "-q"]
    codes, messages = [], []
    for i in range(5):
        codes.append(main(argv + (["--resume"] if i else [])))
        messages.append(capsys.readouterr().err.strip())
        if codes[-1] == 0:
            break
    # coarse 0-2, coarse 2-4 (the budget ends with the stage: stop before the fine one), fine 0-2, 2-4
    assert codes == [3, 3, 3, 0]
    assert messages[0] == ("stopped after 2 step(s) (--max-steps 2) at coarse step 2 of 4; run the same "
                           "command with --resume to continue")
    assert "the end of the coarse stage" in messages[1] and "fine step 2 of 4" in messages[2]
    assert_same_run(a.out_dir, tmp_path / "run")


def test_train_help_documents_max_steps_and_exit_codes(capsys):
    import argparse

    from AbdomenKDSegLib.training.cli import register_cli

    parser = argparse.ArgumentParser(prog="abdomen-kdseg")
    register_cli(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "at most N optimiser steps in this invocation" in text
    for line in ("0 done", "1 error", "2 usage error", "3 stopped early at --max-steps"):
        assert line in text
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["train", "--data", "d", "--out", "o", "--max-steps", "0"])
    assert exit_info.value.code == 2


def test_train_command_init_from_a_missing_bundle_is_refused_before_any_work(tmp_path, capsys):
    from AbdomenKDSegLib.cli import main

    code = main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                 "--init-from", str(tmp_path / "absent.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and "--init-from" in err and "no such model bundle" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_end_to_end_real_data_to_segmentation(data_dir, tmp_path):
    """Full-size patches (96^3 coarse, 96x64x96 fine), tiny widths: coarse -> predictions -> fine -> bundle."""
    from AbdomenKDSegLib.engine.inference import segment_file

    recipe = Recipe.from_dict({"epochs": 1, "student": {"base_features": 4, "n_stages": 5},
                               "teacher": {"base_features": 4, "n_stages": 5}, "snapshot_every_epochs": 0})
    result = train(recipe, data_dir, tmp_path / "run", progress=False)
    assert result.completed and result.bundle.is_file()
    preds = sorted((tmp_path / "run" / "cache" / "coarse_pred").glob("*.npy"))
    assert [p.stem for p in preds] == ["dicom", "flipcrop"]
    assert np.load(preds[0]).shape == (96, 96, 96)
    fine_meta = json.loads((tmp_path / "run" / "cache" / "fine" / "dicom.json").read_text())
    assert np.load(tmp_path / "run" / "cache" / "fine" / "dicom.image.npy").shape == (96, 64, 96)
    assert fine_meta["canonical_shape"] == [50, 512, 512]  # the 40 mm DICOM slab padded to min_z_extent_mm 100
    bundle = load_bundle(result.bundle)
    assert bundle.trained and bundle.metadata["recipe"]["variant"] == "proposed"
    assert bundle.metadata["data"] == {"labeled": 1, "unlabeled": 2, "labeled_cases": ["ct3mm"],
                                       "unlabeled_cases": ["dicom", "flipcrop"]}
    out = segment_file(data_dir / "imagesTr" / "ct3mm_0000.nii.gz", tmp_path / "seg.nii.gz",
                       model=result.bundle, device="cpu")
    seg = sitk.ReadImage(str(out.output_path))
    ref = sitk.ReadImage(str(data_dir / "imagesTr" / "ct3mm_0000.nii.gz"))
    assert seg.GetSize() == ref.GetSize() and seg.GetDirection() == ref.GetDirection()
    assert sitk.GetArrayViewFromImage(seg).max() <= 13
    for stage in ("coarse", "fine"):
        assert (tmp_path / "run" / stage / "losses.png").is_file()
        state = stage_checkpoint(tmp_path / "run", stage)
        assert state["completed"] and set(state["models"]) == {"S", "T1", "T2"}
