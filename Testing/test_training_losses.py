"""Loss terms of METHOD.md §2 against values computed by hand, step totals per variant, gradient flow."""

from __future__ import annotations

import math

import pytest
import torch

from AbdomenKDSegLib.engine.networks import build_network, student_config, teacher1_config, teacher2_config
from AbdomenKDSegLib.training.losses import (
    focal_loss,
    hard_dice_loss,
    kl_distillation,
    loss_weights,
    seg_loss,
    sigmoid_rampup,
    soft_dice_loss,
    step_loss,
)
from AbdomenKDSegLib.training.recipe import VARIANTS, Recipe

torch.set_num_threads(1)

# 4 voxels x 3 classes, written per voxel; targets per voxel
P = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]]
T = [0, 1, 2, 1]


def as_probs(rows):
    """(voxels, C) python lists -> (1, C, voxels, 1, 1) tensor."""
    return torch.tensor(rows, dtype=torch.float64).t().reshape(1, len(rows[0]), len(rows), 1, 1)


def as_index(values):
    return torch.tensor(values).reshape(1, len(values), 1, 1)


def hand_dice(p, t, smooth=1e-5, classes=None):
    c_all = len(p[0])
    classes = classes if classes is not None else range(1, c_all)
    dices = []
    for c in classes:
        tp = sum(p[v][c] for v in range(len(p)) if t[v] == c)
        fp = sum(p[v][c] for v in range(len(p)) if t[v] != c)
        fn = sum(1 - p[v][c] for v in range(len(p)) if t[v] == c)
        dices.append((2 * tp + smooth) / (2 * tp + fp + fn + smooth + 1e-8))
    return -sum(dices) / len(dices)


def test_soft_dice_excludes_background_and_is_negative_mean():
    # class 1: tp 1.1, fp 0.4, fn 0.9 -> 2.2/3.5; class 2: tp 0.6, fp 0.4, fn 0.4 -> 1.2/2.0
    expected = -((2.2 + 1e-5) / (3.5 + 1e-5 + 1e-8) + (1.2 + 1e-5) / (2.0 + 1e-5 + 1e-8)) / 2
    got = soft_dice_loss(as_probs(P), as_index(T), smooth=1e-5)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(hand_dice(P, T), rel=1e-12)
    with_bg = soft_dice_loss(as_probs(P), as_index(T), include_background=True)
    assert with_bg.item() == pytest.approx(hand_dice(P, T, classes=range(3)), rel=1e-9)
    assert with_bg.item() != pytest.approx(got.item())


def test_soft_dice_counts_absent_classes():
    # every voxel background: classes 1 and 2 are absent but still averaged (Dice ~ smooth / fp)
    t = [0, 0, 0, 0]
    fp1, fp2 = 0.2 + 0.8 + 0.2 + 0.3, 0.1 + 0.1 + 0.6 + 0.2
    expected = -(1e-5 / (fp1 + 1e-5 + 1e-8) + 1e-5 / (fp2 + 1e-5 + 1e-8)) / 2
    assert soft_dice_loss(as_probs(P), as_index(t)).item() == pytest.approx(expected, rel=1e-9)


def test_soft_dice_batch_dice_sums_over_batch():
    # batch of two single-voxel samples = one two-voxel sample (batch_dice=True)
    two = soft_dice_loss(as_probs(P[:2]), as_index(T[:2]))
    batch = torch.cat([as_probs(P[:1]), as_probs(P[1:2])], dim=0)
    idx = torch.cat([as_index(T[:1]), as_index(T[1:2])], dim=0)
    assert soft_dice_loss(batch, idx).item() == pytest.approx(two.item(), rel=1e-12)


