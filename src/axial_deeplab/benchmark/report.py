"""What a run shows: one progress line per row as it is measured, the rows as a table at
the end, and the machine they were measured on (for the JSON file)."""

from __future__ import annotations

import os
import platform
from typing import Dict, List, Sequence, Tuple

import torch

from .harness import Result

# (Result field, format spec[, title]); a spec ending in "s" is a left-aligned text column
Column = Tuple[str, ...]

COLUMNS: Sequence[Column] = [
    ("group", "15s"),
    ("case", "28s"),
    ("mode", "5s"),
    ("impl", "17s"),
    ("median_ms", "10.1f", "median ms"),
    ("cpu_ms", "9.1f", "cpu ms"),
    ("vs_conv", "7.2f", "x conv"),
    ("vs_reference", "8.2f", "ref/this"),
    ("peak_mib", "9.1f", "peak MiB"),
]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def progress(r: Result) -> str:
    """The line logged as soon as a row is measured."""
    if r.median_ms is None:
        return f"  {r.group:15s} {r.case:28s} {r.mode:5s} {r.impl:17s} {r.note}"
    return (
        f"  {r.group:15s} {r.case:28s} {r.mode:5s} {r.impl:17s} {r.median_ms:10.1f} ms"
        f"  peak {_fmt(r.peak_mib, '.0f')} MiB"
    )


def format_table(rows: List[Result]) -> str:
    """The common table: time, ratios to the conv and to the reference, peak memory."""
    return table(rows, COLUMNS)


def table(rows: List[Result], columns: Sequence[Column]) -> str:
    """One line per row: ``columns`` are (field, format spec[, title]); text columns are
    left-aligned, numbers right-aligned with "-" for a missing value; the note comes last."""
    head, cells = [], []
    for field_name, spec, *title in columns:
        title = title[0] if title else field_name
        text = spec.endswith("s")
        width = spec[:-1] if text else spec.split(".")[0]
        head.append(format(title, f"{width}s" if text else f">{width}s"))
        cells.append((field_name, spec, text, width))
    lines = [" ".join(head) + "  note"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        values = [
            format(getattr(r, f), spec) if text else format(_fmt(getattr(r, f), spec), f">{width}s")
            for f, spec, text, width in cells
        ]
        lines.append(" ".join(values) + f"  {r.note}")
    return "\n".join(lines)


def machine_info(device: torch.device) -> Dict[str, object]:
    """The machine and settings a run's numbers depend on."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["matmul_precision"] = torch.get_float32_matmul_precision()
        info["cudnn_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        from ..layers.triton_launch import dot_precision, triton_available

        if triton_available():
            info["triton_dot"] = dot_precision()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
