"""Panoptic quality (PQ = SQ x RQ) with the exact rules of panopticapi's ``pq_compute``.

Per image, a ground-truth and a predicted segment match when they have the same category and
IoU > 0.5 (strict); the union leaves out predicted pixels that fall on ground-truth void.
Unmatched non-crowd ground truth is a false negative; crowd ground truth never is. An unmatched
prediction is a false positive unless more than half of it lies on void plus the crowd region of
its own category. Per class, PQ = sum IoU / (TP + FP/2 + FN/2); averages run over classes with
TP + FP + FN > 0.

The statistics are four per-class sums (IoU, TP, FP, FN), so evaluators can stream over a
dataset without storing predictions and be summed across processes.
"""

from __future__ import annotations

from typing import Any, Mapping, MutableMapping, Sequence

import numpy as np
import torch

from ..data.meta import PanopticMetadata
from ..data.panoptic_io import compact_ids, to_numpy

VOID = 0


# -------------------------------------------------------------------------------------------
# One image: the matching rules, on segment ids (0 = void) and pixel-pair intersection counts.
# -------------------------------------------------------------------------------------------
def accumulate_image_stats(
    intersections: Mapping[tuple[int, int], int],
    gt_segments: Mapping[int, Mapping[str, Any]],
    pred_segments: Mapping[int, Mapping[str, Any]],
    stats: MutableMapping[Any, list],
) -> MutableMapping[Any, list]:
    """Add one image's per-category ``[iou_sum, tp, fp, fn]`` to ``stats``.

    Args:
        intersections: ``{(gt_id, pred_id): pixel count}`` over all pixels (id 0 = void).
        gt_segments: ``{gt_id: {"category_id", "iscrowd", "area"}}`` in segments_info order.
        pred_segments: ``{pred_id: {"category_id", "area"}}``.
        stats: ``{category: [iou_sum, tp, fp, fn]}``; missing categories are created.
    """

    def entry(cat):
        if cat not in stats:
            stats[cat] = [0.0, 0, 0, 0]
        return stats[cat]

    gt_matched, pred_matched = set(), set()
    for (gt_id, pred_id), inter in intersections.items():
        if gt_id not in gt_segments or pred_id not in pred_segments:
            continue
        gt = gt_segments[gt_id]
        if gt["iscrowd"] == 1:
            continue
        if gt["category_id"] != pred_segments[pred_id]["category_id"]:
            continue
        union = pred_segments[pred_id]["area"] + gt["area"] - inter - intersections.get((VOID, pred_id), 0)
        iou = inter / union
        if iou > 0.5:
            e = entry(gt["category_id"])
            e[0] += iou
            e[1] += 1
            gt_matched.add(gt_id)
            pred_matched.add(pred_id)

    crowd_by_category = {}
    for gt_id, gt in gt_segments.items():
        if gt_id in gt_matched:
            continue
        if gt["iscrowd"] == 1:
            crowd_by_category[gt["category_id"]] = gt_id  # as panopticapi: the last crowd segment wins
            continue
        entry(gt["category_id"])[3] += 1

    for pred_id, pred in pred_segments.items():
        if pred_id in pred_matched:
            continue
        ignored = intersections.get((VOID, pred_id), 0)
        if pred["category_id"] in crowd_by_category:
            ignored += intersections.get((crowd_by_category[pred["category_id"]], pred_id), 0)
        if ignored / pred["area"] > 0.5:
            continue
        entry(pred["category_id"])[2] += 1
    return stats


