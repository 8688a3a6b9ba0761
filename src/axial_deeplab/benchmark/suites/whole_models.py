"""Whole models against the convolutional models they replace: Axial-ResNet-S against
ResNet-50 and Axial-DeepLab-S against Panoptic-DeepLab-R50, eval forward and training step
(forward, backward of the summed outputs), timed in turns in one process, at 1 thread and at
2 (or torch's thread count, if higher), with peak memory and ratios to the conv model.

The paper's claim is that axial attention costs about a convolution's multiply-adds; whether
it also costs a convolution's time and memory shows only when whole models run side by side
on the same input. The panoptic models are timed through ``predict_raw`` (the network,
without the post-processing, which has a suite of its own).

Memory: peak is the harness's measure (on CPU the high-water mark of bytes allocated through
PyTorch's allocator during one step, relative to its start: activations, gradients, scratch;
not the weights, not the process's resident size), measured once at the first thread count.
Training activation memory per image at full Cityscapes resolution (1025x2049) is
extrapolated from the training rows: peak = fixed + per-pixel x (batch x H x W), fitted
through the smallest and the largest training input, which also gives the batch that would
fit on an 80 GB GPU.

Off by default (about 15 minutes on 2 CPU cores); ``--only whole_models`` runs it and
``--quick`` runs it at tiny sizes (seconds: a check that it runs, not figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..harness import Result, measure, time_interleaved
from ..report import progress, table
from .base import Settings, Suite

Shape = Tuple[int, int, int, int]
# (axial model, conv model it replaces, mode, input shape)
Case = Tuple[str, str, str, Shape]

CLASSIFIERS = ("axial_resnet_s", "resnet50")
PANOPTIC = ("axial_deeplab_s", "panoptic_deeplab_r50")
# Axial-DeepLab-S with its attention activations recomputed in the backward (each block's
# height + width pair replayed as one, layers.activation_recompute): the memory comparison with
# and without; the setting that brings the peak under Panoptic-DeepLab-R50's.
RECOMPUTE = "axial_deeplab_s+recompute"
PANOPTIC_RECOMPUTE = (RECOMPUTE, "panoptic_deeplab_r50")
VARIANTS: Dict[str, Callable[[], torch.nn.Module]] = {
    RECOMPUTE: lambda: _create("axial_deeplab_s", attention_kw={"recompute_activations": True}),
}
CASES: List[Case] = [
    (*CLASSIFIERS, "eval", (1, 3, 224, 224)),
    (*CLASSIFIERS, "train", (4, 3, 224, 224)),
    (*PANOPTIC, "eval", (1, 3, 513, 1025)),
    (*PANOPTIC, "train", (2, 3, 257, 257)),
    (*PANOPTIC, "train", (1, 3, 513, 1025)),  # a Cityscapes crop at half resolution (fits in RAM here)
    (*PANOPTIC, "train", (2, 3, 513, 513)),  # the memory comparison's step
    (*PANOPTIC_RECOMPUTE, "train", (2, 3, 257, 257)),
    (*PANOPTIC_RECOMPUTE, "train", (2, 3, 513, 513)),
]
QUICK_CASES: List[Case] = [
    (*CLASSIFIERS, "eval", (1, 3, 32, 32)),
    (*CLASSIFIERS, "train", (2, 3, 32, 32)),
    (*PANOPTIC, "eval", (1, 3, 33, 65)),
    (*PANOPTIC, "train", (1, 3, 33, 33)),
    (*PANOPTIC, "train", (1, 3, 33, 65)),
    (*PANOPTIC_RECOMPUTE, "train", (1, 3, 33, 65)),
]
FULL_RESOLUTION = (1025, 2049)  # Cityscapes, where the activation memory per image is estimated
GPU_BYTES = 80 * 10**9
BIG_PIXELS = 512 * 512  # above this (batch x H x W) a case is timed at most 3 times


@dataclass
class ModelResult(Result):
    """A whole-model row: also the thread count and the peak memory over the conv model's."""

    threads: Optional[int] = 1
    peak_vs_conv: Optional[float] = None


