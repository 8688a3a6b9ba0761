"""Panoptic-DeepLab losses against straightforward per-image formulas on random inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from axial_deeplab.losses import PanopticDeepLabLoss, bootstrapped_cross_entropy, weighted_l1, weighted_mse

IGNORE = 255


def reference_bootstrapped_ce(logits, labels, weights, frac):
    """Per image: CE x weight on labelled pixels, keep the round(frac * H * W) largest, mean; batch mean."""
    per_image = []
    for b in range(logits.shape[0]):
        logp = torch.log_softmax(logits[b].double(), dim=0).numpy()
        lab, wt = labels[b].numpy(), weights[b].double().numpy()
        values = [
            -logp[lab[y, x], y, x] * wt[y, x]
            for y in range(lab.shape[0])
            for x in range(lab.shape[1])
            if lab[y, x] != IGNORE and wt[y, x] > 0
        ]
        k = int(round(frac * lab.size))
        kept = sorted(values, reverse=True)[:k]
        per_image.append(sum(kept) / len(kept) if kept else 0.0)
    return float(np.mean(per_image))


def reference_weighted(pred, target, weights, power):
    per_image = []
    for b in range(pred.shape[0]):
        err = (pred[b].double() - target[b].double()).abs() ** power  # (K, H, W)
        per_pixel = err.mean(dim=0) * weights[b].double()
        n = int((weights[b] > 0).sum())
        per_image.append(float(per_pixel.sum()) / n if n else 0.0)
    return float(np.mean(per_image))


def random_batch(b=2, c=5, h=9, w=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g) * 3
    labels = torch.randint(0, c, (b, h, w), generator=g)
    labels[torch.rand(b, h, w, generator=g) < 0.3] = IGNORE
    weights = torch.where(torch.rand(b, h, w, generator=g) < 0.2, 3.0, 1.0)
    return logits, labels, weights


@pytest.mark.parametrize("frac", [0.2, 0.5, 0.85, 1.0])
def test_bootstrapped_ce_matches_formula(frac):
    logits, labels, weights = random_batch()
    got = bootstrapped_cross_entropy(logits, labels, weights, ignore_label=IGNORE, top_k_fraction=frac)
    assert float(got) == pytest.approx(reference_bootstrapped_ce(logits, labels, weights, frac), rel=1e-5)


def test_plain_mean_equals_torch_cross_entropy():
    logits, labels, _ = random_batch(b=1)
    got = bootstrapped_cross_entropy(logits, labels, None, ignore_label=IGNORE, top_k_fraction=1.0)
    want = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_ce_gradient_only_on_kept_pixels():
    logits, labels, weights = random_batch(b=1)
    logits.requires_grad_(True)
    bootstrapped_cross_entropy(logits, labels, weights, ignore_label=IGNORE, top_k_fraction=0.2).backward()
    touched = logits.grad.abs().sum(dim=1) > 0
    assert int(touched.sum()) == round(0.2 * labels[0].numel())
    assert not touched[labels == IGNORE].any()


def test_all_ignored_image_contributes_zero():
    logits, labels, weights = random_batch()
    labels[1] = IGNORE
    got = bootstrapped_cross_entropy(logits, labels, weights, ignore_label=IGNORE, top_k_fraction=0.2)
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(reference_bootstrapped_ce(logits, labels, weights, 0.2), rel=1e-5)


def test_mse_and_l1_match_formula():
    g = torch.Generator().manual_seed(1)
    pred_c, gt_c = torch.rand(2, 1, 8, 10, generator=g), torch.rand(2, 1, 8, 10, generator=g)
    pred_o, gt_o = torch.randn(2, 2, 8, 10, generator=g) * 5, torch.randn(2, 2, 8, 10, generator=g) * 5
    w = (torch.rand(2, 8, 10, generator=g) < 0.6).float()
    w[1] = 0  # an image without weighted pixels
    assert float(weighted_mse(pred_c, gt_c, w)) == pytest.approx(reference_weighted(pred_c, gt_c, w, 2), rel=1e-6)
    assert float(weighted_l1(pred_o, gt_o, w)) == pytest.approx(reference_weighted(pred_o, gt_o, w, 1), rel=1e-6)


def test_panoptic_loss_dict_and_weights():
    logits, labels, weights = random_batch()
    g = torch.Generator().manual_seed(2)
    b, _, h, w = logits.shape
    outputs = {
        "semantic_logits": logits.requires_grad_(True),
        "center_heatmap": torch.rand(b, 1, h, w, generator=g, requires_grad=True),
        "offset_map": torch.randn(b, 2, h, w, generator=g, requires_grad=True),
    }
    targets = {
        "semantic": labels,
        "semantic_weights": weights,
        "center": torch.rand(b, 1, h, w, generator=g),
        "center_weights": (labels != IGNORE).float(),
        "offset": torch.randn(b, 2, h, w, generator=g) * 4,
        "offset_weights": (labels == 2).float(),
    }
    losses = PanopticDeepLabLoss(ignore_label=IGNORE)(outputs, targets)
    assert set(losses) == {"semantic", "center", "offset", "total"}
    sem = reference_bootstrapped_ce(logits.detach(), labels, weights, 0.2)
    ctr = 200 * reference_weighted(outputs["center_heatmap"].detach(), targets["center"], targets["center_weights"], 2)
    off = 0.01 * reference_weighted(outputs["offset_map"].detach(), targets["offset"], targets["offset_weights"], 1)
    assert float(losses["semantic"].detach()) == pytest.approx(sem, rel=1e-5)
    assert float(losses["center"].detach()) == pytest.approx(ctr, rel=1e-5)
    assert float(losses["offset"].detach()) == pytest.approx(off, rel=1e-5)
    assert float(losses["total"].detach()) == pytest.approx(sem + ctr + off, rel=1e-5)
    losses["total"].backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in outputs.values())


def test_bad_arguments():
    logits, labels, weights = random_batch()
    with pytest.raises(ValueError, match="top_k_fraction"):
        PanopticDeepLabLoss(top_k_fraction=0.0)
    with pytest.raises(ValueError, match="semantic labels"):
        bootstrapped_cross_entropy(logits, labels[:, :-1], weights)
    with pytest.raises(ValueError, match="offset target"):
        weighted_l1(torch.zeros(2, 2, 4, 4), torch.zeros(2, 1, 4, 4), torch.ones(2, 4, 4))
    with pytest.raises(KeyError, match="center"):
        PanopticDeepLabLoss()(
            {"semantic_logits": logits, "center_heatmap": logits[:, :1], "offset_map": logits[:, :2]},
            {"semantic": labels},
        )
