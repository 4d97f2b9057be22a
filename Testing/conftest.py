"""Shared pytest fixtures: a real MRML scene (slicer-core) and loading volumes into it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTING = Path(__file__).resolve().parent
if str(TESTING) not in sys.path:  # so test modules can import engine_helpers / each other
    sys.path.insert(0, str(TESTING))


@pytest.fixture()
def mrml_scene():
    """A fresh vtkMRMLScene set as ``slicer.mrmlScene``, with the segmentation converters registered."""
    import slicer

    from AbdomenKDSegLib.slicer.logic import registerSegmentationConverters

    registerSegmentationConverters()
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(1)


def load_volume(scene, path: Path | str, name: str | None = None, labelmap: bool = False):  # noqa: ANN001, ANN201
    """Read an image file into a new volume node of ``scene`` with a storage node (no slicer.util)."""
    import slicer

    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name or Path(path).name.split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise OSError(f"could not read {path}")
    return node