def test_focal_matches_hand_computation():
    c, s = 3, 1e-5
    losses = []
    for probs, target in zip(P, T):
        onehot = [min(max(1.0 if k == target else 0.0, s / (c - 1)), 1 - s) for k in range(c)]
        pt = sum(o * p for o, p in zip(onehot, probs)) + s
        losses.append(-0.5 * (1 - pt) ** 2 * math.log(pt))
    expected = sum(losses) / len(losses)
    got = focal_loss(as_probs(P), as_index(T), alpha=0.5, gamma=2.0, smooth=1e-5)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    # gamma 0, alpha 1, no smoothing = cross-entropy on probabilities
    ce = -sum(math.log(p[t]) for p, t in zip(P, T)) / 4
    assert focal_loss(as_probs(P), as_index(T), alpha=1.0, gamma=0.0, smooth=0.0).item() == \
        pytest.approx(ce, rel=1e-9)


def test_focal_label_smoothing_uses_14_classes():
    # 14 classes: off-target one-hot entries are clamped to 1e-5/13
    probs = [[1 / 14] * 14]
    onehot = [1 - 1e-5] + [1e-5 / 13] * 13
    pt = sum(o * p for o, p in zip(onehot, probs[0])) + 1e-5
    expected = -0.5 * (1 - pt) ** 2 * math.log(pt)
    assert focal_loss(as_probs(probs), as_index([0])).item() == pytest.approx(expected, rel=1e-9)


def test_seg_loss_takes_argmax_of_soft_targets():
    recipe = Recipe()
    logits = torch.log(as_probs(P)).float()
    soft = as_probs([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]]).float()  # argmax = T
    expected = hand_dice(P, T) + focal_loss(as_probs(P), as_index(T)).item()
    assert seg_loss(logits, soft, recipe).item() == pytest.approx(expected, rel=1e-5)


def test_hard_dice_uses_argmax_of_teacher_mean():
    t1 = [[0.5, 0.45, 0.05]] * 4  # argmax 0
    t2 = [[0.05, 0.45, 0.5]] * 4  # argmax 2; the mean [0.275, 0.45, 0.275] has argmax 1
    logits = torch.log(as_probs(P))
    got = hard_dice_loss(logits, [as_probs(t1), as_probs(t2)])
    assert got.item() == pytest.approx(hand_dice(P, [1, 1, 1, 1]), rel=1e-6)
    single = hard_dice_loss(logits, [as_probs(t1)])
    assert single.item() == pytest.approx(hand_dice(P, [0, 0, 0, 0]), rel=1e-6)


def test_kl_direction_and_reduction():
    s = [[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]]
    t1 = [[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]]
    t2 = [[0.4, 0.3, 0.3], [0.2, 0.6, 0.2]]
    mean = [[(a + b) / 2 for a, b in zip(r1, r2)] for r1, r2 in zip(t1, t2)]
    per_voxel = [sum(m * (math.log(m) - math.log(q)) for m, q in zip(mr, sr)) for mr, sr in zip(mean, s)]
    expected = sum(per_voxel) / 2  # KL(P_T || P_S) summed over classes, averaged over voxels
    reverse = sum(sum(q * (math.log(q) - math.log(m)) for m, q in zip(mr, sr)) for mr, sr in zip(mean, s)) / 2
    got = kl_distillation(torch.log(as_probs(s)), [torch.log(as_probs(t1)), torch.log(as_probs(t2))])
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert abs(expected - reverse) > 1e-3  # the direction matters for this example
    # batch of 2 samples: batchmean / voxels = mean over samples and voxels
    sb = torch.cat([torch.log(as_probs(s[:1])), torch.log(as_probs(s[1:]))])
    tb = [torch.cat([torch.log(as_probs(t[:1])), torch.log(as_probs(t[1:]))]) for t in (t1, t2)]
    assert kl_distillation(sb, tb).item() == pytest.approx(expected, rel=1e-6)


