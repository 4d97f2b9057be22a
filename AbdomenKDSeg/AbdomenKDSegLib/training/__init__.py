"""Training of the coarse and fine students with knowledge distillation from cross-teaching teachers.

``train(config, data_dir, out_dir, resume=False)`` runs a whole recipe (coarse stage, coarse
predictions of the unlabeled cases, fine stage, export of the student bundle). Submodules:
:mod:`.recipe` (hyperparameters, Table 3 variants), :mod:`.losses`, :mod:`.augment` ("v4"),
:mod:`.sampler`, :mod:`.data` (data folder and cache), :mod:`.trainer` (the loop of one stage),
:mod:`.checkpoint`, :mod:`.logs`, :mod:`.distributed`, :mod:`.pipeline`, :mod:`.cli`.
Imports of torch happen on first use of :func:`train`, so ``import AbdomenKDSegLib.training`` is cheap.
"""

from __future__ import annotations

from typing import Any

from .recipe import VARIANTS, AugmentConfig, Recipe, RecipeError, Variant, load_recipe

__all__ = ["train", "Recipe", "AugmentConfig", "Variant", "VARIANTS", "RecipeError", "load_recipe",
           "TrainResult"]


def train(*args: Any, **kwargs: Any):  # noqa: ANN201 - thin lazy wrapper
    """See :func:`AbdomenKDSegLib.training.pipeline.train`."""
    from .pipeline import train as _train

    return _train(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "TrainResult":
        from .pipeline import TrainResult

        return TrainResult
    raise AttributeError(name)
