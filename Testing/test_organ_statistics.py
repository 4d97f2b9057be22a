"""Organ-volume reference statistics (FLARE22) and the flags of the organ table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from AbdomenKDSegLib.engine import organ_statistics as stats
from AbdomenKDSegLib.engine.organs import BY_KEY, ORGANS

REPO = Path(__file__).resolve().parents[1]
FLARE = REPO.parent / "shared" / "data" / "flare22-labels"


def test_shipped_statistics_cover_every_organ_of_50_cases():
    data = stats.load_statistics()
    assert data["cases"] == 50 and data["percentiles"] == list(stats.PERCENTILES)
    assert set(data["organs"]) == {o.key for o in ORGANS}
    for key, entry in data["organs"].items():
        assert entry["cases"] == 50 and entry["value"] == BY_KEY[key].value
        for what in ("volume_ml", "extent_mm"):
            v = entry[what]
            assert 0 < v["min"] <= v["p1"] <= v["p5"] <= v["p50"] <= v["p95"] <= v["p99"] <= v["max"], (key, what)
    liver = data["organs"]["liver"]["volume_ml"]
    assert 800 < liver["p50"] < 2500  # an adult liver, mL


@pytest.mark.skipif(not FLARE.is_dir(), reason=f"FLARE22 labels not found in {FLARE}")
def test_statistics_script_measures_the_reference_cases_inside_their_range():
    spec = importlib.util.spec_from_file_location("organ_volume_statistics",
                                                  REPO / "benchmarks" / "organ_volume_statistics.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    data = stats.load_statistics()
    for name in ("FLARE22_Tr_0001.nii.gz", "FLARE22_Tr_0050.nii.gz"):
        measured = script.case_measurements(FLARE / name)
        assert set(measured) == {o.value for o in ORGANS}
        for organ in ORGANS:
            ml, mm = measured[organ.value]
            entry = data["organs"][organ.key]
            assert entry["volume_ml"]["min"] - 0.01 <= ml <= entry["volume_ml"]["max"] + 0.01, organ.key
            assert entry["extent_mm"]["min"] - 0.01 <= mm <= entry["extent_mm"]["max"] + 0.01, organ.key


def test_volumes_are_flagged_below_the_1st_and_above_the_99th_percentile():
    liver = BY_KEY["liver"]
    entry = stats.load_statistics()["organs"]["liver"]["volume_ml"]
    assert stats.check_volume(liver, entry["p50"]).status == stats.OK
    low = stats.check_volume(liver, entry["p1"] * 0.9)
    high = stats.check_volume(liver, entry["p99"] * 1.1)
    assert low.status == stats.LOW and low.flagged and "below the FLARE22 range" in low.flag_text
    assert high.status == stats.HIGH and "above" in high.flag_text
    for absent in (None, 0.0):
        row = stats.check_volume(liver, absent)
        assert row.status == stats.NOT_FOUND and not row.flagged and row.volume_text == "not found"


def test_a_short_field_of_view_lowers_the_lower_bound():
    liver = BY_KEY["liver"]
    partial = 300.0  # mL of liver in a 40 mm slab: a normal slab, an implausible whole liver
    assert stats.check_volume(liver, partial, fov_mm=400.0).status == stats.LOW
    assert stats.check_volume(liver, partial, fov_mm=40.0).status == stats.OK
    full_low, full_high = stats.reference_range(liver, 400.0)
    slab_low, slab_high = stats.reference_range(liver, 40.0)
    assert slab_low < full_low and slab_high == full_high  # a short scan never raises the upper bound


def test_a_long_field_of_view_raises_the_upper_bound_of_tubular_organs_only():
    aorta, spleen = BY_KEY["aorta"], BY_KEY["spleen"]
    p99 = stats.load_statistics()["organs"]["aorta"]["volume_ml"]["p99"]
    assert stats.check_volume(aorta, p99 * 1.5, fov_mm=150.0).status == stats.HIGH
    assert stats.check_volume(aorta, p99 * 1.5, fov_mm=900.0).status == stats.OK
    assert stats.reference_range(spleen, 900.0)[1] == stats.reference_range(spleen, None)[1]


def test_field_of_view_follows_the_superior_axis():
    axial = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    sagittal = (0, 0, 1, 1, 0, 0, 0, 1, 0)  # index axis y runs superior
    assert stats.superior_axis(axial) == 2 and stats.superior_axis(sagittal) == 1
    assert stats.craniocaudal_extent_mm((100, 200, 50), (1.0, 0.5, 3.0), axial) == 150.0
    assert stats.craniocaudal_extent_mm((100, 200, 50), (1.0, 0.5, 3.0), sagittal) == 100.0


def test_organ_table_accepts_values_keys_and_names_and_formats_one_table():
    rows = stats.organ_table({1: 1500.0, "spleen": 5000.0, "Left kidney": 180.0}, fov_mm=336.0,
                             organs=[BY_KEY[k] for k in ("liver", "spleen", "left_kidney", "gallbladder")])
    assert [r.status for r in rows] == [stats.OK, stats.HIGH, stats.OK, stats.NOT_FOUND]
    lines = stats.format_table(rows, {1: 10, 3: 20, 13: 30})
    assert "FLARE22" in lines[0] and "voxels" in lines[0]
    assert lines[2].endswith("HIGH") and lines[4].endswith("not found") and len(lines) == 5


def test_cli_summary_shows_the_ranges_and_flags(tmp_path, capsys):
    from types import SimpleNamespace

    import SimpleITK as sitk

    from AbdomenKDSegLib.cli import print_summary

    labels = sitk.Image([20, 20, 10], sitk.sitkUInt8)
    labels.SetSpacing((2.0, 2.0, 4.0))  # 40 mm from head to foot: the liver's lower bound is scaled down
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    counts = {1: 40_000, 3: 200_000}  # x 0.016 mL: liver 640 mL (a plausible slab), spleen 3200 mL (HIGH)
    result = SimpleNamespace(output_path=tmp_path / "labels.nii.gz", voxel_counts=counts, device="cpu",
                             backend="torch", timings={"coarse": 1.0},
                             volumes_ml=lambda: {v: n * 0.016 for v, n in counts.items()})
    print_summary(result, organs=[1, 3, 9])
    out = capsys.readouterr().out.splitlines()
    assert "FLARE22 1-99% mL" in out[0] and "volume mL" in out[0]
    assert "Liver" in out[1] and not out[1].endswith(("LOW", "HIGH"))
    assert "Spleen" in out[2] and out[2].endswith("HIGH")
    assert "Gallbladder" in out[3] and out[3].endswith("not found")
    assert out[4].startswith("device cpu")


def test_logic_run_info_gives_the_same_table():
    pytest.importorskip("slicer")
    import slicer
    import vtk

    from AbdomenKDSegLib.slicer.logic import RunInfo, fieldOfViewMm

    node = slicer.vtkMRMLScalarVolumeNode()
    image = vtk.vtkImageData()
    image.SetDimensions(30, 40, 10)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    node.SetAndObserveImageData(image)
    node.SetSpacing(1.0, 1.0, 4.0)
    assert fieldOfViewMm(node) == pytest.approx(40.0)
    info = RunInfo(volumesMl={"Liver": 640.0, "Spleen": 3200.0}, emptyOrgans=["Gallbladder"], fieldOfViewMm=40.0)
    rows = info.organTable()
    assert [(r.organ.key, r.status) for r in rows] == [("liver", stats.OK), ("spleen", stats.HIGH),
                                                       ("gallbladder", stats.NOT_FOUND)]
    assert rows == stats.organ_table({"Liver": 640.0, "Spleen": 3200.0}, 40.0,
                                     [BY_KEY["liver"], BY_KEY["spleen"], BY_KEY["gallbladder"]])
