"""Panoptic merge and evaluation under adversarial predictions: thousands of tiny segments, a
million segment ids, all-void maps, one giant segment, NaN / inf outputs of a diverged model.
Each case must finish without an exception, give a sensible result, and stay within generous
time and memory bounds that a quadratic table or a K x H x W stack would break."""

import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings

import numpy as np
import pytest
import torch

from axial_deeplab.data.meta import PanopticMetadata
from axial_deeplab.evaluation import InstanceAP, PanopticQuality, SemanticIoU
from axial_deeplab.postprocess import NonFiniteWarning, panoptic_inference

IGNORE = 255


def md(label_divisor=1000):
    return PanopticMetadata("load", ["road", "car", "person"], [1, 2], label_divisor=label_divisor, ignore_label=IGNORE)


def checkerboard(n, num_classes=3, thing=1):
    """Every pixel a thing pixel; a 1-pixel center peak on every other pixel of every other row."""
    probs = torch.zeros(1, num_classes, n, n)
    probs[:, thing] = 1.0
    heat = torch.zeros(1, 1, n, n)
    heat[0, 0, ::2, ::2] = 1.0
    return probs, heat, torch.zeros(1, 2, n, n)


def run_in_subprocess(script: str, timeout=120) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- tiny segments
def test_thousands_of_tiny_centers_are_bounded_by_top_k():
    probs, heat, offsets = checkerboard(256)  # 16384 peaks above the threshold
    start = time.perf_counter()
    r = panoptic_inference(probs, heat, offsets, [1, 2], top_k=200, nms_kernel=1)[0]
    elapsed = time.perf_counter() - start
    assert len(r["centers"]) == 200 and len(r["instances"]["ids"]) == 200
    assert int(r["instances"]["areas"].sum()) == 256 * 256  # every thing pixel in some instance
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_top_k_disabled_gives_every_tiny_instance_or_a_clear_error():
    probs, heat, offsets = checkerboard(128)  # 4096 centers
    with pytest.raises(ValueError, match="label_divisor.*top_k"):
        panoptic_inference(probs, heat, offsets, [1, 2], top_k=None, nms_kernel=1, label_divisor=1000)
    r = panoptic_inference(probs, heat, offsets, [1, 2], top_k=None, nms_kernel=1, label_divisor=1 << 20)[0]
    assert len(r["instances"]["ids"]) == 4096
    assert set(r["instances"]["areas"].tolist()) <= {1, 2, 4}  # each center keeps its own 2x2 block


