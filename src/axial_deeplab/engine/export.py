"""Export a model for deployment: ONNX, ExportedProgram (``.pt2``) or TorchScript.

For ONNX and TorchScript every attention layer runs its exportable decomposition
(``impl="banded"``: standard tensor ops, O(L x span) memory for local spans, the plain reference
for global ones). An ExportedProgram keeps the default path: its attention is the
``axial_deeplab::attention_eval`` operator (registered by ``import axial_deeplab.layers``, which
a program must import before ``torch.export.load``), so it runs the fused kernel. Panoptic models export their raw
outputs (``semantic_logits``, ``center_heatmap``, ``offset_map``); the post-processing
(:meth:`PanopticDeepLab.postprocess`) stays in Python.

Each file is written under a temporary name, loaded back, run and compared with the eager
model; only a file that matches is renamed into place. A mismatch or a failed export leaves
whatever was at the output path untouched.
"""

from __future__ import annotations

import contextlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..errors import MissingExtraError, UserError
from ..fileio import atomic_output

__all__ = ["FORMATS", "ExportReport", "export_model", "exportable_attention", "export_outputs"]

FORMATS = {"onnx": ".onnx", "exported-program": ".pt2", "torchscript": ".pt"}
# Strided convolutions and axial strides round sizes up; a dynamic export covers sizes that are
# multiples of the deepest feature map's stride, where every level divides evenly.
SIZE_MULTIPLE = 32
MAX_DYNAMIC_SIZE = 4096
PANOPTIC_OUTPUTS = ("semantic_logits", "center_heatmap", "offset_map")
DEFAULT_OPSET = 18


@dataclass
class ExportReport:
    path: str
    format: str
    input_shape: Tuple[int, int, int, int]
    dynamic: bool
    output_names: List[str]
    export_seconds: float
    # (H, W) -> max |file - eager| / max |eager| over the outputs, for each size checked
    max_rel_diff: Dict[Tuple[int, int], float] = field(default_factory=dict)


