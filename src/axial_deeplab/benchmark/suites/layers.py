"""Layer pairs: height+width axial attention, in every implementation, against a 3x3 conv
of the same width, eval forward and train forward+backward, timed in turns."""

from __future__ import annotations

from copy import deepcopy
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..attention import attention_impls, layer_pair, set_attention_impl
from ..harness import Result, fill_ratios, measure, module_step, time_interleaved
from ..report import progress
from .base import Settings, Suite

LAYER_SHAPES = [(2, 64, 56, 56), (2, 128, 28, 28), (1, 128, 65, 129), (1, 256, 65, 129)]
QUICK_LAYER_SHAPES = LAYER_SHAPES
# On a GPU also the size the Triton kernels are tuned for: a batch of 8 Cityscapes crops at
# output stride 16 (65x129), 256 channels.
GPU_LAYER_SHAPES = LAYER_SHAPES + [(8, 256, 65, 129)]


def bench_layers(
    device: torch.device,
    shapes=LAYER_SHAPES,
    modes=("eval", "train"),
    impls: Optional[Sequence[str]] = None,
    repeats: int = 5,
    with_memory: bool = True,
    log=print,
    clock: str = "wall",
) -> List[Result]:
    impls = list(impls) if impls is not None else attention_impls(device)
    rows: List[Result] = []
    for shape in shapes:
        b, c, h, w = shape
        case = "x".join(map(str, shape))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).to(device)
        torch.manual_seed(0)
        pair = layer_pair(c).to(device)
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device)
        for mode in modes:
            # the conv and every implementation (each on its own copy of the pair) in turns
            steps = {"conv3x3": module_step(conv.train(mode == "train"), x, mode)}
            for impl in impls:
                if impl == "memory_efficient" and mode == "eval":
                    continue  # same forward as "fast"; it differs only in the backward
                copy = deepcopy(pair).train(mode == "train")
                set_attention_impl(copy, impl)
                steps[impl] = module_step(copy, x, mode)
            timed = time_interleaved(steps, repeats, device)
            for name, step in steps.items():
                rows.append(
                    measure("layer pair", case, mode, name, step, repeats, device, with_memory, timed=timed[name])
                )
                log(progress(rows[-1]))
    fill_ratios(rows, clock)
    return rows


def layer_shapes(s: Settings):
    """The shapes for the command's settings (shared with the attention-core suite)."""
    if s.device.type != "cpu":
        return GPU_LAYER_SHAPES
    return QUICK_LAYER_SHAPES if s.quick else LAYER_SHAPES


def run(s: Settings) -> List[Result]:
    return bench_layers(
        s.device, layer_shapes(s), impls=s.impls, repeats=s.repeats, with_memory=s.with_memory, log=s.log, clock=s.clock
    )


SUITE = Suite("layers", run)
