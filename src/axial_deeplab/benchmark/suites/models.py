"""Whole-model inference with each axial-attention implementation."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..attention import attention_impls, set_attention_impl
from ..harness import Result, fill_ratios, measure, module_step
from ..report import progress
from .base import Settings, Suite

MODEL_CASES = [
    # (model name, input (C, H, W), runs the reference too when not --quick)
    ("axial_resnet_s", (3, 224, 224), True),
    ("axial_deeplab_s", (3, 1025, 2049), False),
    ("axial_deeplab_l", (3, 1025, 2049), False),
]
QUICK_MODEL_CASES = [("axial_resnet_s", (3, 224, 224), True), ("axial_deeplab_s", (3, 1025, 2049), False)]


def bench_models(
    device: torch.device,
    cases=MODEL_CASES,
    impls: Optional[Sequence[str]] = None,
    repeats: int = 3,
    with_memory: bool = True,
    log=print,
    clock: str = "wall",
) -> List[Result]:
    """Models come from ``axial_deeplab.create_model``; a model that is not registered is
    reported as skipped. Inputs above 512x512 run once, without a warm-up or a memory run."""
    from ... import create_model, list_models

    impls = [i for i in (impls if impls is not None else attention_impls(device)) if i != "memory_efficient"]
    rows: List[Result] = []
    available = set(list_models())
    for name, (c, h, w), with_reference in cases:
        case = f"{name} {h}x{w}"
        if name not in available:
            rows.append(Result("model", case, "eval", "-", note=f"skipped: model {name!r} is not registered"))
            log(progress(rows[-1]))
            continue
        torch.manual_seed(0)
        model = create_model(name).to(device).eval()
        x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0)).to(device)
        for impl in impls:
            if impl == "reference" and not with_reference:
                rows.append(
                    Result(
                        "model",
                        case,
                        "eval",
                        impl,
                        note="skipped: the reference's L x L tensors at this size take minutes",
                    )
                )
                log(progress(rows[-1]))
                continue
            set_attention_impl(model, impl)
            big = h * w > 512 * 512
            rows.append(
                measure(
                    "model",
                    case,
                    "eval",
                    impl,
                    module_step(model, x, "eval"),
                    1 if big else repeats,
                    device,
                    with_memory and not big,
                    warmup=0 if big else 1,
                )
            )
            log(progress(rows[-1]))
        del model
    fill_ratios(rows, clock)
    return rows


def run(s: Settings) -> List[Result]:
    return bench_models(
        s.device,
        QUICK_MODEL_CASES if s.quick else MODEL_CASES,
        impls=s.impls,
        repeats=max(1, s.repeats // 3) if s.quick else s.repeats,
        with_memory=s.with_memory,
        log=s.log,
        clock=s.clock,
    )


SUITE = Suite("models", run)
