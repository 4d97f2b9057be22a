"""File/folder evaluation: case matching, missing cases, geometry checks, summary, CSV and CLI."""

from __future__ import annotations

import argparse
import csv
import math

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenKDSegLib.engine.organs import BY_KEY, ORGANS
from AbdomenKDSegLib.errors import InputError
from AbdomenKDSegLib.evaluation import evaluate as E

SPACING = (0.8, 0.8, 2.5)  # SimpleITK order (x, y, z)
LIVER, SPLEEN = BY_KEY["liver"], BY_KEY["spleen"]


def label_map():
    """(Z, Y, X) = (10, 12, 14) map with a liver and a spleen block."""
    arr = np.zeros((10, 12, 14), np.uint8)
    arr[2:7, 2:8, 2:7] = LIVER.value
    arr[3:6, 3:9, 9:13] = SPLEEN.value
    return arr


def write(path, arr, spacing=SPACING, origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture()
def folders(tmp_path):
    """Case a: prediction identical; case b: prediction without liver. nnU-Net style prediction names."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    arr = label_map()
    write(ref / "case_a.nii.gz", arr)
    write(ref / "case_b.nii.gz", arr)
    write(pred / "case_a_0000.nii.gz", arr)
    no_liver = arr.copy()
    no_liver[no_liver == LIVER.value] = 0
    write(pred / "case_b.nii.gz", no_liver)
    return pred, ref


def test_case_id():
    assert E.case_id("x/FLARE22_Tr_0001_0000.nii.gz") == "FLARE22_Tr_0001"
    assert E.case_id("FLARE22_Tr_0001.nii.gz") == "FLARE22_Tr_0001"
    assert E.case_id("case.NII") == "case"
    assert E.case_id("case_0001.nrrd") == "case_0001"


def test_folder_evaluation_scores_and_summary(folders):
    pred, ref = folders
    result = E.evaluate(pred, ref, progress=False)
    assert [s.case for s in result.scores] == ["case_a"] * 13 + ["case_b"] * 13
    assert [s.organ for s in result.scores[:13]] == list(ORGANS)
    by = {(s.case, s.organ.key): (s.dsc, s.nsd) for s in result.scores}
    assert all(by[("case_a", o.key)] == (1.0, 1.0) for o in ORGANS)
    assert by[("case_b", "liver")] == (0.0, 0.0)  # present in reference, absent in prediction
    assert by[("case_b", "spleen")] == (1.0, 1.0)
    assert by[("case_b", "pancreas")] == (1.0, 1.0)  # absent in both
    summary = {(r.organ.key if r.organ else "mean"): r for r in result.summary}
    liver = summary["liver"]
    assert (liver.n, liver.dsc_mean, liver.dsc_std, liver.nsd_mean) == (2, 0.5, 0.5, 0.5)
    assert summary["spleen"].dsc_std == 0.0
    overall = summary["mean"]  # per-case means 1 and 12/13
    assert overall.dsc_mean == pytest.approx((1 + 12 / 13) / 2)
    assert overall.dsc_std == pytest.approx((1 - 12 / 13) / 2)
    assert result.missing == []


def test_file_pair(folders):
    pred, ref = folders
    result = E.evaluate(pred / "case_b.nii.gz", ref / "case_b.nii.gz", progress=False)
    assert {s.case for s in result.scores} == {"case_b"}
    assert result.summary[0].dsc_mean == 0.0  # liver


def test_missing_prediction_is_an_error_unless_scored_zero(folders):
    pred, ref = folders
    write(ref / "case_c.nii.gz", label_map())
    with pytest.raises(InputError, match="case_c"):
        E.evaluate(pred, ref, progress=False)
    result = E.evaluate(pred, ref, missing_as_zero=True, progress=False)
    assert result.missing == ["case_c"]
    zeros = [s for s in result.scores if s.case == "case_c"]
    assert len(zeros) == 13 and all(s.dsc == 0.0 and s.nsd == 0.0 for s in zeros)


def test_extra_prediction_is_ignored_with_a_warning(folders, capsys):
    pred, ref = folders
    write(pred / "case_z.nii.gz", label_map())
    result = E.evaluate(pred, ref, progress=False)
    assert {s.case for s in result.scores} == {"case_a", "case_b"}
    assert "case_z" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["size", "spacing", "origin"])
def test_geometry_mismatch_names_the_case(folders, change):
    pred, ref = folders
    arr = label_map()
    if change == "size":
        write(pred / "case_b.nii.gz", arr[:, :, :-1])
    elif change == "spacing":
        write(pred / "case_b.nii.gz", arr, spacing=(0.8, 0.8, 3.0))
    else:
        write(pred / "case_b.nii.gz", arr, origin=(0.0, 5.0, 0.0))
    with pytest.raises(InputError, match=f"case_b.*{change}"):
        E.evaluate(pred, ref, progress=False)


def test_bad_inputs(tmp_path, folders):
    pred, ref = folders
    with pytest.raises(InputError, match="does not exist"):
        E.evaluate(tmp_path / "nope", ref, progress=False)
    with pytest.raises(InputError, match="two label files or two folders"):
        E.evaluate(pred / "case_b.nii.gz", ref, progress=False)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read"):
        E.evaluate(broken, ref / "case_a.nii.gz", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no label files"):
        E.evaluate(pred, empty, progress=False)
    write(pred / "case_a.nii.gz", label_map())  # second file for case_a (case_a_0000 exists)
    with pytest.raises(InputError, match="case_a.nii.gz and case_a_0000.nii.gz"):
        E.evaluate(pred, ref, progress=False)


def test_float_label_maps_are_accepted(tmp_path):
    arr = label_map()
    ref = write(tmp_path / "ref.nii.gz", arr)
    pred = write(tmp_path / "pred.nii.gz", arr.astype(np.float32))
    result = E.evaluate(pred, ref, progress=False)
    assert all(s.dsc == 1.0 for s in result.scores)
    write(pred, arr.astype(np.float32) + 0.5)
    with pytest.raises(InputError, match="non-integer"):
        E.evaluate(pred, ref, progress=False)


@pytest.mark.parametrize("role", ["reference", "prediction"])
def test_a_ct_given_as_label_map_is_refused(tmp_path, role):
    """HU values (int16 CT) or a float CT are not label maps: the error names the file and the values."""
    arr = label_map()
    ct = np.full(arr.shape, -1024, np.int16)
    ct[2:8, 2:10, 2:12] = np.random.default_rng(0).integers(-100, 200, (6, 8, 10))
    ct[0, 0, 0] = 1567
    files = {"reference": write(tmp_path / "ref.nii.gz", arr), "prediction": write(tmp_path / "pred.nii.gz", arr)}
    bad = write(files[role], ct)
    with pytest.raises(InputError) as info:
        E.evaluate(files["prediction"], files["reference"], progress=False)
    message = str(info.value)
    assert message.startswith(f"{role} {bad}: values -1024..1567 are outside the organ labels 0..13")
    assert "is this a CT instead of a label map?" in message
    write(bad, ct.astype(np.float32) + 0.25)
    with pytest.raises(InputError, match=rf"{role} .*{bad.name} is not a label map: .*non-integer values"):
        E.evaluate(files["prediction"], files["reference"], progress=False)


def test_label_values_check_names_the_values():
    path = "x.nii.gz"
    arr = label_map()
    assert E.check_label_values(arr, path) is arr
    assert E.check_label_values(arr.astype(np.float64), path).dtype == np.uint8
    other = arr.astype(np.int16)
    other[0, 0, :2] = [14, 255]
    with pytest.raises(InputError, match=r"label map x.nii.gz: values 14, 255 are outside the organ labels 0..13: "
                                         r"is it labelled with another scheme"):
        E.check_label_values(other, path)
    other[0, 0, :2] = [-1, 0]
    with pytest.raises(InputError, match=r"value -1 is outside .*CT instead"):
        E.check_label_values(other, path)
    with pytest.raises(InputError, match="NaN or infinite"):
        E.check_label_values(np.full((2, 2, 2), np.nan, np.float32), path)


def _cli(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    E.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", *map(str, argv), "-q"])
    return args.func(args)


@pytest.mark.parametrize("case", ["missing folder", "folder", "parent is a file", "input file", "input in folder"])
def test_cli_checks_the_output_before_computing(folders, tmp_path, monkeypatch, case):
    pred, ref = folders

    def no_scoring(*args, **kwargs):
        raise AssertionError("nothing may be computed before the output is checked")

    monkeypatch.setattr(E, "evaluate", no_scoring)
    (tmp_path / "a-file").write_text("x")
    inputs = (pred / "case_a_0000.nii.gz", ref / "case_a.nii.gz")
    out, expected = {
        "missing folder": (tmp_path / "missing" / "x.csv", r"the folder .*missing does not exist"),
        "folder": (tmp_path, "is a folder; give a file name"),
        "parent is a file": (tmp_path / "a-file" / "x.csv", "a-file is not a folder"),
        "input file": (inputs[1], "is the input label map"),
        "input in folder": (ref / "case_b.nii.gz", "is the input label map"),
    }[case]
    before = {p: p.read_bytes() for p in (*pred.iterdir(), *ref.iterdir())}
    evaluated = inputs if case == "input file" else (pred, ref)
    with pytest.raises(InputError, match=rf"^--out .*{expected}"):
        _cli(tmp_path, *evaluated, "--out", out)
    assert not (tmp_path / "missing").exists()
    assert {p: p.read_bytes() for p in (*pred.iterdir(), *ref.iterdir())} == before


def test_api_csv_writers_create_no_folders(folders, tmp_path):
    result = E.evaluate(*folders, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        E.write_scores_csv(result.scores, tmp_path / "missing" / "s.csv")
    with pytest.raises(InputError, match="does not exist"):
        E.write_summary_csv(result.summary, tmp_path / "missing" / "s.csv")
    assert not (tmp_path / "missing").exists()


def test_parallel_workers_give_the_same_scores(folders):
    pred, ref = folders
    serial = E.evaluate(pred, ref, progress=False)
    parallel = E.evaluate(pred, ref, workers=2, progress=False)
    assert parallel.scores == serial.scores


def test_cli_writes_csvs_and_prints_the_table(folders, tmp_path, capsys):
    pred, ref = folders
    parser = argparse.ArgumentParser()
    E.register_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "res" / "scores.csv"
    out.parent.mkdir()
    args = parser.parse_args(["evaluate", str(pred), str(ref), "--out", str(out), "-q"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "Mean over organs" in printed and "Liver" in printed and "0.5000 ± 0.5000" in printed

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "organ", "value", "dsc", "nsd"]
    assert len(rows) == 26
    liver_b = next(r for r in rows if r["case"] == "case_b" and r["organ"] == "liver")
    assert (liver_b["value"], float(liver_b["dsc"]), float(liver_b["nsd"])) == ("1", 0.0, 0.0)

    with open(tmp_path / "res" / "scores_summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert list(summary[0]) == ["organ", "value", "n", "dsc_mean", "dsc_std", "nsd_mean", "nsd_std"]
    assert [r["organ"] for r in summary] == [o.key for o in ORGANS] + ["mean"]
    assert float(summary[0]["dsc_mean"]) == 0.5
    assert math.isclose(float(summary[-1]["dsc_mean"]), (1 + 12 / 13) / 2, abs_tol=1e-6)


def test_cli_missing_as_zero_flag(folders, tmp_path, capsys):
    pred, ref = folders
    write(ref / "case_c.nii.gz", label_map())
    parser = argparse.ArgumentParser()
    E.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", str(pred), str(ref), "--missing-as-zero", "-q"])
    assert args.func(args) == 0
    assert "case_c" in capsys.readouterr().out