def _create(name: str, **kwargs) -> torch.nn.Module:
    from ... import create_model

    return create_model(name, **kwargs)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _total(out) -> torch.Tensor:
    """The sum of every output tensor (a classifier's logits, a panoptic model's dict)."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return sum(_total(o) for o in out)
    return out.float().sum()


def model_step(model: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """One eval forward without autograd, or one training step (forward, backward of the summed
    outputs, gradients dropped); panoptic models through ``predict_raw``."""
    forward = getattr(model, "predict_raw", model)
    model.train(mode == "train")
    if mode == "eval":

        def run():
            with torch.no_grad():
                return forward(x)
    else:

        def run():
            _total(forward(x)).backward()
            model.zero_grad(set_to_none=True)

    return run


def thread_counts() -> List[int]:
    """1 and 2 threads, or 1 and torch's thread count where that is higher."""
    return sorted({1, max(2, torch.get_num_threads())})


def bench_whole_models(
    device: torch.device,
    cases: Sequence[Case] = CASES,
    threads: Optional[Sequence[int]] = None,
    repeats: int = 5,
    with_memory: bool = True,
    log=print,
    clock: str = "wall",
    models: Optional[Dict[str, Callable[[], torch.nn.Module]]] = None,
) -> List[ModelResult]:
    """Rows for each case at each thread count: the axial model and the conv model timed in
    turns, ``vs_conv`` = axial / conv time (``clock``), ``peak_vs_conv`` = axial / conv peak.
    ``models`` maps a name to a builder (default: :data:`VARIANTS`, else ``create_model``). Ends with the memory
    estimate rows (:func:`memory_estimates`)."""
    from ... import create_model

    threads = list(threads) if threads is not None else thread_counts()
    built: Dict[str, torch.nn.Module] = {}

    def get(name):
        if name not in built:
            torch.manual_seed(0)
            build = {**VARIANTS, **(models or {})}.get(name) or (lambda: create_model(name))
            built[name] = build().to(device)
        return built[name]

    rows: List[ModelResult] = []
    saved_threads = torch.get_num_threads()
    try:
        for axial, conv, mode, shape in cases:
            x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
            big = shape[0] * shape[2] * shape[3] > BIG_PIXELS
            n = min(repeats, 3) if big else repeats
            for i, t in enumerate(threads):
                torch.set_num_threads(t)
                steps = {name: model_step(get(name), x, mode) for name in (axial, conv)}
                timed = time_interleaved(steps, n, device)
                case_rows = {}
                for name, step in steps.items():
                    r = measure(
                        "whole model",
                        _shape(shape),
                        mode,
                        name,
                        step,
                        n,
                        device,
                        with_memory and i == 0,
                        timed=timed[name],
                    )
                    case_rows[name] = ModelResult(**vars(r), threads=t)
                _ratios(case_rows[axial], case_rows[conv], clock)
                for name in (axial, conv):
                    rows.append(case_rows[name])
                    log(progress(rows[-1]) + f"  {t} thread(s)")
    finally:
        torch.set_num_threads(saved_threads)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in built.items()}
    for r in memory_estimates(rows, params, {axial: conv for axial, conv, _, _ in cases}):
        rows.append(r)
        log(f"  {r.group:15s} {r.impl:21s} {r.note}")
    return rows


def _ratios(axial: ModelResult, conv: ModelResult, clock: str) -> None:
    def t(r):
        return r.median_ms if clock == "wall" else r.cpu_ms

    if t(axial) is not None and t(conv):
        axial.vs_conv, conv.vs_conv = t(axial) / t(conv), 1.0
    if axial.peak_mib is not None and conv.peak_mib:
        axial.peak_vs_conv, conv.peak_vs_conv = axial.peak_mib / conv.peak_mib, 1.0


