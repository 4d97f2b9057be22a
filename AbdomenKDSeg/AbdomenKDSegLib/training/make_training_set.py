"""The training-set generator: realistic, varied labeled CT made from one labeled CT and many label maps.

For each target label map (e.g. the 50 hand-drawn FLARE22 maps) the labeled source CT is deformed so
that its organs take the target's shapes and positions (:mod:`.anatomy_transfer`; fits stored once in
``<out>/transfers/``), then rendered ``variants`` times, each with its own field of view and
appearance (:mod:`.appearance`): contrast phase, organ texture, noise, blur, slice thickness, spacing,
HU clipping. Image and labels are the same warped object, so they agree voxel for voxel; the
target's esophagus (absent from the source labels) is painted in. Output, the folder ``train`` reads::

    <out>/imagesTr/<case>_0000.nii.gz   <out>/labelsTr/<case>.nii.gz
    <out>/heldout/imagesTs/...          <out>/heldout/labelsTs/...   (targets kept out of training)
    <out>/transfers/<target>.npz        <out>/report.json            <out>/previews/<case>.png

Deterministic given ``seed``: every case draws from its own generator seeded by (seed, target, variant).
The draws' weights and ranges (fields of view, slab length, slice thickness, contrast phases) are options, so
a second set can stress one kind of scan (e.g. thin non-contrast slabs) with variants numbered after the first
set's (``first_variant``), ready to be merged into one data folder.
Resumable: finished fits and cases are skipped on a re-run.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic_files import atomic_path, atomic_write_text
from ..engine.image_io import IMAGE_SUFFIXES, strip_image_suffix
from ..errors import InputError

Progress = Optional[Callable[[str, int, int], None]]

if TYPE_CHECKING:
    from .anatomy_transfer import FitSettings
    from .appearance import AppearanceRanges


@dataclass(frozen=True)
class TargetCase:
    """One target label map and the split it belongs to."""

    name: str
    path: Path
    heldout: bool


def case_stem(path: Path) -> str:
    """File name without its image suffix (``FLARE22_Tr_0001.nii.gz`` -> ``FLARE22_Tr_0001``)."""
    return strip_image_suffix(path.name) or path.stem


def find_targets(folder: Path, heldout: Sequence[str]) -> List[TargetCase]:
    """Label maps of ``folder`` (sorted); names in ``heldout`` (or ending in one of them) are held out."""
    if not folder.is_dir():
        raise InputError(f"target label folder not found: {folder}")
    paths = [p for p in sorted(folder.iterdir())
             if p.is_file() and any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES)]
    if not paths:
        raise InputError(f"no label maps (.nii.gz, .nrrd, ...) in {folder}")
    out = []
    for p in paths:
        stem = case_stem(p)
        out.append(TargetCase(stem, p, any(stem == h or stem.endswith(h) for h in heldout)))
    return out


def parse_weights(text: str, names: Sequence[str], what: str) -> Tuple[Tuple[str, float], ...]:
    """``"slab=0.7,target=0.3"`` -> (name, weight) pairs over ``names`` (missing names get 0); weights
    >= 0 with a positive sum. :class:`InputError` names a bad item."""
    weights = dict.fromkeys(names, 0.0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in weights:
            raise InputError(f"bad {what} weight {item!r}: use NAME=WEIGHT with NAME one of {', '.join(names)}")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"bad {what} weight {item!r}: {value!r} is not a number") from None
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise InputError(f"{what} weights must be >= 0 with a positive sum, got {text!r}")
    return tuple(weights.items())


def parse_range(text: str, what: str) -> Tuple[float, float]:
    """``"40-80"`` -> (40.0, 80.0), with 0 < low <= high."""
    low, sep, high = text.partition("-")
    try:
        lo, hi = float(low), float(high)
    except ValueError:
        raise InputError(f"bad {what} {text!r}: use LOW-HIGH, e.g. 40-80") from None
    if not sep or not 0 < lo <= hi:
        raise InputError(f"bad {what} {text!r}: use LOW-HIGH with 0 < LOW <= HIGH")
    return lo, hi


def parse_heldout(spec: str) -> List[str]:
    """``"41-50"`` -> ["0041", ..., "0050"]; ``"0003,0007"`` -> ["0003", "0007"]; "" -> []."""
    out: List[str] = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        lo, sep, hi = part.partition("-")
        if sep and lo.isdigit() and hi.isdigit():
            width = max(4, len(lo), len(hi))
            out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(part)
    return out


# ---------------------------------------------------------------------------- step 1: fits
def _fit_one(args: Tuple[str, str, str, str, dict]) -> Tuple[str, float, Dict[int, float]]:
    import torch

    from .anatomy_transfer import FitSettings, fit_transfer, organ_values_present, read_grid_volume
    from .transfer_store import save_transfer

    source_labels, target_path, out_path, key, settings = args
    torch.set_num_threads(1)
    start = time.perf_counter()
    src = read_grid_volume(source_labels, check=False)
    tgt = read_grid_volume(target_path, check=False)
    organs = organ_values_present(src.array, tgt.array)
    transfer = fit_transfer(src, tgt, organs, FitSettings(**settings))
    seconds = time.perf_counter() - start
    save_transfer(Path(out_path), transfer, key, seconds)
    return out_path, seconds, transfer.dice


def fit_all(source_labels: Path, targets: Sequence[TargetCase], folder: Path, workers: int = 1,
            settings=None, progress: Progress = None) -> Dict[str, Path]:  # noqa: ANN001
    """Fit (or reuse) the transfer of every target; returns {target name: .npz path}."""
    from .anatomy_transfer import FitSettings
    from .transfer_store import fit_key, is_current

    settings = settings or FitSettings()
    todo, out = [], {}
    for t in targets:
        path = folder / f"{t.name}.npz"
        out[t.name] = path
        key = fit_key(source_labels, t.path, settings)
        if not is_current(path, key):
            todo.append((str(source_labels), str(t.path), str(path), key, asdict(settings)))
    done = len(targets) - len(todo)
    if progress:
        progress("anatomy transfer", done, len(targets))
    if todo:
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(_fit_one, todo):
                    done += 1
                    if progress:
                        progress("anatomy transfer", done, len(targets))
        else:
            for job in todo:
                _fit_one(job)
                done += 1
                if progress:
                    progress("anatomy transfer", done, len(targets))
    return out


# ---------------------------------------------------------------------------- step 2: rendering
@dataclass(frozen=True)
class RenderRanges:
    """Field-of-view and grid draws of one rendered case (mm; (name, weight) pairs, normalised when drawn)."""

    fov_probabilities: Tuple[Tuple[str, float], ...] = (
        ("target", 0.3), ("extended", 0.25), ("slab", 0.3), ("liver_cut", 0.15))
    slab_mm: Tuple[float, float] = (40.0, 150.0)
    inplane_spacing_mm: Tuple[float, float] = (1.0, 2.0)
    slice_thickness_mm: Tuple[float, float] = (0.6, 5.0)
    slice_spacing_mm: Tuple[float, float] = (1.0, 5.0)  # the slice spacing is the thickness, clipped to this


@dataclass
class RenderDraw:
    """The field of view and grid one case got."""

    fov: str
    z_range_mm: Tuple[float, float]
    spacing_mm: Tuple[float, float, float]  # (z, y, x)
    slice_thickness_mm: float


def case_seed(seed: int, target: str, variant: int) -> int:
    """A generator seed from (seed, target name, variant), stable across runs and platforms."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{target}:{variant}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


