"""Bad input, one table, two ways in: ``abdomen-kdseg segment`` and :func:`inference.segment_file`.

Each row makes a bad call in a fresh folder and states the exit code (2 usage error, 1 bad input;
the Python API raises :class:`UsageError` / :class:`InputError` for them), the words the message
must contain, and whether the model may be loaded at all: usage errors are found before anything
is loaded, so those rows name a model file that does not exist (a late check would report the
missing model instead). After every row the folder is exactly as before: every file (the input, an
existing output) byte for byte unchanged, and no new file (no output, no temporary file).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenKDSegLib.cli import main
from AbdomenKDSegLib.engine.inference import segment_file
from AbdomenKDSegLib.errors import InputError, UsageError

from bad_files import BAD_FILES
from engine_helpers import DICOM_DIR, SAMPLE_CT, make_tiny_bundle

NO_MODEL = "never-loaded.safetensors"  #: usage-error rows: the model must not be needed


@dataclass
class Call:
    """What a row runs: CLI arguments after ``segment``, and the Python call (None: CLI only)."""

    input: Path
    output: str
    cli_extra: list[str] = field(default_factory=list)
    api_kwargs: Optional[dict] = None  #: extra keyword arguments of segment_file; None: no API row
    cli: bool = True  #: False: a Python-only row


@dataclass
class Row:
    id: str
    make: Callable[[Path], Call]
    code: int  #: 2 usage error, 1 bad input
    words: tuple[str, ...]
    loads_model: bool = False  #: False: the row runs with a model path that does not exist
    skip: Optional[str] = None


def _ct(folder: Path, name: str = "ct.nii.gz") -> Path:
    path = folder / name
    shutil.copy(SAMPLE_CT, path)
    return path


def _image(folder: Path, name: str, image: sitk.Image) -> Path:
    path = folder / name
    sitk.WriteImage(image, str(path))
    return path


# ----------------------------------------------------------------------------- makers: outputs
def out_is_input(d: Path) -> Call:
    ct = _ct(d)
    return Call(ct, str(ct), api_kwargs={})


def out_is_input_by_symlink(d: Path) -> Call:
    ct = _ct(d)
    (d / "link.nii.gz").symlink_to(ct)
    return Call(ct, str(d / "link.nii.gz"), api_kwargs={})


def out_is_input_by_hardlink(d: Path) -> Call:
    ct = _ct(d)
    os.link(ct, d / "hard.nii.gz")
    return Call(ct, str(d / "hard.nii.gz"), api_kwargs={})


def out_exists(d: Path) -> Call:
    ct = _ct(d)
    (d / "labels.nii.gz").write_bytes(b"the user's earlier result")
    return Call(ct, str(d / "labels.nii.gz"), api_kwargs={})


def out_in_dicom_folder(d: Path) -> Call:
    series = shutil.copytree(DICOM_DIR, d / "series")
    return Call(series, str(series / "labels.nii.gz"), api_kwargs={})


def batch_into_itself(d: Path) -> Call:
    cases = d / "cases"
    cases.mkdir()
    _ct(cases, "a_0000.nii.gz")
    return Call(cases, str(cases))


def batch_output_exists(d: Path) -> Call:
    cases, out = d / "cases", d / "out"
    cases.mkdir()
    out.mkdir()
    _ct(cases, "a_0000.nii.gz")
    (out / "a.nii.gz").write_bytes(b"earlier result")
    return Call(cases, str(out))


def batch_two_cases_one_name(d: Path) -> Call:
    cases = d / "cases"
    cases.mkdir()
    _ct(cases, "a.nii.gz")
    _ct(cases, "a_0000.nii.gz")
    return Call(cases, str(d / "out"))


def output_type(suffix: str) -> Callable[[Path], Call]:
    def make(d: Path) -> Call:
        return Call(_ct(d), str(d / f"labels{suffix}"), api_kwargs={})

    return make


def output_parent_is_a_file(d: Path) -> Call:
    (d / "notes.txt").write_text("a file")
    return Call(_ct(d), str(d / "notes.txt" / "labels.nii.gz"), api_kwargs={})


def output_parent_missing(d: Path) -> Call:
    return Call(_ct(d), str(d / "typo" / "labels.nii.gz"), api_kwargs={})


def output_parent_read_only(d: Path) -> Call:
    locked = d / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return Call(_ct(d), str(locked / "labels.nii.gz"), api_kwargs={})


def api_output_is_a_folder(d: Path) -> Call:
    (d / "results").mkdir()
    return Call(_ct(d), str(d / "results"), api_kwargs={}, cli=False)  # the CLI writes into a folder


def organs(value: str) -> Callable[[Path], Call]:
    def make(d: Path) -> Call:
        return Call(_ct(d), str(d / "labels.nii.gz"), ["--organs", value], {"organs": [value]})

    return make


def preview(name: str, exists: bool = False) -> Callable[[Path], Call]:
    def make(d: Path) -> Call:
        if exists:
            (d / name).write_bytes(b"earlier preview")
        return Call(_ct(d), str(d / "labels.nii.gz"), ["--preview", str(d / name)])

    return make


def coarse_is_output(d: Path) -> Call:
    out = str(d / "labels.nii.gz")
    return Call(_ct(d), out, ["--coarse-output", out], {"coarse_output": out})


def threads(value: str) -> Callable[[Path], Call]:
    def make(d: Path) -> Call:
        return Call(_ct(d), str(d / "labels.nii.gz"), ["--threads", value])

    return make


# ----------------------------------------------------------------------------- makers: inputs (more in bad_files)
def missing_input(d: Path) -> Call:
    return Call(d / "nothing-here.nii.gz", str(d / "labels.nii.gz"), api_kwargs={})


def image_input(name: str, image: Callable[[], sitk.Image]) -> Callable[[Path], Call]:
    def make(d: Path) -> Call:
        return Call(_image(d, name, image()), str(d / "labels.nii.gz"), api_kwargs={})

    return make


def vector() -> sitk.Image:
    return sitk.Image([16, 16, 16], sitk.sitkVectorFloat32, 3)


def thin() -> sitk.Image:
    return sitk.Image([64, 64, 3], sitk.sitkInt16)


ROWS = [
    # the output must never destroy the input or an earlier result (issue 14, defect 1)
    Row("output is the input", out_is_input, 2, ("is the input", "would destroy the CT")),
    Row("output is the input through a symlink", out_is_input_by_symlink, 2, ("is the input",)),
    Row("output is the input through a hard link", out_is_input_by_hardlink, 2, ("is the input",)),
    Row("output inside the DICOM folder read", out_in_dicom_folder, 2, ("DICOM folder",)),
    Row("output exists", out_exists, 2, ("already exists", "overwrite")),
    Row("folder of cases into itself", batch_into_itself, 2, ("is the input folder",)),
    Row("folder of cases, an output exists", batch_output_exists, 2, ("a.nii.gz already exists", "--overwrite")),
    Row("two cases with one output name", batch_two_cases_one_name, 2, ("would both be written as a.nii.gz",)),
    # arguments checked before any work (defect 7)
    Row("output .png", output_type(".png"), 2, ("unsupported file type '.png'",)),
    Row("output .txt", output_type(".txt"), 2, ("unsupported file type '.txt'",)),
    Row("output folder is a file", output_parent_is_a_file, 2, ("is a file, not a folder",)),
    Row("output folder missing", output_parent_missing, 2, ("does not exist",)),
    Row("output folder read-only", output_parent_read_only, 2, ("cannot write in the folder",),
        skip="root may write anywhere" if hasattr(os, "geteuid") and os.geteuid() == 0 else None),
    Row("output is a folder (Python)", api_output_is_a_folder, 2, ("is a folder",)),
    Row("unknown organ", organs("kidney"), 2, ("unknown organ 'kidney'", "right_kidney")),
    Row("unknown organ in a comma list", organs("liver,kidny"), 2, ("unknown organ 'kidny'",)),
    Row("preview not .png", preview("p.jpg"), 2, ("preview", "unsupported file type '.jpg'")),
    Row("preview exists", preview("p.png", exists=True), 2, ("preview", "already exists")),
    Row("coarse output is the output", coarse_is_output, 2, ("coarse", "same file as the output")),
    Row("threads negative", threads("-3"), 2, ("--threads", "-3 is not allowed")),
    Row("threads zero", threads("0"), 2, ("--threads", "0 is not allowed")),
    Row("threads not a number", threads("two"), 2, ("--threads", "'two' is not a whole number")),
    # bad input images (defects 2-5 and the earlier ones)
    Row("input missing", missing_input, 1, ("input not found",), loads_model=True),
    Row("vector image", image_input("rgb.mha", vector), 1, ("components per voxel",), loads_model=True),
    Row("too thin", image_input("thin.nii.gz", thin), 1, ("volume too small",), loads_model=True),
]


def bad_file(make: Callable[[Path], Path]) -> Callable[[Path], Call]:
    def call(d: Path) -> Call:
        return Call(make(d), str(d / "labels.nii.gz"), api_kwargs={})

    return call


# broken files (truncated, data-short, NaN, empty, not an image, huge header, no body, ...): the same
# table as the reader's own tests; a folder without DICOM is a folder of cases on the command line
ROWS += [Row(name, bad_file(make), 1, words, loads_model=True)
         for name, make, words in BAD_FILES if name != "folder without DICOM"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("model") / "tiny.safetensors", seed=3)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and link under ``folder``: relative path -> SHA-256 of its bytes (or the link target)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            state[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[rel] = "folder"
    return state


def _prepare(row: Row, tmp_path: Path, tiny_model: Path) -> tuple[Call, Path, str]:
    if row.skip:
        pytest.skip(row.skip)
    work = tmp_path / "work"
    work.mkdir()
    call = row.make(work)
    model = str(tiny_model) if row.loads_model else str(tmp_path / NO_MODEL)
    return call, work, model


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_command_line(row, tmp_path, tiny_model, capsys):
    call, work, model = _prepare(row, tmp_path, tiny_model)
    if not call.cli:
        pytest.skip("a Python-only case")
    before = snapshot(work)
    try:
        code = main(["segment", str(call.input), call.output, "--model", model, "-q", *call.cli_extra])
    except SystemExit as exit_info:  # argparse's usage errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == row.code, err
    message = " ".join(err.split())
    assert "error: " in err and all(w in message for w in row.words), err
    assert "Traceback" not in err and ".cxx" not in err and "Error:" not in err.replace("error:", "")
    assert snapshot(work) == before, "a file was changed, or an output or temporary file was left"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_python_api(row, tmp_path, tiny_model):
    call, work, model = _prepare(row, tmp_path, tiny_model)
    if call.api_kwargs is None:
        pytest.skip("a command-line option only")
    before = snapshot(work)
    expected = UsageError if row.code == 2 else InputError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny model is untrained, and says so
        with pytest.raises(expected) as info:
            segment_file(call.input, call.output, model=model, **call.api_kwargs)
    message = " ".join(str(info.value).split())
    assert all(w.replace("--overwrite", "overwrite=True") in message for w in row.words), message
    assert snapshot(work) == before, "a file was changed, or an output or temporary file was left"


def test_overwrite_replaces_an_existing_output(tmp_path, tiny_model, capsys):
    ct = _ct(tmp_path)
    out = tmp_path / "labels.nii.gz"
    out.write_bytes(b"earlier result")
    code = main(["segment", str(ct), str(out), "--model", str(tiny_model), "--no-fine", "-q", "--overwrite"])
    assert code == 0, capsys.readouterr().err
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(ct)).GetSize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "labels.nii.gz"]


def test_output_folder_for_one_case_is_created_and_said(tmp_path, tiny_model, capsys):
    ct = _ct(tmp_path)
    code = main(["segment", str(ct), f"{tmp_path / 'new'}/", "--model", str(tiny_model), "--no-fine", "-q",
                 "--organs", "liver,spleen", "--organs", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"created the folder {tmp_path / 'new'}" in err
    values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "new" / "ct.nii.gz")))).tolist())
    assert values <= {0, 1, 3}


def test_summary_lists_the_requested_organs_only(tmp_path, tiny_model, capsys):
    code = main(["segment", str(_ct(tmp_path)), str(tmp_path / "l.nii.gz"), "--model", str(tiny_model),
                 "--no-fine", "--organs", "liver,left_kidney"])
    out = capsys.readouterr().out
    assert code == 0
    names = [line[7:29].strip() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert names == ["Liver", "Left kidney"]


def test_folder_without_dicom_prints_no_itk_warning(tmp_path):
    """A folder of cases is scanned for DICOM series without ITK's raw 'No Series were found' line."""
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "AbdomenKDSegLib.cli", "segment", str(tmp_path / "empty"),
                           str(tmp_path / "out"), "--model", str(tmp_path / NO_MODEL)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: no images (NIfTI/NRRD/MHA files or DICOM series folders) found in {tmp_path / 'empty'}"]


def test_help_documents_exit_codes_and_overwrite(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("0 done", "1 bad input", "2 usage error", "--overwrite", "auto (default): CUDA when a GPU",
                  "comma-separated"):
        assert words in text

