"""Time PanopticTargetGenerator on a Cityscapes-sized label (1025x2049, 50 instances).

Run: ``.venv/bin/python benchmarks/bench_targets.py [--repeats N]``. Prints the median in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from axial_deeplab.data.targets import PanopticTargetGenerator


def synthetic_label(height=1025, width=2049, num_instances=50, num_classes=19, thing_ids=range(11, 19), seed=0):
    """Stuff background of random classes plus ``num_instances`` rectangles of thing classes (some crowd)."""
    rng = np.random.default_rng(seed)
    thing_ids = list(thing_ids)
    stuff_ids = [c for c in range(num_classes) if c not in thing_ids]
    semantic = np.full((height, width), stuff_ids[0], dtype=np.int64)
    semantic[: height // 3] = stuff_ids[1]
    semantic[-40:] = 255
    instance = np.zeros((height, width), dtype=np.int64)
    crowd = np.zeros((height, width), dtype=bool)
    for i in range(1, num_instances + 1):
        h, w = rng.integers(20, 250), rng.integers(20, 400)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        semantic[y : y + h, x : x + w] = rng.choice(thing_ids)
        instance[y : y + h, x : x + w] = i
        crowd[y : y + h, x : x + w] = i % 10 == 0
    return {
        "semantic": torch.from_numpy(semantic),
        "instance": torch.from_numpy(instance),
        "crowd": torch.from_numpy(crowd),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--height", type=int, default=1025)
    parser.add_argument("--width", type=int, default=2049)
    parser.add_argument("--instances", type=int, default=50)
    args = parser.parse_args(argv)
    sample = synthetic_label(args.height, args.width, args.instances)
    generator = PanopticTargetGenerator(thing_ids=range(11, 19))
    generator(sample)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generator(sample)
        times.append((time.perf_counter() - start) * 1e3)
    print(
        f"targets {args.height}x{args.width}, {args.instances} instances: "
        f"median {statistics.median(times):.1f} ms (min {min(times):.1f} ms, {args.repeats} runs)"
    )


if __name__ == "__main__":
    main()
