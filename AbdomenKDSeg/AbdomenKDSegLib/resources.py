"""Where the extension's files are, in one place (standard library only).

The engine package ``AbdomenKDSegLib`` sits inside the Slicer module folder ``AbdomenKDSeg/``
(the layout Slicer builds, installs and loads), whose ``Resources/`` holds the default model bundle,
the panel's ``.ui`` file, icons and the self-test CT. The training recipes are in the repository's
top-level ``Resources/recipes/``. These files are outside the Python package on purpose (Slicer's
CMake installs ``Resources/`` beside the module), so they are found relative to this file; a source
checkout, an editable install and an installed Slicer extension all have this layout.
``$ABDOMENKDSEG_MODEL`` replaces the default model everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The folder that contains the ``AbdomenKDSegLib`` package: the Slicer module folder ``AbdomenKDSeg/``.
LIBRARY_PARENT = Path(__file__).resolve().parent.parent
#: The Slicer module's resources (model, UI, icons, test CT).
MODULE_RESOURCES = LIBRARY_PARENT / "Resources"
#: The repository's shipped training recipes (``<name>.yaml``).
RECIPES_DIR = LIBRARY_PARENT.parent / "Resources" / "recipes"
#: File name of the default model bundle in ``MODULE_RESOURCES / "Models"``.
DEFAULT_BUNDLE_NAME = "abdomen-kdseg-default.safetensors"
#: Environment variable naming another default model bundle.
MODEL_ENV = "ABDOMENKDSEG_MODEL"


def default_model_path() -> Path:
    """The model used when none is given: ``$ABDOMENKDSEG_MODEL`` or the bundled default."""
    env = os.environ.get(MODEL_ENV)
    if env:
        return Path(env)
    return MODULE_RESOURCES / "Models" / DEFAULT_BUNDLE_NAME
