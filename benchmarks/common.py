"""Shared helpers of the benchmark scripts: inputs, child processes with peak memory, tables, JSON.

* :func:`prepare_input` - the sample CT, or a clinical-size CT resampled from it, written once as
  uncompressed NIfTI under ``benchmarks/data-cache/``. The clinical sizes of the issues have a
  clinical voxel spacing (512x512x300 at 0.8x0.8x2.5 mm; 512x512x800 at 0.8 mm isotropic): the
  sample is resampled onto that grid, centred, and air (-1024 HU) fills the field of view beyond the
  sample's 366x303x336 mm. ``XxYxZ@SXxSYxSZ`` names any size and spacing; a size without a spacing
  that is not in the table keeps the sample's field of view.
* :func:`run_measured` - runs a command as a child process and measures its wall-clock seconds
  and peak resident memory (the child's own ``ru_maxrss`` from ``wait4``, and the peak of the
  summed RSS of the child and its descendants sampled with psutil).
* :func:`print_table`, :func:`write_json`, :func:`machine_info`.

Sizes are written the ITK way, X x Y x Z (columns x rows x slices); numpy arrays are (Z, Y, X).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DATA_CACHE = BENCH_DIR / "data-cache"
RESULTS = BENCH_DIR / "results"
SAMPLE_CT = REPO.parent / "shared" / "data" / "ct-abdomen-3mm" / "image.nii.gz"
#: Size names accepted by ``--sizes``: "sample", "XxYxZ" (voxels, ITK order) or "XxYxZ@SXxSYxSZ" (mm).
DEFAULT_SIZES = ("sample", "512x512x300", "512x512x800")
#: Voxel spacing (X, Y, Z mm) of the named clinical sizes: issue 3 asks for 512x512x300 at
#: 0.8x0.8x2.5 mm; 512x512x800 is a thin-slice (0.8 mm isotropic) chest-abdomen-pelvis scan.
CLINICAL_SPACING_MM = {(512, 512, 300): (0.8, 0.8, 2.5), (512, 512, 800): (0.8, 0.8, 0.8)}
AIR_HU = -1024


# ------------------------------------------------------------------------------------------ inputs
def _triple(text: str, kind: type, name: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ValueError(f"size {name!r} is neither 'sample' nor XxYxZ[@SXxSYxSZ] (e.g. 512x512x300@0.8x0.8x2.5)")
    return values


def parse_size(name: str) -> Optional[tuple[int, int, int]]:
    """``"sample"`` -> None; ``"512x512x300"`` or ``"512x512x300@0.8x0.8x2.5"`` -> (512, 512, 300)."""
    if name == "sample":
        return None
    size = _triple(name.split("@")[0], int, name)
    if min(size) < 8:
        raise ValueError(f"size {name!r} is too small")
    if "@" in name:
        parse_spacing(name)
    return size


def parse_spacing(name: str) -> Optional[tuple[float, float, float]]:
    """Spacing (X, Y, Z mm) of a size name: after ``@``, else :data:`CLINICAL_SPACING_MM`, else None."""
    if name == "sample":
        return None
    if "@" in name:
        spacing = _triple(name.split("@", 1)[1], float, name)
        if min(spacing) <= 0:
            raise ValueError(f"size {name!r} has a spacing <= 0")
        return spacing
    return CLINICAL_SPACING_MM.get(_triple(name, int, name))


def resample_to_size(image, size_xyz: Sequence[int]):  # noqa: ANN001, ANN201 (SimpleITK images)
    """Trilinear resample of ``image`` to ``size_xyz`` voxels covering the same field of view.

    The field of view (voxel edges) is kept: spacing_new = spacing * size / size_new.
    """
    import numpy as np

    spacing = np.array(image.GetSpacing(), dtype=float) * np.array(image.GetSize()) / np.array(size_xyz)
    return resample_to_grid(image, size_xyz, spacing.tolist())


def resample_to_grid(image, size_xyz: Sequence[int], spacing_xyz: Sequence[float]):  # noqa: ANN001, ANN201
    """Trilinear resample of ``image`` onto ``size_xyz`` voxels of ``spacing_xyz`` mm, same centre.

    The new grid has the image's direction and its field-of-view centre; samples outside the image
    are air (-1024 HU). Output is int16 HU.
    """
    import numpy as np
    import SimpleITK as sitk

    old_size = np.array(image.GetSize(), dtype=float)
    old_spacing = np.array(image.GetSpacing(), dtype=float)
    new_size = np.array(size_xyz, dtype=float)
    new_spacing = np.array(spacing_xyz, dtype=float)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    centre = np.array(image.GetOrigin(), dtype=float) + direction @ ((old_size - 1.0) * old_spacing / 2.0)
    origin = centre - direction @ ((new_size - 1.0) * new_spacing / 2.0)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in size_xyz])
    resampler.SetOutputSpacing(new_spacing.tolist())
    resampler.SetOutputOrigin(origin.tolist())
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(AIR_HU)
    resampler.SetOutputPixelType(sitk.sitkInt16)
    return resampler.Execute(image)


def prepare_input(name: str, cache: Path = DATA_CACHE, sample: Path = SAMPLE_CT) -> Path:
    """Path of the input called ``name`` ("sample" or "XxYxZ"); clinical sizes are made once.

    Clinical sizes are the sample CT resampled by :func:`resample_to_grid` (a size with a spacing) or
    :func:`resample_to_size` (same field of view) and written as uncompressed NIfTI
    ``ct-<X>x<Y>x<Z>[-<spacing>mm].nii`` (atomically) in ``cache``.
    """
    size = parse_size(name)
    if not sample.is_file():
        raise FileNotFoundError(f"sample CT not found: {sample}")
    if size is None:
        return sample
    spacing = parse_spacing(name)
    tag = "x".join(str(n) for n in size)
    if spacing is not None:
        tag += "-" + "x".join(f"{v:g}" for v in spacing) + "mm"
    path = cache / f"ct-{tag}.nii"
    if path.is_file():
        return path
    import SimpleITK as sitk

    cache.mkdir(parents=True, exist_ok=True)
    source = sitk.ReadImage(str(sample))
    image = resample_to_size(source, size) if spacing is None else resample_to_grid(source, size, spacing)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".nii", dir=cache)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, False)  # useCompression=False
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def image_summary(path: Path) -> dict[str, Any]:
    """Size (X, Y, Z), spacing (mm), voxel count and file size of an image, read from its header."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = list(reader.GetSize())
    return {
        "path": str(path),
        "size_xyz": size,
        "spacing_xyz_mm": [round(s, 4) for s in reader.GetSpacing()],
        "voxels": size[0] * size[1] * size[2],
        "file_mb": round(path.stat().st_size / 2**20, 1),
    }


