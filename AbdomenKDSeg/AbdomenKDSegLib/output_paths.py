"""Where a segmentation may be written: every output path checked before any image is read.

The rules (the same for the command line and :func:`inference.segment_file`):

- an output file ends in one of the accepted suffixes (label maps: :data:`LABEL_SUFFIXES`,
  previews ``.png``) and is not a folder;
- its folder exists, is a folder and is writable (a mistyped parent is not created);
- it is never one of the inputs: not the same path, not the same file through a symbolic or hard
  link, not a file inside a DICOM series folder being read;
- an existing file is replaced only when ``overwrite`` is given (``--overwrite``).

All problems raise :class:`errors.UsageError` naming the path and what to do instead. Importing this
module does not import PyTorch or SimpleITK.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from .errors import UsageError

#: File name endings a label map can be written to (single-file formats, so the write is atomic).
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: File name ending of a preview.
PREVIEW_SUFFIXES = (".png",)


def _same_file(a: Path, b: Path) -> bool:
    """True if ``a`` and ``b`` name one file (same resolved path, or the same inode)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _inside(path: Path, folder: Path) -> bool:
    """True if ``path`` lies in ``folder`` (both resolved)."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def is_folder_target(text: str | os.PathLike[str]) -> bool:
    """True if ``text`` (as typed: ``Path`` drops a trailing slash) names a folder to write into: an
    existing folder, or a name ending in ``/``."""
    return Path(text).is_dir() or str(text).endswith(("/", os.sep))


def check_writable_folder(folder: Path, what: str) -> None:
    """``folder`` exists, is a folder and can receive new files; else :class:`UsageError`."""
    shown = folder if str(folder) else Path(".")
    if not folder.exists():
        raise UsageError(f"{what}: the folder {shown} does not exist (create it first, or check the path)")
    if not folder.is_dir():
        raise UsageError(f"{what}: {shown} is a file, not a folder")
    try:  # a real probe: also catches read-only file systems (os.access answers yes to root)
        fd, probe = tempfile.mkstemp(prefix=".abdomen-kdseg-write-test.", dir=folder)
    except OSError as exc:
        raise UsageError(f"{what}: cannot write in the folder {shown} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Path, inputs: Sequence[Path], overwrite: bool, what: str = "output",
                      suffixes: Sequence[str] = LABEL_SUFFIXES, overwrite_hint: str = "--overwrite",
                      parent_checked: bool = False) -> Path:
    """Check one output file (rules in the module docstring); returns ``path``.

    ``inputs``: the files and folders being read (a DICOM folder counts with every file in it).
    ``what`` names the output in messages ("output", "preview", "coarse output");
    ``overwrite_hint`` how the caller asks to replace a file (``--overwrite``, ``overwrite=True``);
    ``parent_checked``: the folder was checked by :func:`check_output_folder` (it may not exist yet).
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name such as {path / ('labels' + suffixes[0])}")
    if not path.name.lower().endswith(tuple(suffixes)):
        raise UsageError(f"{what} {path}: unsupported file type {_suffix(path)!r} (use {' or '.join(suffixes)})")
    for source in inputs:
        source = Path(source)
        if _same_file(path, source) or (source.is_dir() and _inside(path, source)):
            kind = "the input's DICOM folder" if source.is_dir() else "the input"
            raise UsageError(f"{what} {path} is {kind} ({source}): writing it would destroy the CT; "
                             "give another name")
    if not parent_checked:
        check_writable_folder(path.parent, f"{what} {path}")
    if path.exists() and not overwrite:
        raise UsageError(f"{what} {path} already exists; give {overwrite_hint} to replace it")
    return path


def check_output_folder(folder: Path, inputs: Iterable[Path], what: str = "output folder") -> bool:
    """Check a folder that will receive one file per case: not a file, not an input folder, its parent
    writable if it is to be created. Returns True if it does not exist yet (the caller creates it)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what} {folder} is a file; a folder of cases needs a folder here")
    for source in inputs:
        if Path(source).is_dir() and _same_file(folder, Path(source)):
            raise UsageError(f"{what} {folder} is the input folder: the label maps would be written among the "
                             "CTs; give another folder")
    if folder.is_dir():
        check_writable_folder(folder, f"{what} {folder}")
        return False
    check_writable_folder(_existing_parent(folder), f"{what} {folder}")
    return True


def _existing_parent(folder: Path) -> Path:
    """The nearest existing folder above ``folder`` (``mkdir -p`` creates the rest)."""
    parent = folder.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else (path.suffix or "(none)")


__all__ = ["LABEL_SUFFIXES", "PREVIEW_SUFFIXES", "check_output_file", "check_output_folder",
           "check_writable_folder", "is_folder_target"]
