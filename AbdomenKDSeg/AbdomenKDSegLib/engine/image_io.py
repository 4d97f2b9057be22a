"""Reading CT volumes (NIfTI, NRRD, MetaImage, DICOM series) and writing label maps.

Images are SimpleITK images in ITK's LPS world frame; numpy views of them are (Z, Y, X).
:func:`read_image` checks a file before its voxels are read: not empty, a header ITK can read
(reasons in words, :func:`sitk_reason`), a 3D scalar volume of at least ``MIN_SIZE`` voxels per
axis that fits in memory (:func:`check_header`); a NIfTI's voxel data complete and its floats
finite (:mod:`nifti_check`: ITK would fill missing voxels and NaN with 0). After reading,
:func:`validate_ct` checks what the segmenter needs: finite values and a body to segment
(:func:`body_mask.check_has_body`). Values that do not look like CT in Hounsfield units raise a
:class:`NonCTWarning` (a warning, not an error: the user may know better).
"""

from __future__ import annotations

import math
import os
import re
import warnings
import weakref
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..atomic_files import atomic_path
from ..errors import InputError
from .body_mask import check_has_body
from .nifti_check import check_nifti, is_nifti_name

PathLike = Union[str, "os.PathLike[str]"]

#: Smallest size along any axis the coarse-to-fine pipeline accepts (voxels).
MIN_SIZE = 8
#: Voxel count above which a volume gets a memory warning (512x512x800 is 210 M).
LARGE_VOXELS = 400_000_000
#: Memory a segmentation needs per input voxel, bytes (an upper bound: 512x512x800 peaks near 12).
BYTES_PER_VOXEL = 20
#: Voxel count above which a header is refused before anything is read. 2**31 voxels is a
#: 1024x1024 matrix over 2048 slices, beyond any CT series a scanner writes (thin-slice whole-body
#: scans are 512x512 over 2000 slices: 0.5 G), and would need ~43 GB to segment: a header claiming
#: more is corrupt (or not a CT), and is refused in words rather than by a failed allocation or
#: the system's out-of-memory killer. The same holds for a header whose voxels alone exceed this
#: computer's memory (:func:`physical_memory_bytes`).
MAX_VOXELS = 2**31
#: File name endings read as single images.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: File name endings a label map can be written to (single-file formats, so the write is atomic).
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: What :func:`sitk_reason` says when no reader recognises a file.
FORMATS = "NIfTI .nii/.nii.gz, NRRD, MetaImage .mha/.mhd or a DICOM series folder"


class NonCTWarning(UserWarning):
    """The intensities do not look like a CT in Hounsfield units."""


class LargeVolumeWarning(UserWarning):
    """The volume is large enough that memory may run short."""


class ObliqueWarning(UserWarning):
    """The image axes are not aligned with the patient axes."""


def has_image_suffix(path: PathLike) -> bool:
    """True if the file name ends in one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


#: nnU-Net's channel tag at the end of an image's case name (``case_0000.nii.gz``).
NNUNET_CHANNEL_SUFFIX = "_0000"


def strip_image_suffix(name: str) -> Optional[str]:
    """A file name without its image suffix (:data:`IMAGE_SUFFIXES`), or None if it has none."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def case_id(path: PathLike) -> str:
    """Case identifier of an image, a label map or a DICOM folder: the name without its image suffix
    and without the nnU-Net channel tag (``FLARE22_Tr_0001_0000.nii.gz`` -> ``FLARE22_Tr_0001``)."""
    name = Path(path).name
    name = strip_image_suffix(name) or name
    if name.endswith(NNUNET_CHANNEL_SUFFIX) and len(name) > len(NNUNET_CHANNEL_SUFFIX):
        name = name[: -len(NNUNET_CHANNEL_SUFFIX)]
    return name


def dicom_series_files(directory: PathLike) -> list[str]:
    """File names of the largest DICOM series in ``directory`` (empty list if it holds none).

    ITK's "No Series were found" warning for a folder without DICOM is not printed.
    """
    reader = sitk.ImageSeriesReader()
    best: list[str] = []
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        for series_id in reader.GetGDCMSeriesIDs(str(directory)):
            files = list(reader.GetGDCMSeriesFileNames(str(directory), series_id))
            if len(files) > len(best):
                best = files
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    return best


