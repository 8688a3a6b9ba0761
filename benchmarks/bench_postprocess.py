"""Time the vectorised panoptic merge against the per-instance loop version.

Scene: a 1025x2049 Cityscapes-like frame (19 classes, 8 thing classes) with
``--instances`` boxes of thing classes; the network outputs are the targets of
that label (softmax of noisy one-hot logits, Gaussian centers, exact offsets
plus noise). Both versions get the same probabilities and must agree.

Run: ``.venv/bin/python benchmarks/bench_postprocess.py [--instances 200] [--repeats 10]``.
Prints median wall and process-CPU times (the latter is steadier on a shared machine) and the
speed-up; ``--device cuda`` times the vectorised version on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from axial_deeplab.data.targets import PanopticTargetGenerator
from axial_deeplab.postprocess import panoptic_inference, panoptic_inference_reference

THING_IDS = list(range(11, 19))


def synthetic_outputs(height=1025, width=2049, num_instances=200, num_classes=19, seed=0):
    """Network-like outputs (probs (1, C, H, W), heatmap (1, 1, H, W), offsets (1, 2, H, W))."""
    rng = np.random.default_rng(seed)
    semantic = np.zeros((height, width), dtype=np.int64)
    semantic[: height // 3] = 10
    semantic[height // 3 : height // 2] = 2
    instance = np.zeros((height, width), dtype=np.int64)
    # Boxes on a jittered grid so that (almost) every instance keeps a visible center.
    cols = int(np.ceil(np.sqrt(num_instances * width / height)))
    rows = int(np.ceil(num_instances / cols))
    cell_h, cell_w = height // rows, width // cols
    for i in range(num_instances):
        r, c = divmod(i, cols)
        h, w = rng.integers(cell_h // 2, cell_h + 1), rng.integers(cell_w // 2, cell_w + 1)
        y = r * cell_h + rng.integers(0, cell_h - h + 1)
        x = c * cell_w + rng.integers(0, cell_w - w + 1)
        semantic[y : y + h, x : x + w] = rng.choice(THING_IDS)
        instance[y : y + h, x : x + w] = i + 1
    targets = PanopticTargetGenerator(THING_IDS)(
        {"semantic": torch.from_numpy(semantic), "instance": torch.from_numpy(instance)}
    )
    gen = torch.Generator().manual_seed(seed)
    logits = torch.nn.functional.one_hot(targets["semantic"], num_classes).permute(2, 0, 1).float() * 4
    logits += torch.randn(logits.shape, generator=gen)
    probs = logits.softmax(dim=0)[None]
    heat = targets["center"][None]
    offsets = (targets["offset"] + 0.5 * torch.randn(targets["offset"].shape, generator=gen))[None]
    return probs, heat, offsets


def _timed_ms(fn, device):
    """(wall ms, process CPU ms): on a shared machine CPU time is the steadier of the two."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--height", type=int, default=1025)
    parser.add_argument("--width", type=int, default=2049)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    probs, heat, offsets = synthetic_outputs(args.height, args.width, args.instances)
    kw = dict(
        thing_ids=THING_IDS,
        label_divisor=1000,
        stuff_area=2048,
        threshold=0.1,
        nms_kernel=13,
        top_k=max(200, args.instances),
    )
    d = [t.to(args.device) for t in (probs, heat, offsets)]
    fast = panoptic_inference(*d, semantic_is_probs=True, **kw)[0]
    ref = panoptic_inference_reference(probs[0], heat[0], offsets[0], **kw)
    agree = torch.equal(fast["panoptic"].cpu(), ref["panoptic"])
    print(
        f"{args.height}x{args.width}, {probs.shape[1]} classes, {len(fast['centers'])} centers, "
        f"{len(fast['instances']['ids'])} instances, {torch.get_num_threads()} thread(s); "
        f"outputs identical: {agree}"
    )
    # Interleaved runs, so that load from other processes hits both versions alike.
    t_fast, t_ref = [], []
    for i in range(args.repeats):
        t_fast.append(_timed_ms(lambda: panoptic_inference(*d, semantic_is_probs=True, **kw), args.device))
        if i < max(1, args.repeats // 2):
            t_ref.append(_timed_ms(lambda: panoptic_inference_reference(probs[0], heat[0], offsets[0], **kw), "cpu"))
    for label, col in (("wall", 0), ("CPU", 1)):
        fast_ms = statistics.median(t[col] for t in t_fast)
        ref_ms = statistics.median(t[col] for t in t_ref)
        print(
            f"{label:>4} time  vectorised ({args.device}): {fast_ms:7.1f} ms   loop reference (cpu): "
            f"{ref_ms:7.1f} ms   speed-up {ref_ms / fast_ms:.1f}x"
        )
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
