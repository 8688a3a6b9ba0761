"""Score COCO-panoptic files (ground-truth JSON + PNG folder against prediction JSON + PNG folder)
the way panopticapi's ``pq_compute`` does, with the same numbers, over all cores.

As in panopticapi: images pair up by ``image_id`` (here also when one file writes it as text and
the other as a number); predicted segment areas come from the PNG and ground-truth areas from the
JSON; the categories are those of the ground-truth JSON. Unlike it, malformed input (a PNG id
missing from the JSON, an unknown category, sizes that differ, a missing prediction) stops with
an error naming the file instead of a bare KeyError in a worker.
"""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..data.panoptic_io import PanopticFormatError, compact_ids, read_panoptic_json, read_panoptic_png
from .panoptic_quality import VOID, accumulate_image_stats, summarize_pq


def score_image(
    gt_ann: Mapping[str, Any],
    pred_ann: Mapping[str, Any],
    gt_folder: str | os.PathLike,
    pred_folder: str | os.PathLike,
    category_ids: set,
    gt_json: str = "ground-truth JSON",
    pred_json: str = "prediction JSON",
) -> dict:
    """Per-category ``[iou_sum, tp, fp, fn]`` of one image pair of files."""
    image_id = gt_ann["image_id"]
    gt_png = Path(gt_folder) / gt_ann["file_name"]
    pred_png = Path(pred_folder) / pred_ann["file_name"]
    gt_ids = read_panoptic_png(gt_png)
    pred_ids = read_panoptic_png(pred_png)
    if gt_ids.shape != pred_ids.shape:
        raise PanopticFormatError(
            f"{pred_png}: size {pred_ids.shape[1]}x{pred_ids.shape[0]} differs from the ground truth "
            f"{gt_png} ({gt_ids.shape[1]}x{gt_ids.shape[0]})"
        )

    gt_segments = {}
    for seg in gt_ann["segments_info"]:
        if seg["category_id"] not in category_ids:
            raise PanopticFormatError(
                f"{gt_json}: image_id {image_id!r} segment {seg['id']} has unknown category_id {seg['category_id']}"
            )
        gt_segments[int(seg["id"])] = {
            "category_id": seg["category_id"],
            "iscrowd": int(seg.get("iscrowd", 0)),
            "area": seg.get("area"),
        }
    pred_segments = {}
    for seg in pred_ann["segments_info"]:
        if seg["category_id"] not in category_ids:
            raise PanopticFormatError(
                f"{pred_json}: image_id {image_id!r} segment {seg['id']} has unknown category_id {seg['category_id']}"
            )
        pred_segments[int(seg["id"])] = {"category_id": seg["category_id"], "area": 0}

    # Pixel-pair counts through compact ids (0 = void) and one bincount, instead of sorting pixels.
    gt_c, gt_keys = compact_ids(gt_ids - 1)
    pred_c, pred_keys = compact_ids(pred_ids - 1)
    G, P = gt_keys.size, pred_keys.size
    joint = np.bincount((gt_c * (P + 1) + pred_c).ravel(), minlength=(G + 1) * (P + 1)).reshape(G + 1, P + 1)
    gt_real = np.concatenate([[VOID], gt_keys + 1]).tolist()
    pred_real = np.concatenate([[VOID], pred_keys + 1]).tolist()

    pred_area = joint.sum(0)
    for p in range(1, P + 1):
        label = pred_real[p]
        if label not in pred_segments:
            raise PanopticFormatError(
                f"{pred_png}: segment id {label} is in the PNG but not in {pred_json} (image_id {image_id!r})"
            )
        pred_segments[label]["area"] = int(pred_area[p])
    absent = [sid for sid, s in pred_segments.items() if s["area"] == 0]
    if absent:
        raise PanopticFormatError(
            f"{pred_json}: image_id {image_id!r} lists segment ids {absent[:5]} that are not in {pred_png}"
        )
    unknown_gt = [g for g in gt_real[1:] if g not in gt_segments]
    if unknown_gt:
        raise PanopticFormatError(
            f"{gt_png}: segment ids {unknown_gt[:5]} are in the PNG but not in {gt_json} (image_id {image_id!r})"
        )
    if any(s["area"] is None for s in gt_segments.values()):  # tolerate JSONs without areas
        gt_area = dict(zip(gt_real, joint.sum(1).tolist()))
        for sid, s in gt_segments.items():
            if s["area"] is None:
                s["area"] = gt_area.get(sid, 0)
    nz_g, nz_p = np.nonzero(joint)
    intersections = {
        (gt_real[g], pred_real[p]): int(joint[g, p]) for g, p in zip(nz_g.tolist(), nz_p.tolist())
    }
    return accumulate_image_stats(intersections, gt_segments, pred_segments, {})


