"""The built-in attention paths, registered with :mod:`.dispatch` (the one place they are).

* ``reference`` (:mod:`.reference`): the equation as written, every L x L tensor stored; the
  oracle, and the path while torch.jit.trace or ONNX export records a graph with ``impl="auto"``.
* ``banded`` (:mod:`.reference`): the same math in O(L x span) memory from standard ops (what
  ``axial-deeplab export`` decomposes the layer into); by name only.
* ``memory_efficient`` (:mod:`.memory_efficient`): the default on CPU and on devices without
  Triton. Inner routes: inference as the operator ``axial_deeplab::attention_eval`` (C kernel
  inside, :mod:`.ops`), training as ``axial_deeplab::attention_rows`` (recompute backward),
  else the chunked PyTorch path.
* ``fast`` (:mod:`.chunked`): the same forward with autograd's backward through the chunked
  PyTorch path (more memory; an independent second backward the tests hold to the reference).
* ``triton`` (:mod:`.triton_self_check`): Triton kernels for forward and backward (the default
  on CUDA when installed).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, List, Optional

import torch

from . import cpu_kernel, memory_efficient, triton_self_check
from .chunked import axial_attention_fast
from .dispatch import Backend, register_backend, register_unavailable, tracing_refusal
from .memory_efficient import ROUTE_DESCRIPTIONS, axial_attention_memory_efficient
from .reference import axial_attention_banded, axial_attention_reference
from .triton_kernels import triton_available

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__: List[str] = []

_CTYPES = "calls the C kernel through ctypes (invisible to the tracer: the trace would be silently wrong)"


def c_kernel_state() -> str:
    """One line on the compiled CPU kernel (compiling it on first call)."""
    if not cpu_kernel.ENABLED:
        return "C kernel: switched off (AXIAL_DEEPLAB_NO_C_KERNEL); the operators run their PyTorch code"
    if not cpu_kernel.available():
        return (
            "C kernel: not built (no C compiler, or the build failed: see its warning); "
            "the operators run their PyTorch code"
        )
    return "C kernel: loaded (float32 runs it; other dtypes the PyTorch code)"


def _cpu_notes(layer: PositionSensitiveAxialAttention, x) -> List[str]:
    return [c_kernel_state()] if x.device.type == "cpu" else []


def _fast_can_run(layer: PositionSensitiveAxialAttention, x) -> Optional[str]:
    reason = tracing_refusal(_CTYPES)
    if reason is None and x.device.type == "cpu" and torch.compiler.is_compiling():
        reason = "torch.compile/export is tracing and this path calls the C kernel through ctypes"
    if reason is None and x.device.type == "meta":
        reason = "meta tensors hold no values (this path branches on them)"
    return reason


def _triton_can_run(layer: PositionSensitiveAxialAttention, x) -> Optional[str]:
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if x.device.type == "cpu" and not interpreted:
        return "the Triton kernels run on GPUs (on CPU only through TRITON_INTERPRET=1)"
    if x.device.type not in ("cpu", "cuda", "xpu"):
        return f"the Triton kernels do not run on {x.device.type}"
    return tracing_refusal("launches its kernels by hand (invisible to the tracer)")


def _triton_auto_refusal(layer: PositionSensitiveAxialAttention, x) -> Optional[str]:
    if not triton_self_check.trusted(x.device):
        return (
            f"the Triton kernels failed their self-check on {x.device} (see its warning; "
            f"impl='triton' by name warns and runs the PyTorch memory-efficient path)"
        )
    return None


register_backend(
    Backend("reference", "the equation as written, every L x L tensor stored (the oracle)", axial_attention_reference)
)
register_backend(
    Backend(
        "banded",
        "the reference math in O(L x span) memory from standard ops (the export decomposition)",
        axial_attention_banded,
    )
)
register_backend(
    Backend(
        "fast",
        "fused C kernel in inference, chunked PyTorch forward with autograd's backward",
        axial_attention_fast,
        can_run=_fast_can_run,
        notes=_cpu_notes,
    )
)
register_backend(
    Backend(
        "memory_efficient",
        "recompute-in-backward attention: CPU operators, else chunked PyTorch",
        axial_attention_memory_efficient,
        can_run=memory_efficient.refusal,
        routes=memory_efficient.routes,
        notes=_cpu_notes,
        route_descriptions=ROUTE_DESCRIPTIONS,
    )
)
if triton_available():  # optional; on CPU only through Triton's interpreter (TRITON_INTERPRET=1)
    register_backend(
        Backend(
            "triton",
            "Triton kernels for the forward and the recompute backward",
            triton_self_check.axial_attention_triton,
            can_run=_triton_can_run,
            auto_refusal=_triton_auto_refusal,
        )
    )
else:
    register_unavailable("triton", "Triton is not installed")
