"""The Slicer-worker-engine contract: requests and their command line, worker events, progress stages."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import SimpleITK as sitk

from AbdomenKDSegLib.engine.organs import BY_KEY, ORGANS
from AbdomenKDSegLib.errors import UsageError
from AbdomenKDSegLib.request import (
    BACKENDS,
    DEVICES,
    ENGINE_STAGES,
    DoneEvent,
    ErrorEvent,
    ProgressEvent,
    ProgressMap,
    SegmentRequest,
    StartedEvent,
    parse_event,
    resolve_device_name,
    stage_spans,
)

from engine_helpers import SAMPLE_CT, make_tiny_bundle


# ----------------------------------------------------------------------------- requests
@pytest.mark.parametrize("request_", [
    SegmentRequest("in.nrrd", "out.nrrd"),
    SegmentRequest("/t/in put.nrrd", "/t/out.nrrd", model="/m.safetensors", device="cuda", backend="openvino",
                   organs=(1, 5), fine=False, threads=3),
    SegmentRequest("in.nrrd", "out.nrrd", organs=["left_kidney"], coarse_output="/t/coarse.nrrd"),
], ids=["defaults", "everything", "coarse-output"])
def test_request_round_trips_through_its_command_line(request_):
    assert SegmentRequest.from_argv(request_.to_argv()) == request_


def test_request_command_line_leaves_the_defaults_out():
    assert SegmentRequest("i", "o").to_argv() == ["--input", "i", "--output", "o"]
    argv = SegmentRequest("i", "o", device="CPU", organs="liver, 5", fine=False, coarse_output="c").to_argv()
    assert argv == ["--input", "i", "--output", "o", "--device", "cpu", "--organs", "1,5", "--no-fine",
                    "--coarse-output", "c"]


def test_request_holds_the_organs_as_label_values():
    assert SegmentRequest("i", "o", organs=["spleen", "Liver", 13, "1"]).organs == (1, 3, 13)
    assert SegmentRequest("i", "o", organs=[BY_KEY["aorta"]]).organs == (5,)
    assert SegmentRequest("i", "o", organs=[o.key for o in ORGANS]).organs is None  # all 13
    assert SegmentRequest("i", "o", organs="2,3").organs == (2, 3)
    assert SegmentRequest("i", "o").input == Path("i")


@pytest.mark.parametrize("fields, message", [
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"backend": "tensorrt"}, "unknown backend 'tensorrt'"),
    ({"organs": ["brain"]}, "unknown organ 'brain'"),
    ({"organs": []}, "no organ selected"),
    ({"threads": -1}, "threads must be"),
    ({"output": ""}, "needs an input and an output"),
])
def test_invalid_requests_are_usage_errors(fields, message):
    with pytest.raises(UsageError, match=message):
        SegmentRequest(**{"input": "i", "output": "o", **fields})


@pytest.mark.parametrize("argv, message", [
    (["--input", "i"], "required: --output"),
    (["--input", "i", "--output", "o", "--serve"], "unrecognized arguments: --serve"),
    (["--input", "i", "--output", "o", "--out", "x"], "unrecognized arguments"),  # no abbreviations
    (["--input", "i", "--output", "o", "--device", "gpu"], "invalid choice: 'gpu'"),
])
def test_bad_request_command_lines_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        SegmentRequest.from_argv(argv)


def test_device_names_are_resolved_without_torch():
    assert DEVICES == ("auto", "cpu", "cuda") and BACKENDS == ("auto", "torch", "onnx", "openvino")
    assert resolve_device_name("auto", cuda_available=True) == "cuda"
    assert resolve_device_name("Auto", cuda_available=False) == "cpu"
    assert resolve_device_name("cuda:1", cuda_available=False) == "cuda:1"  # availability: the caller's
    with pytest.raises(UsageError, match="unknown device 'gpu'"):
        resolve_device_name("gpu", cuda_available=True)


# ----------------------------------------------------------------------------- events
@pytest.mark.parametrize("event", [
    StartedEvent(pid=12, python="/usr/bin/python3"),
    StartedEvent(pid=12, python="p", address="\0AbdomenKDSeg-12", family="AF_UNIX"),
    ProgressEvent("coarse", 0.5, request=3),
    DoneEvent(output="o.nrrd", device="cpu", backend="openvino", timings={"coarse": 1.5},
              voxel_counts={1: 10, 13: 2}, warnings=("careful",), coarse_output="c.nrrd"),
    ErrorEvent(type="InputError", message="input x is 2D", warnings=("w",), request=1),
], ids=lambda e: e.kind)
def test_events_round_trip_through_their_json_line(event):
    assert parse_event(event.to_json()) == event


def test_event_lines_keep_the_protocol():
    done = DoneEvent(output="o", device="cpu", voxel_counts={1: 10}, warnings=("w",)).for_request(4)
    assert json.loads(done.to_json()) == {"event": "done", "output": "o", "device": "cpu", "backend": "",
                                          "timings": {}, "voxel_counts": {"1": 10}, "warnings": ["w"], "request": 4}
    assert json.loads(StartedEvent(pid=1, python="p").to_json()) == {"event": "started", "pid": 1, "python": "p"}
    for line in ("a library's chatter", "[1, 2]", '{"no": "event"}', '{"event": "unknown"}',
                 '{"event": "progress", "fraction": "half"}'):
        assert parse_event(line) is None


# ----------------------------------------------------------------------------- progress stages
@pytest.fixture(scope="module")
def emitted(tmp_path_factory):
    """Stage reports of the real predictor: (fine + coarse result kept) and (coarse only) runs."""
    from AbdomenKDSegLib.engine.inference import Predictor

    predictor = Predictor(make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.safetensors"), device="cpu")
    image = sitk.ReadImage(str(SAMPLE_CT))
    runs = {}
    for name, options in {"fine": {"keep_coarse": True}, "no_fine": {"fine": False}}.items():
        calls: list[tuple[str, float]] = []
        predictor.progress = lambda stage, fraction, calls=calls: calls.append((stage, fraction))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a random model on a partial scan
            predictor.predict(image, **options)
        runs[name] = calls
    return runs


def test_stage_table_is_what_the_engine_reports(emitted):
    names = [s.name for s in ENGINE_STAGES]
    assert len(names) == len(set(names))
    for calls in emitted.values():
        stages = list(dict.fromkeys(stage for stage, _ in calls))
        assert stages == sorted(stages, key=names.index)  # known stages, in the table's order
    # a fine run that keeps the coarse result reports every stage (the worker's test hook aside)
    assert set(stage for stage, _ in emitted["fine"]) == set(names) - {"waiting"}


def test_fine_runs_map_as_before_and_coarse_only_runs_have_no_jump(emitted):
    from AbdomenKDSegLib.slicer.logic import STAGES

    spans = stage_spans(STAGES)
    assert spans["export"] == (0.0, 0.02) and spans["import"] == pytest.approx((0.94, 1.0))
    assert spans["coarse"] == pytest.approx((0.06, 0.55)) and spans["fine"] == pytest.approx((0.55, 0.86))
    assert spans["coarse_resample"][0] == spans["coarse_resample"][1]  # not kept: an empty span
    for name, fine in (("fine", True), ("no_fine", False)):
        progress = ProgressMap(STAGES, fine=fine, coarse_output=fine)
        overall = [progress(stage, fraction)[1] for stage, fraction in
                   [("export", 0.0), ("started", 0.0), *emitted[name], ("import", 0.0), ("import", 1.0)]]
        assert overall == sorted(overall) and overall[-1] == 1.0
    # without the fine stage the coarse stage fills the bar: no jump from 0.55 to the end
    progress = ProgressMap(STAGES, fine=False)
    after_coarse = progress("coarse", 1.0)[1]
    assert after_coarse > 0.75 and progress("done", 1.0)[1] - after_coarse < 0.15
