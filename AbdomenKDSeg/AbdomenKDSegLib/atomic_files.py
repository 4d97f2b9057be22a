"""Writing a file so that it is either complete or absent: a temporary file beside it, then a rename.

Every file the project writes for a user (label maps, previews, bundles, exported graphs, training
checkpoints, caches) goes through :func:`atomic_path`: the data is written to a hidden temporary
file in the destination's folder (``.<name>.<random><suffix>``) that is renamed over the destination
(``os.replace``, atomic within one file system) only when the writer succeeded, and deleted when it
failed. A crash, a full disk or Ctrl+C never leaves a half-written file under the final name, and an
existing file is replaced in one step. Standard library only.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def temp_prefix(path: Path) -> str:
    """Name prefix of the temporary files written for ``path`` (a hidden file: ``.<name>.``)."""
    return f".{path.name}."


@contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp", fsync: bool = False) -> Iterator[Path]:
    """Yield an empty temporary file beside ``path`` to write; on success it becomes ``path``.

    The parent folder is created. The temporary file gets the permissions of a normal new file
    (the umask's, not ``mkstemp``'s 0600). ``suffix`` keeps writers that pick a format from the
    file name working (``.nii.gz``, ``.png``). ``fsync``: flush the file and its folder to disk
    before and after the rename (training checkpoints survive a power cut).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(out), suffix=suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync and hasattr(os, "O_DIRECTORY"):
        folder = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_path`; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
