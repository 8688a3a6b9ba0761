"""The run's metrics log: JSON lines (the record), a CSV mirror for spreadsheets, and
TensorBoard scalars and image panels when tensorboard is installed.

Only rank 0 writes. On resume the log is cut back to the checkpoint's step, so the
rows after a resume continue the curve instead of duplicating the steps redone.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Dict, List, Optional

import numpy as np

from ..fileio import atomic_write_text

__all__ = ["MetricsLogger", "read_metrics"]

JSONL = "metrics.jsonl"
CSV = "metrics.csv"


def read_metrics(run_dir_or_file: str) -> List[Dict]:
    """All rows of a run's metrics.jsonl (a torn last line from a kill is skipped)."""
    path = run_dir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, JSONL)
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _clean(v):
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled
        self._tb = None
        self._csv_keys: Optional[List[str]] = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl_path = os.path.join(run_dir, JSONL)
        self.csv_path = os.path.join(run_dir, CSV)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed: scalars still go to JSON/CSV
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (they belong to the part of a run being redone)."""
        if not self.enabled:
            return
        rows = [r for r in read_metrics(self.jsonl_path) if int(r.get("step", 0)) <= step]
        atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in rows))
        self._rewrite_csv(rows)

    def log(self, kind: str, step: int, values: Dict) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": int(step)}
        row.update({k: _clean(v) for k, v in values.items()})
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self._append_csv(row)
        if self._tb is not None:
            for k, v in row.items():
                if k in ("kind", "step") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                self._tb.add_scalar(f"{kind}/{k}", v, step)

    def log_image(self, tag: str, step: int, image_hwc_uint8: np.ndarray) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image_hwc_uint8, step, dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # CSV mirror: one header over all keys seen; rewritten from the JSON lines when new keys appear.
    def _append_csv(self, row: Dict) -> None:
        if self._csv_keys is None and os.path.isfile(self.csv_path):
            with open(self.csv_path, "r", encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), None)
            self._csv_keys = header or None
        if self._csv_keys is None or any(k not in self._csv_keys for k in row):
            self._rewrite_csv(read_metrics(self.jsonl_path))
            return
        with open(self.csv_path, "a", encoding="utf-8", newline="") as f:
            csv.DictWriter(f, fieldnames=self._csv_keys, extrasaction="ignore").writerow(row)

    def _rewrite_csv(self, rows: List[Dict]) -> None:
        keys: List[str] = ["kind", "step"]
        for r in rows:
            for k in r:
                if k not in keys:
                    keys.append(k)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
        atomic_write_text(self.csv_path, buf.getvalue())
        self._csv_keys = keys
