"""PNG previews: axial and coronal CT slices with the organ labels overlaid in the organ colors.

Slices are shown in radiological convention (patient right on the left of the picture, anterior
up on axial views, superior up on coronal views), with the true voxel aspect ratio. Drawn with
Pillow (CT bilinear, labels nearest, alpha-blended in numpy), so the base install needs no plotting
library; the 3D figures (:mod:`.render3d`) use matplotlib and VTK from the ``[figures]`` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import SimpleITK as sitk

from ..atomic_files import atomic_path
from ..engine.geometry import to_canonical
from ..engine.image_io import PathLike
from ..engine.organs import BY_VALUE, NUM_CLASSES

if TYPE_CHECKING:
    from PIL import Image

#: Display window for soft tissue (HU).
DISPLAY_HU = (-160.0, 240.0)
#: Height of each slice panel in the preview (pixels); widths follow the physical aspect ratio.
PANEL_HEIGHT = 400
_MARGIN = 10
_LEGEND_COLUMNS = 7


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


def overlay_panel(ct_slice: np.ndarray, label_slice: np.ndarray, aspect: float, height: int = PANEL_HEIGHT,
                  alpha: float = 0.5, flip_rows: bool = False) -> np.ndarray:
    """RGB uint8 (height, width, 3) of a CT slice (HU, rows x columns) in :data:`DISPLAY_HU` with
    ``label_slice`` (FLARE22 values, same shape) blended in the organ colors.

    ``aspect``: physical height / width of one pixel (row spacing / column spacing), so the panel
    keeps the true proportions; ``flip_rows``: draw the last row at the top (coronal: superior up).
    """
    from PIL import Image

    rows, cols = ct_slice.shape
    width = max(1, int(round(height * cols / (rows * aspect))))
    low, high = DISPLAY_HU
    gray = np.clip((np.asarray(ct_slice, np.float32) - low) / (high - low), 0.0, 1.0)
    gray = np.asarray(Image.fromarray(gray).resize((width, height), Image.BILINEAR), np.float32)
    labels = Image.fromarray(np.asarray(label_slice, np.uint8)).resize((width, height), Image.NEAREST)
    rgba = label_colormap(alpha)[np.minimum(np.asarray(labels), NUM_CLASSES - 1)]
    rgb = gray[..., None] * (1.0 - rgba[..., 3:]) + rgba[..., :3] * rgba[..., 3:]
    if flip_rows:
        rgb = rgb[::-1]
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def _font(size: int):  # noqa: ANN202 (PIL.ImageFont)
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def compose_figure(panels: Sequence[tuple[str, np.ndarray]], legend: Sequence[tuple[tuple[float, float, float], str]],
                   title: str) -> Image.Image:
    """One black RGB figure: ``title`` on top, the RGB ``panels`` side by side each under its name,
    and a legend of (color 0..1, text) entries in rows of up to seven along the bottom."""
    from PIL import Image, ImageDraw

    title_font, name_font, legend_font = _font(16), _font(12), _font(12)
    height = max(p.shape[0] for _, p in panels)
    width = sum(p.shape[1] for _, p in panels) + _MARGIN * (len(panels) + 1)
    legend_rows = -(-len(legend) // _LEGEND_COLUMNS)
    top = 2 * _MARGIN + 16 + 18
    figure = Image.new("RGB", (max(width, 300), top + height + _MARGIN + legend_rows * 20 + _MARGIN), "black")
    draw = ImageDraw.Draw(figure)
    draw.text((figure.width // 2, _MARGIN), title, fill="white", font=title_font, anchor="mt")
    x = _MARGIN
    for name, pixels in panels:
        draw.text((x + pixels.shape[1] // 2, top - 4), name, fill="white", font=name_font, anchor="mb")
        figure.paste(Image.fromarray(pixels), (x, top))
        x += pixels.shape[1] + _MARGIN
    column_width = (figure.width - 2 * _MARGIN) // max(1, min(_LEGEND_COLUMNS, len(legend)))
    for index, (color, text) in enumerate(legend):
        row, column = divmod(index, _LEGEND_COLUMNS)
        lx, ly = _MARGIN + column * column_width, top + height + _MARGIN + row * 20
        draw.rectangle((lx, ly + 2, lx + 12, ly + 14), fill=tuple(int(round(c * 255)) for c in color))
        draw.text((lx + 18, ly + 8), text, fill="white", font=legend_font, anchor="lm")
    return figure


def save_preview(image: sitk.Image, labels: sitk.Image, path: PathLike, title: str | None = None) -> Path:
    """Write a PNG with 3 axial slices and 1 coronal slice of ``image`` overlaid with ``labels``.

    ``image`` (HU) and ``labels`` must share size and geometry. Written atomically.
    """
    if image.GetSize() != labels.GetSize():
        raise ValueError(f"image size {image.GetSize()} differs from label size {labels.GetSize()}")
    ct_img, geom = to_canonical(image)
    lab_img, _ = to_canonical(labels)
    ct = sitk.GetArrayViewFromImage(ct_img)
    lab = sitk.GetArrayViewFromImage(lab_img).astype(np.uint8)
    sz, sy, sx = geom.canonical_spacing_zyx
    axial, coronal = _pick_slices(lab)
    panels = [(f"axial z={k}", overlay_panel(ct[k], lab[k], sy / sx)) for k in axial]
    panels += [(f"coronal y={k}", overlay_panel(ct[:, k, :], lab[:, k, :], sz / sx, flip_rows=True))
               for k in coronal]
    present = [BY_VALUE[v] for v in sorted(set(np.unique(lab).tolist()) - {0}) if v in BY_VALUE]
    figure = compose_figure(panels, [(o.color_float, f"{o.value} {o.name}") for o in present],
                            title or "AbdomenKDSeg")
    out = Path(path)
    with atomic_path(out, suffix=".png") as tmp:
        figure.save(tmp, format="PNG")
    return out