#: How far (mm, source space) a case may reach above the source CT's top slice. The source CT ends
#: inside the liver, spleen and stomach (no liver dome, no lung above it); above its top the
#: generator continues the body from the top slice and paints the target's organs there, with lung
#: where the source's organs would continue (:func:`render_case`).
TOP_EXTENSION_MM = 80.0


def valid_z_range(transfer, source, target, z_lo: float, z_hi: float, step: float = 2.0,  # noqa: ANN001
                  top_extension_mm: float = TOP_EXTENSION_MM) -> Tuple[float, float]:
    """Target-space z interval (mm) inside [z_lo, z_hi] whose central in-plane field of view (the middle
    half, where the body is) maps into the source's z extent, extended by ``top_extension_mm`` above
    the source's top slice (below its bottom slice the source has no data)."""
    import torch

    ext = target.extent()
    zs = np.arange(z_lo, z_hi + 1e-6, step)
    centre, half = ext[1:].mean(axis=1), 0.25 * (ext[1:, 1] - ext[1:, 0])
    ys = np.linspace(centre[0] - half[0], centre[0] + half[0], 9)
    xs = np.linspace(centre[1] - half[1], centre[1] + half[1], 9)
    pts = torch.as_tensor(np.stack(np.meshgrid(zs, ys, xs, indexing="ij"), -1), dtype=torch.float32)
    with torch.no_grad():
        mapped_z = transfer.map_points(pts)[..., 0].numpy()
    src = source.extent()[0]
    ok = ((mapped_z >= src[0]) & (mapped_z <= src[1] + top_extension_mm)).all(axis=(1, 2))
    if not ok.any():
        raise InputError("the source CT does not cover any slab of the target's field of view")
    # the longest run of valid slices
    best, start, best_range = 0, None, (zs[0], zs[0])
    for i, good in enumerate(np.append(ok, False)):
        if good and start is None:
            start = i
        elif not good and start is not None:
            if i - start > best:
                best, best_range = i - start, (zs[start], zs[i - 1])
            start = None
    return float(best_range[0]), float(best_range[1])


