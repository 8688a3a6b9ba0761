"""What a training run folder is, and what may be deleted in it: ``train --overwrite`` empties
only a folder that a run made and that holds nothing else, and a new run never replaces a file
it did not write."""

from __future__ import annotations

import os
import shutil

from ..errors import UserError, output_error
from ..fileio import atomic_write_text
from . import checkpoint as ckpt
from .metrics_log import CSV, JSONL

__all__ = ["RUN_MARKER", "RUN_ENTRIES", "is_run_folder", "check_overwritable", "check_fresh_start", "prepare_run_dir"]

RUN_MARKER = ".axial-deeplab-run"
# Everything a run (and the demo, which trains into its folder) writes at the top of its folder.
RUN_ENTRIES = frozenset(
    {RUN_MARKER, ckpt.CONFIG_FILE, "checkpoints", JSONL, CSV, "tensorboard", "training_curves.png", "overlays"}
)


def _ours(name: str) -> bool:
    """A name a run writes, or the temporary file of an interrupted atomic write of one."""
    if name in RUN_ENTRIES:
        return True
    return name.endswith(".tmp") and any(name.startswith(known + ".") for known in RUN_ENTRIES)


def is_run_folder(run_dir: str) -> bool:
    """True for a folder ``train`` made: it has the marker file, or (runs made before the
    marker existed) config.yaml beside checkpoints/ or metrics.jsonl."""
    if os.path.isfile(os.path.join(run_dir, RUN_MARKER)):
        return True
    return os.path.isfile(os.path.join(run_dir, ckpt.CONFIG_FILE)) and (
        os.path.isdir(os.path.join(run_dir, "checkpoints")) or os.path.isfile(os.path.join(run_dir, JSONL))
    )


def check_overwritable(run_dir: str) -> None:
    """Raise a :class:`UserError` unless ``run_dir`` is missing, empty, or a run folder that
    holds nothing but what runs write: ``--overwrite`` never deletes a file it did not make."""
    if not os.path.lexists(run_dir):
        return
    if not os.path.isdir(run_dir):
        raise UserError(
            f"--overwrite: experiment.output_dir {run_dir} is a file, not a run folder; "
            f"choose another experiment.output_dir"
        )
    entries = sorted(os.listdir(run_dir))
    if not entries:
        return
    foreign = [n for n in entries if not _ours(n)]
    if not is_run_folder(run_dir):
        example = (foreign or entries)[0]
        raise UserError(
            f"--overwrite: refusing to delete {run_dir}: it is not a training run folder (no {RUN_MARKER}, "
            f"nor {ckpt.CONFIG_FILE} with checkpoints/ or {JSONL}) and holds {os.path.join(run_dir, example)}"
            f"{_and_more(len(entries) - 1)}; choose another experiment.output_dir"
        )
    if foreign:
        raise UserError(
            f"--overwrite: refusing to delete {run_dir}: besides the run it holds "
            f"{os.path.join(run_dir, foreign[0])}{_and_more(len(foreign) - 1)}, which train did not write; "
            f"move it away or choose another experiment.output_dir"
        )


def _and_more(n: int) -> str:
    return f" (and {n} other entr{'y' if n == 1 else 'ies'})" if n > 0 else ""


def check_fresh_start(run_dir: str) -> None:
    """A new run may write into a folder that is not a run only if it replaces nothing there."""
    if not os.path.isdir(run_dir) or is_run_folder(run_dir):
        return
    clash = sorted(n for n in os.listdir(run_dir) if n in RUN_ENTRIES)
    if clash:
        raise UserError(
            f"{run_dir} is not a training run folder but holds {os.path.join(run_dir, clash[0])}, which a run "
            f"would replace; choose another experiment.output_dir"
        )


def prepare_run_dir(run_dir: str, ckpt_root: str, overwrite: bool) -> None:
    """Empty the folder (``overwrite``, after :func:`check_overwritable` passed again), create
    it and its marker, and clear leftovers of interrupted checkpoint writes."""
    try:
        if overwrite and os.path.isdir(run_dir):
            check_overwritable(run_dir)  # again: the folder may have changed while data and model were built
            for name in os.listdir(run_dir):
                path = os.path.join(run_dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        os.makedirs(run_dir, exist_ok=True)
        marker = os.path.join(run_dir, RUN_MARKER)
        if not os.path.isfile(marker):
            atomic_write_text(
                marker, "An axial-deeplab training run: `axial-deeplab train --overwrite` may delete this folder.\n"
            )
    except UserError:
        raise
    except OSError as e:
        raise output_error(getattr(e, "filename", None) or run_dir, e) from None
    ckpt.remove_stale_tmp(ckpt_root)
