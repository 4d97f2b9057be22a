"""3D rendering of a label map: organ surfaces (VTK, offscreen) next to CT slice overlays, as a PNG.

The label map is brought to the canonical LPS frame (:func:`geometry.to_canonical`), each organ
becomes a smoothed surface (discrete flying edges + windowed-sinc smoothing, in mm), and the
surfaces are rendered offscreen with VTK from the front (patient's right on the left of the
picture, as on radiological coronal views) and from the patient's left. When VTK cannot render
offscreen (no EGL/OSMesa/X), the same surfaces are drawn with matplotlib instead. Optional CT
slices (coronal and axial, soft-tissue window) with the labels overlaid complete the figure.

Command line: ``abdomen-kdseg render-3d LABELS OUT.png [--image CT] [--title T]`` or
``python -m AbdomenKDSegLib.figures.render3d LABELS OUT.png [--image CT]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..engine.geometry import to_canonical
from ..engine.image_io import PathLike
from ..engine.organs import BY_VALUE
from ..errors import UsageError
from .matplotlib_figures import add_organ_legend, save_figure_atomic
from .preview import DISPLAY_HU

#: Camera directions (LPS, from the focal point towards the camera) and view-up vectors.
VIEWS = {
    "anterior": ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),
    "left": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "posterior": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
}
BACKGROUND = (0.0, 0.0, 0.0)


@dataclass
class OrganSurface:
    """One organ's triangle mesh in LPS millimetres: points (N, 3) float, triangles (M, 3) int."""

    value: int
    points: np.ndarray
    triangles: np.ndarray