def test_kl_temperature_scales_by_tau_squared():
    s = torch.randn(1, 3, 2, 1, 1, dtype=torch.float64)
    t = torch.randn(1, 3, 2, 1, 1, dtype=torch.float64)
    tau = 2.0
    direct = kl_distillation(s / tau, [t / tau], 1.0) * tau * tau
    assert kl_distillation(s, [t], tau).item() == pytest.approx(direct.item(), rel=1e-6)


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 1000) == pytest.approx(math.exp(-5), rel=1e-12)  # 0.0067
    assert sigmoid_rampup(500, 1000) == pytest.approx(math.exp(-5 * 0.25), rel=1e-12)  # 0.2865
    assert sigmoid_rampup(1000, 1000) == 1.0
    assert sigmoid_rampup(2000, 1000) == 1.0  # clipped
    assert sigmoid_rampup(-3, 1000) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(3, 0) == 1.0


def test_loss_weights_reference_and_paper():
    r = math.exp(-5 * 0.25)
    w = loss_weights(Recipe(), 500, 1000)
    assert w["lambda_dis"] == pytest.approx(10 * r)
    assert w["lambda_ssl"] == pytest.approx(0.1 * r)
    assert w["lambda_kl_unlabeled"] == pytest.approx(10 * r * r)
    paper = loss_weights(Recipe(unlabeled_kl_weight="paper"), 500, 1000)
    assert paper["lambda_kl_unlabeled"] == pytest.approx(r * r)


# ---------------------------------------------------------------------------- step totals per variant
def _outputs(seed=0, roles=("S", "T1", "T2")):
    g = torch.Generator().manual_seed(seed)
    return {r: torch.randn(1, 14, 4, 4, 4, generator=g) for r in roles}


def _soft_target(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(1, 14, 4, 4, 4, generator=g), dim=1)


def _probs(x):
    return torch.softmax(x, dim=1)


R = math.exp(-5 * (1 - 200 / 1000) ** 2)


@pytest.mark.parametrize("name", ["proposed", "ctt_kd", "ssl_single_psv", "fsl", "cts"])
def test_labeled_step_total(name):
    recipe = Recipe(variant=name)
    variant = VARIANTS[name]
    out = _outputs(roles=variant.roles)
    target = _soft_target()
    total, terms = step_loss(variant, out, target, loss_weights(recipe, 200, 1000), recipe)
    expected = sum(seg_loss(out[r], target, recipe).item() for r in variant.roles)
    if name in ("proposed", "ctt_kd"):
        kl = kl_distillation(out["S"], [out["T1"], out["T2"]]).item()
        expected += 10 * R * kl
        assert set(terms) == {"seg_S", "seg_T1", "seg_T2", "kl"}
    elif name == "ssl_single_psv":
        assert set(terms) == {"seg_S", "seg_T1"}  # no KD
    elif name == "fsl":
        assert set(terms) == {"seg_S"}
    else:  # cts: two students, no S, no KD
        assert set(terms) == {"seg_T1", "seg_T2"}
    assert total.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["proposed", "ctt_kd", "ssl_single_psv", "ssl_single_kd", "cts"])
def test_unlabeled_step_total(name):
    recipe = Recipe(variant=name)
    variant = VARIANTS[name]
    out = _outputs(seed=5, roles=variant.roles)
    total, terms = step_loss(variant, out, None, loss_weights(recipe, 200, 1000), recipe)
    ct1 = ct2 = psv = kl = 0.0
    if "T2" in out:
        ct1 = soft_dice_loss(_probs(out["T1"]), _probs(out["T2"]).argmax(1)).item()
        ct2 = soft_dice_loss(_probs(out["T2"]), _probs(out["T1"]).argmax(1)).item()
    teachers = [out[r] for r in ("T1", "T2") if r in out]
    mean_t = torch.stack([_probs(t) for t in teachers]).mean(0)
    if "S" in out:
        psv = soft_dice_loss(_probs(out["S"]), mean_t.argmax(1)).item()
        kl = kl_distillation(out["S"], teachers).item()
    expected = {
        "proposed": 0.1 * R * (ct1 + ct2 + psv) + 10 * R * R * kl,
        "ctt_kd": 0.1 * R * (ct1 + ct2) + 10 * R * R * kl,
        "ssl_single_psv": 0.1 * R * psv,
        "ssl_single_kd": 10 * R * R * kl,
        "cts": 0.1 * R * (ct1 + ct2),
    }[name]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    on = {"proposed": {"ct_T1", "ct_T2", "psv", "kl"}, "ctt_kd": {"ct_T1", "ct_T2", "kl"},
          "ssl_single_psv": {"psv"}, "ssl_single_kd": {"kl"}, "cts": {"ct_T1", "ct_T2"}}[name]
    assert set(terms) == on


