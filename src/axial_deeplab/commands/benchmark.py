"""``axial-deeplab benchmark``: axial attention against the plain equation and a 3x3 conv.

The paper's weak point is speed: axial attention has about the multiply-adds of the
3x3 convolution it replaces but ran much slower "due to the lack of specialized
kernels". This suite times, in one process and on the same inputs, the reference
implementation (the plain equation), every registered fast path and a 3x3 conv of
the same width, for height+width layer pairs (eval forward and train
forward+backward; the conv and the implementations run in turns, one call of each per
round, so a host whose speed drifts slows both sides of a ratio alike), whole models, and
the panoptic post-processing; on request (``--only deploy``) eager against
``torch.compile`` and ONNX Runtime for whole models. It prints median
wall times, ratios to the conv and to the reference, and peak memory; ``--json``
writes everything with the machine it ran on.

Peak memory on CPU is the high-water mark of bytes allocated through PyTorch's CPU
allocator during one run, relative to the start (read from ``torch.profiler``'s
memory events); on CUDA it is ``torch.cuda.max_memory_allocated`` over the run.
"""
from __future__ import annotations

import argparse
import contextlib
from copy import deepcopy
import os
import sys
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..fileio import atomic_write_json

LAYER_SHAPES = [(2, 64, 56, 56), (2, 128, 28, 28), (1, 128, 65, 129), (1, 256, 65, 129)]
QUICK_LAYER_SHAPES = LAYER_SHAPES
# On a GPU also the kernel target: a batch of 8 Cityscapes OS16 crops at 256 channels.
GPU_LAYER_SHAPES = LAYER_SHAPES + [(8, 256, 65, 129)]
MODEL_CASES = [
    # (model name, input (C, H, W), runs the reference too when not --quick)
    ("axial_resnet_s", (3, 224, 224), True),
    ("axial_deeplab_s", (3, 1025, 2049), False),
    ("axial_deeplab_l", (3, 1025, 2049), False),
]
QUICK_MODEL_CASES = [("axial_resnet_s", (3, 224, 224), True), ("axial_deeplab_s", (3, 1025, 2049), False)]


@dataclass
class Result:
    group: str  # "layer pair", "model", "post-processing"
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


# --------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1):
    """Median wall and process-CPU milliseconds of ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        walls.append((time.perf_counter() - t0) * 1e3)
        cpus.append((time.process_time() - c0) * 1e3)
    return statistics.median(walls), statistics.median(cpus), walls


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, device: torch.device,
                     warmup: int = 1) -> Dict[str, tuple]:
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
    _sync(device)
    walls: Dict[str, list] = {name: [] for name in live}
    cpus: Dict[str, list] = {name: [] for name in live}
    for _ in range(repeats):
        for name, fn in list(live.items()):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                fn()
                _sync(device)
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
    """High-water mark of memory allocated during one call of ``fn`` (see module doc)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
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
    n = mib * 2 ** 20 // 4
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    median, _, _ = time_runs(lambda: dst.copy_(src), repeats, device)
    return 2 * n * 4 / (median / 1e3)


# --------------------------------------------------------------------------- building blocks
def set_attention_impl(module: nn.Module, impl: str) -> int:
    """Point every axial-attention layer of ``module`` at ``impl``; returns how many."""
    from ..layers import PositionSensitiveAxialAttention

    count = 0
    for m in module.modules():
        if isinstance(m, PositionSensitiveAxialAttention):
            m.impl = impl
            count += 1
    return count


def layer_pair(channels: int, impl: str = "auto", **kwargs) -> nn.Sequential:
    """Height then width axial attention of the same width (the pair inside an axial block)."""
    from ..layers import PositionSensitiveAxialAttention

    return nn.Sequential(
        PositionSensitiveAxialAttention(channels, channels, axis="height", impl=impl, **kwargs),
        PositionSensitiveAxialAttention(channels, channels, axis="width", impl=impl, **kwargs),
    )


