"""Losses checked against hand-computed values, numpy and torch's own cross-entropy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from TransferSegLib.losses import (CrossEntropy, DiceLoss, FocalLossCE, FocalLossL2, L2, LOSSES,
                                   REGRESSION_LOSSES, build_loss)
from TransferSegLib.volume import TransferSegError


def _logits_and_labels(seed=0, n=2, c=3, shape=(3, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, *shape, generator=g), torch.randint(0, c, (n, *shape), generator=g)


def test_focal_ce_with_gamma_zero_is_cross_entropy():
    logits, labels = _logits_and_labels()
    expected = F.cross_entropy(logits, labels)
    assert torch.allclose(FocalLossCE(gamma=0.0)(logits, labels), expected, atol=1e-6)
    assert torch.allclose(CrossEntropy()(logits, labels), expected, atol=1e-6)


def test_focal_ce_down_weights_the_easy_voxel_by_hand():
    # Two voxels, two classes, softmax = (0.9, 0.1) in both; voxel 0 is class 0 (easy, p_t = 0.9),
    # voxel 1 is class 1 (hard, p_t = 0.1).
    logits = torch.log(torch.tensor([[0.9, 0.9], [0.1, 0.1]])).reshape(1, 2, 2)
    labels = torch.tensor([[0, 1]])
    # CE: −ln 0.9 = 0.105360516, −ln 0.1 = 2.302585093
    # focal γ=2: 0.1² · 0.105360516 = 0.00105360516; 0.9² · 2.302585093 = 1.865093925
    assert FocalLossCE(gamma=2.0)(logits, labels).item() == pytest.approx((0.00105360516 + 1.865093925) / 2, rel=1e-6)
    assert CrossEntropy()(logits, labels).item() == pytest.approx((0.105360516 + 2.302585093) / 2, rel=1e-6)
    # α = 0.25 (Lin's binary convention): class 0 × 0.75, class 1 × 0.25
    value = FocalLossCE(gamma=2.0, alpha=0.25)(logits, labels).item()
    assert value == pytest.approx((0.75 * 0.00105360516 + 0.25 * 1.865093925) / 2, rel=1e-6)
    # α per class
    value = FocalLossCE(gamma=2.0, alpha=[2.0, 3.0])(logits, labels).item()
    assert value == pytest.approx((2 * 0.00105360516 + 3 * 1.865093925) / 2, rel=1e-6)


def test_weighted_cross_entropy_is_a_per_voxel_mean():
    logits, labels = _logits_and_labels(1)
    weights = [0.78, 0.65, 8.57]
    per_voxel = F.cross_entropy(logits, labels, reduction="none") * torch.tensor(weights)[labels]
    assert torch.allclose(CrossEntropy(weights)(logits, labels), per_voxel.mean(), atol=1e-6)


def test_focal_l2_is_eq4_by_hand_and_numpy():
    d_max, gamma = 100.0, 2.0
    pred = torch.tensor([0.0, 3.0, 12.0, 0.5, -4.0]).reshape(1, 1, 5)
    target = torch.tensor([0.0, 0.0, 2.0, 0.0, 1.0]).reshape(1, 1, 5)
    # D = 0, 9, 100, 0.25, 25; D = 9 by hand: (ln 9 / ln 100)² · 9 = (2.197224577 / 4.605170186)² · 9 = 2.048802
    d = ((pred - target) ** 2).numpy().ravel().astype(np.float64)
    weight = np.where(d >= 1, (np.log(np.maximum(d, 1)) / np.log(d_max)) ** gamma, 0.0)
    expected = float(np.mean(weight * d))
    value = FocalLossL2(gamma=gamma, d_max=d_max)(pred, target).item()
    assert value == pytest.approx(expected, rel=1e-6)
    assert (2.197224577 / 4.605170186) ** 2 * 9 == pytest.approx(2.048802, rel=1e-6)
    assert value == pytest.approx((0 + 2.048802 + 100.0 + 0 + (math.log(25) / math.log(100)) ** 2 * 25) / 5, rel=1e-6)
    # γ = 0 with every error ≥ 1 is plain L2
    pred2 = torch.tensor([2.0, -3.0, 5.0]).reshape(1, 1, 3)
    assert FocalLossL2(gamma=0.0, d_max=50.0)(pred2, torch.zeros_like(pred2)).item() == pytest.approx(
        L2()(pred2, torch.zeros_like(pred2)).item())
    # scale multiplies D: a [0, 1] heatmap with scale 100
    small = torch.tensor([0.3]).reshape(1, 1, 1)
    assert FocalLossL2(d_max=100.0, scale=100.0)(small, torch.zeros_like(small)).item() == pytest.approx(
        (math.log(9) / math.log(100)) ** 2 * 9, rel=1e-5)


def test_normalise_by_target_divides_each_item_by_its_target_sum():
    """Two items: a big target (sum 40) and a small one (sum 2.5), the same error per target voxel.
    By the mean over voxels the big item dominates; normalised, each item is its missed share."""
    pred = torch.zeros(2, 1, 4, 10)
    target = torch.zeros(2, 1, 4, 10)
    target[0, 0] = 1.0                         # sum 40, all missed: squared error sum 40
    target[1, 0, 0, :5] = 0.5                  # sum 2.5, all missed: squared error sum 1.25
    pred[1, 0, 3, 9] = 2.0                     # and a false positive of squared error 4
    plain = L2()(pred, target).item()
    assert plain == pytest.approx((40 + 1.25 + 4) / 80)
    balanced = L2(normalise_by_target=1.0)(pred, target).item()
    assert balanced == pytest.approx((40 / 40 + (1.25 + 4) / 2.5) / 2)
    floored = L2(normalise_by_target=10.0)(pred, target).item()  # the small item's sum is below the floor
    assert floored == pytest.approx((40 / 40 + 5.25 / 10) / 2)
    empty = torch.zeros(1, 1, 4, 10)                # an item without lesions: its error ÷ the floor
    assert L2(normalise_by_target=8.0)(empty + 0.5, empty).item() == pytest.approx(40 * 0.25 / 8)
    # focal L2 reduces the same way: γ = 0 with errors ≥ 1 is the normalised L2
    big = torch.full((1, 1, 3), 3.0)
    goal = torch.tensor([[[0.0, 1.0, 1.0]]])
    assert FocalLossL2(gamma=0.0, d_max=50.0, normalise_by_target=1.0)(big, goal).item() == pytest.approx(
        (9 + 4 + 4) / 2)
    for bad in (0, -1.0, "64", True):
        with pytest.raises(TransferSegError, match="normalise_by_target"):
            build_loss({"name": "l2", "normalise_by_target": bad})


def test_regression_losses_one_hot_integer_labels():
    logits, labels = _logits_and_labels(2)
    one_hot = F.one_hot(labels, 3).movedim(-1, 1).float()
    assert torch.allclose(L2("softmax")(logits, labels), F.mse_loss(torch.softmax(logits, 1), one_hot))
    with pytest.raises(TransferSegError, match="shape"):
        L2()(logits, torch.zeros(2, 1, 3, 4, 5))


def test_dice_loss_zero_for_perfect_prediction_and_near_one_for_wrong():
    _, labels = _logits_and_labels(3)
    perfect = 50.0 * F.one_hot(labels, 3).movedim(-1, 1).float()
    assert DiceLoss()(perfect, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert DiceLoss(include_background=True)(perfect, labels).item() == pytest.approx(0.0, abs=1e-6)
    wrong = 50.0 * F.one_hot((labels + 1) % 3, 3).movedim(-1, 1).float()
    assert DiceLoss()(wrong, labels).item() > 0.99


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_flow_and_batches_decompose(name):
    spec = {"name": name}
    if name == "focal_l2":
        spec.update(d_max=10.0, scale=20.0, activation="sigmoid", normalise_by_target=4.0)
    loss_fn = build_loss(spec)
    logits, labels = _logits_and_labels(4)
    logits.requires_grad_(True)
    loss = loss_fn(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # the mean of the per-item losses is the batch loss (what DDP's gradient averaging assumes)
    halves = [loss_fn(logits[i:i + 1].detach(), labels[i:i + 1]) for i in range(2)]
    assert (halves[0] + halves[1]).item() / 2 == pytest.approx(loss.item(), rel=1e-5)
    assert (name in REGRESSION_LOSSES) == (name in ("l2", "focal_l2"))


def test_build_loss_errors_name_the_problem():
    with pytest.raises(TransferSegError, match="'hinge'"):
        build_loss({"name": "hinge"})
    with pytest.raises(TransferSegError, match="'gama'"):
        build_loss({"name": "focal", "gama": 2})
    with pytest.raises(TransferSegError, match="d_max"):
        build_loss({"name": "focal_l2", "d_max": 1.0})
    with pytest.raises(TransferSegError, match="class_weights"):
        CrossEntropy([1.0, 2.0])(*_logits_and_labels())
    assert isinstance(build_loss("focal"), FocalLossCE)
    assert build_loss({"name": "ce", "class_weights": None, "switch": {"to": "focal"}}).class_weights is None
