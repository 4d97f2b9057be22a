"""Broken input files, one maker per kind, and the words the refusal must contain.

Shared by test_input_checks.py (read_image, the engine's reader) and test_bad_input.py (the
command line and segment_file). Each maker writes its file into a folder and returns its path.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from engine_helpers import SAMPLE_CT


def _sample_bytes() -> bytes:
    return SAMPLE_CT.read_bytes()


def truncated_gz(d: Path) -> Path:
    data = _sample_bytes()
    path = d / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])  # what `head -c` of half the file gives
    return path


def damaged_gz(d: Path) -> Path:
    data = bytearray(_sample_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    path = d / "damaged.nii.gz"
    path.write_bytes(bytes(data))
    return path


def nifti1_header(dims=(300, 300, 200), datatype=4, bitpix=16, order="<") -> bytes:
    """A 348-byte NIfTI-1 header ("n+1", voxels at 352) plus the 4-byte extension flag."""
    h = bytearray(352)
    struct.pack_into(order + "i", h, 0, 348)
    struct.pack_into(order + "8h", h, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into(order + "2h", h, 70, datatype, bitpix)
    struct.pack_into(order + "8f", h, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into(order + "3f", h, 108, 352.0, 1.0, 0.0)
    h[344:348] = b"n+1\0"
    return bytes(h)


def short_nii(d: Path) -> Path:
    path = d / "short.nii"
    path.write_bytes(nifti1_header() + b"\0" * 1048)  # 1.4 KB; the header needs 36 MB of int16
    return path


def short_nii_big_endian(d: Path) -> Path:
    path = d / "short-be.nii"
    path.write_bytes(nifti1_header(order=">") + b"\0" * 1048)
    return path


def huge_header(d: Path) -> Path:
    path = d / "huge.nii"
    path.write_bytes(nifti1_header(dims=(32767, 32767, 32767)) + b"\0" * 1048)
    return path


def nan_volume() -> np.ndarray:
    return np.full((16, 24, 24), np.nan, dtype=np.float32)


def image_file(name: str, make: Callable[[], sitk.Image]) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        path = d / name
        sitk.WriteImage(make(), str(path))
        return path

    return write


def all_air(size=(48, 48, 40)) -> sitk.Image:
    """Air (-1000 HU) with scanner noise, 2 mm voxels: a scan with nobody in it."""
    arr = np.random.default_rng(0).normal(-1000, 8, size[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


def empty_file(d: Path) -> Path:
    path = d / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def text_file(d: Path) -> Path:
    path = d / "notes.nii.gz"
    path.write_text("patient 12: CT of the abdomen, see the PACS\n")
    return path


def truncated_uncompressed(suffix: str) -> Callable[[Path], Path]:
    """An uncompressed 20^3 int16 image of format ``suffix`` cut after half its bytes."""
    def write(d: Path) -> Path:
        path = d / f"cut{suffix}"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20, 20), np.int16)), str(path), False)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path

    return write


def no_dicom(d: Path) -> Path:
    folder = d / "not-dicom"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    return folder


BAD_FILES = [  # (id, maker, words of the message)
    ("truncated .nii.gz", truncated_gz, ("the compressed file is truncated (it ends after",
                                         "of 5520256 bytes of voxel data)")),
    ("damaged .nii.gz", damaged_gz, ("the compressed data is damaged", "the file is corrupt")),
    ("1.4 KB .nii claiming 300x300x200", short_nii,
     ("the file holds 1048 bytes of voxel data but its header (300x300x200 int16) needs 36000000",
      "the file is truncated or the header is wrong")),
    ("big-endian .nii, data short", short_nii_big_endian, ("(300x300x200 int16) needs 36000000",)),
    ("header claiming 32767^3", huge_header,
     ("the header claims 32767x32767x32767 voxels (35 T voxels, about 704 TB of memory to segment)",
      "is the header corrupt?")),
    ("all-NaN float32 .nii.gz", image_file("nan.nii.gz", lambda: sitk.GetImageFromArray(nan_volume())),
     ("9216 voxels are NaN or infinite",)),
    ("all-NaN float32 .nii", image_file("nan.nii", lambda: sitk.GetImageFromArray(nan_volume())),
     ("9216 voxels are NaN or infinite",)),
    ("NaN NRRD", image_file("nan.nrrd", lambda: sitk.GetImageFromArray(nan_volume())),
     ("9216 voxels are NaN or infinite",)),
    ("NaN MetaImage", image_file("nan.mha", lambda: sitk.GetImageFromArray(nan_volume())),
     ("9216 voxels are NaN or infinite",)),
    ("0-byte file", empty_file, ("the file is empty (0 bytes)",)),
    ("text file named .nii.gz", text_file,
     ("not a recognised image format (NIfTI .nii/.nii.gz, NRRD, MetaImage .mha/.mhd or a DICOM series folder)",)),
    ("truncated NRRD", truncated_uncompressed(".nrrd"), ("the file is truncated: it holds 3926 of the 8000 voxels",)),
    ("truncated MetaImage", truncated_uncompressed(".mha"), ("cannot be read (the file is damaged or truncated)",)),
    ("2D image", image_file("flat.nii.gz", lambda: sitk.Image(64, 64, sitk.sitkInt16)),
     ("expected a 3D volume, got a 2D image of 64x64 voxels",)),
    ("4D image", image_file("time.nii.gz", lambda: sitk.Image([16, 16, 16, 3], sitk.sitkInt16)),
     ("expected a 3D volume, got a 4D image of 16x16x16x3 voxels",)),
    ("constant image", image_file("zeros.nrrd", lambda: sitk.Image([32, 32, 32], sitk.sitkInt16)),
     ("every voxel has the value 0: there is no image to segment",)),
    ("all air", image_file("air.nii.gz", all_air), ("no body found", "is this a CT of a patient?")),
    ("folder without DICOM", no_dicom, ("no DICOM series found in folder",)),
]
