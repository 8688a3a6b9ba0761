"""Score COCO-panoptic files (ground-truth JSON + PNG folder against prediction JSON + PNG folder)
the way panopticapi's ``pq_compute`` does, with the same numbers, over all cores.

As in panopticapi: images pair up by ``image_id`` (here also when one file writes it as text and
the other as a number); predicted segment areas come from the PNG and ground-truth areas from the
JSON; the categories are those of the ground-truth JSON. Unlike it, malformed input stops with
an error naming the file and ids instead of a bare KeyError in a worker or a silently wrong
score: the ground truth passes the same checks as our datasets (no image twice, known
categories, not empty; per image, the PNG's ids and the JSON's the same set both ways), and so
do the predictions (except that they may list extra images); sizes that differ and a missing
prediction are refused too.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..data.panoptic_io import (
    PanopticFormatError,
    check_panoptic_json,
    check_segment_ids,
    compact_ids,
    read_panoptic_json,
    read_panoptic_png,
)
from .panoptic_quality import VOID, accumulate_image_stats, pair_counts, summarize_pq


def score_image(
    gt_ann: Mapping[str, Any],
    pred_ann: Mapping[str, Any],
    gt_folder: str | os.PathLike,
    pred_folder: str | os.PathLike,
    category_ids: set,
    gt_json: str = "ground-truth JSON",
    pred_json: str = "prediction JSON",
) -> dict:
    """Per-category ``[iou_sum, tp, fp, fn]`` of one image pair of files. The JSONs must have
    passed :func:`check_panoptic_json` (which refuses unknown categories against
    ``category_ids``); the PNGs are checked against their entries here."""
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
        gt_segments[int(seg["id"])] = {
            "category_id": seg["category_id"],
            "iscrowd": int(seg.get("iscrowd", 0)),
            "area": seg.get("area"),
        }
    pred_segments = {}
    for seg in pred_ann["segments_info"]:
        pred_segments[int(seg["id"])] = {"category_id": seg["category_id"], "area": 0}

    # Pixel-pair counts through compact ids (0 = void): linear in the pixels however many ids.
    gt_c, gt_keys = compact_ids(gt_ids - 1)
    pred_c, pred_keys = compact_ids(pred_ids - 1)
    G, P = gt_keys.size, pred_keys.size
    pair_g, pair_p, pair_n = pair_counts(gt_c, pred_c, G, P)
    gt_real = np.concatenate([[VOID], gt_keys + 1]).tolist()
    pred_real = np.concatenate([[VOID], pred_keys + 1]).tolist()

    check_segment_ids(gt_real[1:], list(gt_segments), f"{gt_png} (image_id {image_id!r} of {gt_json})")
    check_segment_ids(pred_real[1:], list(pred_segments), f"{pred_png} (image_id {image_id!r} of {pred_json})")
    pred_area = np.bincount(pred_c.ravel(), minlength=P + 1)
    for p in range(1, P + 1):
        pred_segments[pred_real[p]]["area"] = int(pred_area[p])
    if any(s["area"] is None for s in gt_segments.values()):  # tolerate JSONs without areas
        gt_area = dict(zip(gt_real, np.bincount(gt_c.ravel(), minlength=G + 1).tolist()))
        for sid, s in gt_segments.items():
            if s["area"] is None:
                s["area"] = gt_area.get(sid, 0)
    intersections = {
        (gt_real[g], pred_real[p]): n for g, p, n in zip(pair_g.tolist(), pair_p.tolist(), pair_n.tolist())
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
    if len(categories) != len(gt["categories"]):
        ids = [c["id"] for c in gt["categories"]]
        raise PanopticFormatError(f"{gt_json}: duplicate category ids {sorted({i for i in ids if ids.count(i) > 1})}")
    check_panoptic_json(gt, gt_json, categories, what="ground-truth JSON", folders=(gt_folder,))
    check_panoptic_json(pred, pred_json, categories, what="prediction JSON", allow_empty=True)
    pred_by_image = {ann["image_id"]: ann for ann in pred["annotations"]}
    # Ids match exactly as in panopticapi, or else by their text (our datasets give str ids, COCO's are ints).
    pred_by_text = {str(k): v for k, v in pred_by_image.items()}
    pairs = []
    for ann in gt["annotations"]:
        pred_ann = pred_by_image.get(ann["image_id"]) or pred_by_text.get(str(ann["image_id"]))
        if pred_ann is None:
            raise PanopticFormatError(
                f"{pred_json}: no prediction for image_id {ann['image_id']!r} (listed in {gt_json})"
            )
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