def pair_counts(gt_ids: np.ndarray, pred_ids: np.ndarray, G: int, P: int):
    """``(gt, pred, pixels)`` for every pair of compact ids (0 = void, 1..G / 1..P) sharing a
    pixel, in (gt, pred) order. A dense (G+1) x (P+1) table is used only while it is no larger
    than a few times the pixel count; otherwise the pairs are sorted, so a map with a million
    segment ids costs one sort of its pixels, not a million-squared table."""
    gt_ids = np.asarray(gt_ids, np.int64).ravel()
    pred_ids = np.asarray(pred_ids, np.int64).ravel()
    key = gt_ids * (P + 1) + pred_ids
    if (G + 1) * (P + 1) <= 4 * key.size + 65536:
        joint = np.bincount(key, minlength=(G + 1) * (P + 1))
        keys = np.flatnonzero(joint)
        counts = joint[keys]
    else:
        keys, counts = np.unique(key, return_counts=True)
    return keys // (P + 1), keys % (P + 1), counts.astype(np.int64)


def image_stats(g, p, inter, gt_cat, gt_crowd, gt_area, pred_cat, pred_area, num_categories: int):
    """One image's per-category ``(iou_sum, tp, fp, fn)`` arrays, the rules of
    :func:`accumulate_image_stats` on arrays (linear in the number of pairs and segments).

    ``g, p, inter``: pixel-pair counts from :func:`pair_counts` (compact ids, 0 = void).
    ``gt_cat``, ``gt_crowd``, ``gt_area`` are indexed by compact ground-truth id, ``pred_cat``,
    ``pred_area`` by compact predicted id (entry 0, void, is ignored). Categories are 0-based.
    """
    C = int(num_categories)
    G, P = len(gt_cat) - 1, len(pred_cat) - 1
    on_void = g == VOID
    void_inter = np.zeros(P + 1, np.int64)
    void_inter[p[on_void]] = inter[on_void]
    cand = ~on_void & (p != VOID)
    cand &= ~gt_crowd[g] & (gt_cat[g] == pred_cat[p])
    gc, pc, ic = g[cand], p[cand], inter[cand]
    union = pred_area[pc] + gt_area[gc] - ic - void_inter[pc]
    iou = ic / union
    match = iou > 0.5
    cats = gt_cat[gc[match]]
    iou_sum = np.bincount(cats, weights=iou[match], minlength=C)
    tp = np.bincount(cats, minlength=C)
    gt_matched = np.zeros(G + 1, bool)
    gt_matched[gc[match]] = True
    pred_matched = np.zeros(P + 1, bool)
    pred_matched[pc[match]] = True
    real_gt = np.arange(G + 1) > 0
    fn = np.bincount(gt_cat[real_gt & ~gt_matched & ~gt_crowd], minlength=C)
    # Crowd region of each category (the last crowd segment of a category, as panopticapi).
    crowd_of_cat = np.zeros(C, np.int64)
    crowd_ids = np.flatnonzero(gt_crowd)
    if crowd_ids.size:
        crowd_of_cat[gt_cat[crowd_ids]] = crowd_ids
    ignored = void_inter.copy()
    if crowd_ids.size:
        pred_c = np.clip(pred_cat[p], 0, None)
        on_crowd = ~on_void & gt_crowd[g] & (crowd_of_cat[pred_c] == g) & (p != VOID)
        np.add.at(ignored, p[on_crowd], inter[on_crowd])
    unmatched = np.flatnonzero(~pred_matched)
    unmatched = unmatched[unmatched != VOID]
    counted = ignored[unmatched] / pred_area[unmatched] <= 0.5
    fp = np.bincount(pred_cat[unmatched[counted]], minlength=C)
    return iou_sum[:C], tp[:C], fp[:C], fn[:C]


