"""Deployment: eager against ``torch.compile(fullgraph=True, dynamic=True)`` (eval forward, with
Inductor's freezing as ``evaluate`` compiles; and a training step) and against ONNX Runtime
(eval; the file ``axial-deeplab export`` writes, static size, CPU only), timed in turns in one
process, each faster path checked against eager's outputs. Compiling and exporting whole models
takes minutes on a CPU, so the command runs this suite only when ``--only deploy`` asks for it."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ...engine.builders import INFERENCE_COMPILE_OPTIONS, training_compile_options
from ..harness import Result, failure_note, measure, time_interleaved
from ..report import progress, table
from .base import Settings, Suite

DEPLOY_CASES = [("axial_resnet_s", (1, 3, 224, 224)), ("axial_deeplab_s", (1, 3, 513, 1025))]
QUICK_DEPLOY_CASES = [("axial_resnet_s", (1, 3, 224, 224)), ("axial_deeplab_s", (1, 3, 257, 513))]
DEPLOY_TRAIN_CASES = [("axial_resnet_s", (4, 3, 224, 224)), ("axial_deeplab_s", (2, 3, 257, 257))]
QUICK_DEPLOY_TRAIN_CASES = [("axial_resnet_s", (2, 3, 160, 160))]

DEPLOY_COLUMNS = [
    ("case", "28s"),
    ("mode", "5s"),
    ("impl", "12s"),
    ("median_ms", "10.1f", "median ms"),
    ("cpu_ms", "9.1f", "cpu ms"),
    ("vs_eager", "8.2f", "x eager"),
    ("setup_s", "8.1f", "setup s"),
]


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
    """One forward + loss + backward (no optimizer step, so every round sees the same weights;
    BatchNorm's running statistics still move, as in training). The loss: cross-entropy of a
    classifier's logits; for a panoptic model's outputs (a dict), the mean square of each
    output summed (a stand-in with the same backward through every head)."""

    def run():
        out = model(x)
        if isinstance(out, torch.Tensor):
            loss = nn.functional.cross_entropy(out, labels)
        else:
            outs = out.values() if isinstance(out, dict) else out
            loss = sum(t.float().square().mean() for t in outs if torch.is_tensor(t) and t.is_floating_point())
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
    """Time ``steps`` in turns and make their rows: the setup seconds, the notes, the
    difference of each output from eager's ``want``, and this / eager."""
    timed = time_interleaved(steps, repeats, device, warmup=1)
    rows = []
    for name in list(steps) + [n for n in notes if n not in steps]:
        if name in steps:
            r = measure("deploy", case, mode, name, steps[name], repeats, device, with_memory=False, timed=timed[name])
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
        log(
            progress(r)
            + (f"  x eager {r.vs_eager:.2f}" if r.vs_eager else "")
            + (f"  setup {r.setup_s:.1f} s" if r.setup_s is not None else "")
        )
    return rows


def _eval_case(
    model, name, shape, device, tmp, threads, repeats, log, clock, compile_backend, with_compile, with_onnx
) -> List[Result]:
    """Eager, compiled and ONNX Runtime inference of one model at one input size."""
    case = f"{name} {'x'.join(map(str, shape))}"
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        want = model(x)
    steps: Dict[str, Callable[[], object]] = {}
    setup: Dict[str, float] = {}
    notes: Dict[str, str] = {}
    outputs: Dict[str, object] = {"eager": want}

    def eager():
        with torch.no_grad():
            return model(x)

    steps["eager"] = eager
    if with_compile:
        # as `evaluate` compiles (freezing); options exist for Inductor only
        options = dict(INFERENCE_COMPILE_OPTIONS) if compile_backend == "inductor" else None
        compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=compile_backend, options=options)

        def run_compiled():
            with torch.no_grad():
                return compiled(x)

        try:
            outputs["compiled"], setup["compiled"] = _first_call(run_compiled)
            steps["compiled"] = run_compiled
            frozen = ", freezing" if options else ""
            notes["compiled"] = f"compile {setup['compiled']:.1f} s ({compile_backend}, dynamic{frozen})"
        except Exception as e:
            notes["compiled"] = failure_note(e)
    if with_onnx and device.type == "cpu":
        from ...engine.export import export_model, export_outputs

        path = os.path.join(tmp, f"{name}.onnx")
        try:
            report = export_model(model.model, "onnx", path, tuple(shape[1:]), dynamic=False, batch=shape[0])
            session = onnxruntime_session(path, threads)
            feed = x.cpu().numpy()

            def run_ort():
                return session.run(None, {"image": feed})

            out = run_ort()
            # the file's outputs are in export order; the eager wrapper sorts panoptic names
            order = export_outputs(model.model)
            outputs["onnxruntime"] = [torch.from_numpy(out[order.index(k)]) for k in sorted(order)]
            steps["onnxruntime"] = run_ort
            setup["onnxruntime"] = report.export_seconds
            notes["onnxruntime"] = (
                f"export {report.export_seconds:.1f} s; ORT {threads} thread{'s' if threads > 1 else ''}"
            )
        except Exception as e:
            notes["onnxruntime"] = failure_note(e)
    return _deploy_rows(case, "eval", steps, setup, notes, want, outputs, repeats, device, log, clock)


