"""AbdomenKDSeg against the sliding-window predictors a user would otherwise run, side by side.

Every method segments the same input with the same thread count, each run in its own child
process (so peak RSS is per method), from reading the CT to a label map written to disk:

  abdomenkdseg    this engine: Predictor + segment_file (what ``abdomen-kdseg segment`` runs);
                  coarse 96^3 (2 windows) + fine crop (1 window) of 96x64x96, student networks;
                  the process ends as that command's does (``process_exit.exit_now``, no
                  interpreter teardown). The other methods end as their own tools do.
  nnunet-fullres  nnU-Net v2's own ``nnUNetPredictor.predict_from_files_sequential`` on a
                  3d_fullres plan for abdominal CT at 2.5 x 0.8 x 0.8 mm (z, y, x): PlainConvUNet
                  (6 stages, 32..320 features), patch size from nnU-Net's ExperimentPlanner for a
                  FLARE22-like fingerprint (8 GB VRAM target), 14 classes, random He-initialised
                  weights saved as fold_0/checkpoint_final.pth. Gaussian weighting, step 0.5,
                  no test-time mirroring (as TotalSegmentator runs it). nnU-Net's preprocessing
                  (crop, resample order 3, CT normalisation) and export (logits resampled to
                  the input grid, argmax, write) are included.
  nnunet-1.5mm    the same at 1.5 mm isotropic (TotalSegmentator's standard resolution).
  nnunet-3mm      the same at 3 mm isotropic (TotalSegmentator's ``--fast`` resolution).
  monai-unet      MONAI: LoadImage -> Orientation RAS -> Spacing 1.5 mm (bilinear) ->
                  ScaleIntensityRange(-175, 250) -> ``sliding_window_inference`` (ROI 96^3,
                  sw_batch_size 4, overlap 0.5, Gaussian) with the 3D UNet of MONAI's tutorials
                  (channels 16..256, 2 residual units, batch norm) -> argmax -> Invertd
                  (nearest) -> NIfTI written with nibabel. (Argmax before inverting is cheaper
                  than the tutorials' inverting of the 14 probability channels.)
  monai-segresnet the same with SegResNet (16 initial filters, blocks 1-2-2-4 / 1-1-1).

Weights are random: speed and memory depend on the architecture, not on what it learned.
FLOPs are FlopCounterMode counts (2 per multiply-accumulate, convolutions only) of one patch,
on the "meta" device, times the number of patches the method runs on that input.

Usage:
  python benchmarks/compare_methods.py --quick                 # sample CT only
  python benchmarks/compare_methods.py --sizes sample 512x512x300 512x512x800
  python benchmarks/compare_methods.py --plot-only benchmarks/results/compare_methods.json
Writes benchmarks/results/compare_methods.json and benchmarks/results/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("abdomenkdseg", "nnunet-fullres", "nnunet-1.5mm", "nnunet-3mm", "monai-unet", "monai-segresnet")
DEFAULT_METHODS = ("abdomenkdseg", "nnunet-fullres", "nnunet-3mm", "monai-unet")
NUM_CLASSES = 14
#: nnU-Net configurations: target spacing (z, y, x mm) and the median shape of the fingerprint
#: (voxels at that spacing) handed to nnU-Net's planner. FLARE22-like abdominal CT.
NNUNET_PLANS = {
    "nnunet-fullres": {"spacing": [2.5, 0.8, 0.8], "median_shape": [120, 512, 512]},
    "nnunet-1.5mm": {"spacing": [1.5, 1.5, 1.5], "median_shape": [200, 273, 273]},
    "nnunet-3mm": {"spacing": [3.0, 3.0, 3.0], "median_shape": [100, 137, 137]},
}
#: What nnU-Net 2.8's planner gives for the fingerprints above (used if calling it fails).
NNUNET_FALLBACK_PATCH = {"nnunet-fullres": [48, 192, 192], "nnunet-1.5mm": [112, 160, 128],
                         "nnunet-3mm": [112, 160, 128]}
MONAI_SPACING = 1.5
MONAI_ROI = (96, 96, 96)
MONAI_SW_BATCH = 4
OVERLAP = 0.5
#: Foreground intensity statistics of abdominal organs (HU) for nnU-Net's CT normalisation.
CT_INTENSITIES = {"max": 1500.0, "mean": 95.0, "median": 101.0, "min": -1000.0,
                  "percentile_00_5": -160.0, "percentile_99_5": 240.0, "std": 55.0}
TARGETS = {"nnunet-fullres": 10.0, "nnunet-3mm": 3.0}


# ============================================================================ nnU-Net model folders
def _nnunet_env(workdir: Path, threads: int) -> dict[str, str]:
    """nnU-Net's folder variables (it warns without them) and its process/thread count."""
    return {"nnUNet_raw": str(workdir / "nnUNet_raw"), "nnUNet_preprocessed": str(workdir / "nnUNet_pre"),
            "nnUNet_results": str(workdir / "nnUNet_results"), "nnUNet_def_n_proc": str(threads),
            "nnUNet_n_proc_DA": str(threads)}