def attention_impls(device: torch.device) -> List[str]:
    """The reference and every registered fast path usable on ``device``."""
    from ..layers import available_attention_impls

    names = ["reference"] + [n for n in available_attention_impls() if n != "reference"]
    usable = []
    for name in names:
        if name.startswith("triton") and device.type != "cuda":
            continue
        usable.append(name)
    return usable


def _step(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
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


def _measure(group, case, mode, impl, fn, repeats, device, with_memory=True, warmup=1, timed=None) -> Result:
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
            res.peak_mib = peak_memory_bytes(fn, device) / 2 ** 20
    except Exception as e:
        res.note = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:70]}"
    return res


def _fill_ratios(rows: List[Result], clock: str = "wall") -> None:
    """Ratios from the median wall times, or the median process-CPU times (``clock="cpu"``:
    steadier when other processes share the cores)."""
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


# --------------------------------------------------------------------------- suites
def bench_layers(device: torch.device, shapes=LAYER_SHAPES, modes=("eval", "train"),
                 impls: Optional[Sequence[str]] = None, repeats: int = 5, with_memory: bool = True,
                 log=print, clock: str = "wall") -> List[Result]:
    impls = list(impls) if impls is not None else attention_impls(device)
    rows: List[Result] = []
    for shape in shapes:
        b, c, h, w = shape
        case = "x".join(map(str, shape))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).to(device)
        torch.manual_seed(0)
        pair = layer_pair(c).to(device)
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device)
        for mode in modes:
            # the conv and every implementation (each on its own copy of the pair) in turns
            steps = {"conv3x3": _step(conv.train(mode == "train"), x, mode)}
            for impl in impls:
                if impl == "memory_efficient" and mode == "eval":
                    continue  # same forward as "fast"; it differs only in the backward
                copy = deepcopy(pair).train(mode == "train")
                set_attention_impl(copy, impl)
                steps[impl] = _step(copy, x, mode)
            timed = time_interleaved(steps, repeats, device)
            for name, step in steps.items():
                rows.append(_measure("layer pair", case, mode, name, step, repeats, device, with_memory,
                                     timed=timed[name]))
                log(_progress(rows[-1]))
    _fill_ratios(rows, clock)
    return rows


def core_functions(device: torch.device) -> Dict[str, Callable]:
    """The attention core (qkv -> both retrievals, no projection, no BN) of each fast path:
    ``fn(layer, qkv, scales)``. On CPU "fast" is the compiled C kernel (PyTorch without a
    compiler); on CUDA "fast" is the chunked PyTorch path and "triton" the fused kernel."""
    from ..layers import fast_cpu

    fns: Dict[str, Callable] = {"fast": lambda layer, qkv, scales: fast_cpu.attend(layer, qkv, scales)}
    if device.type == "cuda":
        from ..layers.triton_kernels import attend_triton, triton_available

        if triton_available():
            fns["triton"] = lambda layer, qkv, scales: attend_triton(layer, qkv, scales)
    return fns


def bench_core(device: torch.device, shapes=LAYER_SHAPES, repeats: int = 5, log=print,
               bandwidth: Optional[float] = None) -> List[Result]:
    """The attention core alone, per axis, in inference: median time, the bytes it must move
    (qkv in, the two retrievals out), their rate as a fraction of the copy bandwidth, and
    the multiply-add rate of the L x L work."""
    from ..layers import PositionSensitiveAxialAttention

    bandwidth = bandwidth or copy_bandwidth(device)
    rows: List[Result] = []
    for shape in shapes:
        b, c, h, w = shape
        for axis, length, other in (("height", h, w), ("width", w, h)):
            torch.manual_seed(0)
            layer = PositionSensitiveAxialAttention(c, c, axis=axis).to(device).eval()
            heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
            nh = b * other * heads
            gen = torch.Generator().manual_seed(0)
            qkv = torch.randn(nh, 2 * dk + dv, length, generator=gen).to(device)
            scales = torch.rand(3, heads, generator=gen).add_(0.5).to(device)
            moved = 4 * (qkv.numel() + 2 * nh * dv * length)
            macs = nh * length * length * (3 * dk + 2 * dv)
            case = f"{'x'.join(map(str, shape))} {axis}"
            for impl, fn in core_functions(device).items():
                def step(fn=fn):
                    with torch.no_grad():
                        return fn(layer, qkv, scales)
                r = _measure("attention core", case, "eval", impl, step, repeats, device, with_memory=False)
                if r.median_ms:
                    seconds = r.median_ms / 1e3
                    r.gb_per_s = moved / seconds / 1e9
                    r.bandwidth_fraction = moved / seconds / bandwidth
                    r.gmac_per_s = macs / seconds / 1e9
                    r.note = (f"{r.gb_per_s:.1f} GB/s = {100 * r.bandwidth_fraction:.0f}% of copy; "
                              f"{r.gmac_per_s:.1f} GMAC/s")
                rows.append(r)
                log(_progress(rows[-1]) + "  " + r.note)
    return rows