def clamp_interval(z: Tuple[float, float], bounds: Tuple[float, float], min_length: float
                   ) -> Tuple[float, float]:
    """``z`` intersected with ``bounds``; if that is shorter than ``min_length`` (or empty), an interval
    of ``min_length`` inside ``bounds`` (all of ``bounds`` if shorter) as near to ``z`` as possible."""
    lo, hi = max(z[0], bounds[0]), min(z[1], bounds[1])
    if hi - lo >= min_length:
        return float(lo), float(hi)
    if bounds[1] - bounds[0] <= min_length:
        return float(bounds[0]), float(bounds[1])
    half = 0.5 * min_length
    centre = float(np.clip(0.5 * (z[0] + z[1]), bounds[0] + half, bounds[1] - half))
    return centre - half, centre + half


def draw_render(rng: np.random.Generator, transfer, source, target, ranges: RenderRanges  # noqa: ANN001
                ) -> RenderDraw:
    """Draw the field of view (z range in target space) and the output grid of one case."""
    names = [n for n, _ in ranges.fov_probabilities]
    weights = np.array([p for _, p in ranges.fov_probabilities], dtype=np.float64)
    fov = str(rng.choice(names, p=weights / weights.sum()))
    ext = target.extent()
    own = (float(ext[0, 0]), float(ext[0, 1]))
    wide = valid_z_range(transfer, source, target, own[0] - 250.0, own[1] + 250.0)
    organs_z = np.argwhere((target.array > 0).any(axis=(1, 2)))[:, 0]
    organ_lo, organ_hi = (target.origin[0] + target.spacing[0] * organs_z[[0, -1]]).tolist()
    if fov == "extended":
        z = wide
    elif fov == "slab":
        length = rng.uniform(*ranges.slab_mm)
        lo, hi = max(organ_lo, wide[0]), min(organ_hi, wide[1])
        centre = rng.uniform(lo, hi) if lo < hi else 0.5 * (wide[0] + wide[1])
        z = (centre - length / 2, centre + length / 2)
    elif fov == "liver_cut":
        liver_z = np.argwhere((target.array == 1).any(axis=(1, 2)))[:, 0]
        lo, hi = (target.origin[0] + target.spacing[0] * liver_z[[0, -1]]).tolist() if len(liver_z) else own
        cut = rng.uniform(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo))
        z = (own[0], cut) if rng.uniform() < 0.5 else (cut, own[1])
    else:
        z = own
    z = clamp_interval(z, wide, 20.0)
    thickness = float(rng.uniform(*ranges.slice_thickness_mm))
    dz = float(np.clip(thickness, *ranges.slice_spacing_mm))
    dxy = float(rng.uniform(*ranges.inplane_spacing_mm))
    return RenderDraw(fov, (float(z[0]), float(z[1])), (dz, dxy, dxy), thickness)


