"""Panoptic-DeepLab losses: bootstrapped weighted cross-entropy, weighted MSE on
the center heatmap, weighted L1 on the offsets (Cheng et al., Panoptic-DeepLab, CVPR 2020).

Normalisation follows deeplab2 (``model/loss/base_loss.py``,
``compute_average_top_k_loss``): every loss is computed per image and then
averaged over the batch. Within an image the per-pixel loss is multiplied by
its weight; the semantic loss keeps the ``k = round(top_k_fraction * H * W)``
largest weighted losses; the result is the sum of the kept weighted losses
divided by the *number* of kept pixels that carry a positive weight (not the
sum of the weights, so small-instance pixels with weight 3 really count three
times). deeplab2 divides by the number of non-zero kept losses, which is the
same except for a weighted pixel whose loss is exactly 0; counting weighted
pixels keeps the denominator independent of how good the prediction is and
makes the top-k selection deterministic. An image without weighted pixels
contributes 0. L1/MSE average over the channels of a pixel first (deeplab2's
``mean_absolute_error``), so the offset loss is the mean of |dy| and |dx|.

The returned components are already multiplied by their loss weights
(1, 200, 0.01 by default), as deeplab2 reports them, and ``total`` is their sum.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "bootstrapped_cross_entropy",
    "weighted_mse",
    "weighted_l1",
    "PanopticDeepLabLoss",
]


def _check_shape(name: str, tensor: torch.Tensor, shape) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def _weighted_average(weighted: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Per-image sum of ``weighted`` (B, N) over the ``counted`` (B, N) pixels / their number; batch mean."""
    total = (weighted * counted).sum(dim=1)
    count = counted.sum(dim=1).to(weighted.dtype)
    per_image = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    return per_image.mean()


def bootstrapped_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    ignore_label: int = 255,
    top_k_fraction: float = 0.2,
) -> torch.Tensor:
    """Weighted cross-entropy averaged over the hardest ``top_k_fraction`` of each image's pixels.

    Args:
        logits: (B, C, H, W). labels: (B, H, W) int, ``ignore_label`` on void.
        weights: (B, H, W) per-pixel weights (default 1); void pixels get weight 0 regardless.
        top_k_fraction: in (0, 1]; 1.0 is the plain weighted mean over labelled pixels.
    """
    if not 0.0 < top_k_fraction <= 1.0:
        raise ValueError(f"top_k_fraction must lie in (0, 1], got {top_k_fraction}")
    if logits.dim() != 4:
        raise ValueError(f"semantic logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    b, c, h, w = logits.shape
    _check_shape("semantic labels", labels, (b, h, w))
    valid = labels != ignore_label
    if weights is None:
        weights = torch.ones_like(labels, dtype=logits.dtype)
    _check_shape("semantic weights", weights, (b, h, w))
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    if safe_labels.numel() and (safe_labels.min() < 0 or safe_labels.max() >= c):
        raise ValueError(f"semantic labels must lie in [0, {c}) or equal ignore_label {ignore_label}")
    pixel_loss = F.cross_entropy(logits, safe_labels, reduction="none")
    weights = weights.to(pixel_loss.dtype) * valid
    weighted = (pixel_loss * weights).reshape(b, -1)
    counted = (weights > 0).reshape(b, -1)
    if top_k_fraction < 1.0:
        k = max(1, int(round(top_k_fraction * h * w)))
        # Unweighted pixels rank below every weighted one and are never counted.
        ranking = torch.where(counted, weighted.detach(), torch.full_like(weighted, -1.0))
        top = ranking.topk(k, dim=1).indices
        weighted = weighted.gather(1, top)
        counted = counted.gather(1, top)
    return _weighted_average(weighted, counted)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared error (mean over channels) x weight, averaged over weighted pixels per image."""
    _check_shape("center target", target, pred.shape)
    return _weighted_pixel_loss((pred - target).square(), weights, "center")


def weighted_l1(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-pixel absolute error (mean over channels) x weight, averaged over weighted pixels per image."""
    _check_shape("offset target", target, pred.shape)
    return _weighted_pixel_loss((pred - target).abs(), weights, "offset")


def _weighted_pixel_loss(error: torch.Tensor, weights: torch.Tensor, name: str) -> torch.Tensor:
    if error.dim() != 4:
        raise ValueError(f"{name} prediction must be (B, K, H, W), got shape {tuple(error.shape)}")
    b, _, h, w = error.shape
    if weights.dim() == 4 and weights.shape[1] == 1:
        weights = weights[:, 0]
    _check_shape(f"{name} weights", weights, (b, h, w))
    weights = weights.to(error.dtype)
    weighted = (error.mean(dim=1) * weights).reshape(b, -1)
    return _weighted_average(weighted, (weights > 0).reshape(b, -1))


class PanopticDeepLabLoss(nn.Module):
    """The three Panoptic-DeepLab losses from a model output dict and a target dict.

    ``outputs``: ``semantic_logits`` (B, C, H, W), ``center_heatmap`` (B, 1, H, W),
    ``offset_map`` (B, 2, H, W). ``targets``: ``semantic`` (B, H, W), ``semantic_weights``,
    ``center`` (B, 1, H, W), ``center_weights``, ``offset`` (B, 2, H, W), ``offset_weights``
    (weights (B, H, W)), as built by :class:`~axial_deeplab.data.targets.PanopticTargetGenerator`
    and collated. Returns ``dict(semantic, center, offset, total)``, each already scaled by its weight.
    """

    def __init__(
        self,
        ignore_label: int = 255,
        top_k_fraction: float = 0.2,
        semantic_weight: float = 1.0,
        center_weight: float = 200.0,
        offset_weight: float = 0.01,
    ):
        super().__init__()
        if not 0.0 < top_k_fraction <= 1.0:
            raise ValueError(f"top_k_fraction must lie in (0, 1], got {top_k_fraction}")
        self.ignore_label = int(ignore_label)
        self.top_k_fraction = float(top_k_fraction)
        self.semantic_weight = float(semantic_weight)
        self.center_weight = float(center_weight)
        self.offset_weight = float(offset_weight)

    def extra_repr(self) -> str:
        return (
            f"ignore_label={self.ignore_label}, top_k_fraction={self.top_k_fraction}, "
            f"weights=(semantic {self.semantic_weight}, center {self.center_weight}, "
            f"offset {self.offset_weight})"
        )

    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        for key in ("semantic_logits", "center_heatmap", "offset_map"):
            if key not in outputs:
                raise KeyError(f"model outputs lack {key!r}; got {sorted(outputs)}")
        for key in ("semantic", "center", "center_weights", "offset", "offset_weights"):
            if key not in targets:
                raise KeyError(f"targets lack {key!r} (build them with PanopticTargetGenerator); got {sorted(targets)}")
        logits = outputs["semantic_logits"]
        semantic = self.semantic_weight * bootstrapped_cross_entropy(
            logits,
            targets["semantic"],
            targets.get("semantic_weights"),
            ignore_label=self.ignore_label,
            top_k_fraction=self.top_k_fraction,
        )
        center = self.center_weight * weighted_mse(
            outputs["center_heatmap"], targets["center"].to(logits.dtype), targets["center_weights"]
        )
        offset = self.offset_weight * weighted_l1(
            outputs["offset_map"], targets["offset"].to(logits.dtype), targets["offset_weights"]
        )
        return {"semantic": semantic, "center": center, "offset": offset, "total": semantic + center + offset}
