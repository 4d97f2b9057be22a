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
Only the student runs. Everything is computed in ``torch.inference_mode``; CUDA is used when
available (``device="auto"``), and a CUDA out-of-memory error retries the stage on the CPU.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import fastremap
import numpy as np
import SimpleITK as sitk
import torch

from ..errors import AbdomenKDSegError, InputError, UsageError
from ..output_paths import check_output_file
from ..request import BACKENDS, check_backend, resolve_device_name  # noqa: F401  (BACKENDS: re-exported)
from .body_mask import check_has_body
from .bundle import ModelBundle, load_bundle
from .geometry import crop_box, from_canonical, to_canonical
from .image_io import PathLike, read_image, validate_ct, was_validated, write_image_atomic
from .organs import BY_VALUE, resolve_organs
from .postprocess import largest_component_per_class
from .preprocess import PAD_HU, clip_and_zscore, pad_to_min_size, resize_argmax, resize_volume

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


def resolve_device(device: str | torch.device = "auto", fallback: bool = True) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cuda"`` without CUDA -> CPU with a warning, or
    with ``fallback=False`` an error. Other names: :func:`request.resolve_device_name` (UsageError)."""
    available = torch.cuda.is_available()
    name = resolve_device_name(device, available)
    if name.startswith("cuda") and not available:
        if not fallback:
            raise AbdomenKDSegError("CUDA was requested but is not available")
        warnings.warn("CUDA was requested but is not available; running on the CPU",
                      DeviceFallbackWarning, stacklevel=2)
        return torch.device("cpu")
    return torch.device(name)


def gaussian_importance(window: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """nnU-Net's window weighting: a Gaussian centred on the window, sigma = size * sigma_scale.

    Returns float32 (Z, Y, X) with maximum 1; zeros (if any) replaced by the smallest
    positive weight so every voxel keeps some weight.
    """
    axes = []
    for n in window:
        centre, sigma = n // 2, n * sigma_scale
        i = np.arange(n, dtype=np.float64)
        axes.append(np.exp(-((i - centre) ** 2) / (2 * sigma**2)))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = (weights / weights.max()).astype(np.float32)
    if (weights == 0).any():
        weights[weights == 0] = weights[weights > 0].min()
    return weights


def window_starts(size: int, window: int, overlap: float = 0.5) -> list[int]:
    """Start indices of sliding windows covering ``size`` with at least ``overlap`` (nnU-Net rule).

    ``size >= window`` is required (pad first). The starts are spread evenly from 0 to
    ``size - window``; with size 96, window 64 and overlap 0.5 this gives [0, 32].
    """
    if size < window:
        raise ValueError(f"axis of size {size} is smaller than the window {window}")
    step = window * (1 - overlap)
    n = int(math.ceil((size - window) / step)) + 1
    if n == 1:
        return [0]
    span = size - window
    return [int(round(i * span / (n - 1))) for i in range(n)]


class Predictor:
    """Coarse-to-fine student inference with a loaded :class:`ModelBundle`.

    ``device`` is "auto", "cpu" or "cuda"; ``progress`` receives (stage, fraction) updates.
    ``backend`` "auto" runs the networks on the CPU with OpenVINO when it is installed, else with
    ONNX Runtime when that is (both several times faster than PyTorch for the depthwise
    convolutions; probabilities equal to PyTorch's within 1e-4 and 1e-3), else with PyTorch, which also
    is the CUDA path; "torch", "onnx" and "openvino" force one (CPU only for the last two).
    """

    def __init__(
        self,
        bundle: ModelBundle | PathLike | None = None,
        device: str | torch.device = "auto",
        progress: Optional[ProgressCallback] = None,
        channels_last: bool = True,
        backend: str = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.bundle = bundle if isinstance(bundle, ModelBundle) else load_bundle(bundle, device="cpu")
        self.bundle.coarse.to(self.device)
        self.bundle.fine.to(self.device)
        self.progress = progress or (lambda stage, fraction: None)
        self.channels_last = channels_last
        pre = self.bundle.preprocessing
        self.coarse_size = tuple(pre["coarse_size_zyx"])
        self.fine_size = tuple(pre["fine_size_zyx"])
        self.window = tuple(pre["window_zyx"])
        self.overlap = float(pre["window_overlap"])
        self.hu_window = tuple(pre["hu_window"])
        self.padding = float(pre["crop_padding"])
        self.fallback_mm = tuple(pre["fallback_box_mm_zyx"])
        self._importance = torch.from_numpy(gaussian_importance(self.window))
        self.backend = self._select_backend(backend)
        #: stage name -> callable mapping a (1, 1, Z, Y, X) float32 batch to softmax probabilities
        self.runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = self._make_runners()

    def _select_backend(self, backend: str) -> str:
        """The backend that runs the networks: "torch" on CUDA or when asked for; on the CPU the
        one asked for, or with "auto" the fastest installed: "openvino", then "onnx", then "torch"."""
        backend = check_backend(backend)
        if self.device.type != "cpu" or backend == "torch":
            return "torch"
        if backend != "auto":
            return backend
        from ..runtimes import onnx_backend, openvino_backend

        if openvino_backend.available():
            return "openvino"
        return "onnx" if onnx_backend.available() else "torch"

    def _make_runners(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        nets = {"coarse": self.bundle.coarse, "fine": self.bundle.fine}
        if self.backend in ("onnx", "openvino"):
            from ..runtimes import onnx_backend, openvino_backend

            module = onnx_backend if self.backend == "onnx" else openvino_backend
            return {stage: module.make_runner(net, self.window, self.bundle.sha256, stage)
                    for stage, net in nets.items()}
        return {stage: self._torch_runner(net) for stage, net in nets.items()}

    def _torch_runner(self, net: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(batch: torch.Tensor) -> torch.Tensor:
            return self._forward(net, batch)

        return run

    # ---------------------------------------------------------------- networks
    def _forward(self, net: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Softmax of ``net`` on a (1, 1, Z, Y, X) batch, float32, on the predictor's device."""
        batch = batch.to(self.device)
        if self.channels_last and self.device.type == "cpu":
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                logits = net(batch)
        else:
            logits = net(batch)
        return torch.softmax(logits.float(), dim=1)

    def _to_cpu_after_oom(self) -> None:
        warnings.warn("CUDA ran out of memory; retrying on the CPU", DeviceFallbackWarning, stacklevel=3)
        torch.cuda.empty_cache()
        self.device = torch.device("cpu")
        self.bundle.coarse.to(self.device)
        self.bundle.fine.to(self.device)
        self.runners = self._make_runners()

    def sliding_window_probabilities(self, stage: str, volume: torch.Tensor) -> torch.Tensor:
        """Probabilities (C, Z, Y, X) of ``stage``'s network on ``volume`` (Z, Y, X, HU), by windows.

        The volume is padded with air to at least one window; each window is clipped to the HU
        window and z-scored on its own; window softmaxes are blended with the Gaussian weights
        and renormalised across channels. Retries on the CPU after a CUDA out-of-memory error.
        """
        try:
            return self._sliding_window(stage, volume)
        except torch.cuda.OutOfMemoryError:
            if self.device.type != "cuda":
                raise
            self._to_cpu_after_oom()
            return self._sliding_window(stage, volume)

    @torch.inference_mode()
    def _sliding_window(self, stage: str, volume: torch.Tensor) -> torch.Tensor:
        padded, region = pad_to_min_size(volume, self.window, PAD_HU)
        starts = [window_starts(n, w, self.overlap) for n, w in zip(padded.shape, self.window)]
        positions = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
        weight = self._importance.to(self.device)
        total = None
        norm = torch.zeros(padded.shape, device=self.device)
        for i, (z, y, x) in enumerate(positions):
            sl = (slice(z, z + self.window[0]), slice(y, y + self.window[1]), slice(x, x + self.window[2]))
            patch = clip_and_zscore(padded[sl].to(self.device), *self.hu_window)
            probs = self.runners[stage](patch[None, None])[0].to(self.device)
            if total is None:
                total = torch.zeros((probs.shape[0],) + tuple(padded.shape), device=self.device)
            total[(slice(None),) + sl] += probs * weight
            norm[sl] += weight
            self.progress(stage, (i + 1) / len(positions))
        probs = total / norm
        probs = probs / probs.sum(dim=0, keepdim=True)
        return probs[(slice(None),) + region]

    # ---------------------------------------------------------------- stages
    def predict_coarse(self, canonical: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Coarse stage on a canonical (Z, Y, X) HU array.

        Returns the coarse probabilities (C, 96, 96, 96) and the post-processed coarse labels
        (96, 96, 96, uint8, largest component per class).
        """
        small = resize_volume(canonical, self.coarse_size)
        probs = self.sliding_window_probabilities("coarse", small)
        labels = probs.argmax(dim=0).to(torch.uint8).cpu().numpy()
        return probs, largest_component_per_class(labels)

    def predict_fine(self, canonical: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
        """Fine stage on the ``box`` crop of a canonical array; uint8 labels of the crop's shape."""
        crop = canonical[box]
        small = resize_volume(crop, self.fine_size)
        probs = self.sliding_window_probabilities("fine", small)
        self.progress("resample", 0.0)
        labels = resize_argmax(probs, crop.shape)
        self.progress("resample", 1.0)
        return largest_component_per_class(labels)

    def coarse_full_resolution(self, coarse_probs: torch.Tensor, shape: tuple[int, int, int]) -> np.ndarray:
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
        fine crop box comes from nor in the outputs.
        ``keep_coarse`` (fine stage on only): also map the coarse result to full resolution into
        ``info.coarse_labels`` (same shape and dtype), costing one more full-size resize + argmax.
        """
        info = PredictionInfo(device=self.device.type)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
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
                msg = ("the coarse stage found no organ in this image (is it an abdominal CT?); "
                       "the fine stage used a centred 240x160x240 mm box")
                warnings.warn(msg, EmptyCoarseWarning, stacklevel=2)
                info.warnings.append(msg)
            box = crop_box(coarse_labels > 0, canonical.shape, spacing_zyx, self.padding, self.fallback_mm)
            out[box] = self.predict_fine(canonical, box)
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
        partial = field_of_view_warning(out, spacing_zyx)
        if partial is not None:
            warnings.warn(partial, PartialFieldOfViewWarning, stacklevel=2)
            info.warnings.append(partial)
        if on_gpu and self.device.type == "cuda":  # (not after a fallback to the CPU)
            info.gpu_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        info.device = self.device.type
        info.backend = self.backend
        return out, info

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