def nnunet_plan(method: str, smoke: bool = False) -> dict[str, Any]:
    """A 3d_fullres configuration from nnU-Net's ExperimentPlanner for ``NNUNET_PLANS[method]``.

    The planner is called without a dataset on disk (its attributes set to nnU-Net's defaults);
    if that fails (another nnU-Net version), the architecture is built with the patch size it
    gave for nnU-Net 2.8. ``smoke`` divides the features by 8 (wiring tests only).
    """
    import numpy as np
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    spec = NNUNET_PLANS[method]
    planner = object.__new__(ExperimentPlanner)
    defaults = {
        "dataset_json": {"channel_names": {"0": "CT"}, "labels": {str(i): i for i in range(NUM_CLASSES)}},
        "dataset_fingerprint": {"median_relative_size_after_cropping": 1.0},
        "UNet_base_num_features": 32, "UNet_class": PlainConvUNet, "UNet_reference_val_3d": 560000000,
        "UNet_reference_val_2d": 85000000, "UNet_reference_com_nfeatures": 32,
        "UNet_reference_val_corresp_GB": 8, "UNet_reference_val_corresp_bs_2d": 12,
        "UNet_reference_val_corresp_bs_3d": 2, "UNet_featuremap_min_edge_length": 4,
        "UNet_blocks_per_stage_encoder": (2,) * 14, "UNet_blocks_per_stage_decoder": (2,) * 13,
        "UNet_min_batch_size": 2, "UNet_max_features_2d": 512, "UNet_max_features_3d": 320,
        "max_dataset_covered": 0.05, "UNet_vram_target_GB": 8, "preprocessor_name": "DefaultPreprocessor",
    }
    for key, value in defaults.items():
        setattr(planner, key, value)
    shape = spec["median_shape"]
    try:
        plan = planner.get_plans_for_configuration(spec["spacing"], shape, "nnUNetPlans_3d_fullres",
                                                   100 * float(np.prod(shape)), {})
    except Exception as exc:  # planner internals differ in this nnU-Net version
        print(f"nnU-Net planner failed ({exc}); using the nnU-Net 2.8 patch size", file=sys.stderr)
        plan = _fallback_plan(method)
    plan["batch_dice"] = True
    if smoke:
        kw = plan["architecture"]["arch_kwargs"]
        kw["features_per_stage"] = [max(2, int(f) // 8) for f in kw["features_per_stage"]]
    recursive_fix_for_json_export(plan)
    return plan


def _fallback_plan(method: str) -> dict[str, Any]:
    """3d_fullres plan with the patch nnU-Net 2.8's planner chose (see NNUNET_FALLBACK_PATCH)."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    spacing = NNUNET_PLANS[method]["spacing"]
    _, strides, kernels, patch, _ = get_pool_and_conv_props(spacing, NNUNET_FALLBACK_PATCH[method], 4, 999999)
    n = len(strides)
    return {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": NNUNET_PLANS[method]["median_shape"],
        "spacing": spacing, "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": [min(320, 32 * 2**i) for i in range(n)],
                "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": kernels, "strides": strides,
                "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
    }


def build_nnunet_network(plan: dict[str, Any], allow_init: bool = True):  # noqa: ANN201 (nn.Module)
    """The plan's network (1 input channel, 14 outputs, no deep supervision)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plan["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  1, NUM_CLASSES, allow_init=allow_init, deep_supervision=False)


def make_nnunet_model_folder(method: str, root: Path, smoke: bool = False) -> Path:
    """A trained-model folder nnUNetPredictor can load: dataset.json, plans.json, fold_0 checkpoint.

    Made once per method under ``root`` (random weights, seed 0) and reused.
    """
    import torch

    from AbdomenKDSegLib.engine.organs import ORGANS

    folder = root / (method + ("-smoke" if smoke else ""))
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    if checkpoint.is_file() and (folder / "plans.json").is_file():
        return folder
    plan = nnunet_plan(method, smoke)
    spec = NNUNET_PLANS[method]
    plans = {
        "dataset_name": "Dataset999_AbdomenBench", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spec["spacing"],
        "original_median_shape_after_transp": spec["median_shape"],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": plan}, "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": CT_INTENSITIES},
    }
    labels = {"background": 0, **{o.key: o.value for o in ORGANS}}
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 0, "file_ending": ".nii.gz",
               "name": "AbdomenBench", "description": "benchmark stand-in, random weights"}
    torch.manual_seed(0)
    net = build_nnunet_network(plan)
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    tmp = checkpoint.with_suffix(".tmp")
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)}, tmp)
    os.replace(tmp, checkpoint)
    return folder


