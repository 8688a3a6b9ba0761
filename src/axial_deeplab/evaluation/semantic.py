"""Semantic segmentation mIoU from a streaming confusion matrix (ignore label excluded).

The whole state is one (C, C) count matrix, so it merges across processes by summation.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data.panoptic_io import to_numpy


class SemanticIoU:
    """``update(pred_semantic, gt_semantic)`` with class-id maps of equal shape ((H, W) or batched);
    ``compute()`` -> ``{"miou", "iou" (per class, NaN where a class is absent from both prediction
    and ground truth), "pixel_accuracy", "mean_accuracy", "per_class"}``, values in [0, 1].
    mIoU averages over the classes present in the prediction or the ground truth."""

    def __init__(self, num_classes: int, ignore_label: int = 255, class_names: Sequence[str] | None = None):
        if num_classes <= 0:
            raise ValueError(f"SemanticIoU: num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"SemanticIoU: {len(class_names)} class_names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)  # [gt, pred]

    def update(self, pred_semantic, gt_semantic) -> None:
        pred = to_numpy(pred_semantic).astype(np.int64, copy=False)
        gt = to_numpy(gt_semantic).astype(np.int64, copy=False)
        if pred.shape != gt.shape:
            raise ValueError(f"SemanticIoU.update: pred shape {pred.shape} != gt shape {gt.shape}")
        C = self.num_classes
        keep = gt != self.ignore_label
        g, p = gt[keep], pred[keep]
        bad_g = (g < 0) | (g >= C)
        if bad_g.any():
            raise ValueError(f"SemanticIoU.update: gt values {np.unique(g[bad_g])[:5].tolist()} outside 0..{C - 1}")
        bad_p = (p < 0) | (p >= C)
        if bad_p.any():
            raise ValueError(
                f"SemanticIoU.update: predicted values {np.unique(p[bad_p])[:5].tolist()} outside 0..{C - 1}"
            )
        self.confusion += np.bincount(g * C + p, minlength=C * C).reshape(C, C)

    def state(self) -> dict[str, torch.Tensor]:
        return {"confusion": torch.from_numpy(self.confusion.copy())}

    def merge(self, state: Mapping[str, Any]) -> None:
        m = to_numpy(state["confusion"])
        if m.shape != self.confusion.shape:
            raise ValueError(f"SemanticIoU.merge: confusion has shape {m.shape}, expected {self.confusion.shape}")
        self.confusion += m.astype(np.int64)

    def all_reduce(self, group=None) -> None:
        """Sum the confusion matrix over ``torch.distributed`` processes (no-op when not initialised)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        t = torch.from_numpy(self.confusion.copy())
        if torch.distributed.get_backend(group) == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, group=group)
        self.confusion[...] = t.cpu().numpy()

    def compute(self) -> dict:
        m = self.confusion.astype(np.float64)
        tp = np.diag(m)
        gt_count = m.sum(1)
        union = gt_count + m.sum(0) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt_count > 0, tp / gt_count, np.nan)
        total = m.sum()
        valid = ~np.isnan(iou)
        return {
            "miou": float(iou[valid].mean()) if valid.any() else 0.0,
            "iou": iou.tolist(),
            "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
            "mean_accuracy": float(np.nanmean(acc)) if (~np.isnan(acc)).any() else 0.0,
            "per_class": {n: float(v) for n, v in zip(self.class_names, iou)},
        }
