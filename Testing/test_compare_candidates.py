"""benchmarks/compare_candidates.py: candidates are ranked on generated held-out splits only, and the real
validation CT only guard the choice (issue 13's IRCAD targets, no empty organ)."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tool(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import compare_candidates

    return compare_candidates


def _validation(ircad: dict, amos_empty=(), amos_dsc=0.5) -> dict:
    amos_organs = ("pancreas", "gallbladder", "stomach", "left_kidney")
    return {"ct-abdomen-contrast-ircadb01": {"per_organ": {k: {"dsc": v} for k, v in ircad.items()},
                                             "mean_dsc": sum(ircad.values()) / 4, "empty_organs": []},
            "ct-abdomen-slab-amos0001": {"per_organ": {k: {"dsc": amos_dsc} for k in amos_organs},
                                         "mean_dsc": amos_dsc, "empty_organs": list(amos_empty)}}


GOOD = {"liver": 0.91, "right_kidney": 0.90, "spleen": 0.88, "left_kidney": 0.91}


def test_guard_names_each_missed_target_and_empty_organ(tool):
    assert tool.guard(_validation(GOOD)) == []
    failures = tool.guard(_validation({**GOOD, "right_kidney": 0.839}, amos_empty=["gallbladder"]))
    assert failures == ["IRCAD right_kidney 0.839 < 0.85", "ct-abdomen-slab-amos0001: gallbladder empty"]


def test_ranking_uses_the_heldout_mean_and_finds_the_first_passing_candidate(tool):
    results = {
        "a": {"heldout_mean": 0.79, "guard_failures": []},
        "b": {"heldout_mean": 0.82, "guard_failures": ["IRCAD spleen 0.8 < 0.85"]},
        "c": {"heldout_mean": 0.80, "guard_failures": []},
    }
    order = tool.rank(results)
    assert order == ["b", "c", "a"]
    assert next(n for n in order if not results[n]["guard_failures"]) == "c"


def test_table_has_one_row_per_candidate_in_rank_order(tool):
    split = "/x/gen_ctx/heldout"
    results = {name: {"heldout": {split: {"mean": m}}, "heldout_mean": m, "validation": _validation(GOOD, amos_dsc=a),
                      "guard_failures": f}
               for name, m, a, f in (("low", 0.70, 0.6, []), ("high", 0.80, 0.4, ["x empty"]))}
    out = io.StringIO()
    tool.print_table(results, tool.rank(results), stream=out)
    lines = out.getvalue().splitlines()
    assert "gen_ctx" in lines[0] and "AMOS gallbladder" in lines[0] and "organs at DSC 0" in lines[0]
    assert lines[2].startswith("| 1 | high | 0.800 | 0.800 |") and lines[2].endswith("| x empty |")
    assert lines[3].startswith("| 2 | low | 0.700 |") and lines[3].endswith("| none | pass |")


def test_zero_dsc_lists_missed_or_misplaced_organs(tool):
    validation = _validation({**GOOD, "spleen": 0.0}, amos_dsc=0.0)
    assert tool.zero_dsc(validation) == ["spleen", "pancreas", "gallbladder", "stomach", "left_kidney"]
    assert tool.zero_dsc(_validation(GOOD)) == []


def test_bad_arguments_are_named(tool, tmp_path):
    assert tool._named("s5=/m.safetensors") == ("s5", Path("/m.safetensors"))
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=BUNDLE"):
        tool._named("/m.safetensors")
    (tmp_path / "imagesTs").mkdir()
    with pytest.raises(SystemExit, match="no held-out cases"):
        tool.heldout_scores(None, tmp_path)
