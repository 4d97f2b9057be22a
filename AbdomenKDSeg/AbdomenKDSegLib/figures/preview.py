"""PNG previews: axial and coronal CT slices with the organ labels overlaid in the organ colors.

Slices are shown in radiological convention (patient right on the left of the picture, anterior
up on axial views, superior up on coronal views), with the true voxel aspect ratio.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..atomic_files import atomic_path
from ..engine.geometry import to_canonical
from ..engine.image_io import PathLike
from ..engine.organs import BY_VALUE, NUM_CLASSES

#: Display window for soft tissue (HU).
DISPLAY_HU = (-160.0, 240.0)


def label_colormap(alpha: float = 0.5) -> np.ndarray:
    """RGBA lookup table (NUM_CLASSES, 4) in 0..1; background fully transparent."""
    lut = np.zeros((NUM_CLASSES, 4), dtype=np.float32)
    for value, organ in BY_VALUE.items():
        lut[value, :3] = organ.color_float
        lut[value, 3] = alpha
    return lut


def _pick_slices(labels: np.ndarray) -> tuple[list[int], list[int]]:
    """Three axial (Z) and one coronal (Y) index through the labeled region (or the centre)."""
    if labels.any():
        z = np.flatnonzero(labels.any(axis=(1, 2)))
        y = np.flatnonzero(labels.any(axis=(0, 2)))
        axial = [int(np.percentile(z, q)) for q in (25, 50, 75)]
        weights = (labels > 0).sum(axis=(0, 2))
        coronal = [int(np.round(np.average(np.arange(labels.shape[1]), weights=weights)))] if y.size else []
    else:
        axial = [labels.shape[0] * q // 4 for q in (1, 2, 3)]
        coronal = [labels.shape[1] // 2]
    return axial, coronal


def save_preview(image: sitk.Image, labels: sitk.Image, path: PathLike, title: str | None = None) -> Path:
    """Write a PNG with 3 axial slices and 1 coronal slice of ``image`` overlaid with ``labels``.

    ``image`` (HU) and ``labels`` must share size and geometry. Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if image.GetSize() != labels.GetSize():
        raise ValueError(f"image size {image.GetSize()} differs from label size {labels.GetSize()}")
    ct_img, geom = to_canonical(image)
    lab_img, _ = to_canonical(labels)
    ct = sitk.GetArrayViewFromImage(ct_img)
    lab = sitk.GetArrayViewFromImage(lab_img).astype(np.uint8)
    sz, sy, sx = geom.canonical_spacing_zyx
    axial, coronal = _pick_slices(lab)
    lut = label_colormap()
    views = [(f"axial z={k}", ct[k], lab[k], sy / sx, "upper") for k in axial]
    views += [(f"coronal y={k}", ct[:, k, :], lab[:, k, :], sz / sx, "lower") for k in coronal]
    fig, axes = plt.subplots(1, len(views), figsize=(4.2 * len(views), 5.0), facecolor="black")
    for ax, (name, ct_slice, lab_slice, aspect, origin) in zip(np.atleast_1d(axes), views):
        ax.imshow(ct_slice, cmap="gray", vmin=DISPLAY_HU[0], vmax=DISPLAY_HU[1], aspect=aspect,
                  origin=origin, interpolation="bilinear")
        ax.imshow(lut[lab_slice], aspect=aspect, origin=origin, interpolation="nearest")
        ax.set_title(name, color="white", fontsize=9)
        ax.axis("off")
    present = [BY_VALUE[v] for v in sorted(set(np.unique(lab).tolist()) - {0})]
    add_organ_legend(fig, present, [f"{o.value} {o.name}" for o in present])
    fig.suptitle(title or "AbdomenKDSeg", color="white")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return save_figure_atomic(fig, path)


def add_organ_legend(fig, organs, labels: list[str], max_columns: int = 7) -> None:  # noqa: ANN001
    """A legend of organ color patches along the bottom of a black figure (nothing if no organ)."""
    from matplotlib.patches import Patch

    handles = [Patch(color=o.color_float, label=text) for o, text in zip(organs, labels)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(max_columns, len(handles)), fontsize=8,
                   facecolor="black", labelcolor="white", frameon=False)


def save_figure_atomic(fig, path: PathLike) -> Path:  # noqa: ANN001
    """Save a matplotlib figure as PNG through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    out = Path(path)
    try:
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, facecolor="black", format="png")
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
