"""Time axial-attention layer pairs (height + width) against a 3x3 conv of the same width.

Same measurements as ``axial-deeplab benchmark --only layers``, with the shapes, modes and
implementations chosen on the command line, e.g.::

    .venv/bin/python benchmarks/bench_attention_layers.py --shapes 2x64x56x56 1x128x65x129 \\
        --modes eval --impls reference fast --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse

import torch

from axial_deeplab.benchmark import (
    LAYER_SHAPES,
    add_script_arguments,
    apply_script_threads,
    bench_layers,
    report_script_rows,
)


def _shape(text: str):
    try:
        b, c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 2x64x56x56, got {text!r}")
    return b, c, h, w


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", type=_shape, default=LAYER_SHAPES, help="BxCxHxW inputs")
    p.add_argument("--modes", nargs="+", choices=["eval", "train"], default=["eval", "train"])
    add_script_arguments(p, repeats=5)
    args = p.parse_args(argv)
    apply_script_threads(args)
    rows = bench_layers(
        torch.device(args.device),
        args.shapes,
        args.modes,
        args.impls,
        args.repeats,
        with_memory=not args.no_memory,
        clock=args.clock,
    )
    report_script_rows(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