# ----------------------------------------------------------------------------- SimpleITK's errors in words
#: Pieces of SimpleITK/ITK error texts that mean nothing to a user: the wrapper's prefix, C++ source
#: paths with line numbers, error-level tags, "ClassName(0x55d0...):" object prefixes, NRRD's call chain.
_NOISE = [re.compile(p) for p in (
    r"Exception thrown in SimpleITK \w+:?",
    r"(?:[A-Za-z]:)?[\w./\\+-]*\.(?:cxx|hxx|txx|cpp|cc|h)(?::\d+)?:?(?:, line \d+)?",
    r"\b(?:sitk|itk)::(?:ERROR|WARNING):\s*",
    r"\bITK (?:ERROR|WARNING):\s*",
    r"\b\w+ ?\(0x[0-9a-fA-F]+\):\s*",
    r"\[nrrd\] \w+:\s*",
    r"^\s*(?:ReadImageInformation|Read): Error reading .*?:\s*$",
    r"^\s*(?:trouble|trouble reading .*|trouble reading NRRD file|Reason: .*)\s*$",
)]
#: Known reasons -> words (``{0}``, ``{1}``, ... are the pattern's groups).
_KNOWN = [
    (re.compile(r"Unable to determine ImageIO reader"), f"not a recognised image format ({FORMATS})"),
    (re.compile(r"Failed to allocate memory"), "not enough memory to load it{size}"),
    (re.compile(r"fread got only (\d+) (\d+)-sized things, not (\d+)"),
     "the file is truncated: it holds {0} of the {2} voxels its header announces"),
    (re.compile(r'hit end of header, but no "data file" given'),
     "the header ends without voxel data (the file is truncated, or its data file is missing)"),
    (re.compile(r"File cannot be read: .* for reading"),
     "its MetaImage header or voxel data cannot be read (the file is damaged or truncated)"),
]


def sitk_reason(exc: BaseException, size: Optional[Sequence[int]] = None) -> str:
    """The reason of a SimpleITK ``RuntimeError`` in plain words, without C++ source paths, line
    numbers or object addresses. Known reasons are reworded (an unrecognised format, memory, a
    truncated NRRD or MetaImage); ``size`` (the header's, x first) completes the memory message."""
    text = str(exc)
    for pattern, words in _KNOWN:
        found = pattern.search(text)
        if found:
            claim = f" (its header claims {_dims(size)} voxels)" if size else ""
            return words.format(*found.groups(), size=claim)
    lines = []
    for line in text.splitlines():
        for pattern in _NOISE:
            line = pattern.sub("", line)
        line = line.strip(" :;\t")
        if line and line not in lines:
            lines.append(line)
    reason = "; ".join(lines) or "unknown reason"
    return reason if len(reason) <= 300 else reason[:297] + "..."


# ----------------------------------------------------------------------------- checks before reading
def _dims(size: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in size)


def _amount(value: float, unit: str = "") -> str:
    """3.5e13, "B" -> "35 TB"; 3.5e13, " voxels" -> "35 T voxels" (decimal prefixes)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.0f} {prefix}{unit}"
    return f"{value:.0f} {unit.strip()}".strip()


def physical_memory_bytes() -> Optional[int]:
    """This computer's physical memory, bytes (None where the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _check_shape(size: Sequence[int], components: int, name: str) -> None:
    """The shape checks of :func:`check_header` and :func:`validate_ct` (same messages)."""
    dim = len(size)
    if dim != 3:
        what = {2: " (a single slice?)", 4: " (a time series or several volumes in one file?)"}.get(dim, "")
        raise InputError(f"{name}: expected a 3D volume, got a {dim}D image of {_dims(size)} voxels{what}")
    if components != 1:
        raise InputError(f"{name}: expected a scalar (grayscale) CT, got {components} components per voxel "
                         "(a vector, RGB or 4D image)")
    if min(size) < MIN_SIZE:
        raise InputError(f"{name}: volume too small, size {tuple(int(n) for n in size)} has an axis below "
                         f"{MIN_SIZE} voxels")


_PIXEL_BYTES = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
                sitk.sitkInt32: 4, sitk.sitkFloat32: 4}
_COMPLEX = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


def check_header(size: Sequence[int], components: int, pixel_id: int, name: str, ct: bool = True) -> None:
    """Refuse, from a header alone (:class:`InputError` starting with ``name``), a volume that cannot
    be held in memory (over :data:`MAX_VOXELS` voxels, or more bytes than the computer has) and, with
    ``ct``, one that is not a 3D scalar real-valued volume of at least :data:`MIN_SIZE` per axis.
    ``size`` is ITK's (x first); ``pixel_id`` a SimpleITK pixel type."""
    if ct:
        _check_shape(size, components, name)
        if pixel_id in _COMPLEX:
            raise InputError(f"{name}: the voxels are complex numbers (an MR or Fourier-domain image?), not CT values")
    n = math.prod(int(d) for d in size)
    memory = physical_memory_bytes()
    load = n * max(1, components) * _PIXEL_BYTES.get(pixel_id, 8)
    claim = f"{name}: the header claims {_dims(size)} voxels ({_amount(n, ' voxels')}, about " \
            f"{_amount(n * BYTES_PER_VOXEL, 'B')} of memory to segment)"
    if n > MAX_VOXELS:
        raise InputError(f"{claim}; is the header corrupt?")
    if memory is not None and load > memory:
        raise InputError(f"{claim}, and {_amount(load, 'B')} just to load them: more than this computer's "
                         f"{_amount(memory, 'B')} of memory; is the header corrupt?")


