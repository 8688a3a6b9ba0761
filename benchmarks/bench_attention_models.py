"""Whole-model inference time with each axial-attention implementation.

Same measurements as ``axial-deeplab benchmark --only models``, for any registered
models and input sizes, e.g.::

    .venv/bin/python benchmarks/bench_attention_models.py axial_resnet_s:224x224 \\
        axial_deeplab_l:1025x2049 --impls memory_efficient --threads 2
"""

from __future__ import annotations

import argparse

import torch

from axial_deeplab.benchmark import add_script_arguments, apply_script_threads, bench_models, report_script_rows


def _case(text: str):
    try:
        name, size = text.split(":")
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODEL:HxW, e.g. axial_resnet_s:224x224, got {text!r}")
    return name, (3, h, w), True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="+", type=_case, help="MODEL:HxW")
    add_script_arguments(p, repeats=3)
    args = p.parse_args(argv)
    apply_script_threads(args)
    rows = bench_models(
        torch.device(args.device),
        args.cases,
        args.impls,
        args.repeats,
        with_memory=not args.no_memory,
        clock=args.clock,
    )
    report_script_rows(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