def bench_models(device: torch.device, cases=MODEL_CASES, impls: Optional[Sequence[str]] = None,
                 repeats: int = 3, with_memory: bool = True, log=print, clock: str = "wall") -> List[Result]:
    """Whole-model inference. Models come from ``axial_deeplab.create_model``; a model that
    is not registered (yet) is reported as skipped."""
    from .. import create_model, list_models

    impls = [i for i in (impls if impls is not None else attention_impls(device)) if i != "memory_efficient"]
    rows: List[Result] = []
    available = set(list_models())
    for name, (c, h, w), with_reference in cases:
        case = f"{name} {h}x{w}"
        if name not in available:
            rows.append(Result("model", case, "eval", "-", note=f"skipped: model {name!r} is not registered"))
            log(_progress(rows[-1]))
            continue
        torch.manual_seed(0)
        model = create_model(name).to(device).eval()
        x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0)).to(device)
        for impl in impls:
            if impl == "reference" and not with_reference:
                rows.append(Result("model", case, "eval", impl,
                                   note="skipped: the reference's L x L tensors at this size take minutes"))
                log(_progress(rows[-1]))
                continue
            set_attention_impl(model, impl)
            big = h * w > 512 * 512
            rows.append(_measure("model", case, "eval", impl, _step(model, x, "eval"),
                                 1 if big else repeats, device, with_memory and not big,
                                 warmup=0 if big else 1))
            log(_progress(rows[-1]))
        del model
    _fill_ratios(rows, clock)
    return rows


def bench_postprocess(device: torch.device, height: int = 1025, width: int = 2049, centers: int = 200,
                      repeats: int = 3, with_loop: bool = True, log=print, clock: str = "wall") -> List[Result]:
    """Panoptic post-processing alone (vectorised, and the per-instance loop version)."""
    try:
        from ..postprocess import panoptic_inference, panoptic_inference_reference
    except ImportError as e:
        row = Result("post-processing", f"{height}x{width}", "eval", "-", note=f"skipped: {e}")
        log(_progress(row))
        return [row]
    probs, heat, offsets, thing_ids = synthetic_panoptic_outputs(height, width, centers)
    probs, heat, offsets = probs.to(device), heat.to(device), offsets.to(device)
    case = f"{height}x{width}, {centers} centers"
    rows = [_measure("post-processing", case, "eval", "vectorised",
                     lambda: panoptic_inference(probs, heat, offsets, thing_ids, top_k=centers),
                     repeats, device)]
    log(_progress(rows[-1]))
    if with_loop:
        rows.append(_measure("post-processing", case, "eval", "reference",
                             lambda: panoptic_inference_reference(probs[0].cpu(), heat[0].cpu(), offsets[0].cpu(),
                                                                  thing_ids, top_k=centers),
                             1, device, with_memory=False, warmup=0))
        log(_progress(rows[-1]))
    _fill_ratios(rows, clock)
    return rows


