"""Appearance randomisation of a warped CT: contrast phase, organ texture, scanner noise, blur, clipping.

Works on a (Z, Y, X) float HU tensor with its label map on the same grid (the output of anatomy
transfer). Each organ's intensity is moved from the source's measured median to a mean drawn from the
phase table below, with the organ's own texture kept (an additive offset, blended over ~1 voxel at the
organ border); the kidneys get a cortex/medulla split in the arterial and portal phases. Optional
context draws (off by default): the stomach and duodenum re-filled with fluid or oral contrast, with an
air-fluid level, and a fat layer around the organs (the source patient is lean).

HU ranges per phase (means of the organ parenchyma / vessel lumen), from published CT attenuation
values: non-contrast liver 50-65, spleen 40-52, kidney 28-38; late arterial (~35 s) aorta 220-400,
renal cortex 150-250 with medulla 60-110 (corticomedullary phase), pancreas 100-150 (peak
pancreatic enhancement); portal venous (~70 s) liver 95-135, spleen 100-140, kidney 150-220, IVC
120-180, aorta 140-220; delayed (3-5 min) liver 70-95, kidney 110-180, vessels 100-140. Sources:
Bae, Radiology 2010 (intravenous contrast medium administration and scan timing at CT); Yeh et al.,
AJR 2009 (kidney phases); typical values quoted in abdominal CT texts. Ranges are deliberately wide:
they randomise, they do not model one scanner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

Range = Tuple[float, float]

#: Contrast phases and how often each is drawn (portal venous is the most common abdominal protocol).
PHASE_PROBABILITIES: Dict[str, float] = {"non_contrast": 0.2, "arterial": 0.2, "portal_venous": 0.4,
                                          "delayed": 0.2}

#: Mean HU per organ value (FLARE22 labels) and phase; 2/13 are kidney *cortex*; KIDNEY_MEDULLA below.
PHASE_HU: Dict[str, Dict[int, Range]] = {
    "non_contrast": {1: (50, 65), 2: (28, 38), 3: (40, 52), 4: (35, 48), 5: (35, 50), 6: (35, 48),
                     7: (20, 35), 8: (20, 35), 9: (0, 20), 10: (35, 50), 11: (25, 45), 12: (25, 45),
                     13: (28, 38)},
    "arterial": {1: (65, 90), 2: (150, 250), 3: (90, 160), 4: (100, 150), 5: (220, 400), 6: (60, 120),
                 7: (50, 90), 8: (50, 90), 9: (0, 20), 10: (50, 80), 11: (50, 90), 12: (50, 90),
                 13: (150, 250)},
    "portal_venous": {1: (95, 135), 2: (160, 230), 3: (100, 140), 4: (80, 120), 5: (140, 220),
                      6: (120, 180), 7: (50, 90), 8: (50, 90), 9: (0, 25), 10: (50, 80), 11: (55, 95),
                      12: (60, 100), 13: (160, 230)},
    "delayed": {1: (70, 95), 2: (110, 180), 3: (70, 95), 4: (65, 90), 5: (100, 140), 6: (100, 140),
                7: (45, 70), 8: (45, 70), 9: (0, 25), 10: (45, 65), 11: (45, 75), 12: (45, 75),
                13: (110, 180)},
}
#: Renal medulla mean HU per phase (the corticomedullary difference; equal to the cortex when absent).
KIDNEY_MEDULLA: Dict[str, Optional[Range]] = {"non_contrast": None, "arterial": (60, 110),
                                               "portal_venous": (120, 190), "delayed": None}
#: Unlabeled soft tissue (muscle, bowel wall, unlabeled vessels): HU added in contrast phases.
SOFT_TISSUE_SHIFT: Dict[str, Range] = {"non_contrast": (-5, 5), "arterial": (5, 25),
                                       "portal_venous": (10, 35), "delayed": (5, 20)}
KIDNEYS = (2, 13)

# Contents of the stomach and duodenum (the source CT's are nearly collapsed, 6 % gas; real scans show
# them distended with water, food or oral contrast, often with an air-fluid level at the anterior wall
# of a supine patient). Water/chyme 0-35 HU, positive oral contrast (dilute barium/iodine) 150-500 HU.
HOLLOW_ORGANS = (11, 12)
LUMEN_FLUID_HU: Range = (0.0, 35.0)
ORAL_CONTRAST_HU: Range = (150.0, 500.0)
ORAL_CONTRAST_SHARE = 0.25  # of the re-filled images
AIR_FLUID_LEVEL_SHARE = 0.6  # of the re-filled images
GAS_FRACTION: Range = (0.05, 0.5)  # anterior share of the lumen's antero-posterior depth
HOLLOW_WALL_MM: Range = (2.0, 4.0)  # the wall keeps the organ's own appearance
# Visceral and retroperitoneal fat (-120..-70 HU) separating organs from their neighbours: the source
# patient is lean, organs there touch muscle and bowel; many patients have a fat layer instead.
FAT_HU: Range = (-120.0, -70.0)


@dataclass(frozen=True)
class AppearanceRanges:
    """Ranges of the per-image draws (HU, mm, voxels)."""

    noise_hu: Range = (0.0, 35.0)  # std of scanner noise at the output voxel
    noise_corr_vox: Range = (0.0, 1.0)  # Gaussian correlation of the noise (voxels)
    texture_hu: Range = (0.0, 12.0)  # extra organ texture (std, per organ)
    texture_scale_mm: Range = (1.5, 4.0)
    blur_mm: Range = (0.0, 1.2)  # in-plane Gaussian blur (sigma, mm)
    clip_probability: float = 0.35  # store clipped at [-1024, 1023] as some sources do
    kidney_cortex_mm: float = 5.0
    #: (phase, weight) pairs, normalised when drawn; default :data:`PHASE_PROBABILITIES`
    phase_probabilities: Tuple[Tuple[str, float], ...] = tuple(PHASE_PROBABILITIES.items())
    #: chance that the stomach and duodenum are re-filled (:func:`fill_hollow_organs`); 0 = the source's
    #: own contents, warped (the behaviour of the sets made before the option existed)
    hollow_fill_probability: float = 0.0
    #: chance of a fat layer around the organs (:func:`fat_halo`), and its thickness range (mm)
    fat_halo_probability: float = 0.0
    fat_halo_mm: Range = (2.0, 8.0)


@dataclass
class AppearanceDraw:
    """What one image got (written into the generator's report)."""

    phase: str
    organ_hu: Dict[int, float]
    medulla_hu: Optional[float]
    soft_tissue_shift: float
    noise_hu: float
    noise_corr_vox: float
    texture_hu: Dict[int, float]
    texture_scale_mm: float
    blur_mm: float
    slice_thickness_mm: float
    clip: bool
    #: stomach/duodenum contents: None (the source's), or {"content": "fluid"|"oral_contrast", "hu": ..,
    #: "gas_fraction": .. (anterior share of the lumen's depth that is gas), "wall_mm": ..}
    hollow_fill: Optional[Dict[str, Any]] = None
    fat_halo_mm: Optional[float] = None  # thickness of the fat layer around the organs; None: none
    fat_hu: Optional[float] = None


def draw_appearance(rng: np.random.Generator, slice_thickness_mm: float,
                    ranges: AppearanceRanges = AppearanceRanges()) -> AppearanceDraw:
    """Draw one image's appearance; ``slice_thickness_mm`` is drawn by the caller with the grid."""
    phases = [name for name, _ in ranges.phase_probabilities]
    weights = np.array([w for _, w in ranges.phase_probabilities], dtype=np.float64)
    phase = str(rng.choice(phases, p=weights / weights.sum()))
    organ_hu = {k: float(rng.uniform(*r)) for k, r in PHASE_HU[phase].items()}
    medulla = KIDNEY_MEDULLA[phase]
    return AppearanceDraw(
        phase=phase, organ_hu=organ_hu,
        medulla_hu=float(rng.uniform(*medulla)) if medulla else None,
        soft_tissue_shift=float(rng.uniform(*SOFT_TISSUE_SHIFT[phase])),
        noise_hu=float(rng.uniform(*ranges.noise_hu)),
        noise_corr_vox=float(rng.uniform(*ranges.noise_corr_vox)),
        texture_hu={k: float(rng.uniform(*ranges.texture_hu)) for k in organ_hu},
        texture_scale_mm=float(rng.uniform(*ranges.texture_scale_mm)),
        blur_mm=float(rng.uniform(*ranges.blur_mm)),
        slice_thickness_mm=float(slice_thickness_mm),
        clip=bool(rng.uniform() < ranges.clip_probability),
        **_draw_context(rng, ranges),
    )


def _draw_context(rng: np.random.Generator, ranges: AppearanceRanges) -> Dict[str, Any]:
    """The hollow-organ and fat-layer draws; none is drawn when both chances are 0, so the draws of sets
    made before these options existed stay the same."""
    out: Dict[str, Any] = {}
    if ranges.hollow_fill_probability <= 0 and ranges.fat_halo_probability <= 0:
        return out
    if rng.uniform() < ranges.hollow_fill_probability:
        oral = rng.uniform() < ORAL_CONTRAST_SHARE
        out["hollow_fill"] = {
            "content": "oral_contrast" if oral else "fluid",
            "hu": float(rng.uniform(*(ORAL_CONTRAST_HU if oral else LUMEN_FLUID_HU))),
            "gas_fraction": float(rng.uniform(*GAS_FRACTION)) if rng.uniform() < AIR_FLUID_LEVEL_SHARE else 0.0,
            "wall_mm": float(rng.uniform(*HOLLOW_WALL_MM)),
        }
    if rng.uniform() < ranges.fat_halo_probability:
        out["fat_halo_mm"] = float(rng.uniform(*ranges.fat_halo_mm))
        out["fat_hu"] = float(rng.uniform(*FAT_HU))
    return out


def source_organ_medians(image: np.ndarray, labels: np.ndarray, organs: Sequence[int]) -> Dict[int, float]:
    """Median HU of each organ of the source, inside the organ eroded by one voxel where that leaves
    at least 50 voxels (partial volume at the border would bias it)."""
    lab = torch.as_tensor(labels.astype(np.int64))
    out = {}
    for value in organs:
        mask = lab == value
        if not mask.any():
            continue
        eroded = -F.max_pool3d(-(mask.float()[None, None]), 3, stride=1, padding=1)[0, 0] > 0.5
        use = eroded if int(eroded.sum()) >= 50 else mask
        out[int(value)] = float(np.median(image[use.numpy()]))
    return out


def _smooth(volume: torch.Tensor, sigma_vox: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian with per-axis sigma (voxels; 0 = no smoothing on that axis)."""
    out = volume[None, None]
    for axis, s in enumerate(sigma_vox):
        if s <= 0.05:
            continue
        radius = max(1, int(3.0 * s + 0.5))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / s) ** 2)
        k = k / k.sum()
        shape = [1, 1, 1]
        shape[axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(1, 1, *shape))
    return out[0, 0]


def correlated_noise(shape: Sequence[int], sigma_vox: Sequence[float], gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise of unit std, correlated by a Gaussian of ``sigma_vox`` per axis."""
    noise = _smooth(torch.randn(tuple(shape), generator=gen), sigma_vox)
    return noise / noise.std().clamp_min(1e-6)


def apply_appearance(image: torch.Tensor, labels: torch.Tensor, spacing: Sequence[float],
                     source_hu: Dict[int, float], draw: AppearanceDraw, gen: torch.Generator,
                     source_thickness_mm: float = 3.0, ranges: AppearanceRanges = AppearanceRanges()
                     ) -> torch.Tensor:
    """The randomised image (Z, Y, X) float HU; ``labels`` (Z, Y, X) int on the same grid (mm spacing)."""
    spacing = [float(s) for s in spacing]
    offset = torch.zeros_like(image)
    lab = labels.long()
    for value, target_hu in draw.organ_hu.items():
        if value in source_hu:
            offset[lab == value] = target_hu - source_hu[value]
    if draw.medulla_hu is not None:
        for value in KIDNEYS:
            if value not in source_hu:
                continue
            offset[_erode(lab == value, spacing, ranges.kidney_cortex_mm)] = draw.medulla_hu - source_hu[value]
    background = (lab == 0) & (image > -30) & (image < 150)
    offset[background] = draw.soft_tissue_shift
    not_gas = (image > -200).float()  # gas inside the stomach / bowel does not enhance
    out = image + _smooth(offset, [0.6] * 3) * not_gas
    texture = correlated_noise(image.shape, [draw.texture_scale_mm / s for s in spacing], gen)
    tex_std = torch.zeros_like(image)
    for value, std in draw.texture_hu.items():
        tex_std[lab == value] = std
    out = out + texture * _smooth(tex_std, [0.6] * 3) * not_gas
    if draw.fat_halo_mm is not None and draw.fat_hu is not None:
        out = fat_halo(out, lab, spacing, draw.fat_halo_mm, draw.fat_hu, texture)
    if draw.hollow_fill is not None:
        out = fill_hollow_organs(out, lab, spacing, draw.hollow_fill, gen)
    # acquisition: in-plane blur, thicker slices than the source, noise, clipping
    z_sigma_mm = math.sqrt(max(draw.slice_thickness_mm ** 2 - source_thickness_mm ** 2, 0.0)) / 2.355
    out = _smooth(out, [z_sigma_mm / spacing[0], draw.blur_mm / spacing[1], draw.blur_mm / spacing[2]])
    if draw.noise_hu > 0:
        out = out + draw.noise_hu * correlated_noise(image.shape, [draw.noise_corr_vox] * 3, gen)
    lo, hi = (-1024.0, 1023.0) if draw.clip else (-1024.0, 3071.0)
    return out.clamp(lo, hi)


def _dilate(mask: torch.Tensor, spacing: Sequence[float], mm: float) -> torch.Tensor:
    """Binary dilation of a (Z, Y, X) bool mask by a box of half-width ``mm`` (per axis in voxels)."""
    radius = [max(1, int(round(mm / s))) for s in spacing]
    return F.max_pool3d(mask.float()[None, None], [2 * r + 1 for r in radius], stride=1, padding=radius)[0, 0] > 0.5


def _erode(mask: torch.Tensor, spacing: Sequence[float], mm: float) -> torch.Tensor:
    """Binary erosion of a (Z, Y, X) bool mask by a box of half-width ``mm``."""
    return ~_dilate(~mask, spacing, mm)


def fat_halo(image: torch.Tensor, labels: torch.Tensor, spacing: Sequence[float], thickness_mm: float,
             fat_hu: float, texture: torch.Tensor) -> torch.Tensor:
    """Unlabeled soft tissue (-30..150 HU) within ``thickness_mm`` of any organ becomes fat of mean
    ``fat_hu`` (with the image's texture field at 8 HU), blended over ~1 voxel into the soft tissue
    beyond (gas, bone and the organs themselves are never changed). Labels are unchanged: the organs
    keep their shape, their neighbourhood changes. (Z, Y, X) float HU in and out."""
    organs = labels > 0
    soft = (image > -30) & (image < 150)
    shell = _dilate(organs, spacing, thickness_mm) & ~organs & soft
    weight = _smooth(shell.float(), [0.6] * 3) * (soft & ~organs).float()
    return image * (1 - weight) + (fat_hu + 8.0 * texture) * weight


def fill_hollow_organs(image: torch.Tensor, labels: torch.Tensor, spacing: Sequence[float], fill: Dict[str, Any],
                       gen: torch.Generator) -> torch.Tensor:
    """Re-fill the lumen of the stomach and duodenum (:data:`HOLLOW_ORGANS`; the organ eroded by
    ``fill["wall_mm"]``) with ``fill["hu"]`` (+ 6 HU noise); with ``gas_fraction`` > 0 the anterior
    part of each lumen (low Y: the canonical frame's Y runs anterior -> posterior; a supine patient's
    gas rises to the anterior wall) is gas, -1000 HU, in front of one horizontal (coronal) level per organ.
    Labels are unchanged (contents belong to the organ). (Z, Y, X) float HU in and out."""
    out = image.clone()
    for value in HOLLOW_ORGANS:
        organ = labels == value
        if int(organ.sum()) == 0:
            continue
        lumen = _erode(organ, spacing, fill["wall_mm"])
        if int(lumen.sum()) == 0:
            continue
        noise = 6.0 * torch.randn(int(lumen.sum()), generator=gen)
        out[lumen] = fill["hu"] + noise
        if fill["gas_fraction"] > 0:
            ys = torch.nonzero(lumen)[:, 1]
            lo, hi = int(ys.min()), int(ys.max())
            level = lo + fill["gas_fraction"] * (hi - lo + 1)
            rows = torch.arange(image.shape[1], dtype=torch.float32)[None, :, None]
            gas = lumen & (rows < level)
            out[gas] = -1000.0 + 15.0 * torch.randn(int(gas.sum()), generator=gen)
    return out
