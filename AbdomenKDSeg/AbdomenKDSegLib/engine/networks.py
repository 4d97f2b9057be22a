"""Residual-USE-Net (teachers T1/T2) and Mobile-Residual-USE-Net (student S) of the paper.

All networks take a float tensor of shape (B, in_channels, Z, Y, X) (z-scored CT, axis order as in
SimpleITK arrays) and return logits of shape (B, num_classes, Z, Y, X). Every spatial size must be
divisible by 2**(n_stages - 1) (16 for the 5-stage networks; 96x64x96 windows qualify).

Layout (5 stages, features 32, 64, 128, 256, 512):

* initial plain 3^3 conv 1 -> 32, InstanceNorm3d(affine) + LeakyReLU(0.01) (plain even when mobile);
* encoder: stage s has s + 1 residual blocks; the first block of stage s >= 1 has stride 2 in its
  first conv (no pooling). Residual block: conv1 (stride) -> IN -> LReLU -> conv2 -> IN, shortcut
  identity or 1^3 conv (no bias) + IN, add, LReLU;
* decoder: 4 levels, each: upsample C_below -> C_skip (ConvTranspose3d k2 s2, or trilinear x2
  align_corners=True + Conv3d k2 'same'; both bias=False), one residual SE module applied to the
  upsampled and to the skip feature (same instance), concat [up, skip], plain block of two
  conv -> IN -> LReLU units (2 C_skip -> C_skip -> C_skip);
* output 1^3 conv 32 -> num_classes, bias=False, no deep supervision.

In the mobile network every 3^3 conv inside encoder and decoder blocks is a depthwise 3^3 conv
(groups=in, bias, carries the stride) followed directly by a pointwise 1^3 conv (bias).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .depthwise_conv import DepthwiseConv3d
from .organs import NUM_CLASSES

__all__ = [
    "NetworkConfig",
    "student_config",
    "teacher1_config",
    "teacher2_config",
    "build_network",
    "init_weights",
    "count_parameters",
    "ResidualUSENet",
    "DepthwiseSeparableConv3d",
    "ResizeConv3d",
    "ResidualSE",
]

UPSAMPLING_MODES = ("transposed", "resize")
NORM_EPS = 1e-5
LRELU_SLOPE = 0.01


@dataclass
class NetworkConfig:
    """Architecture hyper-parameters of a (Mobile-)Residual-USE-Net.

    ``encoder_blocks`` gives the residual blocks per stage; None means stage index + 1 (1, 2, 3, 4, 5).
    ``upsampling`` is "transposed" (ConvTranspose3d) or "resize" (trilinear x2 + Conv3d kernel 2).
    """

    in_channels: int = 1
    num_classes: int = NUM_CLASSES
    base_features: int = 32
    n_stages: int = 5
    max_features: int = 512
    mobile: bool = False
    upsampling: str = "transposed"
    se_reduction: int = 8
    encoder_blocks: Optional[List[int]] = field(default=None)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("in_channels", "num_classes", "base_features", "max_features", "se_reduction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NetworkConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.n_stages, bool) or not isinstance(self.n_stages, int) or self.n_stages < 2:
            raise ValueError(f"NetworkConfig.n_stages must be an integer >= 2, got {self.n_stages!r}")
        if not isinstance(self.mobile, bool):
            raise ValueError(f"NetworkConfig.mobile must be a bool, got {self.mobile!r}")
        if self.upsampling not in UPSAMPLING_MODES:
            raise ValueError(
                f"NetworkConfig.upsampling must be one of {UPSAMPLING_MODES}, got {self.upsampling!r}"
            )
        if self.encoder_blocks is not None:
            blocks = list(self.encoder_blocks)
            if len(blocks) != self.n_stages or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks
            ):
                raise ValueError(
                    f"NetworkConfig.encoder_blocks must list {self.n_stages} positive integers "
                    f"(one per stage), got {self.encoder_blocks!r}"
                )
            self.encoder_blocks = blocks

    @property
    def stage_features(self) -> List[int]:
        """Features per encoder stage: min(base * 2**s, max_features)."""
        return [min(self.base_features * 2**s, self.max_features) for s in range(self.n_stages)]

    @property
    def blocks_per_stage(self) -> List[int]:
        """Residual blocks per encoder stage (default stage index + 1)."""
        if self.encoder_blocks is None:
            return [s + 1 for s in range(self.n_stages)]
        return list(self.encoder_blocks)

    @property
    def size_divisor(self) -> int:
        """Every input spatial size must be a multiple of this (2**(n_stages - 1))."""
        return 2 ** (self.n_stages - 1)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict of all fields."""
        d = dataclasses.asdict(self)
        if d["encoder_blocks"] is not None:
            d["encoder_blocks"] = [int(b) for b in d["encoder_blocks"]]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> NetworkConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"NetworkConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"Unknown NetworkConfig key(s): {', '.join(map(str, unknown))} "
                f"(known: {', '.join(sorted(known))})"
            )
        kwargs = dict(d)
        if kwargs.get("encoder_blocks") is not None:
            kwargs["encoder_blocks"] = list(kwargs["encoder_blocks"])
        return cls(**kwargs)


