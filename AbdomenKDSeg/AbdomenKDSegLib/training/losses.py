"""Loss terms of the paper (Dice + Focal supervision, cross-teaching pseudo labels, distillation)
and their per-step combination for every recipe variant.

Tensors: logits and probabilities are (B, C, Z, Y, X) with C = 14 (background + 13 organs); class
index maps are (B, Z, Y, X) int64. All losses are computed in float32.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .recipe import Recipe, Variant


def sigmoid_rampup(epoch: float, t_max: float) -> float:
    """SSL4MIS ramp-up ``exp(-5 (1 - t/t_max)^2)`` with ``t`` clipped to [0, t_max]; 1 if t_max is 0."""
    if t_max <= 0:
        return 1.0
    t = min(max(float(epoch), 0.0), float(t_max))
    phase = 1.0 - t / float(t_max)
    return float(math.exp(-5.0 * phase * phase))


def one_hot(index: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, Z, Y, X) int -> (B, C, Z, Y, X) one-hot of ``dtype``."""
    return F.one_hot(index.long(), num_classes).movedim(-1, 1).to(dtype)


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                   include_background: bool = False) -> torch.Tensor:
    """nnU-Net SoftDiceLoss (batch dice): ``-mean_c (2 tp + s) / (2 tp + fp + fn + s + 1e-8)``.

    ``probs`` (B, C, ...) softmax probabilities; ``target`` (B, ...) class indices. Sums run over the
    batch and all voxels; the mean runs over classes 1..C-1 (background excluded by default), absent
    classes included. Returns the negative mean Dice (not 1 - Dice).
    """
    y = one_hot(target, probs.shape[1], probs.dtype)
    axes = [0] + list(range(2, probs.ndim))
    tp = (probs * y).sum(axes)
    fp = (probs * (1.0 - y)).sum(axes)
    fn = ((1.0 - probs) * y).sum(axes)
    dc = (2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth + 1e-8)
    if not include_background:
        dc = dc[1:]
    return -dc.mean()


def focal_loss(probs: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, gamma: float = 2.0,
               smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on softmax probabilities (SegLoss ``FocalLoss``), mean over all voxels.

    The one-hot target is clamped to ``[smooth/(C-1), 1-smooth]``; ``pt = sum_c onehot_c p_c + smooth``;
    loss ``= -alpha (1-pt)^gamma log(pt)`` with the same ``alpha`` for every class.
    """
    num_classes = probs.shape[1]
    y = one_hot(target, num_classes, probs.dtype)
    if smooth:
        y = y.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    pt = (y * probs).sum(1) + smooth
    loss = -alpha * (1.0 - pt).pow(gamma) * pt.log()
    return loss.mean()


def seg_loss(logits: torch.Tensor, soft_target: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Supervised Lseg = Dice + Focal on softmax(logits) against argmax of the soft one-hot target."""
    probs = torch.softmax(logits.float(), dim=1)
    index = soft_target.argmax(1)
    return (soft_dice_loss(probs, index, recipe.dice_smooth)
            + focal_loss(probs, index, recipe.focal_alpha, recipe.focal_gamma, recipe.focal_smooth))


def hard_dice_loss(logits: torch.Tensor, teacher_probs: Sequence[torch.Tensor],
                   smooth: float = 1e-5) -> torch.Tensor:
    """Dice of softmax(logits) against argmax of the mean of the (detached) teacher probabilities."""
    mean = torch.stack([p.detach().float() for p in teacher_probs]).mean(0)
    return soft_dice_loss(torch.softmax(logits.float(), dim=1), mean.argmax(1), smooth)


def kl_distillation(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor],
                    temperature: float = 1.0) -> torch.Tensor:
    """KL(mean_T softmax(T/τ) || softmax(S/τ)) summed over classes, averaged over batch and voxels, ×τ².

    ``F.kl_div(log_softmax(S), P_T, reduction='batchmean') / n_voxels``; teachers are detached.
    """
    tau = float(temperature)
    p_t = torch.stack([torch.softmax(t.detach().float() / tau, dim=1) for t in teacher_logits]).mean(0)
    log_s = torch.log_softmax(student_logits.float() / tau, dim=1)
    n_voxels = student_logits[0, 0].numel()
    return F.kl_div(log_s, p_t, reduction="batchmean") / n_voxels * (tau * tau)


def loss_weights(recipe: Recipe, epoch: int, t_max: int) -> Dict[str, float]:
    """Ramp ``r`` and the weights of one epoch: λdis = λdis0·r, λssl = λssl0·r, unlabeled KL weight."""
    r = sigmoid_rampup(epoch, t_max)
    if recipe.unlabeled_kl_weight == "reference":
        kl_u = recipe.lambda_dis * r * r
    else:  # "paper": λssl(t)·λdis(t)
        kl_u = recipe.lambda_ssl * recipe.lambda_dis * r * r
    return {"ramp": r, "lambda_dis": recipe.lambda_dis * r, "lambda_ssl": recipe.lambda_ssl * r,
            "lambda_kl_unlabeled": kl_u}


def step_loss(variant: Variant, logits: Dict[str, torch.Tensor], soft_target: Optional[torch.Tensor],
              weights: Dict[str, float], recipe: Recipe) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Total loss of one step and its terms (floats, unweighted) for logging.

    ``logits``: role ("S", "T1", "T2") -> (B, C, Z, Y, X). ``soft_target`` (B, C, Z, Y, X) for a labeled
    step, ``None`` for an unlabeled one.

    Labeled: sum of Lseg over all networks + [kd] λdis·KL(mean T → S).
    Unlabeled: λssl·([ct] HD(T1, T2) + HD(T2, T1) + [psv] HD(S, mean T)) + [kd] w_kl_u·KL(mean T → S).
    """
    terms: Dict[str, torch.Tensor] = {}
    total = logits[variant.roles[0]].new_zeros((), dtype=torch.float32)
    teachers: List[torch.Tensor] = [logits[r] for r in ("T1", "T2") if r in logits and r != "S"]
    distill = variant.kd and variant.student and teachers
    if soft_target is not None:
        for role in variant.roles:
            terms[f"seg_{role}"] = seg_loss(logits[role], soft_target, recipe)
            total = total + terms[f"seg_{role}"]
        if distill:
            terms["kl"] = kl_distillation(logits["S"], teachers, recipe.kd_temperature)
            total = total + weights["lambda_dis"] * terms["kl"]
        return total, {k: float(v.detach()) for k, v in terms.items()}

    probs = {r: torch.softmax(logits[r].detach().float(), dim=1) for r in ("T1", "T2") if r in logits}
    consistency = total.new_zeros(())
    if variant.cross_teaching:
        terms["ct_T1"] = hard_dice_loss(logits["T1"], [probs["T2"]], recipe.dice_smooth)
        terms["ct_T2"] = hard_dice_loss(logits["T2"], [probs["T1"]], recipe.dice_smooth)
        consistency = consistency + terms["ct_T1"] + terms["ct_T2"]
    if variant.psv:
        terms["psv"] = hard_dice_loss(logits["S"], [probs[r] for r in ("T1", "T2") if r in probs],
                                      recipe.dice_smooth)
        consistency = consistency + terms["psv"]
    total = total + weights["lambda_ssl"] * consistency
    if distill:
        terms["kl"] = kl_distillation(logits["S"], teachers, recipe.kd_temperature)
        total = total + weights["lambda_kl_unlabeled"] * terms["kl"]
    return total, {k: float(v.detach()) for k, v in terms.items()}
