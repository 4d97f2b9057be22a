"""The cache of exported runtime graphs: where it is, what is in it, keeping it small, clearing it.

The ONNX Runtime and OpenVINO backends (:mod:`.onnx_backend`, :mod:`.openvino_backend`) export each
bundle's coarse and fine networks to an ONNX graph once and keep it in this folder, with OpenVINO's
compiled blobs next to it::

    <cache>/<sha>-<stage>-<ZxYxX>-torch<v>-opset<n>-v<n>.onnx    one graph (cache_name in onnx_backend)
    <cache>/openvino/<that name without .onnx>/*.blob           OpenVINO's compiled model(s) of that graph
    <cache>/openvino/<sha>-<stage>-<ZxYxX>-stored-ov<v>/model.blob   compiled model of a graph stored in its bundle
    <cache>/openvino/<digits>.blob                              compiled models of older versions (no owner)

``<cache>`` is ``$ABDOMENKDSEG_CACHE``, else ``$XDG_CACHE_HOME/abdomen-kdseg``, else
``~/.cache/abdomen-kdseg``.

Size cap: after a graph is written (and after OpenVINO compiled one) :func:`prune` deletes the
least recently used bundles' graphs (a bundle's coarse and fine graphs together, with their compiled
blobs) until the project's files total at most ``$ABDOMENKDSEG_CACHE_MAX_MB`` megabytes (default
400: four bundles of the default model's size with their OpenVINO blobs, ~85 MB each; 0 keeps only
the model in use). A graph's modification time is its last use: a
cached graph is touched every time it is loaded. The graphs of the model being loaded are never
pruned. Only files of the layout above are ever deleted; anything else in the folder is left alone.

``abdomen-kdseg cache`` lists the folder (:func:`format_listing`); ``abdomen-kdseg cache --clear``
deletes the project's files (:func:`clear`). Importing this module does not import PyTorch.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional

#: Environment variable naming the folder for exported graphs.
CACHE_ENV = "ABDOMENKDSEG_CACHE"
#: Environment variable with the size cap of the cache in megabytes (10**6 bytes).
MAX_MB_ENV = "ABDOMENKDSEG_CACHE_MAX_MB"
#: Default size cap in megabytes.
DEFAULT_MAX_MB = 400.0
#: Sub-folder of OpenVINO's compiled models.
OPENVINO_DIR = "openvino"
#: A temporary file of an atomic graph write older than this (seconds) is left over from a crash.
STALE_TMP_S = 3600.0

#: A graph file name (see onnx_backend.cache_name); ``key`` identifies the bundle (its SHA-256 prefix).
GRAPH_RE = re.compile(r"^(?P<key>[0-9A-Za-z]+)-(?P<stage>coarse|fine)-\d+x\d+x\d+-torch[0-9A-Za-z_.]+"
                      r"-opset\d+-v[0-9A-Za-z_]+\.onnx$")
#: The compiled-model folder of a graph stored in a bundle (``openvino_backend.stored_graph_name``).
STORED_RE = re.compile(r"^(?P<key>[0-9A-Za-z]+)-(?P<stage>coarse|fine)-\d+x\d+x\d+-stored-ov[0-9A-Za-z_.]+$")
#: A temporary file of the atomic write of a graph (:func:`atomic_files.atomic_path`: ``.<name>.<random>.tmp``).
TMP_RE = re.compile(r"^\.(?P<graph>.+\.onnx)\.[^./]+\.tmp$")
#: OpenVINO's compiled model files in the old flat layout (``openvino/<digits>.blob``).
LEGACY_BLOB_RE = re.compile(r"^\d+\.blob$")


def cache_dir() -> Path:
    """Folder for exported graphs: ``$ABDOMENKDSEG_CACHE``, else the user cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "abdomen-kdseg"


def max_bytes() -> int:
    """The size cap in bytes: ``$ABDOMENKDSEG_CACHE_MAX_MB`` megabytes (default 400).

    A value that is not a number >= 0 gives a RuntimeWarning and the default."""
    raw = os.environ.get(MAX_MB_ENV, "").strip()
    megabytes = DEFAULT_MAX_MB
    if raw:
        try:
            megabytes = float(raw)
            if not megabytes >= 0:  # also NaN
                raise ValueError(raw)
        except ValueError:
            warnings.warn(f"{MAX_MB_ENV}={raw!r} is not a size in MB (a number >= 0); using {DEFAULT_MAX_MB:g}",
                          RuntimeWarning, stacklevel=2)
            megabytes = DEFAULT_MAX_MB
    return int(megabytes * 1e6)


def bundle_key(graph_name: str) -> Optional[str]:
    """The bundle part of a graph file name (None if the name is not a graph's)."""
    match = GRAPH_RE.match(graph_name) or STORED_RE.match(graph_name)
    return match.group("key") if match else None