def test_unlabeled_kl_weight_paper_option():
    recipe = Recipe(unlabeled_kl_weight="paper")
    out = _outputs(seed=7)
    w = loss_weights(recipe, 200, 1000)
    total, terms = step_loss(VARIANTS["proposed"], out, None, w, recipe)
    expected = 0.1 * R * (terms["ct_T1"] + terms["ct_T2"] + terms["psv"]) + 1.0 * R * R * terms["kl"]
    assert total.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------- gradients
@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {"S": build_network(student_config(base_features=2, n_stages=2)),
            "T1": build_network(teacher1_config(base_features=2, n_stages=2)),
            "T2": build_network(teacher2_config(base_features=2, n_stages=2))}


def _grads(nets, loss):
    """Role -> True if any parameter of that network gets a non-zero gradient from ``loss``."""
    params = [(r, p) for r, n in nets.items() for p in n.parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True, retain_graph=True)
    out = {r: False for r in nets}
    for (r, _), g in zip(params, grads):
        if g is not None and g.abs().sum() > 0:
            out[r] = True
    return out


def _forward(nets):
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    return {r: n(x) for r, n in nets.items()}


def test_student_terms_do_not_reach_teachers(nets):
    out = _forward(nets)
    kl = kl_distillation(out["S"], [out["T1"], out["T2"]])
    assert _grads(nets, kl) == {"S": True, "T1": False, "T2": False}
    psv = hard_dice_loss(out["S"], [torch.softmax(out["T1"], 1), torch.softmax(out["T2"], 1)])
    assert _grads(nets, psv) == {"S": True, "T1": False, "T2": False}


def test_cross_teaching_reaches_only_the_taught_teacher(nets):
    out = _forward(nets)
    ct1 = hard_dice_loss(out["T1"], [torch.softmax(out["T2"], 1)])
    assert _grads(nets, ct1) == {"S": False, "T1": True, "T2": False}
    ct2 = hard_dice_loss(out["T2"], [torch.softmax(out["T1"], 1)])
    assert _grads(nets, ct2) == {"S": False, "T1": False, "T2": True}


def test_each_network_gets_gradients_from_its_supervised_term(nets):
    recipe = Recipe()
    out = _forward(nets)
    target = torch.nn.functional.one_hot(torch.randint(0, 14, (1, 8, 8, 8)), 14).permute(0, 4, 1, 2, 3).float()
    for role in nets:
        assert _grads(nets, seg_loss(out[role], target, recipe)) == {r: r == role for r in nets}
    total, _ = step_loss(VARIANTS["proposed"], out, target, loss_weights(recipe, 500, 1000), recipe)
    assert _grads(nets, total) == {"S": True, "T1": True, "T2": True}
    unl, _ = step_loss(VARIANTS["proposed"], out, None, loss_weights(recipe, 500, 1000), recipe)
    assert _grads(nets, unl) == {"S": True, "T1": True, "T2": True}
    only_kd, _ = step_loss(VARIANTS["ssl_single_kd"], {"S": out["S"], "T1": out["T1"]}, None,
                           loss_weights(recipe, 500, 1000), recipe)
    assert _grads({"S": nets["S"], "T1": nets["T1"]}, only_kd) == {"S": True, "T1": False}