def student_config(**overrides: Any) -> NetworkConfig:
    """S: Mobile-Residual-USE-Net (depthwise-separable convs, transposed-conv upsampling)."""
    return NetworkConfig(**{"mobile": True, "upsampling": "transposed", **overrides})


def teacher1_config(**overrides: Any) -> NetworkConfig:
    """T1: Residual-USE-Net with transposed-conv upsampling."""
    return NetworkConfig(**{"mobile": False, "upsampling": "transposed", **overrides})


def teacher2_config(**overrides: Any) -> NetworkConfig:
    """T2: Residual-USE-Net with resize-conv upsampling (trilinear x2 + Conv3d kernel 2)."""
    return NetworkConfig(**{"mobile": False, "upsampling": "resize", **overrides})


# --------------------------------------------------------------------------------------------------
# Building blocks


class DepthwiseSeparableConv3d(nn.Module):
    """Depthwise 3^3 conv (groups=in, bias, carries the stride) then pointwise 1^3 conv (bias).

    No norm or activation between the two. (B, C_in, Z, Y, X) -> (B, C_out, Z/s, Y/s, X/s).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = DepthwiseConv3d(in_channels, kernel_size, stride=stride, bias=True)
        self.pointwise = nn.Conv3d(in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def make_block_conv(in_channels: int, out_channels: int, stride: int, mobile: bool) -> nn.Module:
    """3^3 conv (padding 1, bias) used inside encoder/decoder blocks; depthwise-separable if mobile."""
    if mobile:
        return DepthwiseSeparableConv3d(in_channels, out_channels, 3, stride)
    return nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=True)


def make_norm(channels: int) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(channels, eps=NORM_EPS, affine=True)


def make_act() -> nn.LeakyReLU:
    return nn.LeakyReLU(LRELU_SLOPE, inplace=True)


class ConvNormAct(nn.Sequential):
    """conv -> InstanceNorm3d -> LeakyReLU(0.01)."""

    def __init__(self, conv: nn.Module, channels: int) -> None:
        super().__init__()
        self.conv = conv
        self.norm = make_norm(channels)
        self.act = make_act()


class ResidualBlock(nn.Module):
    """Residual encoder block; the stride (if any) is in conv1. Summation before the last LReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, mobile: bool) -> None:
        super().__init__()
        self.conv1 = make_block_conv(in_channels, out_channels, stride, mobile)
        self.norm1 = make_norm(out_channels)
        self.act1 = make_act()
        self.conv2 = make_block_conv(out_channels, out_channels, 1, mobile)
        self.norm2 = make_norm(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), make_norm(out_channels)
            )
        else:
            self.shortcut = nn.Identity()
        self.act2 = make_act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(x)
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + residual)


class PlainBlock(nn.Sequential):
    """Decoder block: two conv -> IN -> LReLU units, in_channels -> out_channels -> out_channels."""

    def __init__(self, in_channels: int, out_channels: int, mobile: bool) -> None:
        super().__init__()
        self.unit1 = ConvNormAct(make_block_conv(in_channels, out_channels, 1, mobile), out_channels)
        self.unit2 = ConvNormAct(make_block_conv(out_channels, out_channels, 1, mobile), out_channels)


class ResidualSE(nn.Module):
    """Residual squeeze-and-excitation (MONAI ResidualSELayer semantics).

    s = ReLU(Linear(LeakyReLU(Linear(mean_ZYX(x))))), returns x * s + x; shape (B, C, Z, Y, X) kept.
    Hidden width C // reduction (at least 1, so tiny test networks work; MONAI would refuse 0).
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.LeakyReLU(LRELU_SLOPE),
            nn.Linear(hidden, channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=(2, 3, 4))  # (B, C)
        scale = self.fc(squeezed)[:, :, None, None, None]
        return x * scale + x


class ResizeConv3d(nn.Module):
    """Trilinear x2 (align_corners=True) then Conv3d kernel 2, stride 1, padding 'same', no bias.

    (B, C_in, Z, Y, X) -> (B, C_out, 2Z, 2Y, 2X). With align_corners=True the interpolation weights
    depend only on input and output sizes, so scale_factor=2 equals resizing to exactly twice the size.
    PyTorch's padding='same' for an even kernel pads one zero at the end of each axis; it is written
    out as F.pad here (same result, no per-call warning, plain ops for export).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=1, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=True)
        return self.conv(F.pad(x, (0, 1, 0, 1, 0, 1)))


