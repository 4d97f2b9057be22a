"""The contract between the Slicer logic, its worker process and the engine (torch-free).

- :class:`SegmentRequest`: the options of one segmentation, validated, with the worker's command
  line (:meth:`~SegmentRequest.to_argv` / :meth:`~SegmentRequest.from_argv`);
- the events the worker writes to stdout, one JSON object a line (:class:`StartedEvent`,
  :class:`ProgressEvent`, :class:`DoneEvent`, :class:`ErrorEvent`; :func:`parse_event`);
- the tables every layer uses: :data:`DEVICES`, :data:`BACKENDS` and the progress stages
  :data:`ENGINE_STAGES` with their weights (:func:`stage_spans`, :class:`ProgressMap`).

Only the standard library and :mod:`.organs` are imported, so the Slicer module can load it
before the engine's packages are installed.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, TypeVar, Union

from .engine.organs import ORGANS, Organ, resolve_organs
from .errors import UsageError

#: Devices a segmentation can ask for: "auto" is CUDA when a GPU is available, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
#: How the Slicer module shows (and saves in its parameter node) each device.
DEVICE_NAMES = {"auto": "Auto", "cpu": "CPU", "cuda": "CUDA"}
#: Network runtimes: "auto" is the fastest installed on the CPU (OpenVINO, ONNX Runtime, PyTorch).
BACKENDS = ("auto", "torch", "onnx", "openvino")
#: Display names of the runtimes a run can report.
BACKEND_NAMES = {"torch": "PyTorch", "onnx": "ONNX Runtime", "openvino": "OpenVINO"}
#: Error types after which a serving worker goes on serving (the user can fix them).
USER_ERRORS = ("InputError", "UsageError", "BundleError", "AbdomenKDSegError")
#: Environment variable holding the serve mode's connection key (hex); never on the command line.
KEY_ENV = "ABDOMENKDSEG_WORKER_KEY"


def _choice(value: Any, choices: Sequence[str], what: str) -> str:
    name = str(value if value is not None else "auto").strip().lower()
    if name not in choices:
        raise UsageError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")
    return name


def check_device(device: Any) -> str:
    """``device`` as one of :data:`DEVICES` (case-insensitive; None is "auto"); else UsageError."""
    return _choice(device, DEVICES, "device")


def check_backend(backend: Any) -> str:
    """``backend`` as one of :data:`BACKENDS` (case-insensitive; None is "auto"); else UsageError."""
    return _choice(backend, BACKENDS, "backend")


def resolve_device_name(device: Any, cuda_available: bool) -> str:
    """The device a run asks for: "auto" -> "cuda" or "cpu"; "cpu", "cuda" and "cuda:N" as given.

    Whether CUDA is really there is left to the caller (:func:`inference.resolve_device`).
    Raises UsageError for any other name.
    """
    name = str(device).strip().lower()
    if name == "auto":
        return "cuda" if cuda_available else "cpu"
    if name in DEVICES or re.fullmatch(r"cuda:\d+", name):
        return name
    raise UsageError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")


def organ_values(selection: Any) -> tuple[int, ...] | None:
    """Label values of an organ selection (keys, names, values, comma lists, Organs), sorted; None: all 13.

    A selection of every organ also gives None. Raises UsageError for an unknown organ or an
    empty selection.
    """
    if selection is None:
        return None
    items = [selection] if isinstance(selection, (str, int, Organ)) else list(selection)
    items = [item.value if isinstance(item, Organ) else item for item in items]
    values = tuple(o.value for o in resolve_organs(items))
    if not values:
        raise UsageError("no organ selected: choose at least one organ (or None for all 13)")
    return None if len(values) == len(ORGANS) else values


# ----------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class SegmentRequest:
    """One segmentation: what the Slicer logic asks the worker to do.

    ``organs``: label values of the organs to keep (any selection :func:`organ_values` takes,
    stored as sorted values; None: all 13). ``coarse_output``: also write the coarse stage's
    result at full resolution there (with the fine stage only). ``threads``: CPU threads of the
    worker (0: PyTorch's default). Checked on creation: UsageError for anything invalid.
    """

    input: Path
    output: Path
    model: Path | None = None
    device: str = "auto"
    backend: str = "auto"
    organs: tuple[int, ...] | None = None
    fine: bool = True
    coarse_output: Path | None = None
    threads: int = 0

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("input", "output", "model", "coarse_output"):
            value = getattr(self, name)
            put(name, None if value is None or str(value) == "" else Path(value))
        if self.input is None or self.output is None:
            raise UsageError("a segmentation request needs an input and an output")
        put("device", check_device(self.device))
        put("backend", check_backend(self.backend))
        put("organs", organ_values(self.organs))
        put("fine", bool(self.fine))
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise UsageError(f"threads must be a whole number >= 0, not {self.threads!r}")

    def to_argv(self) -> list[str]:
        """The worker's command-line options of this request (defaults left out)."""
        argv = ["--input", str(self.input), "--output", str(self.output)]
        if self.device != "auto":
            argv += ["--device", self.device]
        if self.backend != "auto":
            argv += ["--backend", self.backend]
        if self.organs is not None:
            argv += ["--organs", ",".join(str(v) for v in self.organs)]
        if self.model is not None:
            argv += ["--model", str(self.model)]
        if not self.fine:
            argv.append("--no-fine")
        if self.coarse_output is not None:
            argv += ["--coarse-output", str(self.coarse_output)]
        if self.threads > 0:
            argv += ["--threads", str(self.threads)]
        return argv

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> SegmentRequest:
        """The request of the options :meth:`to_argv` writes; UsageError for anything else."""
        parser = _StrictParser(prog="request", add_help=False, allow_abbrev=False)
        add_request_arguments(parser)
        return cls.from_namespace(parser.parse_args([str(a) for a in argv]))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> SegmentRequest:
        """The request of parsed :func:`add_request_arguments` options."""
        return cls(input=args.input, output=args.output, model=args.model, device=args.device,
                   backend=args.backend, organs=args.organs or None, fine=args.fine,
                   coarse_output=args.coarse_output, threads=args.threads)


class _StrictParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # noqa: D102 - raise instead of exiting
        raise UsageError(f"invalid request: {message}")


def add_request_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Add the options of a :class:`SegmentRequest` to ``parser`` (the worker's command line)."""
    parser.add_argument("--input", required=required, default=None, help="CT volume file (NRRD/NIfTI) or DICOM folder")
    parser.add_argument("--output", required=required, default=None, help="label map file to write (.nrrd or .nii.gz)")
    parser.add_argument("--model", default=None, help="model bundle (.safetensors); default: the bundled one")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="network runtime on the CPU (auto: the fastest installed)")
    parser.add_argument("--organs", default=None, help="comma-separated organ keys or label values")
    parser.add_argument("--no-fine", dest="fine", action="store_false", help="coarse stage only")
    parser.add_argument("--coarse-output", default=None,
                        help="also write the coarse result at full resolution here (ignored with --no-fine)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch default)")


# ----------------------------------------------------------------------------- worker events
def _counts(value: Any) -> dict[int, int]:
    return {int(k): int(v) for k, v in dict(value).items()}


#: How each event field is read from its JSON value.
_READ: dict[str, Callable[[Any], Any]] = {
    "pid": int, "python": str, "family": str, "stage": str, "fraction": float, "output": str,
    "device": str, "backend": str, "type": str, "message": str, "coarse_output": str, "request": int,
    "address": lambda a: tuple(a) if isinstance(a, list) else a,
    "timings": lambda d: {str(k): float(v) for k, v in dict(d).items()},
    "voxel_counts": _counts,
    "warnings": lambda w: tuple(str(x) for x in w),
}


_E = TypeVar("_E", bound="_Event")


class _Event:
    """Shared JSON form of the events: ``{"event": kind, field: value, ...}``, None fields left out.

    ``request`` (every event has it) is the id of the serve-mode request the event belongs to.
    """

    kind: ClassVar[str] = ""

    def to_json(self) -> str:
        """The event as one line of the worker's protocol."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return json.dumps({"event": self.kind, **{k: v for k, v in values.items() if v is not None}})

    def for_request(self: _E, request: int | None) -> _E:
        """This event marked as belonging to serve-mode request ``request`` (None: unchanged)."""
        return self if request is None else replace(self, request=request)  # type: ignore[type-var]


@dataclass(frozen=True)
class StartedEvent(_Event):
    """The worker is alive; a serving worker also says where to connect (``address``, ``family``)."""

    kind: ClassVar[str] = "started"
    pid: int = 0
    python: str = ""
    address: Any = None
    family: str | None = None
    request: int | None = None


@dataclass(frozen=True)
class ProgressEvent(_Event):
    """Progress of a stage (a name of :data:`ENGINE_STAGES`): ``fraction`` of it done, in [0, 1]."""

    kind: ClassVar[str] = "progress"
    stage: str = ""
    fraction: float = 0.0
    request: int | None = None


@dataclass(frozen=True)
class DoneEvent(_Event):
    """The label map (and, when asked for, the coarse one) was written: what the run did."""

    kind: ClassVar[str] = "done"
    output: str = ""
    device: str = ""
    backend: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    voxel_counts: dict[int, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    coarse_output: str | None = None
    request: int | None = None


@dataclass(frozen=True)
class ErrorEvent(_Event):
    """A handled failure: the exception's type name (see :data:`USER_ERRORS`) and message."""

    kind: ClassVar[str] = "error"
    type: str = "WorkerError"
    message: str = ""
    warnings: tuple[str, ...] = ()
    request: int | None = None


WorkerEvent = Union[StartedEvent, ProgressEvent, DoneEvent, ErrorEvent]
EVENT_TYPES: dict[str, type] = {cls.kind: cls for cls in (StartedEvent, ProgressEvent, DoneEvent, ErrorEvent)}


def parse_event(line: str) -> WorkerEvent | None:
    """The event of one protocol line; None for anything else (a stray line, an unknown event)."""
    try:
        message = json.loads(line)
        cls = EVENT_TYPES[message["event"]]
        return cls(**{f.name: _READ[f.name](message[f.name]) for f in fields(cls) if message.get(f.name) is not None})
    except (ValueError, TypeError, KeyError):
        return None


# ----------------------------------------------------------------------------- progress stages
@dataclass(frozen=True)
class Stage:
    """A progress stage: its name in ``progress(stage, fraction)``, the text shown, its share of a run.

    ``weight``: percent of a fine run's progress bar in the Slicer module. ``when``: "always",
    "fine" (only with the fine stage) or "coarse_output" (only when the coarse result is kept).
    """

    name: str
    text: str
    weight: float
    when: str = "always"

    def runs(self, fine: bool, coarse_output: bool) -> bool:
        """Whether the stage runs in a run with these options."""
        return (self.when == "always" or (self.when == "fine" and fine)
                or (self.when == "coarse_output" and fine and coarse_output))


#: The stages the worker and the engine report, in the order they run. "resample" maps the result to
#: full resolution: the fine crop's, or without the fine stage the coarse result's.
ENGINE_STAGES: tuple[Stage, ...] = (
    Stage("waiting", "Waiting", 0.0),  # the worker's --debug-delay test hook
    Stage("orient", "Reorienting", 1.0),
    Stage("coarse", "Coarse segmentation", 49.0),
    Stage("fine", "Fine segmentation", 31.0, "fine"),
    Stage("resample", "Resampling to full resolution", 6.0),
    Stage("coarse_resample", "Resampling the coarse result", 6.0, "coarse_output"),
    Stage("done", "Writing label map", 2.0),
)


def stage_spans(stages: Sequence[Stage] = ENGINE_STAGES, fine: bool = True,
                coarse_output: bool = False) -> dict[str, tuple[float, float]]:
    """Stage name -> (overall fraction at its start, at its end) for a run with these options.

    The stages that run are laid end to end over [0, 1] by weight; one that does not run gets an
    empty span where it would be, so a bar never moves back.
    """
    weights = [s.weight if s.runs(fine, coarse_output) else 0.0 for s in stages]
    total = sum(weights) or 1.0
    spans, start = {}, 0.0
    for stage, weight in zip(stages, weights):
        spans[stage.name] = (start / total, (start + weight) / total)
        start += weight
    return spans


class ProgressMap:
    """(stage, fraction) reports of one run -> (text for the user, overall fraction, never decreasing)."""

    def __init__(self, stages: Sequence[Stage] = ENGINE_STAGES, fine: bool = True, coarse_output: bool = False) -> None:
        self.spans = stage_spans(stages, fine, coarse_output)
        self.texts = {s.name: s.text for s in stages}
        self.fraction = 0.0

    def __call__(self, stage: str, fraction: float) -> tuple[str, float]:
        """Text and overall fraction; an unknown stage keeps the fraction reached so far."""
        text = self.texts.get(stage) or stage.replace("_", " ").capitalize()
        if stage in self.spans:
            start, end = self.spans[stage]
            self.fraction = max(self.fraction, start + (end - start) * min(max(float(fraction), 0.0), 1.0))
        return text, self.fraction