# ================================================================================= MONAI networks
def build_monai_network(method: str, smoke: bool = False):  # noqa: ANN201 (nn.Module)
    """MONAI's tutorial UNet, or SegResNet; 1 input channel, 14 outputs. ``smoke``: 1/8 width."""
    import torch
    from monai.networks.nets import SegResNet, UNet

    torch.manual_seed(0)
    div = 8 if smoke else 1
    if method == "monai-unet":
        return UNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES,
                    channels=tuple(max(2, c // div) for c in (16, 32, 64, 128, 256)),
                    strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, init_filters=max(2, 16 // div),
                     blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))


# ===================================================================================== children
class NetworkMeter:
    """Counts patches through a network and the seconds spent in it (forward hooks)."""

    def __init__(self, net) -> None:  # noqa: ANN001
        self.patches, self.seconds, self._t0 = 0, 0.0, 0.0
        net.register_forward_pre_hook(self._pre)
        net.register_forward_hook(self._post)

    def _pre(self, module, inputs) -> None:  # noqa: ANN001
        self._t0 = time.perf_counter()

    def _post(self, module, inputs, output) -> None:  # noqa: ANN001
        self._sync(inputs[0])
        self.seconds += time.perf_counter() - self._t0
        self.patches += int(inputs[0].shape[0])

    @staticmethod
    def _sync(x) -> None:  # noqa: ANN001
        if getattr(x, "is_cuda", False):
            import torch

            torch.cuda.synchronize()


def child_abdomenkdseg(args: argparse.Namespace) -> dict[str, Any]:
    from AbdomenKDSegLib.engine.inference import Predictor, segment_file

    predictor = Predictor(args.model, device=args.device, backend=args.akd_backend)
    counter = {"patches": 0, "seconds": 0.0}

    def counted(run: Callable) -> Callable:
        def wrapped(batch):  # noqa: ANN001, ANN202
            t0 = time.perf_counter()
            out = run(batch)
            NetworkMeter._sync(out)
            counter["seconds"] += time.perf_counter() - t0
            counter["patches"] += int(batch.shape[0])
            return out

        return wrapped

    predictor.runners = {stage: counted(run) for stage, run in predictor.runners.items()}
    result = segment_file(args.input, args.output, predictor=predictor)
    return {"backend": predictor.backend, "device": result.device, "stages_s": result.timings,
            "patches": counter["patches"], "network_s": counter["seconds"], "output": str(args.output)}


def child_nnunet(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    predictor = nnUNetPredictor(tile_step_size=OVERLAP, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(args.model_folder), use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    meter = NetworkMeter(predictor.network)
    ending = ".nii.gz" if str(args.input).endswith(".nii.gz") else Path(args.input).suffix
    predictor.dataset_json["file_ending"] = ending
    # nnU-Net appends the dataset's file ending to a name without one: strip whichever ending the
    # requested output has, then report the file nnU-Net actually wrote
    out_truncated = str(args.output)
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if out_truncated.endswith(suffix):
            out_truncated = out_truncated[: -len(suffix)]
            break
    predictor.predict_from_files_sequential([[str(args.input)]], [out_truncated], save_probabilities=False,
                                            overwrite=True)
    written = sorted(Path(out_truncated).parent.glob(Path(out_truncated).name + ".*"))
    return {"device": device.type, "patches": meter.patches, "network_s": meter.seconds,
            "patch_size": list(predictor.configuration_manager.patch_size),
            "spacing_zyx": list(predictor.configuration_manager.spacing),
            "output": str(written[0]) if written else out_truncated + ending}


def child_monai(args: argparse.Namespace) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    net = build_monai_network(args.method, args.smoke).to(device).eval()
    meter = NetworkMeter(net)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    pre = Compose([
        LoadImaged(keys="image", reader="NibabelReader"),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=(MONAI_SPACING,) * 3, mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
    ])
    data = pre({"image": str(args.input)})
    stages["load_preprocess"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = sliding_window_inference(data["image"][None].to(device), MONAI_ROI, MONAI_SW_BATCH, net,
                                          overlap=OVERLAP, mode="gaussian")
        labels = torch.argmax(logits, dim=1).to(torch.float32).cpu()  # (1, X, Y, Z) at 1.5 mm
    del logits
    stages["sliding_window"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = data["image"]
    data["pred"] = MetaTensor(labels, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    data = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)
    pred = data["pred"]
    out = np.asarray(pred.array if hasattr(pred, "array") else pred)[0].astype(np.uint8)
    affine = np.asarray(pred.affine)
    stages["invert"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    nib.save(nib.Nifti1Image(out, affine), str(args.output))
    stages["write"] = time.perf_counter() - t0
    return {"device": device.type, "patches": meter.patches, "network_s": meter.seconds, "stages_s": stages,
            "output_shape": list(out.shape), "output": str(args.output)}


def child_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per patch of a method's network (one untimed small call, then one timed batch)."""
    import torch

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    if args.method.startswith("nnunet"):
        plan = json.loads((Path(args.model_folder) / "plans.json").read_text())["configurations"]["3d_fullres"]
        net, patch, batch = build_nnunet_network(plan), tuple(plan["patch_size"]), 1
        strides = plan["architecture"]["arch_kwargs"]["strides"]
        small = tuple(2 * math.prod(int(st[axis]) for st in strides) for axis in range(3))
    else:
        net, patch, batch = build_monai_network(args.method, args.smoke), MONAI_ROI, MONAI_SW_BATCH
        small = (32, 32, 32)
    net = net.to(device).eval()
    x = torch.zeros((batch, 1) + tuple(patch), device=device)
    with torch.no_grad():
        net(torch.zeros((1, 1) + small, device=device))  # warm-up on the smallest valid input
        t0 = time.perf_counter()
        out = net(x)
        NetworkMeter._sync(out)
    return {"seconds_per_patch": (time.perf_counter() - t0) / batch, "patch": list(patch), "device": device.type,
            "output": ""}


def child_main(argv: Sequence[str]) -> int:
    """``--child METHOD``: run one method on one input, write a JSON of in-process figures."""
    parser = argparse.ArgumentParser(prog="compare_methods.py --child")
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None)
    parser.add_argument("--model-folder", default=None)
    parser.add_argument("--akd-backend", default="auto")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--probe", action="store_true", help="only time one patch of the network")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if args.probe:
        info = child_probe(args)
    elif args.method == "abdomenkdseg":
        info = child_abdomenkdseg(args)
    elif args.method.startswith("nnunet"):
        info = child_nnunet(args)
    else:
        info = child_monai(args)
    info["in_process_s"] = time.perf_counter() - t0
    info["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20
                           if args.device == "cuda" and torch.cuda.is_available() else None)
    info["output_exists"] = bool(info["output"]) and Path(info["output"]).is_file()
    common.write_json(info, Path(args.result))
    if args.method == "abdomenkdseg" and not args.probe:
        from AbdomenKDSegLib.process_exit import exit_now

        exit_now(0)  # as `abdomen-kdseg segment` ends
    return 0


# =============================================================================== static figures
def patch_flops(net, patch: Sequence[int]) -> int:  # noqa: ANN001
    """FlopCounterMode FLOPs of one (1, 1, *patch) forward pass (network on the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros((1, 1) + tuple(patch), device="meta"))
    return int(counter.get_total_flops())


def count_params(net) -> int:  # noqa: ANN001
    return sum(p.numel() for p in net.parameters())


def n_windows(shape: Sequence[int], patch: Sequence[int], step: float = OVERLAP) -> int:
    """Sliding windows nnU-Net/MONAI place on ``shape`` (padded to at least the patch)."""
    total = 1
    for n, p in zip(shape, patch):
        n = max(n, p)
        total *= 1 if n == p else int(math.ceil((n - p) / (p * step))) + 1
    return total


def resampled_shape_zyx(info: dict[str, Any], spacing_zyx: Sequence[float]) -> list[int]:
    """Shape (Z, Y, X) of an input resampled to ``spacing_zyx`` (same field of view)."""
    size = list(reversed(info["size_xyz"]))
    spacing = list(reversed(info["spacing_xyz_mm"]))
    return [max(1, int(round(n * s / t))) for n, s, t in zip(size, spacing, spacing_zyx)]


def static_figures(method: str, model: Optional[str], smoke: bool, model_root: Path) -> dict[str, Any]:
    """Parameters, patch size and FLOPs per patch of a method (networks built on "meta")."""
    import torch

    if method == "abdomenkdseg":
        from AbdomenKDSegLib.engine.bundle import default_bundle_path, read_bundle_metadata
        from AbdomenKDSegLib.engine.networks import NetworkConfig, build_network

        _, card = read_bundle_metadata(model or default_bundle_path())
        pre = card.get("preprocessing", {})
        window = tuple(pre.get("window_zyx", (96, 64, 96)))
        nets = {}
        with torch.device("meta"):
            for stage in ("coarse", "fine"):
                nets[stage] = build_network(NetworkConfig.from_dict(card["architecture"][stage]))
        flops = {stage: patch_flops(net, window) for stage, net in nets.items()}
        return {"params": sum(count_params(n) for n in nets.values()), "networks": 2, "patch": list(window),
                "flops_per_patch": flops["fine"], "flops_by_stage": flops,
                "coarse_size": list(pre.get("coarse_size_zyx", (96, 96, 96)))}
    if method.startswith("nnunet"):
        plan = json.loads((make_nnunet_model_folder(method, model_root, smoke) / "plans.json").read_text())
        plan = plan["configurations"]["3d_fullres"]
        with torch.device("meta"):
            net = build_nnunet_network(plan, allow_init=False)
        return {"params": count_params(net), "networks": 1, "patch": plan["patch_size"],
                "spacing_zyx": plan["spacing"], "flops_per_patch": patch_flops(net.eval(), plan["patch_size"])}
    with torch.device("meta"):
        net = build_monai_network(method, smoke)
    return {"params": count_params(net), "networks": 1, "patch": list(MONAI_ROI),
            "spacing_zyx": [MONAI_SPACING] * 3, "flops_per_patch": patch_flops(net.eval(), MONAI_ROI)}


def expected_patches(method: str, figures: dict[str, Any], info: dict[str, Any]) -> int:
    """Patches the method runs on an input (AbdomenKDSeg: coarse windows + 1 fine window)."""
    if method == "abdomenkdseg":
        return n_windows(figures["coarse_size"], figures["patch"]) + 1
    shape = resampled_shape_zyx(info, figures["spacing_zyx"])
    return n_windows(shape, figures["patch"])


# ======================================================================================= runner
def _child_command(method: str, source: Path, output: Path, result: Path, args: argparse.Namespace,
                   model_root: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--input", str(source),
           "--output", str(output), "--result", str(result), "--threads", str(args.threads),
           "--device", args.device, "--akd-backend", args.akd_backend]
    if args.model:
        cmd += ["--model", args.model]
    if args.smoke:
        cmd.append("--smoke")
    if method.startswith("nnunet"):
        cmd += ["--model-folder", str(make_nnunet_model_folder(method, model_root, args.smoke))]
    return cmd


def probe_seconds_per_patch(method: str, args: argparse.Namespace, model_root: Path) -> Optional[float]:
    """Seconds per patch of ``method``'s network, timed in a child process (None if it failed)."""
    with tempfile.TemporaryDirectory(prefix=f"probe-{method}-") as tmp:
        result = Path(tmp) / "probe.json"
        cmd = _child_command(method, common.SAMPLE_CT, Path(tmp) / "none", result, args, model_root) + ["--probe"]
        extra = _nnunet_env(Path(tmp), args.threads) if method.startswith("nnunet") else {}
        run = common.run_measured(cmd, env=common.child_env(args.threads, extra), timeout=args.timeout)
        if not run.ok or not result.is_file():
            print(f"probe of {method} failed:\n{run.stderr_tail[-1500:]}", file=sys.stderr)
            return None
        return float(json.loads(result.read_text())["seconds_per_patch"])


def run_method(method: str, size: str, source: Path, args: argparse.Namespace, model_root: Path) -> dict[str, Any]:
    """One measured child process; returns the row (status ok / failed / timeout / low memory)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{method}-") as tmp:
        tmpdir = Path(tmp)
        output = tmpdir / "labels.nii.gz"
        result = tmpdir / "result.json"
        cmd = _child_command(method, source, output, result, args, model_root)
        extra = _nnunet_env(tmpdir, args.threads) if method.startswith("nnunet") else {}
        run = common.run_measured(cmd, env=common.child_env(args.threads, extra), timeout=args.timeout,
                                  min_available_mb=args.min_free_mb)
        child = json.loads(result.read_text()) if result.is_file() else {}
    row: dict[str, Any] = {"method": method, "size": size, "seconds": run.seconds if run.ok else None,
                           "peak_rss_mb": run.peak_rss_mb, "own_maxrss_mb": run.own_maxrss_mb,
                           "tree_peak_rss_mb": run.tree_peak_rss_mb, "gpu_peak_mb": child.get("gpu_peak_mb"),
                           "patches_run": child.get("patches"), "network_s": child.get("network_s"),
                           "in_process_s": child.get("in_process_s"), "child": child}
    if run.ok and child.get("output_exists"):
        row["status"] = "ok"
    elif run.low_memory:
        row["status"] = f"killed (< {args.min_free_mb} MiB RAM left)"
    elif run.timed_out:
        row["status"] = f"timeout (> {args.timeout:.0f} s)"
    else:
        row["status"] = "failed"
        row["error"] = run.stderr_tail[-2000:]
    return row


def run_repeated(method: str, size: str, source: Path, args: argparse.Namespace, model_root: Path) -> dict[str, Any]:
    """:func:`run_method`, repeated ``--repeat`` times in all when the first run took less than
    ``--repeat-under`` seconds: the row then holds the median seconds (a 2-core machine's timings
    vary by 10-30 % from run to run), the largest peak RSS, and every run's seconds."""
    first = run_method(method, size, source, args, model_root)
    if args.repeat <= 1 or first["status"] != "ok" or first["seconds"] >= args.repeat_under:
        return first
    runs = [first] + [run_method(method, size, source, args, model_root) for _ in range(args.repeat - 1)]
    ok = [r for r in runs if r["status"] == "ok"]
    if len(ok) < len(runs):
        return next(r for r in runs if r["status"] != "ok")
    median = statistics.median(r["seconds"] for r in ok)
    row = dict(min(ok, key=lambda r: abs(r["seconds"] - median)))  # in-process figures of a typical run
    row.update({"seconds": round(median, 3), "runs_seconds": [r["seconds"] for r in ok],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in ok)})
    return row


def estimate_seconds(done: dict[str, Any], info_done: dict[str, Any], info_new: dict[str, Any],
                     patches_done: int, patches_new: int) -> Optional[float]:
    """Seconds expected on a larger input from a measured run: process start (interpreter,
    imports: the run's seconds outside its in-process time) stays, network time scales with the
    number of patches, the rest of the in-process time with the number of voxels."""
    if done.get("seconds") is None:
        return None
    net = done.get("network_s") or 0.0
    in_process = min(done.get("in_process_s") or done["seconds"], done["seconds"])
    fixed = done["seconds"] - in_process
    rest = max(0.0, in_process - net)
    scale = info_new["voxels"] / info_done["voxels"]
    return fixed + net * patches_new / max(1, patches_done) + rest * scale


def build_rows(args: argparse.Namespace, inputs: dict[str, Path], infos: dict[str, dict[str, Any]],
               model_root: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Run (or skip, with an estimate) every method on every input, smallest input first.

    A run (of another method than AbdomenKDSeg, the reference) on an input of more than
    ``--skip-above-mvox`` million voxels is skipped when its estimated seconds exceed
    ``--skip-minutes``: from the method's last
    measured (smaller) input (see :func:`estimate_seconds`), or, before any measurement, from a
    one-patch probe times the number of patches (network time only, a lower bound).
    """
    figures = {m: static_figures(m, args.model, args.smoke, model_root) for m in args.methods}
    probes: dict[str, Optional[float]] = {}
    rows: list[dict[str, Any]] = []
    sizes = sorted(inputs, key=lambda s: infos[s]["voxels"])
    for size in sizes:
        for method in args.methods:
            fig = figures[method]
            patches = expected_patches(method, fig, infos[size])
            previous = [r for r in rows if r["method"] == method and r["status"] == "ok"]
            est, est_kind = None, ""
            skippable = infos[size]["voxels"] > args.skip_above_mvox * 1e6
            if previous:
                last = previous[-1]
                est = estimate_seconds(last, infos[last["size"]], infos[size], last["patches"], patches)
            elif method != "abdomenkdseg" and args.skip_minutes > 0 and skippable:
                if method not in probes:
                    probes[method] = probe_seconds_per_patch(method, args, model_root)
                if probes[method] is not None:
                    est, est_kind = probes[method] * patches, ">= "
            unfinished = [r for r in rows if r["method"] == method and not r["status"].startswith(("ok", "skipped"))]
            too_long = skippable and est is not None and args.skip_minutes > 0 and est > args.skip_minutes * 60
            if method != "abdomenkdseg" and (too_long or unfinished):
                why = f"est. {est_kind}{est / 60:.1f} min" if est is not None else "a smaller size did not finish"
                row = {"method": method, "size": size, "status": f"skipped ({why})", "seconds": None,
                       "estimated_seconds": est, "peak_rss_mb": None}
            else:
                row = run_repeated(method, size, inputs[size], args, model_root)
                row["estimated_seconds"] = est
            row.update({"patches": patches, "patch": fig["patch"], "params_m": fig["params"] / 1e6,
                        "gflops_per_patch": fig["flops_per_patch"] / 1e9,
                        "tflops_total": _total_flops(method, fig, patches) / 1e12,
                        "probe_s_per_patch": probes.get(method), "voxels_m": infos[size]["voxels"] / 1e6})
            rows.append(row)
            print(f"  {size:>12} {method:<15} {row['status']:<12} {common.fmt(row.get('seconds'))} s, "
                  f"peak {common.fmt(row.get('peak_rss_mb'), 0)} MiB, {patches} patches", flush=True)
    _add_ratios(rows)
    return rows, figures


def _total_flops(method: str, fig: dict[str, Any], patches: int) -> float:
    if method == "abdomenkdseg":
        coarse = patches - 1
        return fig["flops_by_stage"]["coarse"] * coarse + fig["flops_by_stage"]["fine"]
    return fig["flops_per_patch"] * patches


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per size: each method's seconds and peak memory divided by AbdomenKDSeg's."""
    for row in rows:
        ref = next((r for r in rows if r["size"] == row["size"] and r["method"] == "abdomenkdseg"), None)
        if ref is None or ref.get("seconds") is None:
            continue
        secs = row.get("seconds") or row.get("estimated_seconds")
        row["time_ratio"] = secs / ref["seconds"] if secs else None
        row["time_ratio_estimated"] = row.get("seconds") is None and secs is not None
        if row["time_ratio"] is not None:
            row["time_ratio_text"] = ("~" if row["time_ratio_estimated"] else "") + f"{row['time_ratio']:.1f}"
        if row.get("peak_rss_mb") and ref.get("peak_rss_mb"):
            row["memory_ratio"] = row["peak_rss_mb"] / ref["peak_rss_mb"]


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """AbdomenKDSeg >= 10x faster than nnunet-fullres, >= 3x than nnunet-3mm, less peak memory."""
    verdicts = []
    for row in rows:
        goal = TARGETS.get(row["method"])
        if goal is None or row.get("time_ratio") is None:
            continue
        verdicts.append({"size": row["size"], "versus": row["method"], "speedup": round(row["time_ratio"], 2),
                         "speedup_target": goal, "speedup_estimated": row.get("time_ratio_estimated", False),
                         "speedup_ok": row["time_ratio"] >= goal,
                         "memory_ratio": None if row.get("memory_ratio") is None else round(row["memory_ratio"], 2),
                         "memory_ok": None if row.get("memory_ratio") is None else row["memory_ratio"] > 1.0})
    return verdicts


# ========================================================================================= plot
def plot_scaling(report: dict[str, Any], path: Path) -> Path:
    """Seconds and peak RSS against input size (million voxels), one line per method.

    Measured points are filled; estimates for skipped runs are hollow on a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    for method in methods:
        color = f"C{METHODS.index(method)}" if method in METHODS else None
        rows = sorted((r for r in report["rows"] if r["method"] == method), key=lambda r: r["voxels_m"])
        meas = [(r["voxels_m"], r["seconds"]) for r in rows if r.get("seconds") is not None]
        ests = [(r["voxels_m"], r["estimated_seconds"]) for r in rows
                if r.get("seconds") is None and r.get("estimated_seconds")]
        if meas:
            ax_t.plot(*zip(*meas), "o-", color=color, label=method)
        if ests:
            ax_t.plot(*zip(*(meas[-1:] + ests)), "o--", color=color, mfc="none",
                      label=None if meas else f"{method} (est.)")
        mem = [(r["voxels_m"], r["peak_rss_mb"] / 1024) for r in rows if r.get("seconds") is not None]
        if mem:
            ax_m.plot(*zip(*mem), "o-", color=color, label=method)
    machine = report.get("machine", {})
    title = f"{report['settings']['threads']} threads, {report['settings']['device']}, {machine.get('processor', '')}"
    for ax, ylabel in ((ax_t, "seconds (read -> label map written)"), (ax_m, "peak RSS (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("input size (million voxels)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "1235" else ""))
    ax_t.legend(fontsize=8)
    ax_t.set_title("time (dashed, hollow: estimated)", fontsize=9)
    ax_m.set_title("peak memory", fontsize=9)
    fig.suptitle(f"Segmentation cost vs volume size ({title})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ========================================================================================= main
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(common.DEFAULT_SIZES))
    parser.add_argument("--quick", action="store_true", help="sample CT only")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="AbdomenKDSeg bundle (default: the bundled model)")
    parser.add_argument("--akd-backend", default="auto", choices=["auto", "torch", "onnx", "openvino"])
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before a run is killed")
    parser.add_argument("--skip-minutes", type=float, default=10.0,
                        help="skip a run whose estimated time exceeds this (0: never skip)")
    parser.add_argument("--skip-above-mvox", type=float, default=None,
                        help="only inputs above this many million voxels may be skipped "
                             "(default 100, i.e. 512x512x800; 0 with --quick)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per method and size when the first run is short (median reported)")
    parser.add_argument("--repeat-under", type=float, default=120.0, metavar="SECONDS",
                        help="repeat only runs whose first run took less than this")
    parser.add_argument("--min-free-mb", type=int, default=1024,
                        help="kill a run when the machine's available memory falls below this")
    parser.add_argument("--smoke", action="store_true",
                        help="1/8-width nnU-Net/MONAI networks: checks the wiring, figures meaningless")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "compare_methods.json")
    parser.add_argument("--plot", type=Path, default=common.RESULTS / "scaling.png")
    parser.add_argument("--plot-only", type=Path, default=None, metavar="JSON",
                        help="only redraw the plot from a results JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = ["sample"]
    if args.skip_above_mvox is None:
        args.skip_above_mvox = 0.0 if args.quick else 100.0
    for size in args.sizes:
        common.parse_size(size)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    args = parse_args(argv)
    if args.plot_only:
        print(f"plot -> {plot_scaling(json.loads(args.plot_only.read_text()), args.plot)}")
        return 0
    machine = common.machine_info()
    print(f"machine: {machine['cpu_count']} CPUs, load {machine['load_average_1_5_15']}, "
          f"threads {args.threads}, device {args.device}" + ("  [SMOKE: 1/8-width networks]" if args.smoke else ""))
    inputs = {size: common.prepare_input(size) for size in args.sizes}
    infos = {size: common.image_summary(path) for size, path in inputs.items()}
    model_root = common.DATA_CACHE / "nnunet-models"
    if "abdomenkdseg" in args.methods:
        # Untimed: the first run of a bundle exports its ONNX graph and compiles it (OpenVINO)
        # into the on-disk caches, once per installed model; timed runs then read them.
        warm = run_method("abdomenkdseg", "sample", common.SAMPLE_CT, args, model_root)
        print(f"warm-up of abdomenkdseg on the sample CT (not timed): {warm['status']}", flush=True)
    rows, figures = build_rows(args, inputs, infos, model_root)
    columns = [("size", "input"), ("method", "method"), ("status", "status"), ("seconds", "seconds"),
               ("time_ratio_text", "x AKD time"), ("peak_rss_mb", "peak RSS MiB"), ("memory_ratio", "x AKD mem"),
               ("gpu_peak_mb", "GPU MiB"), ("patches", "patches"), ("params_m", "params M"),
               ("tflops_total", "TFLOPs")]
    print()
    table = common.print_table(rows, columns)
    verdicts = check_targets(rows)
    for v in verdicts:
        est = " (estimated)" if v["speedup_estimated"] else ""
        print(f"target {v['size']}: AbdomenKDSeg {v['speedup']}x faster than {v['versus']}{est} "
              f"(>= {v['speedup_target']}: {'met' if v['speedup_ok'] else 'MISSED'}); memory ratio "
              f"{v['memory_ratio']} ({'met' if v['memory_ok'] else 'MISSED' if v['memory_ok'] is False else 'n/a'})")
    report = {
        "benchmark": "compare_methods",
        "description": __doc__.split("Usage:")[0].strip(),
        "machine": machine,
        "settings": {"sizes": args.sizes, "methods": args.methods, "threads": args.threads, "device": args.device,
                     "repeat": args.repeat, "repeat_under_s": args.repeat_under,
                     "akd_backend": args.akd_backend, "timeout_s": args.timeout, "skip_minutes": args.skip_minutes,
                     "skip_above_mvox": args.skip_above_mvox,
                     "min_free_mb": args.min_free_mb,
                     "smoke": args.smoke, "overlap": OVERLAP, "nnunet_mirroring": False},
        "inputs": infos,
        "methods": figures,
        "rows": rows,
        "targets": verdicts,
        "table_markdown": table,
    }
    common.write_json(report, args.out)
    print(f"results -> {args.out}")
    print(f"plot -> {plot_scaling(report, args.plot)}")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