def synthetic_panoptic_outputs(height: int, width: int, centers: int, num_classes: int = 19, seed: int = 0):
    """Network-like outputs: class probabilities with thing boxes, a heatmap with one
    Gaussian peak per box and offsets pointing at the box centers."""
    gen = torch.Generator().manual_seed(seed)
    thing_ids = list(range(11, 19))
    labels = torch.full((height, width), 0, dtype=torch.long)
    labels[: height // 3] = 10
    heat = torch.zeros(height, width)
    offsets = torch.zeros(2, height, width)
    cols = max(1, int(round((centers * width / height) ** 0.5)))
    rows = -(-centers // cols)
    cell_h, cell_w = height // rows, width // cols
    yy = torch.arange(height, dtype=torch.float32)[:, None]
    xx = torch.arange(width, dtype=torch.float32)[None, :]
    for i in range(centers):
        r, c = divmod(i, cols)
        y0, x0 = r * cell_h + cell_h // 4, c * cell_w + cell_w // 4
        y1, x1 = y0 + cell_h // 2, x0 + cell_w // 2
        cls = thing_ids[i % len(thing_ids)]
        labels[y0:y1, x0:x1] = cls
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        ys, xs = slice(max(0, int(cy) - 24), int(cy) + 25), slice(max(0, int(cx) - 24), int(cx) + 25)
        heat[ys, xs] = torch.maximum(heat[ys, xs], torch.exp(-((yy[ys] - cy) ** 2 + (xx[:, xs] - cx) ** 2) / 128))
        offsets[0, y0:y1, x0:x1] = cy - yy[y0:y1]
        offsets[1, y0:y1, x0:x1] = cx - xx[:, x0:x1]
    logits = torch.nn.functional.one_hot(labels, num_classes).permute(2, 0, 1).float() * 4
    logits += torch.randn(logits.shape, generator=gen)
    return logits.softmax(0)[None], heat[None, None], offsets[None], thing_ids


# --------------------------------------------------------------------------- deployment
DEPLOY_CASES = [("axial_resnet_s", (1, 3, 224, 224)), ("axial_deeplab_s", (1, 3, 513, 1025))]
QUICK_DEPLOY_CASES = [("axial_resnet_s", (1, 3, 224, 224)), ("axial_deeplab_s", (1, 3, 257, 513))]
DEPLOY_TRAIN_CASES = [("axial_resnet_s", (4, 3, 224, 224))]
QUICK_DEPLOY_TRAIN_CASES = [("axial_resnet_s", (2, 3, 160, 160))]


class RawOutputs(nn.Module):
    """A model as a function of one image batch returning plain tensors: the logits, or a
    panoptic model's raw outputs (what an exported ONNX file computes, post-processing aside)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        if hasattr(self.model, "predict_raw"):
            raw = self.model.predict_raw(x)
            return tuple(raw[k] for k in sorted(raw))
        return self.model(x)


def _as_tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return [torch.as_tensor(o) for o in out]


def max_rel_diff(got, want) -> float:
    """max |got - want| / max |want| over the outputs (inf on a shape mismatch)."""
    worst = 0.0
    for g, w in zip(_as_tensors(got), _as_tensors(want)):
        if g.shape != w.shape:
            return float("inf")
        worst = max(worst, float((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-12)))
    return worst


def train_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], object]:
    """One forward + cross-entropy + backward of a classifier (no optimizer step, so every
    round sees the same weights; BatchNorm's running statistics still move, as in training)."""
    def run():
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        return loss.detach()
    return run


def onnxruntime_session(path: str, threads: int):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (torch's count) and the
    full graph optimisation (ORT's default), one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _first_call(fn: Callable[[], object]):
    """(result, seconds) of one call: torch.compile compiles in its first call."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _deploy_rows(case, mode, steps, setup, notes, want, outputs, repeats, device, log, clock="wall"):
    timed = time_interleaved(steps, repeats, device, warmup=1)
    rows = []
    for name in list(steps) + [n for n in notes if n not in steps]:
        if name in steps:
            r = _measure("deploy", case, mode, name, steps[name], repeats, device, with_memory=False,
                         timed=timed[name])
        else:  # failed before timing (compile or export)
            r = Result("deploy", case, mode, name)
        r.setup_s = setup.get(name)
        extra = notes.get(name, "")
        if name in outputs and name != "eager" and want is not None and not r.note:
            extra = (extra + "; " if extra else "") + f"max rel diff {max_rel_diff(outputs[name], want):.1e}"
        r.note = "; ".join(s for s in (r.note, extra) if s)
        rows.append(r)
    eager = next((r for r in rows if r.impl == "eager"), None)
    t = (lambda r: r.median_ms) if clock == "wall" else (lambda r: r.cpu_ms)
    for r in rows:
        if eager is not None and t(eager) and t(r):
            r.vs_eager = t(r) / t(eager)
        log(_progress(r) + (f"  x eager {r.vs_eager:.2f}" if r.vs_eager else "")
            + (f"  setup {r.setup_s:.1f} s" if r.setup_s is not None else ""))
    return rows


def bench_deploy(device: torch.device, cases=DEPLOY_CASES, train_cases=DEPLOY_TRAIN_CASES, repeats: int = 5,
                 log=print, compile_backend: str = "inductor", with_compile: bool = True,
                 with_onnx: bool = True, models: Optional[Dict[str, Callable[[], nn.Module]]] = None,
                 workdir: Optional[str] = None, clock: str = "wall") -> List[Result]:
    """Deployment rows: eager against ``torch.compile(dynamic=True)`` (eval forward, and a
    training step for ``train_cases``) and against ONNX Runtime (eval; the file written by
    :func:`axial_deeplab.engine.export.export_model`, static size, CPU only), timed in turns
    in one process. ``setup_s`` is the compile time (the compiled function's first call) or
    the export time (export, check and verification of the file); ``vs_eager`` is this / eager.
    ``models`` maps a case's name to a builder (default: ``axial_deeplab.create_model``)."""
    import tempfile

    from .. import create_model

    def build(name):
        return models[name]() if models and name in models else create_model(name)

    rows: List[Result] = []
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="axial-deeplab-deploy-", dir=workdir) as tmp:
        for name, shape in cases:
            case = f"{name} {'x'.join(map(str, shape))}"
            torch.manual_seed(0)
            model = RawOutputs(build(name)).to(device).eval()
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
            with torch.no_grad():
                want = model(x)
            steps: Dict[str, Callable[[], object]] = {}
            setup: Dict[str, float] = {}
            notes: Dict[str, str] = {}
            outputs: Dict[str, object] = {"eager": want}

            def eager(model=model, x=x):
                with torch.no_grad():
                    return model(x)
            steps["eager"] = eager
            if with_compile:
                compiled = torch.compile(model, dynamic=True, backend=compile_backend)

                def run_compiled(compiled=compiled, x=x):
                    with torch.no_grad():
                        return compiled(x)
                try:
                    outputs["compiled"], setup["compiled"] = _first_call(run_compiled)
                    steps["compiled"] = run_compiled
                    notes["compiled"] = f"compile {setup['compiled']:.1f} s ({compile_backend}, dynamic)"
                except Exception as e:
                    notes["compiled"] = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:70]}"
            if with_onnx and device.type == "cpu":
                from ..engine.export import export_model

                path = os.path.join(tmp, f"{name}.onnx")
                try:
                    report = export_model(model.model, "onnx", path, tuple(shape[1:]), dynamic=False,
                                          batch=shape[0])
                    session = onnxruntime_session(path, threads)
                    feed = x.cpu().numpy()

                    def run_ort(session=session, feed=feed):
                        return session.run(None, {"image": feed})
                    out = run_ort()
                    # the file's outputs are in export order; the eager wrapper sorts panoptic names
                    from ..engine.export import export_outputs
                    order = export_outputs(model.model)
                    outputs["onnxruntime"] = [torch.from_numpy(out[order.index(k)]) for k in sorted(order)]
                    steps["onnxruntime"] = run_ort
                    setup["onnxruntime"] = report.export_seconds
                    notes["onnxruntime"] = (f"export {report.export_seconds:.1f} s; ORT {threads} thread"
                                            f"{'s' if threads > 1 else ''}")
                except Exception as e:
                    notes["onnxruntime"] = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:70]}"
            rows += _deploy_rows(case, "eval", steps, setup, notes, want, outputs, repeats, device, log, clock)
            del model, steps
        for name, shape in train_cases if with_compile else ():
            case = f"{name} {'x'.join(map(str, shape))}"
            torch.manual_seed(0)
            model = build(name).to(device).train()
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=gen).to(device)
            labels = torch.randint(0, 10, (shape[0],), generator=gen).to(device)
            steps = {"eager": train_step(model, x, labels)}
            setup, notes = {}, {}
            compiled = torch.compile(model, dynamic=True, backend=compile_backend)
            try:
                _, setup["compiled"] = _first_call(train_step(compiled, x, labels))
                steps["compiled"] = train_step(compiled, x, labels)
                notes["compiled"] = f"compile {setup['compiled']:.1f} s ({compile_backend}, dynamic)"
            except Exception as e:
                notes["compiled"] = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:70]}"
            rows += _deploy_rows(case, "train", steps, setup, notes, None, {}, repeats, device, log, clock)
            del model, steps
    return rows


