"""Screenshot of the Slicer module's OWN result: the logic's output segmentation, rendered offscreen.

    python benchmarks/render_module_screenshot.py [--image CT] [--model BUNDLE] [--out PNG] [--device cpu]

Runs :class:`AbdomenKDSegLib.slicer.logic.AbdomenKDSegLogic` (what the module's "Segment abdomen" button
runs: the real worker process and the bundled model unless ``--model``) on real MRML (slicer-core)
with the sample CT ``../shared/data/ct-abdomen-3mm/image.nii.gz``, exports the output
segmentation's organ segments to a label map node (value = FLARE22 value), writes it, and renders
it with the offscreen renderer (:func:`AbdomenKDSegLib.figures.render3d.render_figure`, the same as
``abdomen-kdseg render-3d LABELS OUT --image CT``) to ``Resources/Screenshots/organs-3d-module-result.png``
(the README's and the Extensions Index's screenshot). The title names the model, so the picture
always says which model made it; re-run it whenever the bundled model changes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import slicer
import vtk

from AbdomenKDSegLib.engine.model_card import default_model_path, model_name, read_model_card
from AbdomenKDSegLib.engine.organs import ORGANS
from AbdomenKDSegLib.figures.render3d import render_figure
from AbdomenKDSegLib.slicer.logic import AbdomenKDSegLogic, registerSegmentationConverters

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CT = REPO.parent / "shared" / "data" / "ct-abdomen-3mm" / "image.nii.gz"
OUT = REPO / "Resources" / "Screenshots" / "organs-3d-module-result.png"


def read_volume(scene, path: Path, cls: str = "vtkMRMLScalarVolumeNode"):  # noqa: ANN001, ANN201
    node = scene.AddNewNodeByClass(cls, path.name.split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise OSError(f"could not read {path}")
    return node


def write_volume(node, path: Path) -> None:  # noqa: ANN001
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    if not storage.WriteData(node):
        raise OSError(f"could not write {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=SAMPLE_CT)
    parser.add_argument("--model", type=Path, default=None, help="model bundle (default: the bundled model)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    assert [o.value for o in ORGANS] == list(range(1, len(ORGANS) + 1)), "organ order must be the FLARE22 order"

    registerSegmentationConverters()
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    volume = read_volume(scene, args.image)
    logic = AbdomenKDSegLogic()
    logic.logCallback = print
    try:
        segmentation = logic.segment(volume, device=args.device, model=str(args.model) if args.model else None)
    finally:
        shutdown = getattr(logic, "shutdownWorker", None)
        if shutdown is not None:
            shutdown()
    info = logic.lastRunInfo
    for name, ml in info.volumesMl.items():
        print(f"  {name:<22}{ml:>9.1f} mL")

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "module result")
    ids = vtk.vtkStringArray()
    for organ in ORGANS:  # segment IDs are the organ keys; position + 1 = FLARE22 value
        ids.InsertNextValue(organ.key)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, volume):
        raise RuntimeError("exporting the segmentation to a label map failed")

    model_path = args.model or default_model_path()
    name = model_name(model_path, read_model_card(model_path))
    title = (f"Abdominal Organs (AbdomenKDSeg) module result: model {name}, {args.image.parent.name}, "
             f"{info.summary().split(' (')[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        labels_path = Path(tmp) / "module-result.nii.gz"
        write_volume(labelmap, labels_path)
        out = render_figure(labels_path, args.out, image_path=args.image, title=title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