def _score_chunk(args) -> list[dict]:
    pairs, gt_folder, pred_folder, category_ids, gt_json, pred_json = args
    return [
        score_image(gt_ann, pred_ann, gt_folder, pred_folder, category_ids, gt_json, pred_json)
        for gt_ann, pred_ann in pairs
    ]


def pq_compute_files(
    gt_json: str | os.PathLike,
    gt_folder: str | os.PathLike,
    pred_json: str | os.PathLike,
    pred_folder: str | os.PathLike,
    workers: int | None = None,
) -> dict:
    """panopticapi's ``pq_compute`` result: ``{"All", "Things", "Stuff": {"pq", "sq", "rq", "n"},
    "per_class": {category_id: {"pq", "sq", "rq", "tp", "fp", "fn"}}}``, values in [0, 1].

    ``workers``: processes to use (default: all cores; 1 = in this process).
    """
    gt_json, pred_json = str(gt_json), str(pred_json)
    for folder, what in ((gt_folder, "ground-truth PNG folder"), (pred_folder, "prediction PNG folder")):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: {what} not found")
    gt = read_panoptic_json(gt_json, require_categories=True)
    pred = read_panoptic_json(pred_json, require_categories=False)
    categories = {c["id"]: c for c in gt["categories"]}
    pred_by_image = {}
    for ann in pred["annotations"]:
        if ann["image_id"] in pred_by_image:
            raise PanopticFormatError(f"{pred_json}: image_id {ann['image_id']!r} appears twice")
        pred_by_image[ann["image_id"]] = ann
    # Ids match exactly as in panopticapi, or else by their text (our datasets give str ids, COCO's are ints).
    pred_by_text = {str(k): v for k, v in pred_by_image.items()}
    pairs = []
    for ann in gt["annotations"]:
        pred_ann = pred_by_image.get(ann["image_id"]) or pred_by_text.get(str(ann["image_id"]))
        if pred_ann is None:
            raise PanopticFormatError(f"{pred_json}: no prediction for image_id {ann['image_id']!r} (listed in {gt_json})")
        pairs.append((ann, pred_ann))

    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(pairs)))
    cat_ids = set(categories)
    if workers == 1:
        chunks = [pairs]
    else:
        per = max(1, min(32, -(-len(pairs) // (4 * workers))))
        chunks = [pairs[i : i + per] for i in range(0, len(pairs), per)]
    tasks = [(c, str(gt_folder), str(pred_folder), cat_ids, gt_json, pred_json) for c in chunks]
    stats: dict = {}
    if workers == 1:
        _merge_all(stats, map(_score_chunk, tasks))
    else:
        with multiprocessing.Pool(processes=workers) as pool:
            _merge_all(stats, pool.imap(_score_chunk, tasks))
    cats = list(categories)
    zero = [0.0, 0, 0, 0]
    return summarize_pq(
        [stats.get(c, zero)[0] for c in cats],
        [stats.get(c, zero)[1] for c in cats],
        [stats.get(c, zero)[2] for c in cats],
        [stats.get(c, zero)[3] for c in cats],
        [int(categories[c].get("isthing", 0)) == 1 for c in cats],
        cats,
    )


def _merge_all(stats: dict, chunks) -> None:
    # Summed image by image in JSON order, so the result does not depend on the worker count.
    for chunk in chunks:
        for image_stats in chunk:
            for cat, s in image_stats.items():
                acc = stats.setdefault(cat, [0.0, 0, 0, 0])
                for i in range(4):
                    acc[i] += s[i]
