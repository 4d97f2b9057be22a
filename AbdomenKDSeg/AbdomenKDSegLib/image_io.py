"""Reading CT volumes (NIfTI, NRRD, MetaImage, DICOM series) and writing label maps.

Images are SimpleITK images in ITK's LPS world frame; numpy views of them are (Z, Y, X).
Every reader validates what the segmenter needs: a 3D scalar image, at least ``MIN_SIZE``
voxels along each axis, finite values. Values that do not look like CT in Hounsfield units
raise a :class:`NonCTWarning` (a warning, not an error: the user may know better).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

#: Smallest size along any axis the coarse-to-fine pipeline accepts (voxels).
MIN_SIZE = 8
#: Voxel count above which a volume gets a memory warning (512x512x800 is 210 M).
LARGE_VOXELS = 400_000_000
#: File name endings read as single images.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: File name endings a label map can be written to (single-file formats, so the write is atomic).
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


class NonCTWarning(UserWarning):
    """The intensities do not look like a CT in Hounsfield units."""


class LargeVolumeWarning(UserWarning):
    """The volume is large enough that memory may run short."""


class ObliqueWarning(UserWarning):
    """The image axes are not aligned with the patient axes."""


def has_image_suffix(path: PathLike) -> bool:
    """True if the file name ends in one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def dicom_series_files(directory: PathLike) -> list[str]:
    """File names of the largest DICOM series in ``directory`` (empty list if it holds none)."""
    reader = sitk.ImageSeriesReader()
    best: list[str] = []
    for series_id in reader.GetGDCMSeriesIDs(str(directory)):
        files = list(reader.GetGDCMSeriesFileNames(str(directory), series_id))
        if len(files) > len(best):
            best = files
    return best


def read_image(path: PathLike, check: bool = True) -> sitk.Image:
    """Read a CT from a file or a DICOM series folder.

    Returns the image as stored (geometry untouched). With ``check``, validates it with
    :func:`validate_ct` and raises :class:`InputError` naming the problem.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {p}")
    try:
        if p.is_dir():
            files = dicom_series_files(p)
            if not files:
                raise InputError(f"no DICOM series found in folder {p}")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(p))
    except InputError:
        raise
    except RuntimeError as exc:  # SimpleITK reports unreadable files as RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown reason"
        raise InputError(f"cannot read image {p}: {first}") from exc
    if check:
        validate_ct(image, name=str(p))
    return image


def validate_ct(image: sitk.Image, name: str = "input") -> None:
    """Raise :class:`InputError` unless ``image`` is a 3D scalar volume of finite values.

    Warns (:class:`NonCTWarning`) when intensities do not look like HU, and
    (:class:`ObliqueWarning`) when the direction matrix is not axis-aligned.
    """
    dim = image.GetDimension()
    if dim != 3:
        raise InputError(f"{name}: expected a 3D volume, got a {dim}D image of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name}: expected a scalar (grayscale) CT, got {image.GetNumberOfComponentsPerPixel()} "
            "components per voxel (a vector, RGB or 4D image)"
        )
    size = image.GetSize()
    if min(size) < MIN_SIZE:
        raise InputError(f"{name}: volume too small, size {size} has an axis below {MIN_SIZE} voxels")
    n_voxels = size[0] * size[1] * size[2]
    if n_voxels > LARGE_VOXELS:
        warnings.warn(f"{name}: very large volume ({n_voxels / 1e6:.0f} M voxels, size {size}); segmentation "
                      "needs about 20 bytes per voxel of memory", LargeVolumeWarning, stacklevel=2)
    if min(image.GetSpacing()) <= 0:
        raise InputError(f"{name}: invalid voxel spacing {image.GetSpacing()}")
    view = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(view.dtype, np.floating) and not np.isfinite(view).all():
        n_bad = int(np.count_nonzero(~np.isfinite(view)))
        raise InputError(f"{name}: {n_bad} voxels are NaN or infinite")
    _warn_if_not_ct(view, name)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.allclose(np.abs(direction), np.round(np.abs(direction)), atol=1e-3):
        warnings.warn(
            f"{name}: oblique image axes (direction {np.round(direction, 3).tolist()}); it is segmented on "
            "its own voxel grid in the nearest axis-aligned orientation",
            ObliqueWarning,
            stacklevel=2,
        )


def _warn_if_not_ct(view: np.ndarray, name: str) -> None:
    """Warn when a subsample of the voxels lacks air (< -500 HU) or soft tissue/bone range."""
    sample = np.asarray(view[::4, ::4, ::4], dtype=np.float32)
    lo, hi = np.percentile(sample, [1, 99.5])
    if lo > -500 or hi < 0 or hi > 5000:
        warnings.warn(
            f"{name}: intensities ({lo:.0f} to {hi:.0f} at the 1st/99.5th percentile) do not look like a CT "
            "in Hounsfield units (expected air near -1000 and soft tissue 0-100); is this an MR or a "
            "rescaled image? Results will be unreliable",
            NonCTWarning,
            stacklevel=3,
        )


def make_temp_beside(path: Path, suffix: str) -> Path:
    """An empty temporary file next to ``path`` with the permissions a normal new file gets."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def write_image_atomic(image: sitk.Image, path: PathLike, compress: bool = True) -> Path:
    """Write ``image`` to ``path`` through a temporary file in the same folder and a rename.

    A failure leaves no partial file behind. The format follows the suffix (.nii.gz, .nrrd, ...).
    """
    out = Path(path)
    if not out.name.lower().endswith(OUTPUT_SUFFIXES):
        raise InputError(f"output {out}: unsupported file type (use one of {', '.join(OUTPUT_SUFFIXES)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if out.name.lower().endswith(".nii.gz") else out.suffix
    tmp = make_temp_beside(out, suffix)
    try:
        sitk.WriteImage(image, str(tmp), compress)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
