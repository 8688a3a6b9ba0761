"""COCO-style mask AP of thing instances, computed by pycocotools' COCOeval.

Masks are kept run-length encoded (small), so the evaluator streams over a dataset; its state is
a list of JSON-able annotations that concatenates across processes.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping

import numpy as np

from ..data.meta import PanopticMetadata
from ..data.panoptic_io import compact_ids, to_numpy


def _mask_api():
    from ..errors import require_extra

    return require_extra("pycocotools.mask", "instance AP (eval.compute_ap)", "coco", "pycocotools")


def _encode(masks: np.ndarray) -> list[dict]:
    """(K, H, W) bool -> K RLEs with str counts."""
    if masks.shape[0] == 0:
        return []
    rles = _mask_api().encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def _encode_labels(ids: np.ndarray, wanted: np.ndarray) -> list[dict]:
    """RLEs (str counts) of the segments ``wanted`` of the label map ``ids`` (H, W), read off one
    sort of the pixels in column-major order: no (K, H, W) mask stack, so thousands of tiny
    segments cost one sort plus their runs."""
    mask_utils = _mask_api()
    h, w = ids.shape
    flat = ids.T.ravel()  # COCO RLE runs go down the columns
    order = np.argsort(flat, kind="stable")  # pixel positions grouped by id, ascending within one
    sorted_ids = flat[order]
    starts = np.searchsorted(sorted_ids, wanted, "left")
    ends = np.searchsorted(sorted_ids, wanted, "right")
    out = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        pos = order[s:e]
        br = np.flatnonzero(np.diff(pos) != 1) + 1
        run_start = pos[np.concatenate([[0], br])]
        run_end = pos[np.concatenate([br - 1, [pos.size - 1]])] + 1
        counts = np.empty(2 * run_start.size + 1, np.int64)
        counts[0] = run_start[0]
        counts[2::2] = np.append(run_start[1:], h * w) - run_end  # zeros between runs, then the tail
        counts[1::2] = run_end - run_start
        if counts[-1] == 0:  # COCO RLE ends on the last run of ones when nothing follows it
            counts = counts[:-1]
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts.tolist()}, h, w)
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(rle)
    return out


class InstanceAP:
    """``update(instances, gt)``: ``instances`` is a dict with ``masks`` (K, H, W) bool, ``classes``
    (K,) contiguous ids and ``scores`` (K,); ``gt`` is a sample dict (or any mapping) with
    ``semantic``, ``instance`` and optionally ``crowd`` (H, W). Only thing classes count; a ground
    truth instance takes the majority class of its labelled pixels.

    ``compute()`` -> ``{"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "per_class"}``
    in [0, 1] (NaN where undefined, e.g. no ground truth)."""

    def __init__(self, metadata: PanopticMetadata, max_detections: int = 100):
        _mask_api()  # fail before the evaluation pass, not after it, when pycocotools is missing
        self.metadata = metadata
        self.max_detections = int(max_detections)
        self.reset()

    def reset(self) -> None:
        self.images: list[dict] = []
        self.gt_annotations: list[dict] = []
        self.detections: list[dict] = []

    def update(self, instances: Mapping[str, Any], gt: Mapping[str, Any]) -> None:
        md = self.metadata
        sem = to_numpy(gt["semantic"]).astype(np.int64, copy=False)
        inst = to_numpy(gt["instance"]).astype(np.int64, copy=False)
        crowd = to_numpy(gt["crowd"]).astype(bool) if gt.get("crowd") is not None else np.zeros(sem.shape, bool)
        if sem.ndim != 2 or inst.shape != sem.shape or crowd.shape != sem.shape:
            raise ValueError(
                f"InstanceAP.update: expected (H, W) ground-truth maps, got semantic {sem.shape}, "
                f"instance {inst.shape}, crowd {crowd.shape}"
            )
        H, W = sem.shape
        masks = to_numpy(instances["masks"]).astype(bool)
        classes = to_numpy(instances["classes"]).astype(np.int64).reshape(-1)
        scores = to_numpy(instances["scores"]).astype(np.float64).reshape(-1)
        if masks.ndim != 3 or masks.shape[1:] != (H, W) or not (masks.shape[0] == classes.size == scores.size):
            raise ValueError(
                f"InstanceAP.update: masks {masks.shape}, classes {classes.shape}, scores {scores.shape} "
                f"do not fit ground truth of size {(H, W)}"
            )
        if classes.size and (classes.min() < 0 or classes.max() >= md.num_classes):
            raise ValueError(f"InstanceAP.update: classes outside 0..{md.num_classes - 1}")
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": H, "width": W})

        keep = np.array([md.is_thing(c) for c in classes.tolist()], bool) if classes.size else np.zeros(0, bool)
        for rle, c, s in zip(_encode(masks[keep]), classes[keep].tolist(), scores[keep].tolist()):
            self.detections.append({"image_id": image_id, "category_id": c + 1, "segmentation": rle, "score": s})

        # Ground-truth instances: majority class of the labelled pixels (lowest class on ties),
        # crowd if any pixel is crowd; counted with one sort of (instance, class) pairs, not a
        # full-image mask per instance.
        labelled = sem != md.ignore_label
        inst_c, inst_keys = compact_ids(np.where(inst > 0, inst, -1))
        n_inst = inst_keys.size
        use = labelled & (inst_c > 0)
        C = md.num_classes
        if use.any():
            pair, votes = np.unique(inst_c[use] * C + sem[use], return_counts=True)
            p_inst, p_cls = pair // C, pair % C
            best = np.lexsort((p_cls, -votes, p_inst))  # per instance: most votes, then lowest class
            first = best[np.concatenate([[True], np.diff(p_inst[best]) != 0])]
            gt_ids, gt_cls = p_inst[first], p_cls[first]
            thing = np.zeros(C, bool)
            thing[md.thing_ids] = True
            keep_gt = thing[gt_cls]
            gt_ids, gt_cls = gt_ids[keep_gt], gt_cls[keep_gt]
        else:
            gt_ids = gt_cls = np.zeros(0, np.int64)
        if gt_ids.size:
            mask_utils = _mask_api()
            area = np.bincount(inst_c.ravel(), minlength=n_inst + 1)
            is_crowd = np.bincount(inst_c.ravel(), weights=crowd.ravel(), minlength=n_inst + 1) > 0
            rles = _encode_labels(inst_c, gt_ids)
            bboxes = mask_utils.toBbox(rles).tolist()
            for rle, g, c, bbox in zip(rles, gt_ids.tolist(), gt_cls.tolist(), bboxes):
                self.gt_annotations.append(
                    {
                        "id": len(self.gt_annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(c) + 1,
                        "segmentation": rle,
                        "area": float(area[g]),
                        "bbox": bbox,
                        "iscrowd": int(is_crowd[g]),
                    }
                )

    # -- distributed ---------------------------------------------------------------------------
    def state(self) -> dict[str, list]:
        return {
            "images": list(self.images),
            "gt_annotations": list(self.gt_annotations),
            "detections": list(self.detections),
        }

    def merge(self, state: Mapping[str, list]) -> None:
        offset = len(self.images)
        remap = {}
        for img in state["images"]:
            remap[img["id"]] = offset + len(remap) + 1
            self.images.append(dict(img, id=remap[img["id"]]))
        for ann in state["gt_annotations"]:
            self.gt_annotations.append(dict(ann, image_id=remap[ann["image_id"]], id=len(self.gt_annotations) + 1))
        for det in state["detections"]:
            self.detections.append(dict(det, image_id=remap[det["image_id"]]))

    def all_gather(self, group=None) -> None:
        """Gather every process's annotations into this one (no-op without ``torch.distributed``)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.state(), group=group)
        self.reset()
        for s in states:
            self.merge(s)

    def compute(self) -> dict:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        md = self.metadata
        nan = float("nan")
        names = ["ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"]
        thing_names = {c: md.class_names[c] for c in md.thing_ids}
        empty = dict({k: nan for k in names}, per_class={n: nan for n in thing_names.values()})
        if not self.gt_annotations:
            return empty
        if not self.detections:
            out = dict({k: 0.0 for k in names}, per_class={})
            for c, n in thing_names.items():
                out["per_class"][n] = 0.0 if any(a["category_id"] == c + 1 for a in self.gt_annotations) else nan
            return out
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = {
                "images": self.images,
                "annotations": self.gt_annotations,
                "categories": [{"id": c + 1, "name": md.class_names[c]} for c in md.thing_ids],
            }
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes([dict(d) for d in self.detections])
            ev = COCOeval(coco_gt, coco_dt, iouType="segm")
            ev.params.maxDets = [1, 10, self.max_detections]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = [float(v) if v >= 0 else nan for v in ev.stats[:6]]
        out: dict[str, Any] = dict(zip(names, stats))
        precision = ev.eval["precision"]  # [T, R, K, A, M]
        per_class = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[md.class_names[cat_id - 1]] = float(p.mean()) if p.size else nan
        out["per_class"] = per_class
        return out