# ----------------------------------------------------------------------------- reading
def read_image(path: PathLike, check: bool = True) -> sitk.Image:
    """Read a CT from a file or a DICOM series folder.

    Returns the image as stored (geometry untouched). Always refused with :class:`InputError`
    before the voxels are read: an empty file, an unreadable header, a voxel count that cannot be
    held, a NIfTI with truncated or damaged voxel data. With ``check`` (a CT, not a label map): also a
    header that is not a 3D scalar volume, NaN/infinite floats in a NIfTI, and after reading
    :func:`validate_ct`. Its warnings are then given here, once: :meth:`Predictor.predict` does not
    repeat them for this image object (:func:`was_validated`).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input not found: {p}")
    image = _read_dicom_series(p, check) if p.is_dir() else _read_file(p, check)
    if check:
        validate_ct(image, name=str(p))
        _mark_validated(image)
    return image


#: id -> weak reference of the images :func:`read_image` validated (SimpleITK images are not
#: hashable, so no WeakSet; nothing is added to the image itself, so nothing reaches its output).
_VALIDATED: dict[int, weakref.ref] = {}


def _mark_validated(image: sitk.Image) -> None:
    key = id(image)
    _VALIDATED[key] = weakref.ref(image, lambda _ref: _VALIDATED.pop(key, None))


def was_validated(image: sitk.Image) -> bool:
    """True if this very image object came from :func:`read_image` with ``check`` (and was warned about)."""
    ref = _VALIDATED.get(id(image))
    return ref is not None and ref() is image


def _read_file(p: Path, check: bool) -> sitk.Image:
    name = str(p)
    if p.stat().st_size == 0:
        raise InputError(f"{name}: the file is empty (0 bytes)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:  # SimpleITK reports unreadable files as RuntimeError
        raise InputError(f"cannot read image {name}: {sitk_reason(exc)}") from exc
    size = reader.GetSize()
    check_header(size, reader.GetNumberOfComponents(), reader.GetPixelID(), name, ct=check)
    if is_nifti_name(p):
        check_nifti(p, name, finite=check)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read image {name}: {sitk_reason(exc, size)}") from exc


def _read_dicom_series(p: Path, check: bool) -> sitk.Image:
    files = dicom_series_files(p)
    if not files:
        raise InputError(f"no DICOM series found in folder {p}")
    size = None
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    try:
        first.ReadImageInformation()
        size = (*first.GetSize()[:2], len(files))
        components, pixel_id = first.GetNumberOfComponents(), first.GetPixelID()
    except RuntimeError:
        pass  # the series reader below says what is wrong
    if size is not None:
        check_header(size, components, pixel_id, f"DICOM series in {p}", ct=check)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read the DICOM series in {p}: {sitk_reason(exc, size)}") from exc


# ----------------------------------------------------------------------------- checks after reading
def validate_ct(image: sitk.Image, name: str = "input", warn: bool = True) -> None:
    """Raise :class:`InputError` unless ``image`` is a 3D scalar volume of finite values with a body
    to segment (:func:`body_mask.check_has_body`: not constant, some soft tissue).

    With ``warn``, also warns (:class:`LargeVolumeWarning`) about memory for a very large volume,
    (:class:`NonCTWarning`) when intensities do not look like HU, and (:class:`ObliqueWarning`)
    when the direction matrix is not axis-aligned.
    """
    size = image.GetSize()
    _check_shape(size, image.GetNumberOfComponentsPerPixel(), name)
    if image.GetPixelID() in _COMPLEX:
        raise InputError(f"{name}: the voxels are complex numbers (an MR or Fourier-domain image?), not CT values")
    n_voxels = size[0] * size[1] * size[2]
    if warn and n_voxels > LARGE_VOXELS:
        warnings.warn(f"{name}: very large volume ({n_voxels / 1e6:.0f} M voxels, size {size}); segmentation "
                      f"needs about {BYTES_PER_VOXEL} bytes per voxel of memory", LargeVolumeWarning, stacklevel=2)
    if min(image.GetSpacing()) <= 0:
        raise InputError(f"{name}: invalid voxel spacing {image.GetSpacing()}")
    view = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(view.dtype, np.floating) and not np.isfinite(view).all():
        n_bad = int(np.count_nonzero(~np.isfinite(view)))
        raise InputError(f"{name}: {n_bad} voxels are NaN or infinite")
    check_has_body(view, tuple(reversed(image.GetSpacing())), name)
    if not warn:
        return
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


def write_image_atomic(image: sitk.Image, path: PathLike, compress: bool = True) -> Path:
    """Write ``image`` to ``path`` through a temporary file in the same folder and a rename.

    A failure leaves no partial file behind. The format follows the suffix (.nii.gz, .nrrd, ...).
    """
    out = Path(path)
    if not out.name.lower().endswith(OUTPUT_SUFFIXES):
        raise InputError(f"output {out}: unsupported file type (use one of {', '.join(OUTPUT_SUFFIXES)})")
    suffix = ".nii.gz" if out.name.lower().endswith(".nii.gz") else out.suffix
    with atomic_path(out, suffix=suffix) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return out
