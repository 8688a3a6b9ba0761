"""The panoptic post-processing alone: the vectorised merge against the per-instance loop
version, on network-like outputs of a Cityscapes-sized frame."""

from __future__ import annotations

from typing import List

import torch

from ..harness import Result, fill_ratios, measure
from ..report import progress
from .base import Settings, Suite


def bench_postprocess(
    device: torch.device,
    height: int = 1025,
    width: int = 2049,
    centers: int = 200,
    repeats: int = 3,
    with_loop: bool = True,
    log=print,
    clock: str = "wall",
) -> List[Result]:
    try:
        from ...postprocess import panoptic_inference, panoptic_inference_reference
    except ImportError as e:
        row = Result("post-processing", f"{height}x{width}", "eval", "-", note=f"skipped: {e}")
        log(progress(row))
        return [row]
    probs, heat, offsets, thing_ids = synthetic_panoptic_outputs(height, width, centers)
    probs, heat, offsets = probs.to(device), heat.to(device), offsets.to(device)
    case = f"{height}x{width}, {centers} centers"
    rows = [
        measure(
            "post-processing",
            case,
            "eval",
            "vectorised",
            lambda: panoptic_inference(probs, heat, offsets, thing_ids, top_k=centers),
            repeats,
            device,
        )
    ]
    log(progress(rows[-1]))
    if with_loop:
        rows.append(
            measure(
                "post-processing",
                case,
                "eval",
                "reference",
                lambda: panoptic_inference_reference(
                    probs[0].cpu(), heat[0].cpu(), offsets[0].cpu(), thing_ids, top_k=centers
                ),
                1,
                device,
                with_memory=False,
                warmup=0,
            )
        )
        log(progress(rows[-1]))
    fill_ratios(rows, clock)
    return rows


def synthetic_panoptic_outputs(height: int, width: int, centers: int, num_classes: int = 19, seed: int = 0):
    """Network-like outputs: class probabilities with thing boxes, a heatmap with one
    Gaussian peak per box and offsets pointing at the box centers."""
    gen = torch.Generator().manual_seed(seed)
    thing_ids = list(range(11, 19))
    labels = torch.full((height, width), 0, dtype=torch.long)
    labels[: height // 3] = 10
    heat = torch.zeros(height, width)
    offsets = torch.zeros(2, height, width)
    cols = max(1, int(round((centers * width / height) ** 0.5)))
    rows = -(-centers // cols)
    cell_h, cell_w = height // rows, width // cols
    yy = torch.arange(height, dtype=torch.float32)[:, None]
    xx = torch.arange(width, dtype=torch.float32)[None, :]
    for i in range(centers):
        r, c = divmod(i, cols)
        y0, x0 = r * cell_h + cell_h // 4, c * cell_w + cell_w // 4
        y1, x1 = y0 + cell_h // 2, x0 + cell_w // 2
        cls = thing_ids[i % len(thing_ids)]
        labels[y0:y1, x0:x1] = cls
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        ys, xs = slice(max(0, int(cy) - 24), int(cy) + 25), slice(max(0, int(cx) - 24), int(cx) + 25)
        heat[ys, xs] = torch.maximum(heat[ys, xs], torch.exp(-((yy[ys] - cy) ** 2 + (xx[:, xs] - cx) ** 2) / 128))
        offsets[0, y0:y1, x0:x1] = cy - yy[y0:y1]
        offsets[1, y0:y1, x0:x1] = cx - xx[:, x0:x1]
    logits = torch.nn.functional.one_hot(labels, num_classes).permute(2, 0, 1).float() * 4
    logits += torch.randn(logits.shape, generator=gen)
    return logits.softmax(0)[None], heat[None, None], offsets[None], thing_ids


def run(s: Settings) -> List[Result]:
    return bench_postprocess(s.device, repeats=s.repeats, with_loop=not s.quick, log=s.log, clock=s.clock)


SUITE = Suite("postprocess", run)
