"""Timing and memory: the measurements every suite shares.

Times are medians of several calls after a warm-up, in wall time and in process CPU time
(the steadier of the two when other processes share the cores). Side-by-side comparisons
run in turns, one call of each contender per round (:func:`time_interleaved`), so a host
whose speed drifts slows every side of a ratio alike.

Peak memory on CPU is the high-water mark of bytes allocated through PyTorch's CPU
allocator during one run, relative to the start (read from ``torch.profiler``'s memory
events); on CUDA it is ``torch.cuda.max_memory_allocated`` over the run.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn


@dataclass
class Result:
    """One row of a report: one implementation on one case in one mode."""

    group: str  # "layer pair", "model", "post-processing", ...
    case: str  # shape or model name
    mode: str  # "eval" or "train"
    impl: str
    median_ms: Optional[float] = None
    cpu_ms: Optional[float] = None  # median process CPU time (steadier on a shared machine)
    runs: int = 0
    peak_mib: Optional[float] = None
    vs_conv: Optional[float] = None
    vs_reference: Optional[float] = None
    note: str = ""
    gb_per_s: Optional[float] = None  # attention core: bytes it must move per second
    bandwidth_fraction: Optional[float] = None  # ... over the device's copy bandwidth
    gmac_per_s: Optional[float] = None  # attention core: multiply-adds of the L x L work per second
    vs_eager: Optional[float] = None  # deploy: this / eager, from the same interleaved rounds
    setup_s: Optional[float] = None  # deploy: seconds of torch.compile's first call, or of the ONNX export
    times_ms: List[float] = field(default_factory=list)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1):
    """Median wall and process-CPU milliseconds of ``repeats`` calls after ``warmup``, and
    the wall times of every call."""
    for _ in range(warmup):
        fn()
    sync(device)
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        walls.append((time.perf_counter() - t0) * 1e3)
        cpus.append((time.process_time() - c0) * 1e3)
    return statistics.median(walls), statistics.median(cpus), walls


def time_interleaved(
    fns: Dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1
) -> Dict[str, tuple]:
    """:func:`time_runs` of several functions in turns (one call of each per round), so that a
    host whose speed drifts (other processes on shared cores) slows every side of a ratio
    alike. A function that raises is left out of the later rounds and maps to its exception."""
    results: Dict[str, object] = {}
    live = dict(fns)
    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):
                fn()
        except Exception as e:
            results[name] = e
            del live[name]
    sync(device)
    walls: Dict[str, list] = {name: [] for name in live}
    cpus: Dict[str, list] = {name: [] for name in live}
    for _ in range(repeats):
        for name, fn in list(live.items()):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                fn()
                sync(device)
            except Exception as e:
                results[name] = e
                del live[name]
                continue
            walls[name].append((time.perf_counter() - t0) * 1e3)
            cpus[name].append((time.process_time() - c0) * 1e3)
    for name in live:
        results[name] = (statistics.median(walls[name]), statistics.median(cpus[name]), walls[name])
    return results


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """High-water mark of memory allocated during one call of ``fn`` (see the module doc)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler back end's start/stop lines, which it writes to file descriptor 2
    from C++ (Python exceptions still propagate and print after the descriptor is restored)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (e.g. an embedding host)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write): the memory bandwidth this
    device reaches in practice, the yardstick of the attention core's bandwidth fraction."""
    n = mib * 2**20 // 4
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    median, _, _ = time_runs(lambda: dst.copy_(src), repeats, device)
    return 2 * n * 4 / (median / 1e3)


def module_step(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """One call of ``module`` on ``x``: a forward without autograd (``"eval"``), or a forward
    and the backward of the output's sum, gradients then dropped (``"train"``)."""
    if mode == "eval":

        def run():
            with torch.no_grad():
                return module(x)
    else:

        def run():
            xg = x.detach().requires_grad_(True)
            module(xg).sum().backward()
            module.zero_grad(set_to_none=True)

    return run


def failure_note(e: BaseException) -> str:
    """A row's note for a case that raised: the exception's type and first line, short."""
    return f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:70]}"


def measure(
    group: str,
    case: str,
    mode: str,
    impl: str,
    fn: Callable[[], object],
    repeats: int,
    device: torch.device,
    with_memory: bool = True,
    warmup: int = 1,
    timed=None,
) -> Result:
    """One row: times of ``fn`` (or ``timed``, its result of :func:`time_interleaved`) and its
    peak memory; a failure (e.g. out of memory at a large shape) is reported in the row."""
    res = Result(group, case, mode, impl)
    try:
        if timed is None:
            timed = time_runs(fn, repeats, device, warmup=warmup)
        if isinstance(timed, Exception):
            raise timed
        res.median_ms, res.cpu_ms, res.times_ms = timed
        res.runs = repeats
        if with_memory:
            res.peak_mib = peak_memory_bytes(fn, device) / 2**20
    except Exception as e:
        res.note = failure_note(e)
    return res


def fill_ratios(rows: List[Result], clock: str = "wall") -> None:
    """Set ``vs_conv`` (this / "conv3x3") and ``vs_reference`` ("reference" / this) between
    rows of the same group, case and mode, from the median wall times or the median
    process-CPU times (``clock="cpu"``: steadier when other processes share the cores)."""

    def t(r):
        return r.median_ms if clock == "wall" else r.cpu_ms

    by_key: Dict[tuple, Dict[str, Result]] = {}
    for r in rows:
        by_key.setdefault((r.group, r.case, r.mode), {})[r.impl] = r
    for impls in by_key.values():
        conv, ref = impls.get("conv3x3"), impls.get("reference")
        for r in impls.values():
            if t(r) is None:
                continue
            if conv is not None and t(conv):
                r.vs_conv = t(r) / t(conv)
            if ref is not None and t(ref):
                r.vs_reference = t(ref) / t(r)
