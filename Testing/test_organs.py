"""The organ table's display colors: Slicer's General Anatomy colors, distinct where organs touch."""

from __future__ import annotations

import itertools

import numpy as np

from AbdomenKDSegLib.engine.organs import BY_KEY, ORGANS


def _distance(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(BY_KEY[a].color, BY_KEY[b].color)))


def test_adrenal_glands_use_the_general_anatomy_adrenal_color_not_the_nerve_color():
    for key in ("right_adrenal_gland", "left_adrenal_gland"):
        assert BY_KEY[key].color == (249, 186, 150)


def test_touching_organs_are_clearly_distinct():
    for a, b in (("liver", "stomach"), ("stomach", "spleen"), ("stomach", "pancreas"), ("liver", "gallbladder"),
                 ("aorta", "inferior_vena_cava"), ("duodenum", "pancreas")):
        assert _distance(a, b) > 80, (a, b)


def test_every_two_organ_types_differ():
    pairs = [(a.key, b.key) for a, b in itertools.combinations(ORGANS, 2) if a.snomed_type != b.snomed_type]
    assert min(_distance(a, b) for a, b in pairs) > 35