# ----------------------------------------------------------------------------------- child processes
@dataclass
class ChildRun:
    """Outcome of :func:`run_measured`. Memory in MiB (2**20 bytes)."""

    command: list[str]
    returncode: Optional[int]
    seconds: float
    peak_rss_mb: float          # max(own ru_maxrss, sampled tree RSS)
    own_maxrss_mb: float        # the child process itself (kernel high-water mark)
    tree_peak_rss_mb: float     # sampled sum over the child and its descendants
    timed_out: bool
    low_memory: bool            # killed because the machine ran short of memory
    stdout_tail: str
    stderr_tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.low_memory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tree_rss(proc) -> int:  # noqa: ANN001 (psutil.Process)
    import psutil

    total = 0
    try:
        members = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in members:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(command: Sequence[str], env: Optional[dict[str, str]] = None, timeout: float = 600.0,
                 poll: float = 0.05, cwd: Optional[Path] = None, tail: int = 4000,
                 min_available_mb: float = 0.0) -> ChildRun:
    """Run ``command`` and measure wall seconds and peak RSS; kill it after ``timeout`` seconds,
    or as soon as the machine's available memory drops below ``min_available_mb`` (protects the
    other processes from the OOM killer).

    stdout/stderr go to temporary files (no pipe can fill up); their last ``tail`` characters
    are kept. Linux: ``ru_maxrss`` is in KiB.
    """
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(list(command), stdout=out, stderr=err, env=env, cwd=cwd)
        proc = psutil.Process(child.pid)
        tree_peak, timed_out, low_memory, status, usage = 0, False, False, None, None
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid != 0:
                break
            tree_peak = max(tree_peak, _tree_rss(proc))
            timed_out = time.perf_counter() - start > timeout
            low_memory = psutil.virtual_memory().available < min_available_mb * 2**20
            if timed_out or low_memory:
                for p in [proc] + proc.children(recursive=True):
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                _, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(poll)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read()[-tail:], err.read()[-tail:]
    own = usage.ru_maxrss / 1024.0 if usage is not None else 0.0
    tree = tree_peak / 2**20
    return ChildRun(list(command), child.returncode, round(seconds, 3), round(max(own, tree), 1),
                    round(own, 1), round(tree, 1), timed_out, low_memory, stdout, stderr)


def child_env(threads: int, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Environment for a measured child: thread counts of every math library set to ``threads``."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[key] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra or {})
    return env


def self_maxrss_mb() -> float:
    """Peak RSS of the current process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------ output
def machine_info() -> dict[str, Any]:
    """CPU count, load averages, platform, Python and torch versions, GPU if any."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def write_json(data: Any, path: Path) -> Path:
    """Write ``data`` as indented JSON, atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fmt(value: Any, digits: int = 1) -> str:
    """Table cell: floats rounded, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], stream=None) -> str:  # noqa: ANN001
    """Print ``rows`` as a Markdown table; ``columns`` = [(key, header), ...]. Returns the text."""
    cells = [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    headers = [h for _, h in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    text = "\n".join(lines)
    print(text, file=stream or sys.stdout, flush=True)
    return text