# -------------------------------------------------------------------------------------------
# Averages
# -------------------------------------------------------------------------------------------
def summarize_pq(
    iou: Sequence[float],
    tp: Sequence[int],
    fp: Sequence[int],
    fn: Sequence[int],
    is_thing: Sequence[bool],
    labels: Sequence[Any],
) -> dict:
    """panopticapi's ``pq_average`` for All / Things / Stuff plus ``per_class`` (values in [0, 1]).

    A group with no class having TP + FP + FN > 0 reports 0 with ``n`` = 0 (panopticapi divides
    by zero there). ``per_class`` lists every class, zeros where it has no segments, keyed by
    ``labels``, and carries the raw counts too.
    """
    results: dict[str, Any] = {}
    per_class = {}
    for k, label in enumerate(labels):
        denom = tp[k] + 0.5 * fp[k] + 0.5 * fn[k]
        if tp[k] + fp[k] + fn[k] == 0:
            pq = sq = rq = 0.0
        else:
            pq = iou[k] / denom
            sq = iou[k] / tp[k] if tp[k] != 0 else 0.0
            rq = tp[k] / denom
        per_class[label] = {
            "pq": float(pq),
            "sq": float(sq),
            "rq": float(rq),
            "tp": int(tp[k]),
            "fp": int(fp[k]),
            "fn": int(fn[k]),
        }
    for name, want in (("All", None), ("Things", True), ("Stuff", False)):
        pq = sq = rq = 0.0
        n = 0
        for k, label in enumerate(labels):
            if want is not None and bool(is_thing[k]) != want:
                continue
            if tp[k] + fp[k] + fn[k] == 0:
                continue
            n += 1
            pq += per_class[label]["pq"]
            sq += per_class[label]["sq"]
            rq += per_class[label]["rq"]
        results[name] = {"pq": pq / n if n else 0.0, "sq": sq / n if n else 0.0, "rq": rq / n if n else 0.0, "n": n}
    results["per_class"] = per_class
    return results


