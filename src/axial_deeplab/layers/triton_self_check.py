"""The Triton path as dispatched (``impl="triton"``), guarded by a self-check on each device.

Why: a kernel that compiles can still compute wrong on a GPU, Triton or driver it was never
tested on, and the layer must not give a silent wrong answer. The first Triton layer on each
GPU runs :func:`self_check` (a tiny layer through the kernels and through the reference on
that GPU); should it fail, the layer warns once and runs the PyTorch memory-efficient path
there instead (same results, slower). Under torch.compile the check still runs eagerly, once,
outside the graph (dynamo calls it instead of tracing it); the compiled graph holds its verdict.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import TYPE_CHECKING, Optional

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import triton_launch, triton_ops
from .axial_attention import PositionSensitiveAxialAttention
from .memory_efficient import axial_attention_memory_efficient
from .reference import axial_attention_reference
from .triton_kernels import triton

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__ = ["axial_attention_triton", "trusted", "self_check", "SELF_CHECK_DEVICE_TYPES", "SELF_CHECK_BLOCKS"]

# Device types whose first Triton layer runs :func:`self_check` (tests add "cpu", where the
# kernels run through the interpreter). AXIAL_DEEPLAB_TRITON_SELF_CHECK=0 skips the check.
SELF_CHECK_DEVICE_TYPES = ("cuda",)
# The tiles of the check, passed to the launch (fixed tiles keep it to two compiles).
SELF_CHECK_BLOCKS = (16, 16, 4, 1)
_TRUST: dict = {}  # (device, dot precision) -> passed


def axial_attention_triton(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> torch.Tensor:
    """``impl="triton"``: :func:`.triton_ops.triton_layer_op` (the kernels as operators); on a
    device where the kernels failed :func:`self_check`, the PyTorch memory-efficient path
    instead (after one warning)."""
    if not trusted(x.device):
        return axial_attention_memory_efficient(layer, x)
    return triton_ops.triton_layer_op(layer, x)


def trusted(device: torch.device) -> bool:
    """Whether the Triton kernels may run on ``device``: :func:`self_check` once per process,
    device and product precision; a failure warns once, naming the reason.

    Traced (torch.compile, torch.export) the check is not part of the graph: the verdict is
    reached eagerly, outside the trace, and the graph is built for it (see :func:`_verdict_outside_trace`)."""
    if device.type not in SELF_CHECK_DEVICE_TYPES or os.environ.get("AXIAL_DEEPLAB_TRITON_SELF_CHECK", "1") in (
        "0",
        "false",
        "no",
    ):
        return True
    if torch.compiler.is_compiling():
        return _verdict_outside_trace(str(device), triton_launch.dot_precision())
    return _verdict(str(device), triton_launch.dot_precision())


def _key(device_name: str, precision: str) -> tuple:
    device = torch.device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device), precision


def _verdict(device_name: str, precision: str) -> bool:
    """The cached verdict for a device (named as ``str(device)``) and product precision, running
    :func:`self_check` the first time."""
    key = _key(device_name, precision)
    if key not in _TRUST:
        device = torch.device(key[0])
        reason = self_check(device)
        _TRUST[key] = reason is None
        if reason is not None:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            warnings.warn(
                f"impl='triton': the Triton kernels failed their self-check on {device} ({reason}); "
                f"this process runs the PyTorch memory-efficient path there instead (same results, "
                f"slower). Please report it, with these versions: {name}, torch {torch.__version__}, "
                f"triton {triton.__version__}.",
                RuntimeWarning,
            )
    return _TRUST[key]


@torch.compiler.assume_constant_result
def _verdict_outside_trace(device_name: str, precision: str) -> bool:
    """:func:`_verdict` while a graph is traced. Dynamo (torch.compile, strict export) runs this
    eagerly rather than tracing it (the check forks the RNG and runs its own autograd, nothing a
    graph holds, and ``fullgraph=True`` allows no break) and builds the graph for the result.
    A Python-level tracer (non-strict export) would record the check through its dispatch modes:
    there a verdict already reached is used, else the kernels are trusted (the check belongs on
    the device that runs the exported program)."""
    if is_in_torch_dispatch_mode():
        return _TRUST.get(_key(device_name, precision), True)
    return _verdict(device_name, precision)


def self_check(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot be trusted on ``device``, or None when they pass.

    A tiny layer (L = 37 in tiles of 16: several query and key blocks, the atomic k/v path,
    tables clipped beyond their reach, and a local span that skips key blocks) runs forward and
    backward in training, and forward in eval, through the kernels and through the reference
    equation on the same device; outputs and every gradient must agree (TF32 products: within
    3e-2 of the largest value, else 1e-3)."""
    tol = 3e-2 if triton_launch.dot_precision() == "tf32" else 1e-3

    def kernels(layer: PositionSensitiveAxialAttention, x):
        return triton_launch.triton_layer(layer, x, blocks=SELF_CHECK_BLOCKS)

    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            torch.manual_seed(0)
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(1, 8, 2, 37, generator=gen).to(device)
            g = torch.randn(1, 16, 2, 37, generator=gen).to(device)
            for span in (None, 7):
                layer = PositionSensitiveAxialAttention(
                    8, 16, axis="width", num_heads=2, span=span, max_relative_distance=20
                ).to(device)
                runs = {}
                for name, fn in (("triton", kernels), ("reference", axial_attention_reference)):
                    probe = copy.deepcopy(layer)
                    xi = x.clone().requires_grad_(True)
                    y = fn(probe, xi)
                    (y * g).sum().backward()
                    probe.eval()
                    with torch.no_grad():
                        y_eval = fn(probe, x)
                    runs[name] = {
                        "output": y.detach(),
                        "eval output": y_eval,
                        "input gradient": xi.grad,
                        **{f"gradient of {n}": p.grad for n, p in probe.named_parameters()},
                    }
                for what, want in runs["reference"].items():
                    got = runs["triton"][what]
                    bound = tol * max(1.0, float(want.abs().max()))
                    err = float((got - want).abs().max()) if got is not None else float("inf")
                    if not err <= bound:
                        span_name = "global span" if span is None else f"span {span}"
                        return f"{what}, {span_name}: max difference {err:.3g} > {bound:.3g}"
    except Exception as exc:  # a compile or launch failure is a failed check, not a crash
        return f"{type(exc).__name__}: {exc}"[:500]
    return None