def compiled_dir(graph_name: str, folder: Optional[Path] = None) -> Path:
    """OpenVINO's compiled-model folder of a graph: ``<cache>/openvino/<graph name without .onnx>``."""
    stem = graph_name[: -len(".onnx")] if graph_name.endswith(".onnx") else graph_name
    return (folder or cache_dir()) / OPENVINO_DIR / stem


def touch(path: Path) -> None:
    """Mark a cached graph as used now (its modification time orders the pruning); errors ignored."""
    try:
        os.utime(path, None)
    except OSError:
        pass


@dataclass
class Entry:
    """Files deleted together: a graph with its compiled blobs, or one file or folder without a graph."""

    name: str  #: the graph file name, or the path of the orphan relative to the cache folder
    kind: str  #: "graph", "compiled" (OpenVINO files whose graph is gone), "legacy" (old blob), "temporary"
    mtime: float  #: last use (a graph's modification time)
    files: List[Path] = field(default_factory=list)  #: every file of the entry
    dirs: List[Path] = field(default_factory=list)  #: folders removed with it (when empty)
    size: int = 0

    @property
    def key(self) -> Optional[str]:
        return bundle_key(self.name) if self.kind == "graph" else None


def _files_under(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def scan(folder: Optional[Path] = None) -> tuple[List[Entry], List[Path]]:
    """The project's entries in the cache folder (oldest first) and the other files found there
    (never touched). An absent folder gives two empty lists."""
    folder = Path(folder) if folder is not None else cache_dir()
    entries: List[Entry] = []
    others: List[Path] = []
    if not folder.is_dir():
        return entries, others
    graphs: dict[str, Entry] = {}
    now = time.time()
    for path in sorted(folder.iterdir()):
        if path.name == OPENVINO_DIR and path.is_dir():
            continue
        if path.is_file() and GRAPH_RE.match(path.name):
            entry = Entry(path.name, "graph", path.stat().st_mtime, [path])
            graphs[path.name] = entry
            entries.append(entry)
        elif path.is_file() and TMP_RE.match(path.name) and GRAPH_RE.match(TMP_RE.match(path.name)["graph"]):
            mtime = path.stat().st_mtime
            entries.append(Entry(path.name, "temporary", mtime, [path],
                                 size=0 if now - mtime < STALE_TMP_S else _size(path)))
        else:
            others.extend(_files_under(path) if path.is_dir() else [path])
    compiled_root = folder / OPENVINO_DIR
    if compiled_root.is_dir():
        for path in sorted(compiled_root.iterdir()):
            if path.is_dir() and GRAPH_RE.match(path.name + ".onnx"):
                files = _files_under(path)
                owner = graphs.get(path.name + ".onnx")
                if owner is not None:
                    owner.files.extend(files)
                    owner.dirs.append(path)
                else:  # the graph was deleted by hand: the blobs are of no use
                    mtime = max([p.stat().st_mtime for p in files] or [path.stat().st_mtime])
                    entries.append(Entry(f"{OPENVINO_DIR}/{path.name}", "compiled", mtime, files, [path]))
            elif path.is_dir() and STORED_RE.match(path.name):  # a bundle's stored graph, compiled
                files = _files_under(path)
                mtime = max([p.stat().st_mtime for p in files] or [path.stat().st_mtime])
                entries.append(Entry(path.name, "graph", mtime, files, [path]))
            elif path.is_file() and LEGACY_BLOB_RE.match(path.name):
                entries.append(Entry(f"{OPENVINO_DIR}/{path.name}", "legacy", path.stat().st_mtime, [path]))
            else:
                others.extend(_files_under(path) if path.is_dir() else [path])
    for entry in entries:
        if entry.kind != "temporary":
            entry.size = sum(_size(p) for p in entry.files)
    entries.sort(key=lambda e: (e.mtime, e.name))
    return entries, others


def _remove(entry: Entry) -> tuple[int, List[str]]:
    """Delete an entry's files (then its emptied folders); returns (bytes freed, errors)."""
    freed, errors = 0, []
    for path in entry.files:
        size = _size(path)
        try:
            path.unlink()
            freed += size
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
    for folder in sorted(entry.dirs, key=lambda p: len(p.parts), reverse=True):
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            _rmdir_if_empty(sub)
        _rmdir_if_empty(folder)
    return freed, errors


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def prune(keep: Iterable[str] = (), limit: Optional[int] = None, folder: Optional[Path] = None) -> List[Entry]:
    """Delete the least recently used bundles' graphs (each bundle's together, with their compiled blobs),
    then other entries by age, until the project's files total at most ``limit`` bytes
    (default :func:`max_bytes`); the entries of the graph names in ``keep`` (every graph of their
    bundles) are never deleted, and temporary files younger than an hour (a write in progress) stay.
    Returns the deleted entries. Never raises for a file it cannot delete (it is skipped)."""
    limit = max_bytes() if limit is None else int(limit)
    try:
        entries, _ = scan(folder)
    except OSError:
        return []
    keep_keys = {bundle_key(Path(name).name) for name in keep} - {None}
    total = sum(e.size for e in entries)
    # a bundle's graphs go together (last use: its most recent graph); other entries one by one
    groups: dict[object, List[Entry]] = {}
    for index, entry in enumerate(entries):
        groups.setdefault(entry.key or index, []).append(entry)
    removed: List[Entry] = []
    for group in sorted(groups.values(), key=lambda g: max(e.mtime for e in g)):  # least recently used first
        if total <= limit:
            break
        for entry in group:
            if entry.key in keep_keys or entry.size == 0:
                continue
            freed, errors = _remove(entry)
            if not errors:
                removed.append(entry)
            total -= freed
    return removed


def clear(folder: Optional[Path] = None) -> tuple[List[Entry], int, List[str]]:
    """Delete every file of the project in the cache folder (graphs, compiled blobs, temporary files).

    Returns (entries removed, bytes freed, errors: files that could not be deleted). The folder itself
    and any file that is not the project's stay."""
    folder = Path(folder) if folder is not None else cache_dir()
    entries, _ = scan(folder)
    removed, freed, errors = [], 0, []
    for entry in entries:
        size, errs = _remove(entry)
        freed += size
        errors.extend(errs)
        if not errs:
            removed.append(entry)
    _rmdir_if_empty(folder / OPENVINO_DIR)
    return removed, freed, errors


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_listing(folder: Optional[Path] = None) -> str:
    """What ``abdomen-kdseg cache`` prints: the folder, the cap, one line per file (last use, size,
    path relative to the folder), the total, and how many other files are left alone."""
    folder = Path(folder) if folder is not None else cache_dir()
    cap = f"size cap {_mb(max_bytes())} (${MAX_MB_ENV})"
    if not folder.is_dir():
        return f"graph cache {folder}: empty (no folder yet); {cap}"
    entries, others = scan(folder)
    lines = [f"graph cache {folder}; {cap}; least recently used first"]
    files = 0
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.mtime))
        label = {"graph": "", "compiled": "  (OpenVINO, graph gone)", "legacy": "  (OpenVINO, old layout)",
                 "temporary": "  (unfinished write)"}[entry.kind]
        for path in entry.files:
            files += 1
            lines.append(f"  {when}  {_mb(_size(path)):>10}  {path.relative_to(folder)}{label}")
    total = sum(_size(p) for e in entries for p in e.files)
    models = len({e.key for e in entries if e.key})
    lines.append(f"total {_mb(total)} in {files} file(s) of {models} model(s)")
    if others:
        lines.append(f"{len(others)} other file(s) in the folder are not this project's graphs: left alone")
    return "\n".join(lines)


