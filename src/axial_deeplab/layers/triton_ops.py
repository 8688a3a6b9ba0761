"""The Triton kernels as PyTorch operators: ``axial_deeplab::triton_attention`` (forward:
``(sv, sve, lse)``) and ``axial_deeplab::triton_attention_backward`` (the recompute backward),
defined with ``torch.library.triton_op`` and registered as the forward's autograd formula.

Why: launched by hand, a kernel is a Python call that ``torch.compile`` can only trace through
or break on. As a ``triton_op`` it is an operator with a known autograd formula whose body
(tensor allocations and ``wrap_triton`` launches, :mod:`.triton_launch`) ``torch.compile``
decomposes, so Inductor sees and schedules the kernels themselves; ``torch.export`` keeps it as
one operator. The body is also the operator's fake implementation: traced, the launches use
the default tiles of :func:`.triton_launch.block_sizes` (the autotuner needs real launches).

Operands are the Triton path's sequence layout: ``qkv`` (N*heads, 2dk+dv, L), ``scales``
(3, heads) the similarity BN's multipliers, the relative tables as stored (None where a term is
off), the layer's geometry as numbers (``radius`` < 0: global span) and the query step. The
operators exist only where Triton imports; importing this module launches and compiles nothing
(kernels compile at their first launch) and touches no GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import Tensor

from . import triton_launch
from .chunked import run_layer
from .ops import layer_args, layer_from_args
from .triton_kernels import triton_available

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__ = ["OPERATORS", "attend_op", "triton_layer_op"]

_NS = "axial_deeplab"
# The operators this module defines (none without Triton).
OPERATORS = ("triton_attention", "triton_attention_backward") if triton_available() else ()


if triton_available():
    from torch.library import triton_op

    @triton_op(f"{_NS}::triton_attention", mutates_args=())
    def triton_attention(
        qkv: Tensor,
        scales: Tensor,
        query_table: Optional[Tensor],
        key_table: Optional[Tensor],
        value_table: Optional[Tensor],
        heads: int,
        dk: int,
        dv: int,
        radius: int,
        max_distance: int,
        use_qk: bool,
        query_step: int,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """(sv (nh, dv, Lq), sve (nh, dv, Lq), or empty without r^v, lse (nh, Lq) log2-sum-exp2)."""
        geo = layer_from_args(heads, dk, dv, radius, max_distance, use_qk, query_table, key_table, value_table)
        sv, sve, lse = triton_launch.attend_triton(geo, qkv, scales, query_step, return_lse=True)
        return sv, (sv.new_empty(0) if sve is None else sve), lse

    @triton_op(f"{_NS}::triton_attention_backward", mutates_args=())
    def triton_attention_backward(
        qkv: Tensor,
        scales: Tensor,
        query_table: Optional[Tensor],
        key_table: Optional[Tensor],
        value_table: Optional[Tensor],
        sv: Tensor,
        sve: Tensor,
        lse: Tensor,
        g_sv: Tensor,
        g_sve: Tensor,
        heads: int,
        dk: int,
        dv: int,
        radius: int,
        max_distance: int,
        use_qk: bool,
        query_step: int,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Gradients of :func:`triton_attention` by recomputation: (g_qkv, g_scales,
        g_query_table, g_key_table, g_value_table), an absent table's an empty tensor."""
        geo = layer_from_args(heads, dk, dv, radius, max_distance, use_qk, query_table, key_table, value_table)
        g_sve = g_sve if geo.use_value_rpe else None
        grads = triton_launch.attention_backward_triton(geo, query_step, qkv, scales, sv, sve, lse, g_sv, g_sve)
        g_qkv, g_scales, *g_tables = grads
        return g_qkv, g_scales, *(qkv.new_empty(0) if g is None else g for g in g_tables)

    def _setup_context(ctx, inputs, output):
        qkv, scales, rq, rk, rv = inputs[:5]
        sv, sve, lse = output
        ctx.save_for_backward(qkv, scales, rq, rk, rv, sv, sve, lse)
        ctx.args = inputs[5:]

    def _backward(ctx, g_sv, g_sve, g_lse):
        qkv, scales, rq, rk, rv, sv, sve, lse = ctx.saved_tensors
        # lse only feeds the backward: its gradient is not propagated
        g_sv = torch.zeros_like(sv) if g_sv is None else g_sv.contiguous()
        g_sve = torch.zeros_like(sve) if g_sve is None else g_sve.contiguous()
        g_qkv, g_scales, g_rq, g_rk, g_rv = triton_attention_backward(
            qkv, scales, rq, rk, rv, sv, sve, lse, g_sv, g_sve, *ctx.args
        )
        tables = (g if t is not None else None for g, t in ((g_rq, rq), (g_rk, rk), (g_rv, rv)))
        return (g_qkv, g_scales, *tables) + (None,) * len(ctx.args)

    triton_attention.register_autograd(_backward, setup_context=_setup_context)


def attend_op(
    layer: PositionSensitiveAxialAttention, qkv: Tensor, scales: Tensor, query_step: int, return_lse: bool = False
):
    """:func:`.triton_launch.attend_triton` through the operator (same contract); autograd
    records it (the operator's backward) when an input or a table needs a gradient."""
    sv, sve, lse = torch.ops.axial_deeplab.triton_attention(
        qkv, scales, layer.query_table, layer.key_table, layer.value_table, *layer_args(layer), query_step
    )
    sve = sve if layer.use_value_rpe else None
    return (sv, sve, lse) if return_lse else (sv, sve)


def triton_layer_op(layer: PositionSensitiveAxialAttention, x: Tensor) -> Tensor:
    """The layer with its attention core as the Triton operator (autograd: the operator's
    registered backward); :func:`.triton_launch.triton_layer` is the same with the kernels
    launched directly (explicit tiles: the self-check, the tile sweep)."""

    def core(layer_, qkv, scales, step):
        return attend_op(layer_, qkv, scales, step)

    return run_layer(layer, x, core)
