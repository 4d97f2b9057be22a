"""The ``abdomen-kdseg segment`` command: real inputs, folders of cases, and bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenKDSegLib.cli import main
from AbdomenKDSegLib.engine.image_io import case_id

from engine_helpers import DICOM_DIR, SAMPLE_CT, assert_same_geometry, make_tiny_bundle, synthetic_ct


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("model") / "tiny.safetensors", seed=2)


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("source", [SAMPLE_CT, DICOM_DIR], ids=["nifti", "dicom"])
def test_segment_with_bundled_model_keeps_geometry(tmp_path, capsys, source):
    out = tmp_path / "labels.nii.gz"
    png = tmp_path / "preview.png"
    code, stdout, err = _run(["segment", source, out, "--preview", png], capsys)
    assert code == 0, err
    labels = sitk.ReadImage(str(out))
    image = sitk.ReadImage(str(source)) if source.is_file() else _read_dicom(source)
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(labels, image)
    assert sitk.GetArrayViewFromImage(labels).max() <= 13
    assert "Liver" in stdout and "volume mL" in stdout and "coarse" in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _read_dicom(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_folder_of_cases_continues_after_a_failure(tmp_path, capsys, tiny_model):
    cases = tmp_path / "cases"
    (cases / "dicom_case").mkdir(parents=True)
    shutil.copy(SAMPLE_CT, cases / "abdomen_0000.nii.gz")
    for f in sorted(DICOM_DIR.iterdir())[:10]:
        shutil.copy(f, cases / "dicom_case" / f.name)
    (cases / "broken.nii.gz").write_bytes(b"not an image")
    out_dir = tmp_path / "labels"
    code, stdout, err = _run(["segment", cases, out_dir, "--model", tiny_model, "--no-fine",
                              "--preview", tmp_path / "png"], capsys)
    assert code == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["abdomen.nii.gz", "dicom_case.nii.gz"]
    assert "2 of 3 cases segmented" in stdout
    assert "broken.nii.gz" in err and "cannot read image" in err
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["abdomen.png", "dicom_case.png"]


def test_case_names():
    from pathlib import Path

    assert case_id(Path("a/FLARE22_Tr_0001_0000.nii.gz")) == "FLARE22_Tr_0001"
    assert case_id(Path("scan.nrrd")) == "scan"
    assert case_id(Path("dicom_folder")) == "dicom_folder"


def _write(image, path):
    sitk.WriteImage(image, str(path))
    return path


def _bad_inputs(tmp):
    """(name, input path, expected message fragment)."""
    flat = sitk.GetImageFromArray(np.full((64, 64), -500, np.int16))
    vector = sitk.GetImageFromArray(np.zeros((20, 20, 20, 3), np.int16), isVector=True)
    four_d = sitk.JoinSeries([synthetic_ct()] * 3)  # e.g. a 4D (time series) NIfTI
    nan = sitk.GetArrayFromImage(synthetic_ct()).astype(np.float32)
    nan[5, 5, 5] = np.nan
    thin = synthetic_ct(size_xyz=(40, 36, 5))
    (tmp / "garbage.nii.gz").write_bytes(b"\x00garbage")
    return [
        ("2d", _write(flat, tmp / "flat.nii.gz"), "expected a 3D volume, got a 2D image"),
        ("vector", _write(vector, tmp / "rgb.nrrd"), "components per voxel"),
        ("4d", _write(four_d, tmp / "four.nii.gz"), "expected a 3D volume, got a 4D image"),
        ("missing", tmp / "missing.nii.gz", "input not found"),
        ("unreadable", tmp / "garbage.nii.gz", "cannot read image"),
        ("nan", _write(sitk.GetImageFromArray(nan), tmp / "nan.nrrd"), "NaN"),  # ITK zeroes NaN in NIfTI
        ("tiny", _write(thin, tmp / "thin.nii.gz"), "volume too small"),
    ]


def test_bad_inputs_fail_with_one_clear_line_and_no_output(tmp_path, capsys, tiny_model):
    for name, path, message in _bad_inputs(tmp_path):
        out_dir = tmp_path / f"out_{name}"
        out_dir.mkdir()
        code, _, err = _run(["segment", path, out_dir / "labels.nii.gz", "--model", tiny_model], capsys)
        assert code == 1, name
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, err)
        assert list(out_dir.iterdir()) == [], f"{name}: partial output left behind"


def test_bad_bundles_fail_with_one_clear_line(tmp_path, capsys, tiny_model):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    tampered = tmp_path / "tampered.safetensors"
    data = bytearray(tiny_model.read_bytes())
    data[-5] ^= 0x55
    tampered.write_bytes(bytes(data))
    for model, message in [(corrupt, "corrupt model bundle"), (tampered, "checksum"),
                           (tmp_path / "none.safetensors", "model bundle not found")]:
        out = tmp_path / "labels.nii.gz"
        code, _, err = _run(["segment", SAMPLE_CT, out, "--model", model], capsys)
        assert code == 1 and err.count("\n") == 1 and message in err, err
        assert not out.exists()


def test_mr_like_values_warn_but_run(tmp_path, tiny_model):
    arr = np.random.default_rng(0).uniform(0, 800, size=(24, 40, 40)).astype(np.float32)
    mr = _write(sitk.GetImageFromArray(arr), tmp_path / "mr.nii.gz")
    proc = subprocess.run([sys.executable, "-m", "AbdomenKDSegLib.cli", "segment", mr, tmp_path / "l.nii.gz",
                           "--model", tiny_model, "--no-fine", "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "warning: " in proc.stderr and "do not look like a CT in Hounsfield units" in proc.stderr
    assert (tmp_path / "l.nii.gz").is_file()


def test_console_script_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "AbdomenKDSegLib.cli", "segment", tmp_path / "x.nii.gz",
                           tmp_path / "y.nii.gz"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: input not found: {tmp_path / 'x.nii.gz'}"


def test_console_script_is_the_fast_exit_entry():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["abdomen-kdseg"] == "AbdomenKDSegLib.cli:console_main"


def test_exit_now_finishes_threads_handlers_and_output_first():
    code = textwrap.dedent("""
        import atexit, threading, time
        from concurrent.futures import ThreadPoolExecutor
        from AbdomenKDSegLib.process_exit import exit_now
        ThreadPoolExecutor(1).submit(int)  # an idle worker never shut down (as OpenVINO's telemetry leaves)
        atexit.register(lambda: print("atexit ran"))
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread done"))).start()
        print("buffered", end="")
        exit_now(3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == "bufferedthread done\natexit ran\n"


def test_huge_volume_warns_before_work(monkeypatch):
    import warnings

    from AbdomenKDSegLib.engine import image_io

    monkeypatch.setattr(image_io, "LARGE_VOXELS", 1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image_io.validate_ct(synthetic_ct(), name="big")
    assert any(issubclass(w.category, image_io.LargeVolumeWarning) and "very large volume" in str(w.message)
               for w in caught)


def test_coarse_output_writes_the_coarse_only_result(tmp_path, capsys, tiny_model):
    out, coarse = tmp_path / "labels.nii.gz", tmp_path / "coarse.nrrd"
    code, stdout, err = _run(["segment", SAMPLE_CT, out, "--model", tiny_model, "--coarse-output", coarse], capsys)
    assert code == 0, err
    assert f"coarse result -> {coarse}" in stdout
    written = sitk.ReadImage(str(coarse))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(written, sitk.ReadImage(str(SAMPLE_CT)))
    code, _, err = _run(["segment", SAMPLE_CT, tmp_path / "no_fine.nii.gz", "--model", tiny_model, "--no-fine",
                         "-q"], capsys)
    assert code == 0, err
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "no_fine.nii.gz")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected)
    assert not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), expected)  # fine != coarse


