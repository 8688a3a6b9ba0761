"""Test-time augmentation for Panoptic-DeepLab: multi-scale inputs and horizontal flips.

Every view's raw outputs are brought back to the input size (offsets rescaled
with the resize factor, flipped views flipped back with dx negated) and
averaged: semantic *probabilities*, center heatmaps and offsets. The result
has the keys of ``model.predict_raw`` plus ``semantic_probs``, the mean
probabilities, which the panoptic merge (``postprocess.merge_raw_outputs``)
uses as they are; ``semantic_logits`` holds log(mean probability) for code
that reads logits (its softmax is the mean probability, up to rounding).
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from .models.panoptic_deeplab import resize_outputs

__all__ = ["tta_raw_outputs", "scaled_size", "DEFAULT_TTA_SCALES"]

DEFAULT_TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def scaled_size(size, scale: float):
    """(h, w) of a view at ``scale``: ``(n - 1) * scale + 1`` keeps align_corners grids aligned
    (1025 -> 513 at 0.5, as deeplab2's odd crop sizes)."""
    return tuple(max(1, int(round((n - 1) * scale)) + 1) for n in size)


def _unflip(outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {k: v.flip(-1) for k, v in outputs.items()}
    out["offset_map"] = out["offset_map"] * out["offset_map"].new_tensor([1.0, -1.0]).view(1, 2, 1, 1)
    return out


@torch.no_grad()
def tta_raw_outputs(
    model, images: torch.Tensor, scales: Sequence[float] = DEFAULT_TTA_SCALES, flip: bool = True
) -> Dict[str, torch.Tensor]:
    """Averaged raw outputs of ``model.predict_raw`` over ``scales`` x (identity, horizontal flip).

    Args:
        model: anything with ``predict_raw(images) -> dict(semantic_logits, center_heatmap, offset_map)``.
        images: (B, 3, H, W) in [0, 1].
        scales: input resize factors (1.0 = as given).
        flip: also run each scale on the mirrored image.
    """
    scales = [float(s) for s in scales]
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"TTA scales must be positive numbers, got {scales}")
    size = tuple(images.shape[-2:])
    totals = None
    views = 0
    for scale in scales:
        view_size = scaled_size(size, scale)
        x = images if view_size == size else F.interpolate(images, size=view_size, mode="bilinear", align_corners=True)
        for mirrored in (False, True) if flip else (False,):
            raw = model.predict_raw(x.flip(-1) if mirrored else x)
            raw = resize_outputs({k: raw[k].float() for k in ("semantic_logits", "center_heatmap", "offset_map")}, size)
            if mirrored:
                raw = _unflip(raw)
            view = {
                "semantic_probs": raw["semantic_logits"].softmax(dim=1),
                "center_heatmap": raw["center_heatmap"],
                "offset_map": raw["offset_map"],
            }
            totals = view if totals is None else {k: totals[k] + view[k] for k in totals}
            views += 1
    out = {k: v / views for k, v in totals.items()}
    out["semantic_logits"] = out["semantic_probs"].clamp_min(torch.finfo(torch.float32).tiny).log()
    return out