def cmd_cache(args: argparse.Namespace) -> int:
    """``abdomen-kdseg cache [--clear]``; returns the exit code (1 if a file could not be deleted)."""
    folder = cache_dir()
    if not args.clear:
        print(format_listing(folder))
        return 0
    removed, freed, errors = clear(folder)
    files = sum(len(e.files) for e in removed)
    print(f"removed {files} file(s) of {len({e.key for e in removed if e.key})} model(s) from {folder}: "
          f"{_mb(freed)} freed")
    for error in errors:
        print(f"error: cannot delete {error}", file=sys.stderr)
    return 1 if errors else 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``cache [--clear]`` to the main parser's subparsers; returns its parser."""
    parser = subparsers.add_parser(
        "cache", help="list (or --clear) the cache of exported CPU runtime graphs",
        description="The ONNX Runtime and OpenVINO backends export each model's networks once and keep "
                    f"the graphs in {cache_dir()} (${CACHE_ENV}), with OpenVINO's compiled blobs. After a new "
                    "graph is written the least recently used models' graphs are deleted until the cache "
                    f"holds at most ${MAX_MB_ENV} MB (default {DEFAULT_MAX_MB:g}; the model in use is always "
                    "kept). Without options: list the files (last use, size) and the total.")
    parser.add_argument("--clear", action="store_true",
                        help="delete this project's cached graphs (other files in the folder are left alone) "
                             "and print the space freed; the next run of each model exports it again")
    parser.set_defaults(func=cmd_cache)
    return parser


__all__ = ["cache_dir", "max_bytes", "prune", "clear", "scan", "touch", "compiled_dir", "format_listing",
           "register_cli", "CACHE_ENV", "MAX_MB_ENV", "DEFAULT_MAX_MB"]
