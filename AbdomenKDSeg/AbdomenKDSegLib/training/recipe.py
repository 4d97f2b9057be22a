"""Training recipes: one dataclass holds every hyperparameter; defaults are the paper's values.

A recipe file (YAML) overrides fields by name; an unknown key is an error. Table 3 ablation variants
of the paper are named presets of a few switches (:class:`Variant`) of the same training loop.
Sizes are (Z, Y, X) voxels; HU values are Hounsfield units.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..engine.preprocess import Preprocessing
from ..errors import AbdomenKDSegError

#: The paper's preprocessing, the source of the recipe's data-geometry defaults.
_PRE = Preprocessing()


class RecipeError(AbdomenKDSegError, ValueError):
    """A recipe file or value is invalid (unknown key, wrong type, unknown variant)."""


@dataclass(frozen=True)
class Variant:
    """Which networks exist and which loss terms are on (one row of the paper's Table 3).

    Roles: ``S`` is the student (Mobile-Residual-USE-Net); ``T1`` and ``T2`` are the two teachers
    (T1 transposed-conv decoder, T2 resize-conv decoder unless ``teacher2_upsampling`` says otherwise).
    For CTS the two "teachers" use the student architecture and no separate student exists.
    ``export`` names the network used at inference (written to the bundle).
    """

    name: str
    n_teachers: int
    student: bool
    teacher_arch: str = "teacher"  # "teacher" (Residual-USE-Net) or "student" (mobile, for CTS)
    teacher2_upsampling: str = "resize"
    unlabeled: bool = False
    kd: bool = False
    psv: bool = False
    cross_teaching: bool = False
    export: str = "S"
    description: str = ""

    @property
    def roles(self) -> Tuple[str, ...]:
        """Network roles in a fixed order: S first (if any), then T1, T2."""
        roles = ("S",) if self.student else ()
        return roles + ("T1", "T2")[: self.n_teachers]


VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("fsl", 0, True, description="fully supervised student, labeled data only"),
        Variant("kd_single", 1, True, kd=True, description="one teacher, KD on labeled data only"),
        Variant("ssl_single_kd", 1, True, unlabeled=True, kd=True,
                description="one teacher + student, KD on labeled and unlabeled data"),
        Variant("ssl_single_psv", 1, True, unlabeled=True, psv=True,
                description="one teacher + student, pseudo-supervision of S on unlabeled data"),
        Variant("ssl_single_kd_psv", 1, True, unlabeled=True, kd=True, psv=True,
                description="one teacher + student, KD and pseudo-supervision"),
        Variant("cts", 2, False, teacher_arch="student", unlabeled=True, cross_teaching=True, export="T1",
                description="cross teaching between two students (transposed / resize decoders); "
                            "the transposed-conv one is exported"),
        Variant("ctt_psv", 2, True, unlabeled=True, psv=True, cross_teaching=True,
                description="cross-teaching teachers + pseudo-supervision, no KD"),
        Variant("ctt_kd", 2, True, unlabeled=True, kd=True, cross_teaching=True,
                description="cross-teaching teachers + KD, no pseudo-supervision"),
        Variant("ctt_sd", 2, True, teacher2_upsampling="transposed", unlabeled=True, kd=True, psv=True,
                cross_teaching=True, description="proposed, but both teachers use transposed convs"),
        Variant("proposed", 2, True, unlabeled=True, kd=True, psv=True, cross_teaching=True,
                description="KD from cross-teaching teachers + pseudo-supervision (the paper's method)"),
    )
}


@dataclass
class AugmentConfig:
    """Augmentation "v4" (:mod:`training.augment`); ``name: none`` = crop, clip, z-score and one-hot only."""

    name: str = "v4"
    hu_shift: float = 1024.0  # added before padding/warping so that zero padding is -1024 HU
    pad_factor: float = 1.25  # centre-pad to round(pad_factor * patch_size)
    elastic_p: float = 0.5
    elastic_grid: int = 16  # control points per axis
    elastic_sigma: Tuple[float, float] = (1.5, 2.0)  # sigma = 2 * U(0.75, 1), grid units
    scale_p: float = 0.5  # per axis
    scale_major: Tuple[float, float] = (0.5, 2.0)  # the range the reference labels "z"
    scale_minor: Tuple[float, float] = (0.8, 1.25)  # the ranges labelled "y" and "x"
    # "reference": as executed by the reference code, scale_major acts on the last array axis (X) and
    # the range labelled "x" on Z; "labelled": scale_major acts on Z as the code's names suggest.
    scale_axis: str = "reference"
    rotate_p: float = 0.5  # per axis
    rotate_deg: float = 15.0
    noise_std_max: float = 0.1  # additive Gaussian noise, std ~ U(0, noise_std_max), always applied
    brightness_p: float = 0.5
    brightness: Tuple[float, float] = (0.75, 1.25)
    background_eps: float = 1e-7


@dataclass
class Recipe:
    """Every training hyperparameter. Defaults reproduce the paper / reference FLARE22 run."""

    variant: str = "proposed"
    coarse_variant: Optional[str] = None  # None: same as ``variant`` (Table 3 ablations: "proposed")
    epochs: int = 1000
    coarse_epochs: Optional[int] = None  # None: ``epochs``
    fine_epochs: Optional[int] = None  # None: ``epochs``
    batch_size: int = 1
    # optimisation (one optimizer over S, T1, T2 together; poly schedule stepped once per epoch).
    # "sgd" is the paper's; "adam" (Adam with L2 weight decay; momentum/nesterov unused) is for short CPU runs
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    # loss weights: lambda(t) = lambda0 * exp(-5 (1 - t/t_max)^2), t = epoch
    lambda_dis: float = 10.0
    lambda_ssl: float = 0.1
    rampup_epochs: Optional[int] = None  # t_max; None: the stage's epoch count
    # "reference": unlabeled KL weight lambda_dis0 * r^2 (reference code); "paper": the paper's formula,
    # lambda_ssl0 * lambda_dis0 * r^2
    unlabeled_kl_weight: str = "reference"
    kd_temperature: float = 1.0
    dice_smooth: float = 1e-5
    focal_alpha: float = 0.5
    focal_gamma: float = 2.0
    focal_smooth: float = 1e-5
    # data geometry, (Z, Y, X)
    # (defaults from :class:`Preprocessing`; :attr:`preprocessing` gives the bundle's block)
    coarse_size: Tuple[int, int, int] = _PRE.coarse_size_zyx
    fine_size: Tuple[int, int, int] = _PRE.fine_size_zyx
    patch_size: Tuple[int, int, int] = _PRE.window_zyx
    hu_window: Tuple[float, float] = _PRE.hu_window
    zscore_eps: float = 1e-5
    fine_padding: float = _PRE.crop_padding  # box scaled about its centre (reference 1.1 = 5% per side)
    fine_fallback_mm: Tuple[float, float, float] = _PRE.fallback_box_mm_zyx
    # scans and organ crops shorter than this (mm, head to foot) are padded to it by repeating their end
    # slices before resizing, in training as at inference; 0 = the reference (never reached on FLARE22)
    min_z_extent_mm: float = _PRE.min_z_extent_mm
    # folds over labeled cases: -1 = all labeled cases (reference); else KFold(n_folds, shuffle, fold_seed)
    fold: int = -1
    n_folds: int = 5
    fold_seed: int = 12345
    # network overrides (keyword arguments of networks.student_config / teacher1_config / teacher2_config)
    student: Dict[str, Any] = field(default_factory=dict)
    # fine-tuning: a model bundle (.safetensors) whose coarse and fine networks start the exported
    # network of each stage (S; T1 for CTS) instead of random weights; None: the paper's random init
    init_from: Optional[str] = None
    teacher: Dict[str, Any] = field(default_factory=dict)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    amp: bool = True  # mixed precision on CUDA (always fp32 on CPU)
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise resume on CPU)
    checkpoint_every_steps: int = 0  # 0: only at epoch ends
    checkpoint_every_epochs: int = 1  # the "latest" checkpoint (atomic, overwritten)
    snapshot_every_epochs: int = 250  # kept copies (reference: weights every 250 epochs)

    # ------------------------------------------------------------------ helpers
    @property
    def preprocessing(self) -> Preprocessing:
        """The inference settings this recipe trains for (stored in the bundle): its sizes, HU window
        and crop box; inference windows have the fine size."""
        return dataclasses.replace(_PRE, hu_window=self.hu_window, coarse_size_zyx=self.coarse_size,
                                   fine_size_zyx=self.fine_size, window_zyx=self.fine_size,
                                   crop_padding=self.fine_padding, fallback_box_mm_zyx=self.fine_fallback_mm,
                                   min_z_extent_mm=self.min_z_extent_mm)

    def stage_variant(self, stage: str) -> Variant:
        """The :class:`Variant` trained in ``stage`` ("coarse" or "fine")."""
        name = self.variant
        if stage == "coarse" and self.coarse_variant is not None:
            name = self.coarse_variant
        return VARIANTS[name]

    def stage_epochs(self, stage: str) -> int:
        """Number of epochs of ``stage``."""
        value = self.coarse_epochs if stage == "coarse" else self.fine_epochs
        return int(self.epochs if value is None else value)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON/YAML-serialisable dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> Recipe:
        """Build from a dict; unknown keys or wrong types raise :class:`RecipeError`."""
        recipe = _build(cls, data, "recipe")
        recipe.validate()
        return recipe

    def validate(self) -> None:
        """Raise :class:`RecipeError` on inconsistent values."""
        for key in ("variant", "coarse_variant"):
            name = getattr(self, key)
            if name is not None and name not in VARIANTS:
                raise RecipeError(f"unknown {key} {name!r}; known variants: {', '.join(VARIANTS)}")
        choices = {
            "unlabeled_kl_weight": ("reference", "paper"),
            "optimizer": ("sgd", "adam"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise RecipeError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.augment.name not in ("v4", "none"):
            raise RecipeError(f"augment.name must be 'v4' or 'none', got {self.augment.name!r}")
        if self.augment.scale_axis not in ("reference", "labelled"):
            raise RecipeError(f"augment.scale_axis must be 'reference' or 'labelled', got "
                              f"{self.augment.scale_axis!r}")
        if not self.lr > 0:
            raise RecipeError(f"lr must be > 0, got {self.lr}")
        positive = ("epochs", "batch_size", "n_folds")
        for key in positive:
            if getattr(self, key) < 1:
                raise RecipeError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("coarse_epochs", "fine_epochs", "rampup_epochs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise RecipeError(f"{key} must be >= 1 or null, got {value}")
        if not -1 <= self.fold < self.n_folds:
            raise RecipeError(f"fold must be -1 or in 0..{self.n_folds - 1}, got {self.fold}")
        if self.hu_window[0] >= self.hu_window[1]:
            raise RecipeError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        if self.fine_padding < 1.0:
            raise RecipeError(f"fine_padding must be >= 1, got {self.fine_padding}")
        for key in ("coarse_size", "fine_size", "patch_size"):
            if min(getattr(self, key)) < 8:
                raise RecipeError(f"{key} must be at least 8 voxels per axis, got {getattr(self, key)}")
        if any(p > c for p, c in zip(self.patch_size, self.coarse_size)):
            raise RecipeError(f"patch_size {self.patch_size} is larger than coarse_size {self.coarse_size}")
        if any(p > f for p, f in zip(self.patch_size, self.fine_size)):
            raise RecipeError(f"patch_size {self.patch_size} is larger than fine_size {self.fine_size} "
                              "(inference windows have the fine size)")


def load_recipe(path: str | Path | None = None, overrides: Optional[Dict[str, Any]] = None) -> Recipe:
    """Read a YAML recipe (``None``: all defaults) and apply ``overrides`` (a dict) on top."""
    import yaml

    data: Dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        with path.open("r", encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"recipe {path} must be a YAML mapping, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = _merge(data, overrides)
    try:
        return Recipe.from_dict(data)
    except RecipeError as exc:
        where = f" in {path}" if path is not None else ""
        raise RecipeError(f"{exc}{where}") from None


def as_recipe(config: Recipe | Dict[str, Any] | str | Path | None) -> Recipe:
    """Accept a :class:`Recipe`, a dict, a YAML path or ``None`` (defaults)."""
    if isinstance(config, Recipe):
        config.validate()
        return config
    if isinstance(config, dict):
        return Recipe.from_dict(config)
    return load_recipe(config)


# ---------------------------------------------------------------------------- internals
def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key == "augment":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecipeError(f"unknown key(s) in {where}: {', '.join(map(str, unknown))}; "
                          f"known keys: {', '.join(sorted(names))}")
    kwargs = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is Any:
        return value
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RecipeError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {value!r}")
        return value
    raise RecipeError(f"{where}: unsupported type {hint!r}")  # pragma: no cover