def render_case(source_image, source_labels, source_hu: Dict[int, float], transfer, target,  # noqa: ANN001
                draw: RenderDraw, appearance, seed: int) -> Tuple[np.ndarray, np.ndarray, Tuple, Tuple]:  # noqa: ANN001
    """Warp the source onto the drawn grid and randomise its appearance.

    Returns (image int16, labels uint8, spacing (z, y, x) mm, origin (z, y, x) mm), canonical frame.
    """
    import torch
    import torch.nn.functional as F

    from .anatomy_transfer import grid_points, nearest_on_grid, to_sampling_grid
    from .appearance import apply_appearance

    ext = target.extent().copy()
    ext[0] = draw.z_range_mm
    spacing = np.asarray(draw.spacing_mm)
    shape = np.round((ext[:, 1] - ext[:, 0]) / spacing).astype(int) + 1
    origin = ext[:, 0]
    gen = torch.Generator().manual_seed(seed)
    image = torch.empty(tuple(shape), dtype=torch.float32)
    labels = torch.empty(tuple(shape), dtype=torch.uint8)
    src_img = torch.as_tensor(source_image.array, dtype=torch.float32)[None, None] + 1024.0
    src_lab = torch.as_tensor(source_labels.array, dtype=torch.float32)[None, None]
    chunk = max(1, int(4e6 // (shape[1] * shape[2])))
    above = torch.zeros(tuple(shape), dtype=torch.bool)  # beyond the source's top slice
    replicated = torch.empty(tuple(shape), dtype=torch.uint8)  # source labels continued upward
    top = source_image.extent()[0, 1] + 0.5 * source_image.spacing[0]
    with torch.no_grad():
        for z0 in range(0, shape[0], chunk):
            n = min(chunk, shape[0] - z0)
            pts = grid_points((n, shape[1], shape[2]), spacing, (origin[0] + z0 * spacing[0], origin[1], origin[2]))
            mapped = transfer.map_points(pts)
            above[z0:z0 + n] = mapped[..., 0] > top
            grid = to_sampling_grid(mapped, source_image)[None]
            # in-plane the border is air; above the top slice the body continues ("border")
            image[z0:z0 + n] = F.grid_sample(src_img, grid, mode="bilinear", padding_mode="border",
                                             align_corners=True)[0, 0] - 1024.0
            labels[z0:z0 + n] = F.grid_sample(src_lab, grid, mode="nearest", padding_mode="zeros",
                                              align_corners=True)[0, 0].to(torch.uint8)
            replicated[z0:z0 + n] = F.grid_sample(src_lab, grid, mode="nearest", padding_mode="border",
                                                  align_corners=True)[0, 0].to(torch.uint8)
        extent = np.stack([origin, origin + (shape - 1) * spacing], 1)
        tgt_on_grid = torch.as_tensor(nearest_on_grid(target, spacing, extent).array.astype(np.uint8))
        # above the source: the target's organs (e.g. the liver dome), lung where the source's organs
        # would continue; the body wall, spine and fat continue from the top slice
        labels[above] = tgt_on_grid[above]
        lung = above & (replicated > 0) & (tgt_on_grid == 0)
        image[lung] = -850.0 + 40.0 * torch.randn(int(lung.sum()), generator=gen)
        # the target's esophagus (absent from the source labels), painted where the warp left background
        eso = (tgt_on_grid == 10) & ((labels == 0) | (above & (labels == 10)))
        labels[eso] = 10
        image[eso] = 40.0 + 8.0 * torch.randn(int(eso.sum()), generator=gen)
        out = apply_appearance(image, labels, spacing, source_hu, appearance, gen)
    return (out.round().to(torch.int16).numpy(), labels.numpy(), tuple(spacing.tolist()), tuple(origin.tolist()))


def write_case(image: np.ndarray, labels: np.ndarray, spacing, origin, image_path: Path,  # noqa: ANN001
               label_path: Path) -> None:
    """Write a canonical (Z, Y, X) image/label pair as NIfTI (LPS-aligned axes), each file atomically."""
    import SimpleITK as sitk

    for array, path in ((image, image_path), (labels, label_path)):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing(tuple(float(s) for s in reversed(spacing)))
        itk.SetOrigin(tuple(float(v) for v in reversed(origin)))
        with atomic_path(path, suffix=".nii.gz") as tmp:
            sitk.WriteImage(itk, str(tmp), useCompression=True)


def save_case_preview(image: np.ndarray, labels: np.ndarray, target_on_grid: Optional[np.ndarray],
                      spacing, path: Path, title: str) -> Path:  # noqa: ANN001
    """Axial and coronal slices: the case's labels filled in organ colors; the target's hand labels as
    red outlines (where the warped anatomy and the hand-drawn target differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..figures.matplotlib_figures import save_figure_atomic
    from ..figures.preview import DISPLAY_HU, label_colormap

    lut = label_colormap(0.35)
    z = np.flatnonzero(labels.any(axis=(1, 2)))
    k = int(np.percentile(z, 50)) if z.size else labels.shape[0] // 2
    weights = (labels > 0).sum(axis=(0, 2))
    j = labels.shape[1] // 2
    if weights.any():
        j = int(np.round(np.average(np.arange(labels.shape[1]), weights=weights)))
    views = [("axial", image[k], labels[k], None if target_on_grid is None else target_on_grid[k],
              spacing[1] / spacing[2], "upper"),
             ("coronal", image[:, j], labels[:, j], None if target_on_grid is None else target_on_grid[:, j],
              spacing[0] / spacing[2], "lower")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), facecolor="black")
    for ax, (name, ct, lab, tgt, aspect, origin) in zip(axes, views):
        ax.imshow(ct, cmap="gray", vmin=DISPLAY_HU[0], vmax=DISPLAY_HU[1], aspect=aspect, origin=origin)
        ax.imshow(lut[lab], aspect=aspect, origin=origin, interpolation="nearest")
        if tgt is not None and (tgt > 0).any():
            for value in np.unique(tgt[tgt > 0]):
                ax.contour((tgt == value).astype(float), levels=[0.5], colors="red", linewidths=0.6)
        ax.set_title(name, color="white", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, color="white", fontsize=9)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


@dataclass(frozen=True)
class GeneratorOptions:
    """Inputs and switches of :func:`make_training_set`."""

    source_image: Path
    source_labels: Path
    targets: Path
    out: Path
    variants: int = 2
    heldout: Tuple[str, ...] = ()
    heldout_variants: int = 1
    seed: int = 0
    workers: int = 1
    previews: int = 6
    include_source: bool = True
    render: RenderRanges = field(default_factory=RenderRanges)
    appearance: Optional[AppearanceRanges] = None  # None: the defaults of appearance.AppearanceRanges
    first_variant: int = 0  # variants are numbered first_variant, first_variant + 1, ... (names and seeds)
    fit: Optional[FitSettings] = None  # None: the defaults of anatomy_transfer.FitSettings


_SOURCE_CACHE: Dict[str, tuple] = {}


def _source(image_path: str, labels_path: str) -> tuple:
    """(image, labels, organ medians) of the source, read once per process."""
    key = f"{image_path}|{labels_path}"
    if key not in _SOURCE_CACHE:
        from .anatomy_transfer import read_grid_volume
        from .appearance import source_organ_medians

        image = read_grid_volume(image_path)
        labels = read_grid_volume(labels_path, check=False)
        if image.shape != labels.shape:
            raise InputError(f"source labels {labels_path} do not match source image {image_path}")
        medians = source_organ_medians(image.array.astype(np.float32), labels.array, range(1, 14))
        _SOURCE_CACHE[key] = (image, labels, medians)
    return _SOURCE_CACHE[key]


def _render_one(job: dict) -> dict:
    """Render one case (in a worker process); returns its report entry."""
    import torch

    from .anatomy_transfer import nearest_on_grid, read_grid_volume
    from .appearance import AppearanceRanges, draw_appearance
    from .transfer_store import load_transfer

    torch.set_num_threads(1)
    start = time.perf_counter()
    image, labels, medians = _source(job["source_image"], job["source_labels"])
    transfer = load_transfer(Path(job["transfer"]))
    target = read_grid_volume(job["target"], check=False)
    rng = np.random.default_rng(job["seed"])
    render = draw_render(rng, transfer, image, target, job["ranges"])
    look = draw_appearance(rng, render.slice_thickness_mm, job["appearance"] or AppearanceRanges())
    out_img, out_lab, spacing, origin = render_case(image, labels, medians, transfer, target, render, look,
                                                     job["seed"] & 0x7FFFFFFF)
    write_case(out_img, out_lab, spacing, origin, Path(job["image_out"]), Path(job["label_out"]))
    if job.get("preview"):
        first = np.asarray(origin)
        extent = np.stack([first, first + (np.array(out_lab.shape) - 1) * np.asarray(spacing)], 1)
        tgt = nearest_on_grid(target, spacing, extent).array
        length = render.z_range_mm[1] - render.z_range_mm[0]
        save_case_preview(out_img, out_lab, tgt, spacing, Path(job["preview"]),
                          f"{job['case']}: {look.phase}, {render.fov} z {length:.0f} mm, spacing "
                          f"{spacing[2]:.2f}x{spacing[1]:.2f}x{spacing[0]:.2f} mm "
                          "(fill: labels; red: target hand labels)")
    entry = {"case": job["case"], "target": job["target_name"], "variant": job["variant"],
             "split": job["split"], "seed": job["seed"], "render": asdict(render), "appearance": asdict(look),
             "shape_zyx": list(out_img.shape), "organs": sorted(int(v) for v in np.unique(out_lab) if v),
             "seconds": round(time.perf_counter() - start, 2)}
    meta = Path(job["meta"])
    meta.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta, json.dumps(entry, indent=1))  # written last: marks the case complete
    return entry


def make_training_set(opts: GeneratorOptions, progress: Progress = None) -> Dict:
    """Write the generated data folder (see the module docstring); returns the report (also
    ``<out>/report.json``)."""
    for path in (opts.source_image, opts.source_labels):
        if not Path(path).is_file():
            raise InputError(f"source file not found: {path}")
    if opts.variants < 1:
        raise InputError(f"--variants must be >= 1, got {opts.variants}")
    out = Path(opts.out)
    targets = find_targets(Path(opts.targets), opts.heldout)
    fits = fit_all(Path(opts.source_labels), targets, out / "transfers", opts.workers, opts.fit, progress)
    from .transfer_store import read_meta

    jobs = []
    for t in targets:
        n = opts.heldout_variants if t.heldout else opts.variants
        for v in range(opts.first_variant, opts.first_variant + n):
            case = f"{t.name}_v{v}"
            split = "heldout" if t.heldout else "train"
            img_dir, lab_dir = (("heldout/imagesTs", "heldout/labelsTs") if t.heldout else ("imagesTr", "labelsTr"))
            job = {"case": case, "target_name": t.name, "target": str(t.path), "variant": v, "split": split,
                   "transfer": str(fits[t.name]), "source_image": str(opts.source_image),
                   "source_labels": str(opts.source_labels), "ranges": opts.render, "appearance": opts.appearance,
                   "seed": case_seed(opts.seed, t.name, v),
                   "image_out": str(out / img_dir / f"{case}_0000.nii.gz"),
                   "label_out": str(out / lab_dir / f"{case}.nii.gz"),
                   "meta": str(out / "cases" / f"{case}.json"),
                   "preview": str(out / "previews" / f"{case}.png") if len(jobs) < opts.previews else None}
            jobs.append(job)
    entries, todo = [], []
    for job in jobs:
        meta = Path(job["meta"])
        done = meta.is_file() and Path(job["image_out"]).is_file() and Path(job["label_out"]).is_file()
        if done:
            try:
                entry = json.loads(meta.read_text())
            except (OSError, ValueError):
                entry = {}
            done = entry.get("seed") == job["seed"]
        if done:
            entries.append(entry)
        else:
            todo.append(job)
    if progress:
        progress("render", len(entries), len(jobs))
    if todo:
        if opts.workers > 1:
            with ProcessPoolExecutor(max_workers=opts.workers) as pool:
                for entry in pool.map(_render_one, todo):
                    entries.append(entry)
                    if progress:
                        progress("render", len(entries), len(jobs))
        else:
            for job in todo:
                entries.append(_render_one(job))
                if progress:
                    progress("render", len(entries), len(jobs))
    if opts.include_source:
        _copy_source(opts, out)
    fit_report = {}
    for t in targets:
        meta = read_meta(fits[t.name])
        fit_report[t.name] = {"split": "heldout" if t.heldout else "train", "seconds": round(meta["seconds"], 1),
                              "dice_affine": meta["dice_affine"], "dice": meta["dice"]}
    report = {"seed": opts.seed, "source_image": str(opts.source_image), "source_labels": str(opts.source_labels),
              "targets": str(opts.targets), "variants": opts.variants, "first_variant": opts.first_variant,
              "heldout": list(opts.heldout), "render_ranges": asdict(opts.render),
              "appearance_ranges": asdict(opts.appearance) if opts.appearance is not None else "defaults",
              "fits": fit_report, "fit_dice_mean": _mean_dice(fit_report),
              "cases": sorted(entries, key=lambda e: e["case"])}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    return report


def _mean_dice(fits: Dict) -> Dict[str, float]:
    """Mean DSC over the fits per organ value (and 'all'), as reached on the registration grid."""
    per: Dict[str, List[float]] = {}
    for fit in fits.values():
        for organ, value in fit["dice"].items():
            per.setdefault(organ, []).append(value)
    out = {organ: round(float(np.mean(v)), 4) for organ, v in sorted(per.items(), key=lambda kv: int(kv[0]))}
    out["all"] = round(float(np.mean([np.mean(v) for v in per.values()])), 4) if per else float("nan")
    return out


def _copy_source(opts: GeneratorOptions, out: Path) -> None:
    """The real source CT itself, as one more (unwarped) training case."""
    import shutil

    name = case_stem(Path(opts.source_image))
    if name in ("image", "ct"):
        name = Path(opts.source_image).parent.name
    for src, dst in ((opts.source_image, out / "imagesTr" / f"{name}_0000.nii.gz"),
                     (opts.source_labels, out / "labelsTr" / f"{name}.nii.gz")):
        if not dst.is_file():
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
