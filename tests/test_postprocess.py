"""Panoptic merge: round trip from ground truth, agreement with the loop reference, center
selection, edge cases, and bounded memory at Cityscapes size."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from axial_deeplab.data.meta import PanopticMetadata
from axial_deeplab.data.targets import PanopticTargetGenerator
from axial_deeplab.evaluation import PanopticQuality
from axial_deeplab.postprocess import (
    find_instance_centers,
    instance_masks,
    max_filter2d,
    nearest_center,
    nearest_center_reference,
    panoptic_inference,
    panoptic_inference_reference,
    semantic_argmax,
)

NUM_CLASSES = 6
THINGS = [3, 4, 5]
IGNORE = 255


def crowded_scene(h=90, w=120, seed=0, n=14):
    """Stuff (classes 0-2) with a void band, tiled by touching and overlapping boxes of 3 thing classes."""
    rng = np.random.default_rng(seed)
    sem = np.zeros((h, w), np.int64)
    sem[: h // 3] = 1
    sem[h // 3 : h // 2, : w // 2] = 2
    sem[-3:] = IGNORE
    inst = np.zeros((h, w), np.int64)
    # A row of touching boxes (no gap), then random overlapping ones on top.
    x = 2
    for i in range(1, 6):
        bw = int(rng.integers(10, 20))
        sem[50:70, x : x + bw] = THINGS[i % 3]
        inst[50:70, x : x + bw] = i
        x += bw
    for i in range(6, n + 1):
        bh, bw = int(rng.integers(9, 25)), int(rng.integers(9, 25))
        y, x = int(rng.integers(0, h - 3 - bh)), int(rng.integers(0, w - bw))
        sem[y : y + bh, x : x + bw] = THINGS[i % 3]
        inst[y : y + bh, x : x + bw] = i
    return torch.from_numpy(sem), torch.from_numpy(inst)


def perfect_outputs(sem, inst, sigma=3.0):
    """Targets of a label used as network outputs: one-hot probabilities, Gaussian centers, offsets."""
    t = PanopticTargetGenerator(THINGS, ignore_label=IGNORE, sigma=sigma)({"semantic": sem, "instance": inst})
    labels = torch.where(sem == IGNORE, torch.zeros_like(sem), sem)  # void pixels: any class
    probs = F.one_hot(labels, NUM_CLASSES).permute(2, 0, 1).float()
    return probs, t["center"], t["offset"]


def metadata():
    return PanopticMetadata(
        "toy", [f"c{i}" for i in range(NUM_CLASSES)], THINGS, label_divisor=1000, ignore_label=IGNORE
    )


def same_partition(pred, sem, inst):
    """Every non-void ground-truth segment is exactly one predicted segment of the same class."""
    valid = sem != IGNORE
    gt_key = sem * 10_000 + inst
    pairs = torch.unique(torch.stack([gt_key[valid], pred[valid]]), dim=1)
    return len(torch.unique(pairs[0])) == pairs.shape[1] == len(torch.unique(pairs[1])) and bool(
        (torch.div(pairs[1], 1000, rounding_mode="floor") == torch.div(pairs[0], 10_000, rounding_mode="floor")).all()
    )


@pytest.mark.parametrize("seed,sigma,nms_kernel", [(0, 3.0, 3), (1, 3.0, 7), (2, 8.0, 13)])
def test_round_trip_gives_back_the_ground_truth(seed, sigma, nms_kernel):
    sem, inst = crowded_scene(seed=seed)
    probs, center, offset = perfect_outputs(sem, inst, sigma)
    sem2, inst2 = crowded_scene(seed=seed + 10)
    probs2, center2, offset2 = perfect_outputs(sem2, inst2, sigma)
    results = panoptic_inference(
        torch.stack([probs, probs2]),
        torch.stack([center, center2]),
        torch.stack([offset, offset2]),
        THINGS,
        label_divisor=1000,
        stuff_area=1,
        threshold=0.1,
        nms_kernel=nms_kernel,
        top_k=200,
    )
    pq = PanopticQuality(metadata())
    for result, (s, i) in zip(results, [(sem, inst), (sem2, inst2)]):
        pan = result["panoptic"]
        assert same_partition(pan, s, i)
        pq.update(pan, s, i)
        # Ids count from 1 per class and the segments list agrees with the map.
        thing_ids = sorted(seg["id"] for seg in result["segments_info"] if seg["isthing"])
        for c in THINGS:
            ids = [x % 1000 for x in thing_ids if x // 1000 == c]
            assert sorted(ids) == list(range(1, len(ids) + 1))
        for seg in result["segments_info"]:
            assert int((pan == seg["id"]).sum()) == seg["area"]
    assert pq.compute()["All"]["pq"] == pytest.approx(1.0)


def random_outputs(b=2, c=NUM_CLASSES, h=70, w=90, seed=0, offset_scale=15.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g) * 2
    heat = F.avg_pool2d(torch.rand(b, 1, h, w, generator=g), 5, 1, 2)  # smooth, many peaks
    heat = (heat - heat.min()) / (heat.max() - heat.min())
    offset = torch.randn(b, 2, h, w, generator=g) * offset_scale
    return logits, heat, offset


@pytest.mark.parametrize(
    "seed,thing_ids,num_classes",
    [(0, THINGS, 6), (1, [0, 1, 2, 3, 4, 5], 6), (2, [], 6), (3, [0], 1), (4, [], 1), (5, [1], 3)],
)
def test_vectorised_equals_loop_reference(seed, thing_ids, num_classes):
    logits, heat, offset = random_outputs(c=num_classes, seed=seed)
    kw = dict(label_divisor=1000, stuff_area=40, threshold=0.3, nms_kernel=5, top_k=40)
    results = panoptic_inference(logits, heat, offset, thing_ids, semantic_is_probs=False, max_elements=4096, **kw)
    probs = logits.softmax(dim=1)
    for b, fast in enumerate(results):
        ref = panoptic_inference_reference(probs[b], heat[b], offset[b], thing_ids, **kw)
        assert torch.equal(fast["panoptic"], ref["panoptic"])
        assert torch.equal(fast["semantic"], ref["semantic"])
        for key in ("ids", "classes", "areas", "centers"):
            assert torch.equal(fast["instances"][key], ref["instances"][key]), key
        torch.testing.assert_close(fast["instances"]["scores"], ref["instances"]["scores"], rtol=1e-5, atol=1e-6)
        assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in fast["segments_info"]] == [
            (s["id"], s["category_id"], s["isthing"], s["area"]) for s in ref["segments_info"]
        ]
        if thing_ids and num_classes > 1:
            assert len(fast["instances"]["ids"]) > 3  # the case exercised the grouping


def test_nearest_center_grid_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    for k in (1, 7, 16, 60, 400):
        centers = torch.randint(0, 200, (k, 2), generator=g).float()
        points = torch.rand(5000, 2, generator=g) * 300 - 50  # some point outside the image
        points[:500] = points[:500].round()  # integer points: exact ties between centers
        points[-3:] = torch.tensor([[1e5, -1e5], [-3e4, 2.0], [7.5, 1e4]])  # wild offsets
        for max_elements in (64, 1 << 22):
            got = nearest_center(points, centers, max_elements=max_elements)
            assert torch.equal(got, nearest_center_reference(points, centers)), (k, max_elements)


def test_majority_vote_and_score():
    probs = torch.zeros(1, 3, 10, 10)
    probs[0, 0] = 1.0
    probs[0, :, 2:8, 2:8] = 0.0
    probs[0, 1, 2:8, 2:5] = 0.75  # 18 px of class 1 with p 0.75
    probs[0, 0, 2:8, 2:5] = 0.25
    probs[0, 2, 2:8, 5:8] = 0.9  # 18 px of class 2 with p 0.9 ...
    probs[0, 0, 2:8, 5:8] = 0.1
    probs[0, 2, 2:4, 2:5] = 0.8  # ... and 6 more: class 2 wins 24 to 12
    probs[0, 1, 2:4, 2:5] = 0.2
    probs[0, 0, 2:4, 2:5] = 0.0
    heat = torch.zeros(1, 1, 10, 10)
    heat[0, 0, 5, 5] = 0.5
    result = panoptic_inference(probs, heat, torch.zeros(1, 2, 10, 10), [1, 2], stuff_area=1, nms_kernel=3)[0]
    assert (result["panoptic"][2:8, 2:8] == 2001).all()  # class 1 pixels join the class-2 instance
    assert (result["panoptic"][0] == 0).all()
    expected_prob = (18 * 0.9 + 6 * 0.8 + 12 * 0.0) / 36  # mean p(class 2) over the mask
    assert result["instances"]["scores"].item() == pytest.approx(expected_prob * 0.5, rel=1e-6)
    assert instance_masks(result).sum().item() == 36


def test_exactly_k_centers_with_ties():
    heat = torch.zeros(1, 1, 40, 40)
    peaks = [(5, 5), (5, 20), (5, 35), (20, 5), (20, 20), (20, 35), (35, 5)]
    for y, x in peaks:
        heat[0, 0, y, x] = 0.5  # seven equal scores
    heat[0, 0, 35, 35] = 0.9
    for k in (1, 3, 7, 8, 50):
        ((centers, scores),) = find_instance_centers(heat, threshold=0.1, nms_kernel=7, top_k=k)
        assert len(centers) == min(k, 8)
        assert centers[0].tolist() == [35, 35]
        assert [tuple(c) for c in centers[1:].tolist()] == peaks[: min(k, 8) - 1]  # ties: raster order
    ((centers, _),) = find_instance_centers(heat, threshold=0.5, nms_kernel=7, top_k=50)
    assert centers.tolist() == [[35, 35]]  # threshold is strict
    ((centers, _),) = find_instance_centers(heat, threshold=0.1, nms_kernel=61, top_k=50)
    assert centers.tolist() == [[35, 35]]  # one window covers all


def test_empty_cases():
    probs = torch.zeros(1, 3, 12, 14)
    probs[0, 2] = 1.0
    probs[0, 2, :, :4] = 0.0
    probs[0, 0, :, :4] = 1.0
    no_centers = panoptic_inference(probs, torch.zeros(1, 1, 12, 14), torch.zeros(1, 2, 12, 14), [2], stuff_area=1)[0]
    assert (no_centers["panoptic"][:, 4:] == -1).all() and (no_centers["panoptic"][:, :4] == 0).all()
    assert no_centers["instances"]["ids"].numel() == 0
    heat = torch.zeros(1, 1, 12, 14)
    heat[0, 0, 3, 3] = 1.0
    no_things = panoptic_inference(probs, heat, torch.zeros(1, 2, 12, 14), [1], stuff_area=1)[0]
    assert set(no_things["panoptic"].unique().tolist()) == {0, 2000}
    assert [s["category_id"] for s in no_things["segments_info"]] == [0, 2]
    small_stuff = panoptic_inference(probs, heat, torch.zeros(1, 2, 12, 14), [], stuff_area=49)[0]
    assert (small_stuff["panoptic"][:, :4] == -1).all()  # 48 px < 49: void
    one_class = panoptic_inference(torch.ones(1, 1, 12, 14), heat, torch.zeros(1, 2, 12, 14), [0])[0]
    assert (one_class["panoptic"] == 1).all()
    unbatched = panoptic_inference(probs[0], heat[0], torch.zeros(2, 12, 14), [2], stuff_area=1)
    assert isinstance(unbatched, dict) and (unbatched["panoptic"][:, 4:] == 2001).all()


def test_helpers_match_plain_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 23, 31, generator=g)
    for k in (1, 3, 5, 7, 13, 41):
        assert torch.equal(max_filter2d(x, k), F.max_pool2d(x, k, stride=1, padding=k // 2)), k
    q = (torch.rand(7, 30, 40, generator=g) * 4).round() / 4  # many exact ties
    values, index = semantic_argmax(q, chunk=257)
    want_values, want_index = q.max(dim=0)
    assert torch.equal(values, want_values) and torch.equal(index, want_index)


def test_bad_arguments():
    probs, heat, offset = torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8), torch.rand(1, 2, 8, 8)
    with pytest.raises(ValueError, match="nms_kernel"):
        panoptic_inference(probs, heat, offset, [1], nms_kernel=4)
    with pytest.raises(ValueError, match="label_divisor"):
        panoptic_inference(probs, heat, offset, [1], top_k=1000, label_divisor=1000)
    with pytest.raises(ValueError, match="offset_map"):
        panoptic_inference(probs, heat, offset[:, :1], [1])
    with pytest.raises(ValueError, match="thing_ids"):
        panoptic_inference(probs, heat, offset, [3])
    with pytest.warns(RuntimeWarning, match="offset_map"):  # NaN offsets: warned, pixels void
        panoptic_inference(probs, heat, offset.clone().fill_(float("nan")), [1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_like_on_cpu():
    logits, heat, offset = random_outputs(seed=7)
    kw = dict(label_divisor=1000, stuff_area=40, threshold=0.3, nms_kernel=5, top_k=40, semantic_is_probs=False)
    cpu = panoptic_inference(logits, heat, offset, THINGS, **kw)
    gpu = panoptic_inference(logits.cuda(), heat.cuda(), offset.cuda(), THINGS, **kw)
    for a, b in zip(cpu, gpu):
        assert b["panoptic"].is_cuda and torch.equal(a["panoptic"], b["panoptic"].cpu())


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from axial_deeplab.postprocess import panoptic_inference
    torch.set_num_threads(1)
    H, W, K = 1025, 2049, 400
    probs = torch.zeros(1, 2, H, W); probs[:, 1] = 1.0          # every pixel a thing pixel
    heat = torch.zeros(1, 1, H, W)
    ys, xs = torch.meshgrid(torch.arange(20) * 51 + 10, torch.arange(20) * 102 + 10, indexing="ij")
    heat[0, 0, ys.reshape(-1), xs.reshape(-1)] = 1.0             # 400 well separated centers
    offset = torch.randn(1, 2, H, W) * 300                       # points all over the image
    def rss_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
    before = rss_kb("VmRSS:")
    result = panoptic_inference(probs, heat, offset, [1], top_k=K, nms_kernel=13)[0]
    print(json.dumps({"before_kb": before, "peak_kb": rss_kb("VmHWM:"),
                      "centers": len(result["centers"]), "instances": len(result["instances"]["ids"])}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory read from /proc (Linux)")
def test_memory_bounded_at_cityscapes_size_with_400_centers():
    """A K x H x W float32 distance tensor would be 400 * 1025 * 2049 * 4 B = 3.4 GB; the merge must
    stay far below (measured as the process's peak resident memory above its level before the call)."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["centers"] == 400 and stats["instances"] > 300
    extra_mb = (stats["peak_kb"] - stats["before_kb"]) / 1024
    assert extra_mb < 400, f"merge used {extra_mb:.0f} MB above its inputs"
