"""Broken input refused before its voxels are read or segmented, with the real reason in words.

Each row makes a bad input file (a truncated or corrupt NIfTI, NaN voxels, an empty or text file,
a header that claims too much, 2D/4D images, a folder without DICOM), reads it with
:func:`image_io.read_image` and states the words the :class:`InputError` must contain. Messages
name the file and hold no C++ source paths, no SimpleITK call names and no Python class names;
every input file is byte for byte unchanged afterwards.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenKDSegLib.cli import main
from AbdomenKDSegLib.engine import image_io
from AbdomenKDSegLib.engine.image_io import NonCTWarning, read_image, sitk_reason
from AbdomenKDSegLib.engine.inference import NUMPY_INPUT_MESSAGE, Predictor
from AbdomenKDSegLib.engine.nifti_check import check_nifti, parse_header
from AbdomenKDSegLib.errors import InputError

from bad_files import BAD_FILES, huge_header, image_file, nifti1_header, truncated_gz
from engine_helpers import DICOM_DIR, SAMPLE_CT, make_tiny_bundle, synthetic_ct

ROWS = BAD_FILES


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_plain(message: str) -> None:
    for noise in (".cxx", ".hxx", "Exception thrown", "sitk::", "itk::", "ERROR", "RuntimeError", "Error:"):
        assert noise not in message, message
    assert not re.search(r"0x[0-9a-fA-F]{4,}|\.py\b|Traceback", message), message


@pytest.mark.parametrize("make, words", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_before_the_voxels_are_used(make, words, tmp_path, capfd):
    path = make(tmp_path)
    before = snapshot(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused input is refused, not warned about
        with pytest.raises(InputError) as info:
            read_image(path)
    message = str(info.value)
    assert str(path) in message and all(w in message for w in words), message
    assert_plain(message)
    assert "No Series were found" not in capfd.readouterr().err
    assert snapshot(tmp_path) == before, "an input file was changed or a file was left"


@pytest.mark.parametrize("make", [truncated_gz, huge_header, image_file(
    "time.nii.gz", lambda: sitk.Image([16, 16, 16, 3], sitk.sitkInt16))], ids=["truncated", "huge", "4D"])
def test_header_checks_come_before_the_voxels_are_read(make, tmp_path, monkeypatch):
    path = make(tmp_path)

    def no_reading(self):  # noqa: ANN001, ANN202
        raise AssertionError("the voxels were read")

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_reading)
    with pytest.raises(InputError):
        read_image(path)


def test_truncated_nifti_fails_on_the_command_line_without_output(tmp_path, capsys):
    model = make_tiny_bundle(tmp_path / "tiny.safetensors")
    path = truncated_gz(tmp_path)
    before = snapshot(tmp_path)
    code = main(["segment", str(path), str(tmp_path / "labels.nii.gz"), "--model", str(model), "-q"])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "compressed file is truncated" in lines[0], err
    assert snapshot(tmp_path) == before


def test_a_complete_nifti_passes_and_reads_like_itk(tmp_path):
    raw = gzip.decompress(SAMPLE_CT.read_bytes())
    two_members = tmp_path / "two-members.nii.gz"  # a header member and a voxel member: valid gzip
    two_members.write_bytes(gzip.compress(raw[:352], 1) + gzip.compress(raw[352:], 1))
    plain = tmp_path / "plain.nii"
    plain.write_bytes(raw)
    for path in (SAMPLE_CT, two_members, plain):
        header = check_nifti(path)
        assert header is not None and header.dims == (122, 101, 112) and header.description == "122x101x112 int32"
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_CT))))


def test_nifti_check_is_fast_on_the_sample():
    import time

    check_nifti(SAMPLE_CT)
    started = time.perf_counter()
    check_nifti(SAMPLE_CT)
    assert time.perf_counter() - started < 0.5  # ~20 ms: one zlib pass over 5.5 MB


def test_nifti_headers_of_both_byte_orders_and_versions():
    little, big = parse_header(nifti1_header()), parse_header(nifti1_header(order=">"))
    assert little == parse_header(nifti1_header()) and little.byteorder == "<" and big.byteorder == ">"
    assert big.dims == little.dims == (300, 300, 200) and big.data_bytes == 36_000_000 and big.vox_offset == 352
    h = bytearray(544)
    struct.pack_into("<i8s2h8q", h, 0, 540, b"n+2\0\r\n\x1a\n", 16, 32, 3, 64, 64, 40, 1, 1, 1, 1)
    struct.pack_into("<q2d", h, 168, 544, 2.0, -1024.0)
    v2 = parse_header(bytes(h))
    assert (v2.version, v2.dims, v2.datatype, v2.vox_offset, v2.scl_slope, v2.scl_inter) == (
        2, (64, 64, 40), 16, 544, 2.0, -1024.0)
    assert parse_header(b"not a header" * 50) is None


def test_a_header_larger_than_the_memory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(image_io, "physical_memory_bytes", lambda: 1_000_000)
    with pytest.raises(InputError, match=r"the header claims 122x101x112 voxels .* more than this computer's "
                                         r"1 MB of memory"):
        read_image(SAMPLE_CT)
    monkeypatch.setattr(image_io, "MAX_VOXELS", 1000)
    with pytest.raises(InputError, match=r"DICOM series in .*: the header claims 512x512x20 voxels"):
        read_image(DICOM_DIR)


def test_sitk_reasons_in_words():
    cases = {
        'Exception thrown in SimpleITK ImageFileReader_Execute: /work/src/Code/IO/src/sitkImageReaderBase.cxx:99:\n'
        'sitk::ERROR: Unable to determine ImageIO reader for "x.nii.gz"': "not a recognised image format",
        "Exception thrown in SimpleITK ImageFileReader_Execute: /tmp/SimpleITK-build/ITK-prefix/include/ITK-5.4/"
        "itkImportImageContainer.hxx:179:\nFailed to allocate memory for image.":
            "not enough memory to load it (its header claims 900x900x900 voxels)",
        "Exception thrown in SimpleITK ImageSeriesReader_Execute: /tmp/ITK/Modules/IO/GDCM/src/itkGDCMImageIO.cxx:"
        "361:\nITK ERROR: GDCMImageIO(0x55d0c8a1b2c0): Cannot read requested file": "Cannot read requested file",
        "Exception thrown in SimpleITK ImageFileReader_Execute: C:\\build\\ITK\\Modules\\IO\\NRRD\\src\\"
        "itkNrrdImageIO.cxx:410:\nitk::ERROR: NrrdImageIO(0x1f2e): ReadImageInformation: Error reading a.nrrd:\n"
        "[nrrd] nrrdLoad: trouble reading \"a.nrrd\"\n[nrrd] _nrrdReadNrrdParse_type: didn't recognize type "
        "\"flot\"": 'didn\'t recognize type "flot"',
    }
    for text, words in cases.items():
        reason = sitk_reason(RuntimeError(text), size=(900, 900, 900))
        assert words in reason, reason
        assert_plain(reason)
        assert "\n" not in reason


# ----------------------------------------------------------------------------- the Python API
@pytest.fixture(scope="module")
def tiny_predictor(tmp_path_factory):
    return Predictor(make_tiny_bundle(tmp_path_factory.mktemp("m") / "tiny.safetensors"), device="cpu")


def test_predict_refuses_a_numpy_array(tiny_predictor):
    with pytest.raises(InputError) as info:
        tiny_predictor.predict(np.zeros((24, 36, 40), np.int16))
    assert str(info.value) == NUMPY_INPUT_MESSAGE
    assert str(info.value) == ("Predictor.predict takes a SimpleITK image (with spacing, origin and direction), "
                               "not a numpy array: use sitk.GetImageFromArray(array) and set its spacing, or "
                               "predict_canonical(array, spacing_zyx)")


def test_each_warning_once_for_an_image_read_with_read_image(tiny_predictor, tmp_path):
    shifted = sitk.Cast(synthetic_ct(size_xyz=(40, 36, 24)), sitk.sitkFloat32) + 1024.0  # air near 0: not HU
    path = tmp_path / "shifted.nrrd"
    sitk.WriteImage(shifted, str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(path)
        tiny_predictor.predict(image, fine=False)
    non_ct = [w for w in caught if issubclass(w.category, NonCTWarning)]
    assert len(non_ct) == 1 and str(path) in str(non_ct[0].message)
    with warnings.catch_warnings(record=True) as caught:  # an image from elsewhere is still warned about
        warnings.simplefilter("always")
        tiny_predictor.predict(sitk.ReadImage(str(path)), fine=False)
    assert sum(issubclass(w.category, NonCTWarning) for w in caught) == 1