MANY_CENTERS_SCRIPT = """
    import json, resource, time, torch
    from axial_deeplab.postprocess import panoptic_inference
    torch.set_num_threads(1)
    n = 256
    probs = torch.zeros(1, 3, n, n); probs[:, 1] = 1.0
    heat = torch.zeros(1, 1, n, n); heat[0, 0, ::2, ::2] = 1.0      # 16384 centers
    offsets = torch.randn(1, 2, n, n, generator=torch.Generator().manual_seed(0)) * 64
    def rss_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
    before = rss_kb("VmRSS:")
    start = time.perf_counter()
    r = panoptic_inference(probs, heat, offsets, [1], top_k=None, nms_kernel=1, label_divisor=1 << 20)[0]
    print(json.dumps({"seconds": time.perf_counter() - start, "extra_mb": (rss_kb("VmHWM:") - before) / 1024,
                      "area": int(r["instances"]["areas"].sum())}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory read from /proc (Linux)")
def test_top_k_disabled_with_scattered_offsets_stays_bounded():
    """16k centers and pixels pointing all over: the nearest-center grid must not build a
    (cells x centers) table for all cells at once (it took 1.2 GB here, 19 GB at 512 x 512)."""
    stats = run_in_subprocess(MANY_CENTERS_SCRIPT)
    assert stats["area"] == 256 * 256
    assert stats["extra_mb"] < 500, stats
    assert stats["seconds"] < 30, stats


# --------------------------------------------------------------------------- a million ids in PQ
def test_a_million_segment_ids_in_pq_is_linear():
    """1024 x 1024 prediction and ground truth with a distinct id on every pixel: a dense
    (gt ids x predicted ids) table would be 8 TiB."""
    n = 1024
    meta = md(label_divisor=1 << 22)
    ids = np.arange(n * n, dtype=np.int64).reshape(n, n) + 1
    sem = np.ones((n, n), np.int64)
    ev = PanopticQuality(meta)
    tracemalloc.start()
    start = time.perf_counter()
    ev.update(1 * meta.label_divisor + ids, sem, ids)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    r = ev.compute()
    assert r["All"]["pq"] == pytest.approx(1.0) and ev.tp[1] == n * n and ev.fp.sum() == ev.fn.sum() == 0
    assert elapsed < 20, f"{elapsed:.1f} s"
    assert peak < 600 * 2**20, f"{peak / 2**20:.0f} MB"


def test_many_segment_ids_in_pq_files_are_linear(tmp_path):
    """The ``pq`` command's path: 256 x 256 predicted ids against one ground-truth segment (a
    dense id-pair table would take 32 GiB); the scores must equal the in-memory evaluator's."""
    from axial_deeplab.data.panoptic_io import write_panoptic_png
    from axial_deeplab.evaluation.pq_files import pq_compute_files

    n = 256
    for sub in ("gt", "pred"):
        (tmp_path / sub).mkdir()
    write_panoptic_png(tmp_path / "gt" / "a.png", np.ones((n, n), np.int64))
    write_panoptic_png(tmp_path / "pred" / "a.png", np.arange(1, n * n + 1, dtype=np.int64).reshape(n, n))
    cats = [{"id": 1, "name": "x", "isthing": 1}]
    (tmp_path / "gt.json").write_text(
        json.dumps(
            {
                "categories": cats,
                "images": [{"id": 1, "file_name": "a.jpg", "height": n, "width": n}],
                "annotations": [
                    {
                        "image_id": 1,
                        "file_name": "a.png",
                        "segments_info": [{"id": 1, "category_id": 1, "iscrowd": 0, "area": n * n}],
                    }
                ],
            }
        )
    )
    (tmp_path / "pred.json").write_text(
        json.dumps(
            {
                "annotations": [
                    {
                        "image_id": 1,
                        "file_name": "a.png",
                        "segments_info": [{"id": i, "category_id": 1} for i in range(1, n * n + 1)],
                    }
                ]
            }
        )
    )
    tracemalloc.start()
    start = time.perf_counter()
    r = pq_compute_files(tmp_path / "gt.json", tmp_path / "gt", tmp_path / "pred.json", tmp_path / "pred", workers=1)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert r["per_class"][1]["fp"] == n * n and r["per_class"][1]["fn"] == 1 and r["All"]["pq"] == 0.0
    assert elapsed < 30, f"{elapsed:.1f} s"
    assert peak < 600 * 2**20, f"{peak / 2**20:.0f} MB"


def test_shattered_prediction_against_one_segment():
    n = 512
    meta = md(label_divisor=1 << 20)
    pred = 1 * meta.label_divisor + np.arange(n * n, dtype=np.int64).reshape(n, n) + 1
    ev = PanopticQuality(meta)
    ev.update(pred, np.ones((n, n), np.int64), np.ones((n, n), np.int64))
    r = ev.compute()
    assert (ev.tp.sum(), ev.fp[1], ev.fn[1]) == (0, n * n, 1)
    assert r["All"]["pq"] == 0.0 and 0.0 <= r["Things"]["pq"] <= 1.0


