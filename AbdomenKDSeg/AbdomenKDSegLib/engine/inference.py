"""The coarse-to-fine predictor: CT image in, 13-organ label map out (the paper's two-stage inference).

1. Reorient to the canonical frame (:mod:`geometry`).
2. Coarse: whole volume -> 96x96x96 -> Gaussian-weighted 96x64x96 windows, half overlap, each
   window clipped to [-300, 300] HU and z-scored -> argmax -> largest component per class.
3. Box: the coarse foreground's bounding box scaled 1.1x about its centre, on the full grid.
4. Fine: the crop at full resolution -> 96x64x96 -> one window -> probabilities.
5. Back: probabilities resized to the crop slab by slab and argmaxed, largest component per
   class, pasted into a uint8 full-size map, original orientation and geometry.
Optionally (``keep_coarse``) the coarse result is also mapped to full resolution, exactly as the
coarse-only mode (``fine=False``) maps it, so coarse and fine can be compared.
Only the student runs. On the CPU the networks run in OpenVINO or ONNX Runtime from the graphs the
bundle stores, and nothing here imports PyTorch (all array work is numpy: :mod:`.preprocess`,
:mod:`.sliding_window`); PyTorch is imported only for ``backend="torch"``, for CUDA (used when
available with ``device="auto"``; a CUDA out-of-memory error retries the stage on the CPU) and for
a bundle without stored graphs (exported once, :mod:`runtimes.onnx_backend`).
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import fastremap
import numpy as np
import SimpleITK as sitk

from ..dependencies import cuda_driver_present
from ..errors import AbdomenKDSegError, InputError, UsageError
from ..output_paths import check_output_file
from ..request import BACKENDS, check_backend, resolve_device_name  # noqa: F401  (BACKENDS: re-exported)
from .body_mask import check_has_body
from .bundle import STAGES, ModelBundle, load_bundle
from .geometry import crop_box, from_canonical, to_canonical
from .image_io import PathLike, read_image, validate_ct, was_validated, write_image_atomic
from .organs import BY_VALUE, resolve_organs
from .postprocess import largest_component_per_class
from .preprocess import Preprocessing, pad_z_to_extent, resize_argmax, resize_volume
from .sliding_window import (  # noqa: F401  (gaussian_importance, window_starts: re-exported)
    Network,
    gaussian_importance,
    sliding_window_probabilities,
    window_starts,
)

#: ``progress(stage, fraction)``: stage is a short human-readable name, fraction in [0, 1].
ProgressCallback = Callable[[str, float], None]
#: The error :meth:`Predictor.predict` raises for a numpy array.
NUMPY_INPUT_MESSAGE = ("Predictor.predict takes a SimpleITK image (with spacing, origin and direction), not a numpy "
                       "array: use sitk.GetImageFromArray(array) and set its spacing, or "
                       "predict_canonical(array, spacing_zyx)")


class EmptyCoarseWarning(UserWarning):
    """The coarse stage found no organ; the fine stage used a centred fallback box."""


class UntrainedModelWarning(UserWarning):
    """The model bundle holds untrained (random) weights."""


class DeviceFallbackWarning(UserWarning):
    """CUDA was asked for but is unavailable or ran out of memory; the CPU was used."""


class PartialFieldOfViewWarning(UserWarning):
    """The scan does not cover the whole abdomen: organs may be cut off at its top or bottom."""


#: Head-to-foot (superior-inferior) extent below which a scan cannot hold the whole abdomen, mm.
MIN_ABDOMEN_EXTENT_MM = 150.0
#: Organs that are cut when they reach the first or last slice. The aorta, the inferior vena cava
#: and the esophagus run through every abdominal scan, so they are left out.
SOLID_ORGAN_VALUES = (1, 2, 3, 4, 7, 8, 9, 11, 12, 13)


def field_of_view_warning(labels_zyx: np.ndarray, spacing_zyx: Sequence[float]) -> str | None:
    """One warning text when the scan is a partial field of view of the abdomen, else None.

    ``labels_zyx``: the predicted labels on the canonical grid (axis 0 inferior -> superior),
    ``spacing_zyx`` in mm. Partial: the head-to-foot extent is under :data:`MIN_ABDOMEN_EXTENT_MM`,
    or solid organs reach both the first and the last slice (a slab through the organs). One end
    alone is not enough: abdominal CTs often clip the liver dome by a slice or two.
    """
    if labels_zyx.ndim != 3 or labels_zyx.shape[0] == 0:
        return None
    extent = float(labels_zyx.shape[0]) * float(spacing_zyx[0])
    ends = {}
    for name, plane in (("first", labels_zyx[0]), ("last", labels_zyx[-1])):
        values = set(fastremap.unique(np.ascontiguousarray(plane)).tolist())
        ends[name] = [v for v in SOLID_ORGAN_VALUES if v in values]
    short = extent < MIN_ABDOMEN_EXTENT_MM
    if not short and not (ends["first"] and ends["last"]):
        return None
    cut = [BY_VALUE[v].name.lower() for v in SOLID_ORGAN_VALUES if v in ends["first"] or v in ends["last"]]
    text = f"partial field of view: the scan covers {'only ' if short else ''}{extent:.0f} mm from head to foot"
    if short:
        text += f", less than the {MIN_ABDOMEN_EXTENT_MM:.0f} mm a whole abdomen needs"
    if cut:
        text += f"; {', '.join(cut)} reach{'es' if len(cut) == 1 else ''} its first or last slice"
    return text + ". Organs may be cut off at the edges of the scan: their segments and volumes can be incomplete."


@dataclass
class PredictionInfo:
    """What a prediction did: device used, seconds per stage, crop box (canonical Z, Y, X slices).

    With ``keep_coarse=True`` and the fine stage on, the coarse result at full resolution is kept:
    :meth:`Predictor.predict_canonical` sets ``coarse_labels`` (canonical (Z, Y, X) uint8 array),
    :meth:`Predictor.predict` turns it into ``coarse_image`` (uint8 ``sitk.Image`` with the input's
    geometry) and clears ``coarse_labels``. Both stay None otherwise (with the fine stage off the
    main output already is the coarse result).
    """

    device: str
    timings: dict[str, float] = field(default_factory=dict)
    #: network runtime used: "torch", "onnx" or "openvino"
    backend: str = "torch"
    crop_box: tuple[slice, slice, slice] | None = None
    warnings: list[str] = field(default_factory=list)
    coarse_labels: np.ndarray | None = None
    coarse_image: sitk.Image | None = None
    #: peak GPU memory allocated by PyTorch during the prediction, MiB (None on the CPU)
    gpu_peak_mb: float | None = None


@dataclass
class SegmentationResult:
    """Outcome of :func:`segment_file`: where the label map went and what it contains."""

    output_path: Path
    device: str
    timings: dict[str, float]
    voxel_counts: dict[int, int]
    voxel_volume_ml: float
    warnings: list[str]
    #: where the coarse result went (``coarse_output`` of :func:`segment_file`), None if not written
    coarse_output_path: Path | None = None
    #: network runtime used: "torch", "onnx" or "openvino"
    backend: str = "torch"
    #: peak GPU memory allocated by PyTorch during the prediction, MiB (None on the CPU)
    gpu_peak_mb: float | None = None

    def volumes_ml(self) -> dict[int, float]:
        """Volume of each organ present, in millilitres."""
        return {v: n * self.voxel_volume_ml for v, n in self.voxel_counts.items()}


def cuda_available() -> bool:
    """True when CUDA can run the networks: an NVIDIA driver and PyTorch with CUDA. PyTorch is
    imported only when the driver is there, so a CPU-only machine never imports it."""
    if not cuda_driver_present():
        return False
    try:
        from ..runtimes import torch_backend
    except ImportError:
        return False
    return torch_backend.cuda_available()


def resolve_device(device: object = "auto", fallback: bool = True) -> str:
    """``"auto"`` -> ``"cuda"`` if available else ``"cpu"``; ``"cuda"`` without CUDA -> ``"cpu"`` with a
    warning, or with ``fallback=False`` an error. Other names: :func:`request.resolve_device_name`
    (UsageError). ``device`` may be a ``torch.device``; the result is its name (e.g. ``"cuda:1"``)."""
    name = str(device)
    available = cuda_available() if name != "cpu" else False
    name = resolve_device_name(name, available)
    if name.startswith("cuda") and not available:
        if not fallback:
            raise AbdomenKDSegError("CUDA was requested but is not available")
        warnings.warn("CUDA was requested but is not available (it needs an NVIDIA GPU and PyTorch with CUDA: "
                      "pip install 'abdomen-kdseg[torch]'); running on the CPU",
                      DeviceFallbackWarning, stacklevel=2)
        return "cpu"
    return name


class Predictor:
    """Coarse-to-fine student inference with a loaded :class:`ModelBundle`.

    ``device`` is "auto", "cpu" or "cuda"; ``progress`` receives (stage, fraction) updates.
    ``backend`` "auto" runs the networks on the CPU with OpenVINO when it is installed, else with
    ONNX Runtime when that is (both several times faster than PyTorch for the depthwise
    convolutions; probabilities equal to PyTorch's within 1e-3 and 1e-4), else with PyTorch, which also
    is the CUDA path; "torch", "onnx" and "openvino" force one (CPU only for the last two).
    The bundle's networks are not moved: the torch backend on CUDA builds its own copies on the GPU
    from the bundle's weights (``bundle.coarse``/``bundle.fine`` stay on the CPU).
    """

    def __init__(
        self,
        bundle: ModelBundle | PathLike | None = None,
        device: object = "auto",
        progress: Optional[ProgressCallback] = None,
        channels_last: bool = True,
        backend: str = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.bundle = bundle if isinstance(bundle, ModelBundle) else load_bundle(bundle)
        self.progress = progress or (lambda stage, fraction: None)
        self.channels_last = channels_last
        self.preprocessing: Preprocessing = self.bundle.preprocessing
        self.backend = self._select_backend(backend)
        #: stage name -> network callable: (1, 1, Z, Y, X) float32 window -> softmax probabilities
        self.runners: dict[str, Network] = self._make_runners()

    def prepare_in_background(self, stages: Sequence[str] = STAGES) -> threading.Thread:
        """Compile (or import from the cache) the CPU runtime's models of ``stages`` in a daemon
        thread, so that it overlaps reading and preprocessing the image; the first window of a stage
        waits for its model. Nothing to do for the torch backend. Failures are left to the first call."""
        runners = [self.runners[stage] for stage in stages]

        def work() -> None:
            for runner in runners:
                prepare = getattr(runner, "prepare", None)
                if prepare is not None:
                    prepare()

        thread = threading.Thread(target=work, name="abdomen-kdseg-prepare", daemon=True)
        thread.start()
        return thread

    def _select_backend(self, backend: str) -> str:
        """The backend that runs the networks: "torch" on CUDA or when asked for; on the CPU the
        one asked for, or with "auto" the fastest installed: "openvino", then "onnx", then "torch"."""
        backend = check_backend(backend)
        if self.device != "cpu" or backend == "torch":
            return "torch"
        if backend != "auto":
            return backend
        from ..runtimes import onnx_backend, openvino_backend

        if openvino_backend.available():
            return "openvino"
        return "onnx" if onnx_backend.available() else "torch"

    def _make_runners(self) -> dict[str, Network]:
        if self.backend in ("onnx", "openvino"):
            from ..runtimes import bundle_graphs, onnx_backend, openvino_backend

            module = onnx_backend if self.backend == "onnx" else openvino_backend
            runners = {}
            for stage in STAGES:
                stored = self.bundle.graph(stage) is not None
                net = None if stored else getattr(self.bundle, stage)  # a bundle without graphs: export
                graph = (lambda s=stage: bundle_graphs.complete_graph(self.bundle, s)) if stored else None
                runners[stage] = module.make_runner(net, self.preprocessing.window_zyx, self.bundle.sha256, stage,
                                                    graph=graph)
            return runners
        try:
            from ..runtimes import torch_backend
        except ImportError as exc:
            raise AbdomenKDSegError("the torch backend and CUDA need PyTorch: pip install 'abdomen-kdseg[torch]' "
                                    "(or use backend='openvino' or 'onnx' on the CPU)") from exc
        return {stage: torch_backend.make_runner(
                    getattr(self.bundle, stage) if self.device == "cpu" else self.bundle.network(stage, self.device),
                    self.device, self.channels_last) for stage in STAGES}

    def _to_cpu_after_oom(self) -> None:
        from ..runtimes import torch_backend

        warnings.warn("CUDA ran out of memory; retrying on the CPU", DeviceFallbackWarning, stacklevel=3)
        self.runners = {}
        torch_backend.empty_cuda_cache()
        self.device = "cpu"
        self.runners = self._make_runners()

    def sliding_window_probabilities(self, stage: str, volume: np.ndarray) -> np.ndarray:
        """Probabilities (C, Z, Y, X) float32 of ``stage``'s network on ``volume`` (Z, Y, X, HU), by
        windows (:func:`sliding_window.sliding_window_probabilities` with the bundle's settings).
        Retries on the CPU after a CUDA out-of-memory error."""
        volume = np.asarray(volume)
        try:
            return self._sliding_window(stage, volume)
        except Exception as exc:
            if not self.device.startswith("cuda"):
                raise
            from ..runtimes import torch_backend

            if not torch_backend.is_cuda_out_of_memory(exc):
                raise
            self._to_cpu_after_oom()
            return self._sliding_window(stage, volume)

    def _sliding_window(self, stage: str, volume: np.ndarray) -> np.ndarray:
        pre = self.preprocessing
        return sliding_window_probabilities(self.runners[stage], volume, pre.window_zyx, pre.window_overlap,
                                            pre.hu_window, lambda fraction: self.progress(stage, fraction))

    # ---------------------------------------------------------------- stages
    def predict_coarse(self, canonical: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coarse stage on a canonical (Z, Y, X) HU array.

        Returns the coarse probabilities (C, 96, 96, 96) and the post-processed coarse labels
        (96, 96, 96, uint8, largest component per class).
        """
        small = resize_volume(canonical, self.preprocessing.coarse_size_zyx)
        probs = self.sliding_window_probabilities("coarse", small)
        labels = probs.argmax(axis=0).astype(np.uint8)
        return probs, largest_component_per_class(labels)

    def predict_fine(self, canonical: np.ndarray, box: tuple[slice, slice, slice], spacing_z_mm: float) -> np.ndarray:
        """Fine stage on the ``box`` crop of a canonical array with Z spacing ``spacing_z_mm``; uint8
        labels of the crop's shape. A crop shorter than ``min_z_extent_mm`` runs padded (:func:`pad_z_to_extent`)."""
        crop, region = pad_z_to_extent(canonical[box], spacing_z_mm, self.preprocessing.min_z_extent_mm)
        small = resize_volume(crop, self.preprocessing.fine_size_zyx)
        probs = self.sliding_window_probabilities("fine", small)
        self.progress("resample", 0.0)
        labels = resize_argmax(probs, crop.shape)[region]
        self.progress("resample", 1.0)
        return largest_component_per_class(labels)

    def coarse_full_resolution(self, coarse_probs: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        """Coarse probabilities (C, 96, 96, 96) -> uint8 labels of canonical ``shape`` (Z, Y, X).

        Resized slab by slab and argmaxed, then the largest component per class: the one mapping
        used both by the coarse-only mode and for the kept coarse result.
        """
        return largest_component_per_class(resize_argmax(coarse_probs, shape))

    def predict_canonical(self, canonical: np.ndarray, spacing_zyx: tuple[float, float, float],
                          fine: bool = True, keep_coarse: bool = False) -> tuple[np.ndarray, PredictionInfo]:
        """Labels (Z, Y, X, uint8) for a canonical HU array with voxel spacing ``spacing_zyx`` (mm).

        Before the networks run, :func:`body_mask.check_has_body` raises :class:`InputError` for an
        image with nothing to segment (constant, no body, no soft tissue) and finds the patient's
        body: no label is kept outside it (air, the scanner table), neither in the coarse map the
        fine crop box comes from nor in the outputs. A scan shorter than the bundle's
        ``min_z_extent_mm`` runs padded by repeats of its end slices (:func:`pad_z_to_extent`); the
        padded slices are dropped from the outputs.
        ``keep_coarse`` (fine stage on only): also map the coarse result to full resolution into
        ``info.coarse_labels`` (same shape and dtype), costing one more full-size resize + argmax.
        """
        info = PredictionInfo(device=self.device.split(":")[0])
        on_gpu = self.device.startswith("cuda")
        if on_gpu:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        volume, scan = pad_z_to_extent(canonical, spacing_zyx[0], self.preprocessing.min_z_extent_mm)
        out = self._predict_volume(volume, spacing_zyx, fine, keep_coarse, info)
        if volume is not canonical:  # drop the padded slices
            out = np.ascontiguousarray(out[scan])
            if info.coarse_labels is not None:
                info.coarse_labels = np.ascontiguousarray(info.coarse_labels[scan])
            if info.crop_box is not None:  # on the scan's own slices (never empty)
                z, n = info.crop_box[0], canonical.shape[0]
                start = min(max(z.start - scan.start, 0), n - 1)
                info.crop_box = (slice(start, max(start + 1, min(z.stop - scan.start, n))), *info.crop_box[1:])
        partial = field_of_view_warning(out, spacing_zyx)
        if partial is not None:
            warnings.warn(partial, PartialFieldOfViewWarning, stacklevel=2)
            info.warnings.append(partial)
        if on_gpu and self.device.startswith("cuda"):  # (not after a fallback to the CPU)
            import torch

            info.gpu_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        info.device = self.device.split(":")[0]
        info.backend = self.backend
        return out, info

    def _predict_volume(self, canonical: np.ndarray, spacing_zyx: tuple[float, float, float], fine: bool,
                        keep_coarse: bool, info: PredictionInfo) -> np.ndarray:
        """Body mask, coarse and (``fine``) fine stage on a canonical array: its labels; fills ``info``."""
        t0 = time.perf_counter()
        body = check_has_body(canonical, spacing_zyx)
        info.timings["body"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        coarse_probs, coarse_labels = self.predict_coarse(canonical)
        coarse_labels = coarse_labels * body.on_grid(coarse_labels.shape)
        info.timings["coarse"] = time.perf_counter() - t0
        out = np.zeros(canonical.shape, dtype=np.uint8)
        t0 = time.perf_counter()
        if fine:
            if not coarse_labels.any():
                size = "x".join(f"{v:g}" for v in self.preprocessing.fallback_box_mm_zyx)
                msg = ("the coarse stage found no organ in this image (is it an abdominal CT?); "
                       f"the fine stage used a centred {size} mm box")
                warnings.warn(msg, EmptyCoarseWarning, stacklevel=3)
                info.warnings.append(msg)
            box = crop_box(coarse_labels > 0, canonical.shape, spacing_zyx, self.preprocessing.crop_padding,
                           self.preprocessing.fallback_box_mm_zyx)
            out[box] = self.predict_fine(canonical, box, spacing_zyx[0])
            body.apply(out, box)
            info.crop_box = box
            info.timings["fine"] = time.perf_counter() - t0
            if keep_coarse:
                t0 = time.perf_counter()
                self.progress("coarse_resample", 0.0)
                info.coarse_labels = body.apply(self.coarse_full_resolution(coarse_probs, canonical.shape))
                self.progress("coarse_resample", 1.0)
                info.timings["coarse_upsample"] = time.perf_counter() - t0
        else:
            self.progress("resample", 0.0)
            out[:] = self.coarse_full_resolution(coarse_probs, canonical.shape)
            body.apply(out)
            self.progress("resample", 1.0)
            info.timings["upsample"] = time.perf_counter() - t0
        return out

    def predict(self, image: sitk.Image, fine: bool = True, organs: Sequence[str | int] | None = None,
                keep_coarse: bool = False, check: bool = True) -> tuple[sitk.Image, PredictionInfo]:
        """Segment a SimpleITK CT; returns a uint8 label map with the input's exact geometry.

        ``keep_coarse`` (fine stage on only): ``info.coarse_image`` also receives the coarse
        result at full resolution (uint8, input geometry, same organ subset), identical to what
        ``predict(image, fine=False)`` returns. Ignored when ``fine`` is False. ``check``: refuse
        what :func:`validate_ct` refuses (:class:`InputError`); its warnings are given unless
        :func:`read_image` already gave them for this image object, so each comes once.
        ``check=False``: the caller validated the image. A numpy array is refused: it has no geometry.
        """
        if isinstance(image, np.ndarray):
            raise InputError(NUMPY_INPUT_MESSAGE)
        if check:
            validate_ct(image, warn=not was_validated(image))
        t0 = time.perf_counter()
        self.progress("orient", 0.0)
        canonical_image, geom = to_canonical(image)
        canonical = sitk.GetArrayViewFromImage(canonical_image)
        t_orient = time.perf_counter() - t0
        labels, info = self.predict_canonical(canonical, geom.canonical_spacing_zyx, fine=fine,
                                              keep_coarse=keep_coarse)
        del canonical, canonical_image
        t0 = time.perf_counter()
        keep = None if organs is None else [o.value for o in resolve_organs(list(organs))]
        if keep is not None:
            labels = fastremap.mask_except(labels, keep)
        result = from_canonical(labels, geom)
        if info.coarse_labels is not None:
            coarse = info.coarse_labels if keep is None else fastremap.mask_except(info.coarse_labels, keep)
            info.coarse_image, info.coarse_labels = from_canonical(coarse, geom), None
        info.timings = {"orient": t_orient, **info.timings, "restore": time.perf_counter() - t0}
        self.progress("done", 1.0)
        return result, info


def segment_file(
    input_path: PathLike,
    output_path: PathLike,
    model: ModelBundle | PathLike | None = None,
    device: str = "auto",
    fine: bool = True,
    organs: Sequence[str | int] | None = None,
    progress: Optional[ProgressCallback] = None,
    predictor: Predictor | None = None,
    coarse_output: PathLike | None = None,
    overwrite: bool = False,
) -> SegmentationResult:
    """Segment one CT file or DICOM folder and write the label map atomically.

    The label map is uint8 with FLARE22 values (0 background, 1..13 organs) and exactly the
    input's size, spacing, origin and direction. Pass ``predictor`` to reuse loaded networks.
    ``coarse_output``: also write the coarse stage's result at full resolution there (same
    format, geometry and organ subset; what ``fine=False`` would write). With ``fine=False`` the
    main output already is the coarse result: nothing more is written, with a warning.

    Before anything is read, the organ names and the output paths are checked
    (:mod:`output_paths`): an output that is the input, or an existing file without
    ``overwrite=True``, raises :class:`UsageError`, as do unknown organs.
    """
    source = Path(input_path)
    if not source.exists():
        raise InputError(f"input not found: {source}")
    out = check_output_file(Path(output_path), [source], overwrite, overwrite_hint="overwrite=True")
    coarse_out = None if coarse_output is None else Path(coarse_output)
    if coarse_out is not None:
        check_output_file(coarse_out, [source], overwrite, "coarse output", overwrite_hint="overwrite=True")
        if coarse_out.resolve() == out.resolve():
            raise UsageError(f"the coarse output {coarse_out} is the same file as the output; give another name")
    if organs is not None:
        organs = [o.value for o in resolve_organs(list(organs))]
        if not organs:
            raise UsageError("no organ selected: give at least one organ (or organs=None for all 13)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        image = read_image(input_path)
        t_read = time.perf_counter() - t0
        pred = predictor or Predictor(model, device=device, progress=progress)
        if predictor is not None and progress is not None:
            pred.progress = progress
        if not pred.bundle.trained:
            warnings.warn(f"the model {pred.bundle.path} is UNTRAINED (random weights): its segmentation "
                          "is meaningless", UntrainedModelWarning, stacklevel=2)
        if coarse_out is not None and not fine:
            warnings.warn(f"the coarse output {coarse_out} was not written: without the fine stage the output "
                          f"{out} already is the coarse result", UserWarning, stacklevel=2)
            coarse_out = None
        labels, info = pred.predict(image, fine=fine, organs=organs, keep_coarse=coarse_out is not None,
                                    check=False)  # read_image validated it, naming the file
        t0 = time.perf_counter()
        write_image_atomic(labels, out)
        if coarse_out is not None:
            write_image_atomic(info.coarse_image, coarse_out)
            info.coarse_image = None
        t_write = time.perf_counter() - t0
    messages = []
    for w in caught:
        text = str(w.message)
        if text not in messages:
            messages.append(text)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    values, sizes = fastremap.unique(sitk.GetArrayViewFromImage(labels), return_counts=True)  # 5x bincount
    counts = {int(v): int(n) for v, n in zip(values, sizes) if int(v) in BY_VALUE}
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    timings = {"read": t_read, **info.timings, "write": t_write}
    return SegmentationResult(out, info.device, timings, counts, voxel_ml, messages, coarse_out, info.backend,
                              info.gpu_peak_mb)