def _train_case(model, name, shape, device, repeats, log, clock, compile_backend) -> List[Result]:
    """Eager against compiled training steps of one model at one batch shape."""
    case = f"{name} {'x'.join(map(str, shape))}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    labels = torch.randint(0, 10, (shape[0],), generator=gen).to(device)
    steps = {"eager": train_step(model, x, labels)}
    setup, notes = {}, {}
    # as `train` compiles (on CPU, the backward's convolutions channels_last); options are Inductor's
    options = training_compile_options(model) if compile_backend == "inductor" else None
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=compile_backend, options=options or None)
    try:
        _, setup["compiled"] = _first_call(train_step(compiled, x, labels))
        steps["compiled"] = train_step(compiled, x, labels)
        forced = ", layout forced" if options else ""
        notes["compiled"] = f"compile {setup['compiled']:.1f} s ({compile_backend}, dynamic{forced})"
    except Exception as e:
        notes["compiled"] = failure_note(e)
    return _deploy_rows(case, "train", steps, setup, notes, None, {}, repeats, device, log, clock)


def bench_deploy(
    device: torch.device,
    cases=DEPLOY_CASES,
    train_cases=DEPLOY_TRAIN_CASES,
    repeats: int = 5,
    log=print,
    compile_backend: str = "inductor",
    with_compile: bool = True,
    with_onnx: bool = True,
    models: Optional[Dict[str, Callable[[], nn.Module]]] = None,
    workdir: Optional[str] = None,
    clock: str = "wall",
) -> List[Result]:
    """Deployment rows (see the module doc). ``setup_s`` is the compile time (the compiled
    function's first call) or the export time (export, check and verification of the file);
    ``vs_eager`` is this / eager. ``models`` maps a case's name to a builder (default:
    ``axial_deeplab.create_model``); the ONNX files live in a temporary folder under ``workdir``."""
    from ... import create_model

    def build(name):
        return models[name]() if models and name in models else create_model(name)

    rows: List[Result] = []
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="axial-deeplab-deploy-", dir=workdir) as tmp:
        for name, shape in cases:
            torch.manual_seed(0)
            model = RawOutputs(build(name)).to(device).eval()
            rows += _eval_case(
                model, name, shape, device, tmp, threads, repeats, log, clock, compile_backend, with_compile, with_onnx
            )
            del model
        for name, shape in train_cases if with_compile else ():
            torch.manual_seed(0)
            model = build(name).to(device).train()
            rows += _train_case(model, name, shape, device, repeats, log, clock, compile_backend)
            del model
    return rows


def format_deploy_table(rows: List[Result]) -> str:
    """The deploy rows: time, this / eager, and the compile or export seconds."""
    return table(rows, DEPLOY_COLUMNS)


def run(s: Settings) -> List[Result]:
    return bench_deploy(
        s.device,
        QUICK_DEPLOY_CASES if s.quick else DEPLOY_CASES,
        QUICK_DEPLOY_TRAIN_CASES if s.quick else DEPLOY_TRAIN_CASES,
        repeats=s.repeats,
        log=s.log,
        clock=s.clock,
    )


SUITE = Suite(
    "deploy",
    run,
    default=False,
    table=format_deploy_table,
    footnote="deploy: 'x eager' = this / eager from the same interleaved rounds (median {clock} times); "
    "'setup s' = torch.compile's first call, or the ONNX export with its verification.",
)
