"""What the scripts in ``benchmarks/`` share: their common options and their output (the
``axial-deeplab benchmark`` command has its own, richer set of options)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import List, Optional

import torch

from ..fileio import atomic_write_json
from .harness import Result
from .report import format_table


def add_script_arguments(p: argparse.ArgumentParser, repeats: int) -> None:
    """Options every script shares; ``repeats`` is the script's default."""
    p.add_argument("--impls", nargs="+", default=None, help="attention implementations (default: all)")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None)


def apply_script_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def report_script_rows(rows: List[Result], json_path: Optional[str]) -> None:
    """Print the table and, when asked, write the rows as a JSON list."""
    print(format_table(rows))
    if json_path:
        atomic_write_json(json_path, [asdict(r) for r in rows])