def memory_estimates(
    rows: Sequence[ModelResult],
    params: Dict[str, int],
    pairs: Optional[Dict[str, str]] = None,
    size: Tuple[int, int] = FULL_RESOLUTION,
    gpu_bytes: int = GPU_BYTES,
) -> List[ModelResult]:
    """Per model with training peaks at two or more input sizes: a row with the estimated
    training activation memory of one image at ``size`` (``peak_mib``), from the line through
    the smallest and the largest input (peak = fixed + per-pixel x batch x H x W), and in its
    note the batch that fits in ``gpu_bytes`` after the weights, their gradients and two
    optimizer moments (16 bytes a parameter, float32), assuming the float32 activations a GPU
    keeps are those the CPU run allocates (no cuDNN workspaces, no allocator slack). ``pairs``
    (axial -> conv model) sets ``peak_vs_conv``."""
    by_model: Dict[str, List[Tuple[int, float]]] = {}
    for r in rows:
        if r.group == "whole model" and r.mode == "train" and r.peak_mib is not None:
            b, _, h, w = (int(v) for v in r.case.split("x"))
            by_model.setdefault(r.impl, []).append((b * h * w, r.peak_mib))
    out: List[ModelResult] = []
    for name, points in by_model.items():
        (p0, m0), (p1, m1) = min(points), max(points)
        if p1 == p0 or m1 <= m0:
            continue
        per_pixel = (m1 - m0) / (p1 - p0)  # MiB
        per_image = per_pixel * size[0] * size[1]
        batch = max(0, math.floor((gpu_bytes - 16 * params.get(name, 0)) / (per_image * 2**20)))
        out.append(
            ModelResult(
                "memory estimate",
                f"1x3x{size[0]}x{size[1]}",
                "train",
                name,
                peak_mib=per_image,
                threads=None,
                note=(
                    f"{per_image / 1024:.1f} GiB activations per image ({per_pixel * 2**20 / 1024:.1f} KiB/pixel, "
                    f"line through the {_px(p0)} and {_px(p1)} training peaks); "
                    f"batch per {gpu_bytes / 1e9:.0f} GB GPU: {batch}"
                ),
            )
        )
    est = {r.impl: r for r in out}
    for axial, conv in (pairs or {}).items():
        if axial in est and conv in est:
            est[axial].peak_vs_conv, est[conv].peak_vs_conv = est[axial].peak_mib / est[conv].peak_mib, 1.0
    return out


def _px(pixels: int) -> str:
    return f"{pixels / 1e6:.2f} Mpx" if pixels >= 10**5 else f"{pixels} px"


COLUMNS = [
    ("group", "15s"),
    ("case", "16s"),
    ("mode", "5s"),
    ("impl", "21s"),
    ("threads", "7.0f"),
    ("median_ms", "10.1f", "median ms"),
    ("cpu_ms", "9.1f", "cpu ms"),
    ("vs_conv", "7.2f", "x conv"),
    ("peak_mib", "9.1f", "peak MiB"),
    ("peak_vs_conv", "8.2f", "mem x cv"),
]


def format_whole_model_table(rows: List[ModelResult]) -> str:
    """The rows, then the thread-scaling table (each model's time at 1 thread over its time at
    more, and the ratio to the conv model at each)."""
    lines = [table(rows, COLUMNS), "", scaling_table(rows)]
    return "\n".join(lines)


def scaling_table(rows: Sequence[ModelResult]) -> str:
    timed = [r for r in rows if r.group == "whole model" and r.median_ms is not None]
    counts = sorted({r.threads for r in timed})
    if len(counts) < 2:
        return "(one thread count: no scaling table)"
    lo, hi = counts[0], counts[-1]
    head = (
        f"{'case':16s} {'mode':5s} {'model':21s} {f'ms {lo}T':>10s} {f'ms {hi}T':>10s} {'speedup':>8s} "
        f"{f'x conv {lo}T':>10s} {f'x conv {hi}T':>10s}"
    )
    lines = ["thread scaling", head, "-" * len(head)]
    keyed = {(r.case, r.mode, r.impl, r.threads): r for r in timed}
    seen = set()
    for r in timed:
        key = (r.case, r.mode, r.impl)
        if key in seen:
            continue
        seen.add(key)
        a, b = keyed.get(key + (lo,)), keyed.get(key + (hi,))
        if a is None or b is None:
            continue
        lines.append(
            f"{r.case:16s} {r.mode:5s} {r.impl:21s} {a.median_ms:10.1f} {b.median_ms:10.1f} "
            f"{a.median_ms / b.median_ms:8.2f} {_f(a.vs_conv):>10s} {_f(b.vs_conv):>10s}"
        )
    return "\n".join(lines)


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def run(s: Settings) -> List[Result]:
    threads = thread_counts() if s.device.type == "cpu" else [torch.get_num_threads()]
    return bench_whole_models(
        s.device,
        QUICK_CASES if s.quick else CASES,
        threads=threads,
        repeats=s.repeats,
        with_memory=s.with_memory,
        log=s.log,
        clock=s.clock,
    )


SUITE = Suite(
    "whole_models",
    run,
    default=False,
    table=format_whole_model_table,
    footnote=(
        "whole models: 'x conv' = this / the conv model on the same input and threads "
        "(median {clock} times, timed in turns); 'mem x cv' = peak / the conv model's peak "
        "(peak measured at the first thread count only); panoptic models time predict_raw; "
        "train = forward + backward of the summed outputs (no optimizer step)."
    ),
)