def format_deploy_table(rows: List[Result]) -> str:
    """The deploy rows: time, this / eager, and the compile or export seconds."""
    return _table(rows, [("case", "28s"), ("mode", "5s"), ("impl", "12s"), ("median_ms", "10.1f", "median ms"),
                         ("cpu_ms", "9.1f", "cpu ms"), ("vs_eager", "8.2f", "x eager"),
                         ("setup_s", "8.1f", "setup s")])


# --------------------------------------------------------------------------- reporting
def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _progress(r: Result) -> str:
    if r.median_ms is None:
        return f"  {r.group:15s} {r.case:28s} {r.mode:5s} {r.impl:17s} {r.note}"
    return (f"  {r.group:15s} {r.case:28s} {r.mode:5s} {r.impl:17s} {r.median_ms:10.1f} ms"
            f"  peak {_fmt(r.peak_mib, '.0f')} MiB")


def format_table(rows: List[Result]) -> str:
    return _table(rows, [("group", "15s"), ("case", "28s"), ("mode", "5s"), ("impl", "17s"),
                         ("median_ms", "10.1f", "median ms"), ("cpu_ms", "9.1f", "cpu ms"),
                         ("vs_conv", "7.2f", "x conv"), ("vs_reference", "8.2f", "ref/this"),
                         ("peak_mib", "9.1f", "peak MiB")])