def make_upsampling(in_channels: int, out_channels: int, mode: str) -> nn.Module:
    if mode == "transposed":
        return nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2, bias=False)
    if mode == "resize":
        return ResizeConv3d(in_channels, out_channels)
    raise ValueError(f"Unknown upsampling mode {mode!r}; expected one of {UPSAMPLING_MODES}")


# --------------------------------------------------------------------------------------------------
# Network


def _shape_checks_enabled() -> bool:
    """False while tracing / exporting / compiling, where Python shape checks are unwanted."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch.onnx.is_in_onnx_export():
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    return True


class ResidualUSENet(nn.Module):
    """(Mobile-)Residual-USE-Net: (B, in_channels, Z, Y, X) -> logits (B, num_classes, Z, Y, X)."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        feats = cfg.stage_features
        self.initial = ConvNormAct(
            nn.Conv3d(cfg.in_channels, feats[0], 3, stride=1, padding=1, bias=True), feats[0]
        )
        stages = []
        in_ch = feats[0]
        for s, (out_ch, n_blocks) in enumerate(zip(feats, cfg.blocks_per_stage)):
            stride = 1 if s == 0 else 2
            blocks = [ResidualBlock(in_ch, out_ch, stride, cfg.mobile)]
            blocks += [ResidualBlock(out_ch, out_ch, 1, cfg.mobile) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.encoder = nn.ModuleList(stages)
        # Decoder levels ordered deepest first (order of application).
        self.upsample = nn.ModuleList()
        self.se = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for s in range(cfg.n_stages - 2, -1, -1):
            c_below, c_skip = feats[s + 1], feats[s]
            self.upsample.append(make_upsampling(c_below, c_skip, cfg.upsampling))
            self.se.append(ResidualSE(c_skip, cfg.se_reduction))
            self.decoder.append(PlainBlock(2 * c_skip, c_skip, cfg.mobile))
        self.output = nn.Conv3d(feats[0], cfg.num_classes, 1, bias=False)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise InputError (a ValueError) unless x is (B, in_channels, Z, Y, X) with every spatial
        size divisible by 2**(n_stages - 1)."""
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise InputError(
                f"Expected input of shape (B, {self.cfg.in_channels}, Z, Y, X), got {tuple(x.shape)}"
            )
        div = self.cfg.size_divisor
        bad = [int(n) for n in x.shape[2:] if int(n) % div != 0]
        if bad:
            raise InputError(
                f"Input spatial size {tuple(int(n) for n in x.shape[2:])} (Z, Y, X) is not divisible by "
                f"{div} = 2**(n_stages-1) (offending size(s): {bad}); pad or resample the input"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _shape_checks_enabled():
            self.check_input(x)
        x = self.initial(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        n_levels = len(self.decoder)
        for i, (up, se, block) in enumerate(zip(self.upsample, self.se, self.decoder)):
            skip = skips[n_levels - 1 - i]
            x = block(torch.cat([se(up(x)), se(skip)], dim=1))
        return self.output(x)


def init_weights(module: nn.Module) -> None:
    """Xavier-normal on every nn.Conv3d weight (incl. depthwise/pointwise/resize-conv), zero conv biases.

    ConvTranspose3d and Linear layers keep PyTorch's default init. Applied in place.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_network(cfg: NetworkConfig) -> ResidualUSENet:
    """Build the network described by cfg and apply :func:`init_weights`."""
    net = ResidualUSENet(cfg)
    init_weights(net)
    return net


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def xavier_normal_std(weight: torch.Tensor) -> float:
    """Expected std of xavier_normal_ (gain 1) for a weight tensor: sqrt(2 / (fan_in + fan_out))."""
    receptive = int(math.prod(weight.shape[2:])) if weight.dim() > 2 else 1
    fan_in = weight.shape[1] * receptive
    fan_out = weight.shape[0] * receptive
    return math.sqrt(2.0 / (fan_in + fan_out))