def canonical_labels(labels: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """Label array (Z, Y, X) in the canonical LPS orientation, its spacing and origin (x, y, z, mm)."""
    image, geom = to_canonical(sitk.Cast(labels, sitk.sitkUInt8))
    return sitk.GetArrayFromImage(image), tuple(image.GetSpacing()), tuple(image.GetOrigin())


def organ_surfaces(labels_zyx: np.ndarray, spacing_xyz: Sequence[float], origin_xyz: Sequence[float],
                   smoothing_iterations: int = 20, values: Sequence[int] | None = None) -> list[OrganSurface]:
    """Smoothed surfaces of each label value present in a canonical (Z, Y, X) label array.

    Points are in LPS mm (index * spacing + origin; the canonical direction is the identity).
    """
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

    present = sorted(set(np.unique(labels_zyx).tolist()) - {0})
    if values is not None:
        present = [v for v in present if v in set(values)]
    padded = np.pad(labels_zyx.astype(np.uint8), 1)  # closed surfaces at the volume border
    image = vtk.vtkImageData()
    image.SetDimensions(padded.shape[2], padded.shape[1], padded.shape[0])
    image.SetSpacing(*[float(s) for s in spacing_xyz])
    image.SetOrigin(*[float(o) - float(s) for o, s in zip(origin_xyz, spacing_xyz)])
    image.GetPointData().SetScalars(numpy_to_vtk(padded.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    surfaces = []
    for value in present:
        edges = vtk.vtkDiscreteFlyingEdges3D()
        edges.SetInputData(image)
        edges.SetValue(0, value)
        edges.ComputeNormalsOff()
        smoother = vtk.vtkWindowedSincPolyDataFilter()
        smoother.SetInputConnection(edges.GetOutputPort())
        smoother.SetNumberOfIterations(smoothing_iterations)
        smoother.SetPassBand(0.05)
        smoother.NonManifoldSmoothingOn()
        smoother.NormalizeCoordinatesOn()
        smoother.BoundarySmoothingOff()
        smoother.FeatureEdgeSmoothingOff()
        triangles = vtk.vtkTriangleFilter()
        triangles.SetInputConnection(smoother.GetOutputPort())
        triangles.Update()
        poly = triangles.GetOutput()
        if poly.GetNumberOfPoints() == 0:
            continue
        cells = vtk_to_numpy(poly.GetPolys().GetConnectivityArray()).reshape(-1, 3)
        surfaces.append(OrganSurface(value, vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float32),
                                     cells.astype(np.int64)))
    return surfaces


def _surface_polydata(surface: OrganSurface):  # noqa: ANN202 (vtkPolyData)
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray

    points = vtk.vtkPoints()
    points.SetData(numpy_to_vtk(surface.points, deep=True))
    offsets = np.arange(0, 3 * len(surface.triangles) + 1, 3, dtype=np.int64)
    cells = vtk.vtkCellArray()
    cells.SetData(numpy_to_vtkIdTypeArray(offsets, deep=True),
                  numpy_to_vtkIdTypeArray(surface.triangles.ravel().astype(np.int64), deep=True))
    poly = vtk.vtkPolyData()
    poly.SetPoints(points)
    poly.SetPolys(cells)
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputData(poly)
    normals.SplittingOff()
    normals.Update()
    return normals.GetOutput()


def render_vtk(surfaces: Sequence[OrganSurface], view: str = "anterior", size: tuple[int, int] = (600, 700),
               zoom: float = 1.0) -> np.ndarray:
    """Offscreen VTK rendering of the surfaces; RGB uint8 (H, W, 3). Raises RuntimeError if blank."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    direction, view_up = VIEWS[view]
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(*BACKGROUND)
    for surface in surfaces:
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(_surface_polydata(surface))
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        prop = actor.GetProperty()
        prop.SetColor(*BY_VALUE[surface.value].color_float)
        prop.SetSpecular(0.25)
        prop.SetSpecularPower(20)
        prop.SetDiffuse(0.85)
        prop.SetAmbient(0.15)
        renderer.AddActor(actor)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(8)
    window.SetSize(*size)
    window.AddRenderer(renderer)
    _fit_camera(renderer.GetActiveCamera(), surfaces, direction, view_up, size[0] / size[1], zoom)
    renderer.ResetCameraClippingRange()
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    out = grab.GetOutput()
    width, height, _ = out.GetDimensions()
    rgb = vtk_to_numpy(out.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3].copy()
    window.Finalize()
    if surfaces and not (rgb != np.asarray(BACKGROUND, dtype=np.uint8) * 255).any():
        raise RuntimeError("VTK offscreen rendering produced an empty image")
    return rgb


def _fit_camera(camera, surfaces: Sequence[OrganSurface], direction: Sequence[float],  # noqa: ANN001
                view_up: Sequence[float], aspect: float, zoom: float = 1.0) -> None:
    """Parallel-projection camera looking at the surfaces from ``direction``, fitting them tightly."""
    points = np.concatenate([s.points for s in surfaces]) if surfaces else np.zeros((1, 3), np.float32)
    d, up = np.asarray(direction, float), np.asarray(view_up, float)
    right = np.cross(-d, up)
    lo, hi = points.min(axis=0), points.max(axis=0)
    centre = (lo + hi) / 2
    half_h = max(np.ptp(points @ up) / 2, 1.0)
    half_w = max(np.ptp(points @ right) / 2, 1.0)
    distance = float(np.linalg.norm(hi - lo)) + 100.0
    camera.SetFocalPoint(*centre)
    camera.SetPosition(*(centre + d * distance))
    camera.SetViewUp(*up)
    camera.ParallelProjectionOn()
    camera.SetParallelScale(max(half_h, half_w / aspect) * 1.06 / zoom)


def crop_background(rgb: np.ndarray, margin: int = 8) -> np.ndarray:
    """The image cropped to its non-black content plus ``margin`` pixels (unchanged if all black)."""
    mask = rgb.any(axis=2)
    if not mask.any():
        return rgb
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, rgb.shape[0])
    c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, rgb.shape[1])
    return rgb[r0:r1, c0:c1]


def render_matplotlib(surfaces: Sequence[OrganSurface], view: str = "anterior",
                      size: tuple[int, int] = (600, 700)) -> np.ndarray:
    """Fallback renderer (no OpenGL): the same surfaces as shaded matplotlib polygons; RGB uint8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    direction = np.asarray(VIEWS[view][0])
    fig = plt.figure(figsize=(size[0] / 100, size[1] / 100), dpi=100, facecolor="black")
    ax = fig.add_axes((0, 0, 1, 1), projection="3d", facecolor="black")
    light = np.array([0.3, -1.0, 0.6]) if view == "anterior" else np.array([1.0, 0.3, 0.6])
    light = light / np.linalg.norm(light)
    all_points = []
    for surface in surfaces:
        tri = surface.points[surface.triangles]
        normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-9
        shade = 0.35 + 0.65 * np.abs(normals @ light)
        colors = np.clip(np.asarray(BY_VALUE[surface.value].color_float)[None, :] * shade[:, None], 0, 1)
        ax.add_collection3d(Poly3DCollection(tri, facecolors=colors, edgecolors="none"))
        all_points.append(surface.points)
    if all_points:
        pts = np.concatenate(all_points)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        centre, half = (lo + hi) / 2, (hi - lo).max() / 2
        for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
            setter(c - half, c + half)
    azimuth = float(np.degrees(np.arctan2(direction[1], direction[0])))
    ax.view_init(elev=0, azim=azimuth)
    ax.set_proj_type("ortho")
    ax.axis("off")
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()
    plt.close(fig)
    return rgb


def render_view(surfaces: Sequence[OrganSurface], view: str = "anterior", size: tuple[int, int] = (600, 700),
                backend: str = "auto") -> tuple[np.ndarray, str]:
    """RGB image of the surfaces and the backend that drew it ("vtk" or "matplotlib")."""
    if backend in ("auto", "vtk"):
        try:
            return render_vtk(surfaces, view, size), "vtk"
        except Exception:
            if backend == "vtk":
                raise
    return render_matplotlib(surfaces, view, size), "matplotlib"


def _slices(ct: np.ndarray | None, labels: np.ndarray) -> tuple[int, int]:
    """Coronal (Y) and axial (Z) indices through the centre of the labeled region."""
    if labels.any():
        zz, yy, _ = np.nonzero(labels)
        return int(np.round(np.median(yy))), int(np.round(np.median(zz)))
    return labels.shape[1] // 2, labels.shape[0] // 2


def render_figure(labels_path: PathLike, out_path: PathLike, image_path: PathLike | None = None,
                  title: str | None = None, backend: str = "auto", size: int = 560) -> Path:
    """Write a PNG: organ surfaces (front and left views) and, with ``image_path``, CT overlays.

    ``labels_path`` is a FLARE22-valued label map; ``image_path`` the CT with the same geometry.
    Returns the PNG path (written atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels_img = sitk.ReadImage(str(labels_path))
    labels, spacing, origin = canonical_labels(labels_img)
    surfaces = organ_surfaces(labels, spacing, origin)
    front, used = render_view(surfaces, "anterior", (size, size), backend)
    side, _ = render_view(surfaces, "left", (size, size), backend)
    front, side = crop_background(front), crop_background(side)
    panels = [("3D, front", front, None, None), ("3D, left side", side, None, None)]
    if image_path is not None:
        ct_img = sitk.ReadImage(str(image_path))
        if ct_img.GetSize() != labels_img.GetSize():
            raise ValueError(f"image size {ct_img.GetSize()} differs from label size {labels_img.GetSize()}")
        ct, _ = to_canonical(ct_img)
        ct_arr = sitk.GetArrayFromImage(ct).astype(np.float32)
        y, z = _slices(ct_arr, labels)
        sx, sy, sz = spacing
        panels.append(("coronal", ct_arr[:, y, :], labels[:, y, :], sz / sx))
        panels.append(("axial", ct_arr[z], labels[z], sy / sx))
    lut = np.zeros((256, 4), dtype=np.float32)
    for value, organ in BY_VALUE.items():
        lut[value, :3], lut[value, 3] = organ.color_float, 0.55
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.6), facecolor="black")
    for ax, (name, pixels, lab, aspect) in zip(np.atleast_1d(axes), panels):
        if lab is None:
            ax.imshow(pixels)
        else:
            origin = "lower" if name == "coronal" else "upper"
            ax.imshow(pixels, cmap="gray", vmin=DISPLAY_HU[0], vmax=DISPLAY_HU[1], aspect=aspect,
                      origin=origin, interpolation="bilinear")
            ax.imshow(lut[lab], aspect=aspect, origin=origin, interpolation="nearest")
        ax.set_title(name, color="white", fontsize=10)
        ax.axis("off")
    present = [BY_VALUE[s.value] for s in surfaces]
    add_organ_legend(fig, present, [o.name for o in present], max_columns=min(7, 2 * len(panels)))
    fig.suptitle(title or f"{Path(labels_path).name} ({used} rendering)", color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0.09, 1, 0.95))
    return save_figure_atomic(fig, out_path)


def cmd_render(args: argparse.Namespace) -> int:
    """``render-3d`` subcommand."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("render-3d needs matplotlib (and VTK for the 3D surfaces): "
                         "pip install 'abdomen-kdseg[figures]'")
    out = render_figure(args.labels, args.out, args.image, args.title, args.backend)
    print(f"wrote {out}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``render-3d LABELS OUT [--image CT] [--title T] [--backend auto|vtk|matplotlib]``."""
    parser = subparsers.add_parser(
        "render-3d", help="PNG of the organs as 3D surfaces (and CT slice overlays)",
        description="Render a label map's organs as 3D surfaces (VTK offscreen, matplotlib fallback), "
                    "optionally next to coronal and axial CT slices with the labels overlaid.")
    parser.add_argument("labels", help="label map (FLARE22 values)")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--image", default=None, help="CT image with the same geometry, for slice overlays")
    parser.add_argument("--title", default=None)
    parser.add_argument("--backend", default="auto", choices=["auto", "vtk", "matplotlib"])
    parser.set_defaults(func=cmd_render)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m AbdomenKDSegLib.figures.render3d``."""
    parser = argparse.ArgumentParser(prog="python -m AbdomenKDSegLib.figures.render3d")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(["render-3d", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