def _table(rows: List[Result], columns) -> str:
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
        values = [format(getattr(r, f), spec) if text else format(_fmt(getattr(r, f), spec), f">{width}s")
                  for f, spec, text, width in cells]
        lines.append(" ".join(values) + f"  {r.note}")
    return "\n".join(lines)


def machine_info(device: torch.device) -> Dict[str, object]:
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
        from ..layers.triton_kernels import dot_precision, triton_available

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


# --------------------------------------------------------------------------- scripts
def add_script_arguments(p: argparse.ArgumentParser, repeats: int) -> None:
    """Options every script in benchmarks/ shares (the command has its own, richer set)."""
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


# --------------------------------------------------------------------------- CLI
SECTIONS = ("layers", "core", "models", "postprocess", "deploy")
# "deploy" compiles and exports whole models (minutes on a CPU): run only when asked for
DEFAULT_SECTIONS = ("layers", "core", "models", "postprocess")


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
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats, skip Axial-DeepLab-L and the slow reference/loop baselines of the "
                        "big cases (about 2 minutes on 2 CPU cores)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the results here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 10, --quick 3)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS),
                   help="sections to run (default: all but deploy; deploy = eager vs torch.compile vs "
                        "ONNX Runtime for Axial-ResNet-S and Axial-DeepLab-S, with compile and export times)")
    p.add_argument("--impls", nargs="+", default=None,
                   help="attention implementations to time (default: reference and every registered fast path)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time the ratios use: median wall time, or median process CPU time (steadier when "
                        "other processes share the cores; with --threads 1 it is the single-core time)")
    p.add_argument("--no-tf32", action="store_true",
                   help="on a GPU, turn TF32 off for cuDNN's convolutions and the Triton kernels (full "
                        "float32 accuracy; by default both use TF32 tensor cores, as PyTorch's convolutions do)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 10)
    info = machine_info(device)
    print(f"axial-deeplab benchmark on {info['cpu']} ({info['torch_threads']} threads), torch {info['torch']}, "
          f"device {device}{' (quick)' if args.quick else ''}", flush=True)
    if device.type == "cuda":
        print(f"GPU {info['gpu']}; cuDNN TF32 {'on' if info['cudnn_tf32'] else 'off'}, Triton dots "
              f"{info.get('triton_dot', '(no triton)')}, float32 matmul precision {info['matmul_precision']}",
              flush=True)
    start = time.perf_counter()
    rows: List[Result] = []
    log = lambda s: print(s, flush=True)  # noqa: E731
    if "layers" in args.only:
        shapes = (QUICK_LAYER_SHAPES if args.quick else LAYER_SHAPES) if device.type == "cpu" else GPU_LAYER_SHAPES
        rows += bench_layers(device, shapes, impls=args.impls,
                             repeats=repeats, with_memory=not args.no_memory, log=log, clock=args.clock)
    if "core" in args.only:
        bandwidth = copy_bandwidth(device)
        print(f"copy bandwidth on {device}: {bandwidth / 1e9:.1f} GB/s", flush=True)
        rows += bench_core(device, (QUICK_LAYER_SHAPES if args.quick else LAYER_SHAPES)
                           if device.type == "cpu" else GPU_LAYER_SHAPES, repeats=repeats, log=log,
                           bandwidth=bandwidth)
    if "models" in args.only:
        rows += bench_models(device, QUICK_MODEL_CASES if args.quick else MODEL_CASES, impls=args.impls,
                             repeats=max(1, repeats // 3) if args.quick else repeats,
                             with_memory=not args.no_memory, log=log, clock=args.clock)
    if "postprocess" in args.only:
        rows += bench_postprocess(device, repeats=repeats, with_loop=not args.quick, log=log, clock=args.clock)
    if "deploy" in args.only:
        rows += bench_deploy(device, QUICK_DEPLOY_CASES if args.quick else DEPLOY_CASES,
                             QUICK_DEPLOY_TRAIN_CASES if args.quick else DEPLOY_TRAIN_CASES,
                             repeats=repeats, log=log, clock=args.clock)
    elapsed = time.perf_counter() - start
    print()
    deploy = [r for r in rows if r.group == "deploy"]
    if len(deploy) < len(rows):
        print(format_table([r for r in rows if r.group != "deploy"]))
    if deploy:
        print(format_deploy_table(deploy))
        print(f"deploy: 'x eager' = this / eager from the same interleaved rounds (median {args.clock} times); "
              "'setup s' = torch.compile's first call, or the ONNX export with its verification.")
    print(f"\n{len(rows)} cases in {elapsed:.0f} s. Ratios from median {args.clock} times: 'x conv' = this / "
          "conv3x3 on the same input; 'ref/this' = reference / this.")
    tuned = {}
    if device.type == "cuda":
        from ..layers.triton_kernels import tuned_configs

        tuned = tuned_configs()
        for kernel, chosen in tuned.items():
            print(f"Triton {kernel} tiles chosen by the autotuner (key: L, Lq, step, radius, dk, dv, dots, terms):")
            for key, config in chosen.items():
                print(f"  {key}: {config}")
    if args.json_out:
        atomic_write_json(args.json_out, {"machine": info, "quick": bool(args.quick), "clock": args.clock,
                                          "seconds": elapsed, "triton_configs": tuned,
                                          "results": [asdict(r) for r in rows]})
        print(f"wrote {args.json_out}")
    return 0