# --------------------------------------------------------------------------- all void
def test_all_void_prediction_scores_zero_against_ground_truth():
    n = 64
    sem = np.zeros((n, n), np.int64)
    sem[:, n // 2 :] = 1
    inst = np.where(sem == 1, 1, 0)
    ev = PanopticQuality(md())
    ev.update(np.full((n, n), -1), sem, inst)
    r = ev.compute()
    assert r["All"]["pq"] == 0.0 and r["All"]["n"] == 2 and ev.fn.sum() == 2 and ev.fp.sum() == 0
    # The merge of an all-void output (no centers, stuff below stuff_area) is all void too.
    out = panoptic_inference(
        torch.softmax(torch.zeros(1, 3, n, n), 1),
        torch.zeros(1, 1, n, n),
        torch.zeros(1, 2, n, n),
        [1, 2],
        stuff_area=n * n + 1,
    )[0]
    assert (out["panoptic"] == -1).all() and out["segments_info"] == []


def test_all_void_ground_truth_counts_nothing():
    n = 64
    void = np.full((n, n), IGNORE, np.int64)
    ev = PanopticQuality(md())
    ev.update(np.full((n, n), 1001), void, np.zeros((n, n), np.int64))  # prediction entirely on void
    ev.update(np.full((n, n), -1), void, np.zeros((n, n), np.int64))
    r = ev.compute()
    assert ev.tp.sum() == ev.fp.sum() == ev.fn.sum() == 0 and r["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    miou = SemanticIoU(3, ignore_label=IGNORE)
    miou.update(np.zeros((n, n), np.int64), void)
    assert miou.compute()["miou"] == 0.0


# --------------------------------------------------------------------------- one giant segment
def test_one_giant_segment_is_matched():
    n = 256
    probs = torch.zeros(1, 3, n, n)
    probs[:, 1] = 1.0
    heat = torch.zeros(1, 1, n, n)
    heat[0, 0, n // 2, n // 2] = 1.0
    r = panoptic_inference(probs, heat, torch.randn(1, 2, n, n) * 50, [1, 2])[0]
    assert (r["panoptic"] == 1001).all() and r["instances"]["areas"].tolist() == [n * n]
    ev = PanopticQuality(md())
    ev.update(r["panoptic"], torch.ones(n, n, dtype=torch.long), torch.full((n, n), 7))
    assert ev.compute()["All"]["pq"] == pytest.approx(1.0) and ev.tp[1] == 1
    stuff = panoptic_inference(
        torch.eye(3)[0].view(1, 3, 1, 1).expand(1, 3, n, n), heat, torch.zeros(1, 2, n, n), [1, 2]
    )[0]
    assert (stuff["panoptic"] == 0).all()
    ev = PanopticQuality(md())
    ev.update(stuff["panoptic"], torch.zeros(n, n, dtype=torch.long), torch.zeros(n, n, dtype=torch.long))
    assert ev.compute()["Stuff"]["pq"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- mask AP
def test_instance_ap_with_thousands_of_tiny_ground_truth_instances():
    """pycocotools' area() overflows on 256+ masks at once, and one full-image mask per instance
    is quadratic: 16384 one-pixel instances must be fine."""
    n = 128
    meta = md()
    sem = np.ones((n, n), np.int64)
    inst = np.arange(n * n, dtype=np.int64).reshape(n, n) + 1
    ap = InstanceAP(meta)
    start = time.perf_counter()
    ap.update(
        {"masks": np.zeros((0, n, n), bool), "classes": np.zeros(0), "scores": np.zeros(0)},
        {"semantic": sem, "instance": inst},
    )
    assert time.perf_counter() - start < 10
    assert len(ap.gt_annotations) == n * n and all(a["area"] == 1.0 for a in ap.gt_annotations[:10])
    # The same instances found by a perfect prediction of 300 of them score AP > 0.
    small = inst[:20, :15]
    ap = InstanceAP(meta)
    masks = small[None] == np.arange(1, 301)[:, None, None] + 0 * small.min()
    ap.update(
        {"masks": masks, "classes": np.ones(300), "scores": np.linspace(1, 0.5, 300)},
        {"semantic": np.ones_like(small), "instance": small},
    )
    out = ap.compute()
    assert len(ap.gt_annotations) == 300 and 0.0 < out["ap50"] <= 1.0


def test_instance_ap_encodes_like_the_mask_path():
    from axial_deeplab.evaluation.instance_ap import _encode, _encode_labels

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, size=(13, 17))
    ids[-1, -1] = 5  # a segment that ends on the last pixel
    wanted = np.array([0, 1, 3, 5])
    assert _encode_labels(ids, wanted) == _encode(ids[None] == wanted[:, None, None])


# --------------------------------------------------------------------------- NaN / inf
def _scene(n=48):
    """Stuff class 0 on the left, two car instances on the right with their centers."""
    logits = torch.zeros(1, 3, n, n)
    logits[0, 0, :, : n // 2] = 10.0
    logits[0, 1, :, n // 2 :] = 10.0
    heat = torch.zeros(1, 1, n, n)
    heat[0, 0, n // 4, 3 * n // 4] = 0.9
    heat[0, 0, 3 * n // 4, 3 * n // 4] = 0.8
    rows = torch.arange(n).view(n, 1).float()
    offsets = torch.zeros(1, 2, n, n)
    offsets[0, 0] = torch.where(rows < n // 2, n // 4 - rows, 3 * n // 4 - rows).expand(n, n)
    offsets[0, 1] = 3 * n // 4 - torch.arange(n).float().view(1, n)
    return logits, heat, offsets


def _one_warning(record):
    mine = [w for w in record if issubclass(w.category, NonFiniteWarning)]
    assert len(mine) == 1, [str(w.message) for w in mine]
    return str(mine[0].message)


def test_clean_scene_has_no_warning():
    logits, heat, offsets = _scene()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = panoptic_inference(logits, heat, offsets, [1, 2], stuff_area=1, semantic_is_probs=False)[0]
    assert sorted(r["panoptic"].unique().tolist()) == [0, 1001, 1002]


def test_nan_semantic_logits_make_void_pixels_with_one_warning():
    logits, heat, offsets = _scene()
    clean = panoptic_inference(logits, heat, offsets, [1, 2], stuff_area=1, semantic_is_probs=False)[0]
    logits[0, :, :5, :5] = float("nan")  # stuff corner
    logits[0, 2, 30:34, 30:34] = float("inf")  # inside a car
    with pytest.warns(NonFiniteWarning, match=r"semantic \(75 NaN, 16 inf\)") as record:
        r = panoptic_inference(logits, heat, offsets, [1, 2], stuff_area=1, semantic_is_probs=False)[0]
    msg = _one_warning(record)
    assert "center_heatmap" not in msg and "offset_map" not in msg
    bad = torch.zeros(48, 48, dtype=torch.bool)
    bad[:5, :5] = True
    bad[30:34, 30:34] = True
    assert (r["panoptic"][bad] == -1).all()
    assert torch.equal(r["panoptic"][~bad], clean["panoptic"][~bad])
    assert all(np.isfinite(s["score"]) for s in r["segments_info"])
    assert ((r["semantic"] >= 0) & (r["semantic"] < 3)).all()


def test_nan_probabilities_are_still_detected_as_probabilities():
    logits, heat, offsets = _scene()
    probs = logits.softmax(1)
    probs[0, :, 0, 0] = float("nan")
    with pytest.warns(NonFiniteWarning, match="semantic"):
        r = panoptic_inference(probs, heat, offsets, [1, 2], stuff_area=1)[0]
    assert r["panoptic"][0, 0] == -1
    stuff = [s for s in r["segments_info"] if not s["isthing"]]
    assert stuff[0]["score"] == pytest.approx(float(probs[0, 0, 1, 0]), rel=1e-4)  # not softmaxed twice


def test_nan_heatmap_neither_a_center_nor_suppresses_one():
    logits, heat, offsets = _scene()
    heat[0, 0, 12, 33] = float("nan")  # next to the first center
    heat[0, 0, 40, 5] = float("inf")  # on stuff
    heat[0, 0, 0, 47] = float("-inf")
    with pytest.warns(NonFiniteWarning, match=r"center_heatmap \(1 NaN, 2 inf\)") as record:
        r = panoptic_inference(logits, heat, offsets, [1, 2], stuff_area=1, semantic_is_probs=False)[0]
    _one_warning(record)
    assert r["centers"].tolist() == [[12, 36], [36, 36]]
    assert sorted(r["panoptic"].unique().tolist()) == [0, 1001, 1002]
    assert torch.isfinite(r["center_scores"]).all()


def test_nan_and_huge_offsets_leave_those_thing_pixels_void():
    logits, heat, offsets = _scene()
    offsets[0, :, 40:, 40:] = float("nan")
    offsets[0, 0, 0:4, 0:4] = float("nan")  # stuff pixels: offsets unused, stay stuff
    offsets64 = offsets.double()
    offsets64[0, 1, 2, 30] = 1e300  # finite in float64, inf in float32
    with pytest.warns(NonFiniteWarning, match=r"offset_map \(144 NaN, 1 inf\)") as record:
        r = panoptic_inference(logits, heat, offsets64, [1, 2], stuff_area=1, semantic_is_probs=False)[0]
    _one_warning(record)
    pan = r["panoptic"]
    assert (pan[40:, 40:] == -1).all() and pan[2, 30] == -1 and (pan[0:4, 0:4] == 0).all()
    assert int((pan[:40, 24:40] > 1000).sum()) == 40 * 16 - 1  # the rest of the cars: grouped
    finite_but_far = offsets.clone().nan_to_num_(0.0)
    finite_but_far[0, :, ::3] = 1e30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        far = panoptic_inference(logits, heat, finite_but_far, [1, 2], stuff_area=1, semantic_is_probs=False)[0]
    assert int(far["instances"]["areas"].sum()) == 48 * 24  # every car pixel still in some instance


def test_everything_non_finite_is_all_void_and_one_warning_names_all_three():
    n = 64
    nan = torch.full((2, 3, n, n), float("nan"))
    with pytest.warns(NonFiniteWarning) as record:
        out = panoptic_inference(nan, nan[:, :1], nan[:, :2], [1, 2], stuff_area=1)
    msg = _one_warning(record)
    for name in ("semantic", "center_heatmap", "offset_map"):
        assert name in msg
    for r in out:
        assert (r["panoptic"] == -1).all() and r["segments_info"] == [] and len(r["centers"]) == 0
    ev = PanopticQuality(md())
    ev.update(
        torch.stack([r["panoptic"] for r in out]),
        torch.zeros(2, n, n, dtype=torch.long),
        torch.zeros(2, n, n, dtype=torch.long),
    )
    assert ev.compute()["All"]["pq"] == 0.0 and ev.fn[0] == 2
