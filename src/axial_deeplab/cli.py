"""The ``axial-deeplab`` command. Each subcommand lives in ``axial_deeplab.commands.<name>``
and exposes ``register(subparsers)``, which adds its parser and sets ``func``."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from .cpu_memory import keep_freed_memory
from .errors import UserError, output_error  # noqa: F401  (the commands import UserError from here)

COMMAND_MODULES = [
    "train",
    "config",
    "evaluate",
    "predict",
    "demo",
    "info",
    "classify_demo",
    "pq",
    "benchmark",
    "export",
    "convert",
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="axial-deeplab",
        description="Axial-DeepLab: position-sensitive axial attention, Axial-ResNets and panoptic segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"axial-deeplab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"axial_deeplab.commands.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    # a command's training or inference steps would page-fault their tensors in again each step
    keep_freed_memory()
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"axial-deeplab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader of the output went away (``| head``): stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        # a full or read-only disk met by a writer outside the atomic ones: still one line
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or not e.filename:
            raise
        print(f"axial-deeplab {args.command}: error: {output_error(e.filename, e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