class _RawOutputs(nn.Module):
    """The model as a function of one image batch returning a tuple of plain tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.panoptic = hasattr(model, "predict_raw")

    def forward(self, image: torch.Tensor):
        if self.panoptic:
            raw = self.model.predict_raw(image)
            return tuple(raw[k] for k in PANOPTIC_OUTPUTS)
        return (self.model(image),)


def export_outputs(model: nn.Module) -> List[str]:
    """The names of the exported outputs, in order."""
    return list(PANOPTIC_OUTPUTS) if hasattr(model, "predict_raw") else ["logits"]


@contextmanager
def exportable_attention(model: nn.Module, impl: str = "banded"):
    """Run every attention layer of ``model`` through ``impl`` (restored afterwards)."""
    from ..layers import PositionSensitiveAxialAttention

    layers = [m for m in model.modules() if isinstance(m, PositionSensitiveAxialAttention)]
    saved = [m.impl for m in layers]
    try:
        for m in layers:
            m.impl = impl
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.impl = s


def _check_shape(input_shape: Sequence[int], dynamic: bool, format: str) -> Tuple[int, int, int]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or shape[0] != 3 or min(shape) < 1:
        raise UserError(f"input shape must be 3xHxW (RGB), got {'x'.join(map(str, input_shape))}")
    _, h, w = shape
    if dynamic and format != "torchscript":
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE or min(h, w) < 2 * SIZE_MULTIPLE or max(h, w) > MAX_DYNAMIC_SIZE:
            raise UserError(
                f"a dynamic export takes an example input whose H and W are multiples of "
                f"{SIZE_MULTIPLE} between {2 * SIZE_MULTIPLE} and {MAX_DYNAMIC_SIZE} "
                f"(got {h}x{w}); the file then runs at any such size. Use --static "
                f"(dynamic=False) for a file fixed to another size"
            )
    return shape


def _rel_diff(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for g, e in zip(got, want):
        g = torch.as_tensor(g).to(e.dtype)
        if g.shape != e.shape:
            return float("inf")
        scale = e.abs().max().clamp_min(1e-12)
        worst = max(worst, float((g - e).abs().max() / scale))
    return worst


def _require(*modules: str) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise MissingExtraError(
                "ONNX export", "onnx", f"onnx, onnxscript and onnxruntime ({name} is missing)"
            ) from None


def _export_onnx(wrapper, example, tmp, names, dynamic_shapes, opset):
    _require("onnx", "onnxscript", "onnxruntime")
    import onnx

    with torch.no_grad():  # inference graph: the decomposition's eval forms
        program = torch.onnx.export(
            wrapper,
            (example,),
            input_names=["image"],
            output_names=names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
        )
    program.save(tmp)
    onnx.checker.check_model(tmp, full_check=True)
    graph = onnx.load(tmp)
    foreign = sorted({n.domain for n in graph.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign or graph.functions:
        raise UserError(
            f"the ONNX graph uses non-standard operators (domains {foreign}, "
            f"{len(graph.functions)} local functions); refusing to write it"
        )

    import onnxruntime as ort

    session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    return lambda x: [torch.from_numpy(o) for o in session.run(None, {"image": x.numpy()})]


def _export_program(wrapper, example, tmp, dynamic_shapes):
    with torch.no_grad():  # records the fused inference operator, not the training one
        program = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic_shapes)
    torch.export.save(program, tmp)
    loaded = torch.export.load(tmp).module()

    def run(x):
        with torch.no_grad():
            return list(loaded(x))

    return run


def _export_torchscript(wrapper, example, tmp):
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # size checks frozen into the trace are expected: the file is verified at its size below
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    torch.jit.save(traced, tmp)
    loaded = torch.jit.load(tmp, map_location="cpu")

    def run(x):
        with torch.no_grad():
            return list(loaded(x))

    return run


def _check_export_args(format: str, opset: int, input_shape, dynamic: bool, output, overwrite: bool):
    """``(input shape, output path)`` of valid :func:`export_model` arguments; else a UserError."""
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "onnx" and opset < 17:
        raise UserError(f"ONNX export needs opset 17 or newer (got {opset})")
    shape = _check_shape(input_shape, dynamic, format)
    output = os.fspath(output)
    if os.path.isdir(output):
        raise UserError(f"output {output} is a folder; give a file name such as model{FORMATS[format]}")
    if os.path.exists(output) and not overwrite:
        raise UserError(f"output {output} exists; remove it or pass --force (overwrite=True) to replace it")
    return shape, output


def _dynamic_shapes_and_sizes(h: int, w: int, dynamic: bool):
    """``(dynamic_shapes for torch.export, the sizes the written file is checked at)``: the example
    size, and for a dynamic export a second size (one multiple of 32 away) as well."""
    if not dynamic:
        return None, [(h, w)]
    dim_h = torch.export.Dim("h", min=2, max=MAX_DYNAMIC_SIZE // SIZE_MULTIPLE)
    dim_w = torch.export.Dim("w", min=2, max=MAX_DYNAMIC_SIZE // SIZE_MULTIPLE)
    dynamic_shapes = {"image": {2: SIZE_MULTIPLE * dim_h, 3: SIZE_MULTIPLE * dim_w}}
    second = (h + SIZE_MULTIPLE, w - SIZE_MULTIPLE) if w > 2 * SIZE_MULTIPLE else (h + SIZE_MULTIPLE, w)
    return dynamic_shapes, [(h, w), second if max(second) <= MAX_DYNAMIC_SIZE else (h - SIZE_MULTIPLE, w)]


def export_model(
    model: nn.Module,
    format: str,
    output: str,
    input_shape: Sequence[int] = (3, 224, 224),
    dynamic: bool = True,
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    rtol: float = 1e-4,
    overwrite: bool = False,
    seed: int = 0,
) -> ExportReport:
    """Export ``model`` (CPU, eval mode) to ``output`` and verify the written file.

    Args:
        format: ``"onnx"`` (opset >= 17, standard operators only), ``"exported-program"``
            (``torch.export``, load with ``torch.export.load``) or ``"torchscript"`` (``torch.jit.trace``).
        input_shape: example input (3, H, W). With ``dynamic`` (ONNX and ExportedProgram) the file
            takes any H and W that are multiples of 32 (64..4096), and H, W must be such multiples
            here; TorchScript is traced at this size and verified at it only.
        batch: batch size of the example (dynamic exports keep the batch fixed).
        rtol: largest accepted ``max |file - eager| / max |eager|`` per output.
        overwrite: replace an existing ``output`` (otherwise refused).

    The file is written to a temporary name, loaded, run at the example size (and, when dynamic,
    at a second size) and compared with the eager model; only then is it renamed to ``output``.
    Raises :class:`UserError` on bad arguments or a mismatch."""
    shape, output = _check_export_args(format, opset, input_shape, dynamic, output, overwrite)
    was_training = model.training
    model = model.cpu().eval()
    wrapper = _RawOutputs(model).eval()
    names = export_outputs(model)
    _, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    example = torch.rand((batch,) + shape, generator=gen)
    dynamic_shapes, sizes = _dynamic_shapes_and_sizes(h, w, dynamic and format != "torchscript")

    try:
        with atomic_output(output, suffix=".tmp" + FORMATS[format]) as tmp:
            start = time.perf_counter()
            # ONNX and TorchScript need the attention as plain tensor ops; an ExportedProgram keeps
            # the default path, whose kernels are axial_deeplab operators (torch.library)
            with exportable_attention(model) if format != "exported-program" else contextlib.nullcontext():
                if format == "onnx":
                    run = _export_onnx(wrapper, example, tmp, names, dynamic_shapes, opset)
                elif format == "exported-program":
                    run = _export_program(wrapper, example, tmp, dynamic_shapes)
                else:
                    run = _export_torchscript(wrapper, example, tmp)
            seconds = time.perf_counter() - start
            report = ExportReport(output, format, (batch,) + shape, dynamic_shapes is not None, names, seconds)
            for sh, sw in sizes:  # the eager model as the user has it (its default attention path)
                x = example if (sh, sw) == (h, w) else torch.rand((batch, 3, sh, sw), generator=gen)
                with torch.no_grad():
                    want = wrapper(x)
                diff = _rel_diff(run(x), want)
                report.max_rel_diff[(sh, sw)] = diff
                if not diff <= rtol:
                    raise UserError(
                        f"the exported {format} file differs from the eager model at {sh}x{sw} "
                        f"(max relative difference {diff:.2e} > {rtol:g}); nothing was written"
                    )
        return report
    finally:
        model.train(was_training)
