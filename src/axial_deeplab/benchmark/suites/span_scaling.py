"""How the cost of axial attention grows with the axis length L and the span m.

The paper's claim (section 3.1) is that a local span makes the layer O(L x m) per axis instead of
the O(L^2) of global attention. One height-axis layer (64 channels, 8 heads) on a 1x64xLx16 input
is timed at L = 65, 129, 257, 513 and span 17, 33, 65 and global, in eval and in training
(forward + backward), with the default attention path. The table shows the milliseconds and the
cost per in-span (query, key) pair: a flat ns/pair column down each span is the O(L x m) claim,
measured; for the global span the pairs grow as L^2.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..harness import Result, measure, module_step, time_interleaved
from ..report import progress
from .base import Settings, Suite

LENGTHS = (65, 129, 257, 513)
SPANS: Sequence[Optional[int]] = (17, 33, 65, None)
QUICK_LENGTHS = (65, 129)
QUICK_SPANS: Sequence[Optional[int]] = (17, 65, None)
CHANNELS, COLUMNS = 64, 16
GROUP = "span scaling"


def span_name(span: Optional[int]) -> str:
    return "global" if span is None else f"span {span}"


def pairs_per_sequence(length: int, span: Optional[int]) -> int:
    """In-span (query, key) pairs on one axis of ``length``."""
    from ...layers.geometry import in_span_pairs

    radius = length - 1 if span is None else (span - 1) // 2
    return int(in_span_pairs(length, radius))


def bench_span_scaling(
    device: torch.device,
    lengths: Sequence[int] = LENGTHS,
    spans: Sequence[Optional[int]] = SPANS,
    modes: Sequence[str] = ("eval", "train"),
    repeats: int = 5,
    with_memory: bool = False,
    log=print,
) -> List[Result]:
    """One row per (L, span, mode); the spans of one L and mode are timed in turns, and each
    row's note holds the nanoseconds per in-span pair (time / (columns x pairs per axis))."""
    from ...layers import PositionSensitiveAxialAttention

    rows: List[Result] = []
    for length in lengths:
        x = torch.randn(1, CHANNELS, length, COLUMNS, generator=torch.Generator().manual_seed(0)).to(device)
        for mode in modes:
            steps, layers = {}, {}
            for span in spans:
                torch.manual_seed(0)
                layer = PositionSensitiveAxialAttention(CHANNELS, CHANNELS, axis="height", span=span).to(device)
                layers[span] = layer.train(mode == "train")
                steps[span_name(span)] = module_step(layers[span], x, mode)
            timed = time_interleaved(steps, repeats, device)
            for span in spans:
                name = span_name(span)
                row = measure(
                    GROUP, f"L={length}", mode, name, steps[name], repeats, device, with_memory, timed=timed[name]
                )
                if row.median_ms is not None:
                    pairs = COLUMNS * pairs_per_sequence(length, span)
                    row.note = f"{row.median_ms * 1e6 / pairs:.1f} ns/pair ({pairs / 1e3:.0f}k pairs)"
                rows.append(row)
                log(progress(row) + "  " + row.note)
    return rows


def format_span_table(rows: List[Result]) -> str:
    """L down, span across: milliseconds, and ns per in-span pair in brackets, per mode."""
    spans = list(dict.fromkeys(r.impl for r in rows))
    lines = []
    for mode in dict.fromkeys(r.mode for r in rows):
        head = f"{mode:6s} {'L':>5s} " + " ".join(f"{s:>22s}" for s in spans)
        lines += [head, "-" * len(head)]
        for case in dict.fromkeys(r.case for r in rows if r.mode == mode):
            keyed = {r.impl: r for r in rows if r.mode == mode and r.case == case}
            cells = []
            for s in spans:
                r = keyed.get(s)
                if r is None or r.median_ms is None:
                    cells.append(f"{'-' if r is None else 'failed':>22s}")
                else:
                    per_pair = r.note.split(" ns/pair")[0]
                    cells.append(f"{r.median_ms:10.1f} ms ({per_pair:>5s} ns)")
            lines.append(f"{'':6s} {case[2:]:>5s} " + " ".join(cells))
        lines.append("")
    return "\n".join(lines).rstrip()


def run(s: Settings) -> List[Result]:
    lengths, spans = (QUICK_LENGTHS, QUICK_SPANS) if s.quick else (LENGTHS, SPANS)
    return bench_span_scaling(s.device, lengths, spans, repeats=s.repeats, with_memory=s.with_memory, log=s.log)


SUITE = Suite(
    GROUP.replace(" ", "_"),
    run,
    default=False,
    table=format_span_table,
    footnote=(
        f"span scaling: one height-axis layer, {CHANNELS} channels, 8 heads, on 1x{CHANNELS}xLx{COLUMNS}, "
        "default attention path; median wall ms, and ns per in-span (query, key) pair in brackets "
        "(flat down a column = O(L x m))."
    ),
)