def format_pq_table(results: Mapping[str, Any], class_names: Mapping[Any, str] | None = None) -> str:
    """The panopticapi-style text table (percent): per class, then All / Things / Stuff with N."""
    lines = []
    if class_names is not None:
        lines.append(f"{'Category':24s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s}")
        for label, r in results["per_class"].items():
            lines.append(
                f"{str(class_names.get(label, label))[:24]:24s}| "
                f"{100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f}"
            )
        lines.append("-" * 51)
    lines.append(f"{'':24s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}")
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(f"{name:24s}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f} {r['n']:5d}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------
# Streaming evaluator on label maps
# -------------------------------------------------------------------------------------------
class PanopticQuality:
    """Streaming PQ over label maps, with panopticapi's semantics.

    ``update(pred_panoptic, gt_semantic, gt_instance, gt_crowd)`` takes a predicted panoptic map
    (class * label_divisor + instance, negative = void) and the ground-truth maps of a sample
    (void = ``ignore_label``; thing segments are (class, instance) pairs; crowd pixels of one
    class form that class's crowd region). Inputs may be (H, W) or batched (B, H, W).
    ``compute()`` returns ``{"All", "Things", "Stuff": {"pq", "sq", "rq", "n"}, "per_class":
    {class name: {...}}}`` with values in [0, 1].
    """

    def __init__(self, metadata: PanopticMetadata):
        self.metadata = metadata
        self.num_classes = metadata.num_classes
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self.iou = np.zeros(c, np.float64)
        self.tp = np.zeros(c, np.int64)
        self.fp = np.zeros(c, np.int64)
        self.fn = np.zeros(c, np.int64)

    def update(self, pred_panoptic, gt_semantic, gt_instance, gt_crowd=None) -> None:
        pred = to_numpy(pred_panoptic).astype(np.int64, copy=False)
        sem = to_numpy(gt_semantic).astype(np.int64, copy=False)
        inst = to_numpy(gt_instance).astype(np.int64, copy=False)
        crowd = np.zeros(sem.shape, bool) if gt_crowd is None else to_numpy(gt_crowd).astype(bool, copy=False)
        if not (pred.shape == sem.shape == inst.shape == crowd.shape):
            raise ValueError(
                f"PanopticQuality.update: shapes differ: pred {pred.shape}, gt_semantic {sem.shape}, "
                f"gt_instance {inst.shape}, gt_crowd {crowd.shape}"
            )
        if pred.ndim == 3:
            for b in range(pred.shape[0]):
                self._update_one(pred[b], sem[b], inst[b], crowd[b])
        elif pred.ndim == 2:
            self._update_one(pred, sem, inst, crowd)
        else:
            raise ValueError(f"PanopticQuality.update: expected (H, W) or (B, H, W) maps, got {pred.shape}")

    def _update_one(self, pred, sem, inst, crowd) -> None:
        md = self.metadata
        C = self.num_classes
        void = sem == md.ignore_label
        bad = ~void & ((sem < 0) | (sem >= C))
        if bad.any():
            raise ValueError(
                f"PanopticQuality: gt_semantic has values {np.unique(sem[bad])[:5].tolist()} that are "
                f"neither classes 0..{C - 1} nor ignore_label {md.ignore_label}"
            )
        is_thing = np.zeros(C, bool)
        is_thing[md.thing_ids] = True
        sem0 = np.where(void, 0, sem)
        # Ground-truth segments: one per stuff class, one per (thing class, instance), and one
        # merged crowd region per class.
        inst_t = np.where(is_thing[sem0] & ~crowd, np.maximum(inst, 0), 0)
        span = int(inst_t.max()) + 2
        gt_key = np.where(void, -1, sem0 * span + np.where(crowd, span - 1, inst_t))
        gt_ids, gt_keys = compact_ids(gt_key.ravel())
        pred_flat = pred.ravel()
        pred_ids, pred_keys = compact_ids(np.where(pred_flat < 0, -1, pred_flat))
        pred_cls = pred_keys // md.label_divisor
        out = (pred_cls < 0) | (pred_cls >= C)
        if out.any():
            raise ValueError(
                f"PanopticQuality: predicted ids {pred_keys[out][:5].tolist()} decode to classes outside "
                f"0..{C - 1} (label_divisor {md.label_divisor})"
            )
        G, P = gt_keys.size, pred_keys.size
        g, p, inter = pair_counts(gt_ids, pred_ids.ravel(), G, P)
        gt_area = np.bincount(g, weights=inter, minlength=G + 1).astype(np.int64)
        pred_area = np.bincount(p, weights=inter, minlength=P + 1).astype(np.int64)
        gt_cat = np.concatenate([[-1], gt_keys // span])
        gt_crowd = np.concatenate([[False], gt_keys % span == span - 1])
        pred_cat = np.concatenate([[-1], pred_cls])
        iou, tp, fp, fn = image_stats(g, p, inter, gt_cat, gt_crowd, gt_area, pred_cat, pred_area, C)
        self.iou += iou
        self.tp += tp
        self.fp += fp
        self.fn += fn

    # -- distributed ---------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        return {
            "iou": torch.from_numpy(self.iou.copy()),
            "tp": torch.from_numpy(self.tp.copy()),
            "fp": torch.from_numpy(self.fp.copy()),
            "fn": torch.from_numpy(self.fn.copy()),
        }

    def merge(self, state: Mapping[str, Any]) -> None:
        for key in ("iou", "tp", "fp", "fn"):
            value = to_numpy(state[key])
            if value.shape != (self.num_classes,):
                raise ValueError(
                    f"PanopticQuality.merge: {key} has shape {value.shape}, expected ({self.num_classes},)"
                )
            getattr(self, key)[...] += value.astype(getattr(self, key).dtype)

    def all_reduce(self, group=None) -> None:
        """Sum the statistics over all processes of ``torch.distributed`` (no-op when not initialised)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        t = torch.from_numpy(np.stack([self.iou, self.tp, self.fp, self.fn]).astype(np.float64))
        if torch.distributed.get_backend(group) == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, group=group)
        t = t.cpu().numpy()
        self.iou[...] = t[0]
        self.tp[...], self.fp[...], self.fn[...] = (np.rint(t[i]).astype(np.int64) for i in (1, 2, 3))

    def compute(self) -> dict:
        md = self.metadata
        labels = list(md.class_names)
        if len(set(labels)) != len(labels):
            labels = [f"{c}:{n}" for c, n in enumerate(labels)]
        return summarize_pq(
            self.iou, self.tp, self.fp, self.fn, [md.is_thing(c) for c in range(md.num_classes)], labels
        )
