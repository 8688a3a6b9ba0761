"""Whole-model inference time with each axial-attention implementation.

Same measurements as ``axial-deeplab benchmark --only models``, for any registered
models and input sizes, e.g.::

    .venv/bin/python benchmarks/bench_attention_models.py axial_resnet_s:224x224 \\
        axial_deeplab_l:1025x2049 --impls memory_efficient --threads 2
"""
from __future__ import annotations

import argparse

import torch

from axial_deeplab.commands.benchmark import bench_models, format_table
from axial_deeplab.fileio import atomic_write_json


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
    p.add_argument("--impls", nargs="+", default=None, help="attention implementations (default: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_models(torch.device(args.device), args.cases, args.impls, args.repeats,
                        with_memory=not args.no_memory, clock=args.clock)
    print(format_table(rows))
    if args.json:
        from dataclasses import asdict

        atomic_write_json(args.json, [asdict(r) for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