def test_coarse_output_is_a_folder_for_a_folder_of_cases(tmp_path, capsys, tiny_model):
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(SAMPLE_CT, cases / "abdomen_0000.nii.gz")
    code, _, err = _run(["segment", cases, tmp_path / "labels", "--model", tiny_model, "-q",
                         "--coarse-output", tmp_path / "labels"], capsys)
    assert code == 2 and err.startswith("error: --coarse-output") and "would replace the fine ones" in err
    assert not (tmp_path / "labels").exists()
    code, _, err = _run(["segment", cases, tmp_path / "labels", "--model", tiny_model, "-q",
                         "--coarse-output", tmp_path / "coarse"], capsys)
    assert code == 0, err
    assert [p.name for p in (tmp_path / "coarse").iterdir()] == ["abdomen.nii.gz"]
    assert [p.name for p in (tmp_path / "labels").iterdir()] == ["abdomen.nii.gz"]
    assert_same_geometry(sitk.ReadImage(str(tmp_path / "coarse" / "abdomen.nii.gz")),
                         sitk.ReadImage(str(SAMPLE_CT)))


def test_coarse_output_with_no_fine_is_not_a_duplicate(tmp_path, capsys, tiny_model):
    with pytest.warns(UserWarning, match="already is the coarse result"):
        code, _, err = _run(["segment", SAMPLE_CT, tmp_path / "l.nii.gz", "--model", tiny_model, "--no-fine", "-q",
                             "--coarse-output", tmp_path / "c.nii.gz"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.nii.gz"]
