"""``axial-deeplab benchmark``: runs the suites of :mod:`axial_deeplab.benchmark` and
prints their tables (and, with ``--json``, writes every row with the machine)."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import List, Tuple

import torch

from ..benchmark.harness import Result
from ..benchmark.report import format_table, machine_info
from ..benchmark.suites import SUITES, Settings, Suite
from ..fileio import atomic_write_json

SECTIONS = tuple(s.name for s in SUITES)
# "whole_models", "span_scaling" and "deploy" time big cases (minutes on a CPU): run only when asked for
DEFAULT_SECTIONS = tuple(s.name for s in SUITES if s.default)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark",
        help="time axial attention (reference, fast paths) against a 3x3 conv, models and post-processing",
        description=(
            "Times, in one process and on the same inputs, the reference axial attention, every fast path "
            "and a 3x3 conv of the same width (height+width layer pairs, eval forward and train "
            "forward+backward), whole models (Axial-ResNet-S 224, Axial-DeepLab-S/-L 1025x2049 inference) "
            "and the panoptic post-processing. Prints medians, ratios and peak memory."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats, skip Axial-DeepLab-L and the slow reference/loop baselines of the "
        "big cases (about 2 minutes on 2 CPU cores)",
    )
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the results here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 10, --quick 3)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=list(DEFAULT_SECTIONS),
        help="sections to run (default: all but whole_models, span_scaling and deploy; whole_models = "
        "Axial-ResNet-S vs ResNet-50 and Axial-DeepLab-S vs Panoptic-DeepLab-R50, eval and "
        "training step at 1 and 2 threads with peak memory, about 15 minutes on 2 cores, "
        "tiny inputs with --quick; deploy = eager vs torch.compile vs ONNX Runtime for "
        "Axial-ResNet-S and Axial-DeepLab-S, with compile and export times; span_scaling = one "
        "axial layer at L = 65..513 and span 17, 33, 65, global: the O(L x m) cost, a few minutes)",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        default=None,
        help="attention implementations to time (default: reference and every registered fast path)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time the ratios use: median wall time, or median process CPU time (steadier when "
        "other processes share the cores; with --threads 1 it is the single-core time)",
    )
    p.add_argument(
        "--no-tf32",
        action="store_true",
        help="on a GPU, turn TF32 off for cuDNN's convolutions and the Triton kernels (full "
        "float32 accuracy; by default both use TF32 tensor cores, as PyTorch's convolutions do)",
    )
    p.set_defaults(func=run)


def _check_and_apply(args: argparse.Namespace) -> None:
    """Reject bad options before anything is measured; set threads and TF32."""
    from ..cli import UserError
    from ..layers import available_attention_impls

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to PyTorch")
    if args.repeats is not None and args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    if args.impls:
        unknown = sorted(set(args.impls) - set(available_attention_impls()))
        if unknown:
            raise UserError(f"--impls: unknown implementation(s) {unknown}; available: {available_attention_impls()}")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False


def _print_header(info: dict, device: torch.device, quick: bool) -> None:
    print(
        f"axial-deeplab benchmark on {info['cpu']} ({info['torch_threads']} threads), torch {info['torch']}, "
        f"device {device}{' (quick)' if quick else ''}",
        flush=True,
    )
    if device.type == "cuda":
        print(
            f"GPU {info['gpu']}; cuDNN TF32 {'on' if info['cudnn_tf32'] else 'off'}, Triton dots "
            f"{info.get('triton_dot', '(no triton)')}, float32 matmul precision {info['matmul_precision']}",
            flush=True,
        )


def _print_tables(ran: List[Tuple[Suite, List[Result]]], clock: str) -> None:
    """The common table for the suites without a table of their own, then each of those."""
    common = [r for suite, rows in ran if suite.table is None for r in rows]
    if common:
        print(format_table(common))
    for suite, rows in ran:
        if suite.table is not None and rows:
            print(suite.table(rows))
            if suite.footnote:
                print(suite.footnote.format(clock=clock))


def _print_triton_tiles() -> dict:
    """The tile configurations the Triton autotuner chose during the run (for the JSON too)."""
    from ..layers.triton_launch import tuned_configs

    tuned = tuned_configs()
    for kernel, chosen in tuned.items():
        print(f"Triton {kernel} tiles chosen by the autotuner (key: L, Lq, step, radius, dk, dv, dots, terms):")
        for key, config in chosen.items():
            print(f"  {key}: {config}")
    return tuned


def run(args: argparse.Namespace) -> int:
    _check_and_apply(args)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 10)
    info = machine_info(device)
    _print_header(info, device, args.quick)
    settings = Settings(
        device,
        quick=args.quick,
        repeats=repeats,
        impls=args.impls,
        with_memory=not args.no_memory,
        clock=args.clock,
        log=lambda s: print(s, flush=True),
    )
    start = time.perf_counter()
    ran = [(suite, suite.run(settings)) for suite in SUITES if suite.name in args.only]
    rows = [r for _, suite_rows in ran for r in suite_rows]
    elapsed = time.perf_counter() - start
    print()
    _print_tables(ran, args.clock)
    print(
        f"\n{len(rows)} cases in {elapsed:.0f} s. Ratios from median {args.clock} times: 'x conv' = this / "
        "conv3x3 on the same input; 'ref/this' = reference / this."
    )
    tuned = _print_triton_tiles() if device.type == "cuda" else {}
    if args.json_out:
        atomic_write_json(
            args.json_out,
            {
                "machine": info,
                "quick": bool(args.quick),
                "clock": args.clock,
                "seconds": elapsed,
                "triton_configs": tuned,
                "results": [asdict(r) for r in rows],
            },
        )
        print(f"wrote {args.json_out}")
    return 0
