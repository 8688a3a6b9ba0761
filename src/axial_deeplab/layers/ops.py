"""The attention core as PyTorch operators (``torch.ops.axial_deeplab.*``).

Why: a call through ctypes is invisible to FakeTensor tracing, so ``torch.compile`` and
``torch.export`` could not see the fast path. As registered custom operators the kernels are
opaque nodes with known output shapes (the fake implementations below, exact for symbolic
H and W) and a registered autograd formula, while every data-dependent choice (is the C kernel
loaded, does a row overflow exp2) is made inside the real implementation.

Three operators, all on plain tensors and numbers (no module objects):

* ``attention_eval``: the whole layer in inference (BN folded projection, attention, folded
  output BN), the C kernel of :mod:`.cpu_kernel`; no autograd.
* ``attention_rows`` -> ``(out, lse)``: the attention of position-major rows ``qkv`` (N*L, C2)
  to rows ``out`` (N*L, 2C) = [sv channels | sve channels] and each row's log2-sum-exp2;
  its autograd is ``attention_rows_backward``, the recompute backward of the kernel.

Each CPU implementation runs the C kernel when it takes the operands (float32, kernel
compiled) and otherwise the chunked PyTorch path of :mod:`.chunked` / :mod:`.recompute`
(same results within float32 rounding; float64 too).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import Tensor

from . import cpu_kernel
from .chunked import attend
from .dispatch import runs_eagerly
from .geometry import attention_radius, normalised
from .recompute import recompute_backward

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__ = [
    "attention_eval",
    "attention_rows",
    "attention_rows_backward",
    "attention_rows_entry",
    "layer_from_args",
    "layer_args",
]

_NS = "axial_deeplab"


def layer_from_args(
    heads: int,
    dk: int,
    dv: int,
    radius: int,
    max_distance: int,
    use_qk: bool,
    query_table: Optional[Tensor],
    key_table: Optional[Tensor],
    value_table: Optional[Tensor],
):
    """The attributes of a layer that the kernels read, rebuilt from operator arguments
    (``radius`` < 0: global span)."""
    return SimpleNamespace(
        num_heads=heads,
        key_depth=dk,
        value_depth=dv,
        span=None if radius < 0 else 2 * radius + 1,
        max_relative_distance=max_distance,
        table_rows=2 * max_distance + 1,
        use_qk=use_qk,
        use_query_rpe=query_table is not None,
        use_key_rpe=key_table is not None,
        use_value_rpe=value_table is not None,
        query_table=query_table,
        key_table=key_table,
        value_table=value_table,
    )


def layer_args(layer: PositionSensitiveAxialAttention) -> Tuple[int, int, int, int, int, bool]:
    """(heads, dk, dv, radius, max_distance, use_qk): a layer's geometry as operator arguments
    (the inverse of :func:`layer_from_args`, tables aside)."""
    return (
        layer.num_heads,
        layer.key_depth,
        layer.value_depth,
        attention_radius(layer),
        layer.max_relative_distance,
        layer.use_qk,
    )


def _detached_geometry(heads, dk, dv, radius, max_distance, use_qk, tables):
    """:func:`layer_from_args` of the training operators' arguments, the (query, key, value)
    ``tables`` detached: their gradients come from the registered backward, not from autograd
    through the kernels."""
    rq, rk, rv = (None if t is None else t.detach() for t in tables)
    return layer_from_args(heads, dk, dv, radius, max_distance, use_qk, rq, rk, rv)


def _rows_kernel_applies(geo, qkv: Tensor) -> bool:
    dk, dv = geo.key_depth, geo.value_depth
    # the kernel reads q and k channels 8 at a time: the rest must stay inside the rows
    return cpu_kernel.supports(geo, qkv) and (-2 * dk) % 8 <= dv and dv <= 4 * cpu_kernel.MAX_KEY_DEPTH


def _to_sequences(rows: Tensor, nseq: int, heads: int) -> Tensor:
    """(N*L, heads*c) rows -> (N*heads, c, L) sequences."""
    length = rows.shape[0] // nseq
    return rows.view(nseq, length, heads, -1).permute(0, 2, 3, 1).reshape(nseq * heads, -1, length)


def _to_rows(seq: Tensor, nseq: int) -> Tensor:
    """(N*heads, c, L) sequences -> (N*L, heads*c) rows."""
    nh, c, length = seq.shape
    return seq.reshape(nseq, nh // nseq, c, length).permute(0, 3, 1, 2).reshape(nseq * length, -1)


# --------------------------------------------------------------------------- training core
def _attention_rows(
    qkv: Tensor,
    scales: Tensor,
    query_table: Optional[Tensor],
    key_table: Optional[Tensor],
    value_table: Optional[Tensor],
    nseq: int,
    heads: int,
    dk: int,
    dv: int,
    radius: int,
    max_distance: int,
    use_qk: bool,
    length: int = -1,
    source: Optional[Tensor] = None,
    affine: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """qkv rows (N*L, heads*(2dk+dv)), scales (3, heads) natural-unit similarity multipliers ->
    (out (N*L, 2*heads*dv) = [sv | sve], lse (N*heads, L) log2-sum-exp2 of each row).
    ``length``: L when the caller knows it (traced with symbolic sizes, (N*L)//N is an
    expression the compiler cannot reduce to L, and it guards on it); -1: (N*L)//N.
    ``source``, ``affine`` (2, C2): optional, when qkv is a BatchNorm's output
    ``affine[0] * source + affine[1]`` per channel: the backward keeps ``source`` (which that
    BatchNorm keeps anyway) and the affine terms instead of qkv, and its kernel applies them as it
    loads, so qkv is freed after the forward and never formed again. Neither gets a gradient."""
    geo = _detached_geometry(heads, dk, dv, radius, max_distance, use_qk, (query_table, key_table, value_table))
    qkv = qkv.detach().contiguous()
    scales = scales.detach()
    length = qkv.shape[0] // nseq if length < 0 else length
    c2, c = qkv.shape[1], heads * dv
    if _rows_kernel_applies(geo, qkv):
        out = torch.empty(nseq * length, 2 * c)
        lse = torch.empty(nseq * heads, length)
        if cpu_kernel.run_kernel(
            geo,
            qkv,
            (0, length * c2, 2 * dk + dv, 1, c2),
            nseq,
            nseq,
            length,
            1,
            cpu_kernel.kernel_operands(geo, length, scales),
            out,
            (0, length * 2 * c, dv, 2 * c),
            out2=out[:, c:],
            lse=lse,
        ):
            return out, lse
    with torch.no_grad():
        sv, sve, lse = attend(geo, _to_sequences(qkv, nseq, heads), scales, 1, return_lse=True)
    sve = torch.zeros_like(sv) if sve is None else sve
    out = torch.cat([_to_rows(sv, nseq), _to_rows(sve, nseq)], dim=1)
    return out, lse.contiguous()


# the implementation stays a plain function too: eager calls skip the operator (_AttentionRowsEager)
attention_rows = torch.library.custom_op(f"{_NS}::attention_rows", mutates_args=())(_attention_rows)


@attention_rows.register_fake
def _(
    qkv,
    scales,
    query_table,
    key_table,
    value_table,
    nseq,
    heads,
    dk,
    dv,
    radius,
    max_distance,
    use_qk,
    length=-1,
    source=None,
    affine=None,
):
    length = qkv.shape[0] // nseq if length < 0 else length
    return qkv.new_empty(qkv.shape[0], 2 * heads * dv), qkv.new_empty(nseq * heads, length)


def _attention_rows_backward(
    qkv: Tensor,
    scales: Tensor,
    query_table: Optional[Tensor],
    key_table: Optional[Tensor],
    value_table: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    g_out: Tensor,
    nseq: int,
    heads: int,
    dk: int,
    dv: int,
    radius: int,
    max_distance: int,
    use_qk: bool,
    affine: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`attention_rows` by recomputation: (g_qkv, g_scales, g_query_table,
    g_key_table, g_value_table); the gradient of an absent table is an empty tensor. With
    ``affine`` (2, C2), ``qkv`` is the ``source`` of :func:`attention_rows` (the attention's input was
    ``affine[0] * qkv + affine[1]``) and g_qkv the gradient of that input."""
    geo = _detached_geometry(heads, dk, dv, radius, max_distance, use_qk, (query_table, key_table, value_table))
    qkv, out, lse, g_out = (t.detach().contiguous() for t in (qkv, out, lse, g_out))
    length = qkv.shape[0] // nseq
    c2, c = qkv.shape[1], heads * dv
    grads = None
    affine = None if affine is None else affine.detach().contiguous()
    kernel_dtypes = out.dtype == g_out.dtype == torch.float32 and (affine is None or affine.dtype == torch.float32)
    if _rows_kernel_applies(geo, qkv) and kernel_dtypes:
        g_qkv = torch.empty_like(qkv)
        # delta = sum_c g_sv*sv + g_sve*sve is formed in the kernel
        grads = cpu_kernel.backward_strided(
            geo,
            qkv,
            (length * c2, 2 * dk + dv, 1, c2),
            nseq,
            length,
            scales.detach(),
            lse,
            None,
            g_out,
            g_out[:, c:],
            (length * 2 * c, dv, 1, 2 * c),
            g_qkv,
            sv=out,
            sve=out[:, c:],
            affine=affine,
        )
        if grads is not None:
            grads = (g_qkv, *grads)
    if grads is None and affine is not None:  # no kernel, or it refused: the attention's input formed again
        qkv = normalised(qkv, affine[0], affine[1])
    if grads is None:

        def seq(t):
            return _to_sequences(t, nseq, heads)

        with torch.no_grad():
            g_qkv, *rest = recompute_backward(
                geo,
                1,
                seq(qkv),
                scales.detach(),
                seq(out[:, :c]),
                seq(out[:, c:]),
                lse,
                seq(g_out[:, :c]),
                seq(g_out[:, c:]),
            )
        grads = (_to_rows(g_qkv, nseq), *rest)
    g_qkv, g_scales, g_rq, g_rk, g_rv = grads
    empty = qkv.new_empty(0)
    return (
        g_qkv.contiguous(),
        g_scales.to(scales.dtype).contiguous(),
        *(empty if g is None else g.to(qkv.dtype).contiguous() for g in (g_rq, g_rk, g_rv)),
    )


attention_rows_backward = torch.library.custom_op(f"{_NS}::attention_rows_backward", mutates_args=())(
    _attention_rows_backward
)


@attention_rows_backward.register_fake
def _(qkv, scales, query_table, key_table, value_table, *args, **kwargs):  # the rest do not shape the outputs
    def table_grad(t):
        return qkv.new_empty(0) if t is None else qkv.new_empty(t.shape)

    return (
        torch.empty_like(qkv, memory_format=torch.contiguous_format),
        scales.new_empty(scales.shape),
        table_grad(query_table),
        table_grad(key_table),
        table_grad(value_table),
    )


def _rows_setup_context(ctx, inputs, output):
    qkv, scales, rq, rk, rv, nseq, heads, dk, dv, radius, max_distance, use_qk = inputs[:12]
    source, affine = (tuple(inputs[13:15]) + (None, None))[:2]
    out, lse = output
    if source is None or affine is None:
        source, affine = qkv, None
    ctx.save_for_backward(source, scales, rq, rk, rv, out, lse, affine)
    ctx.args = (nseq, heads, dk, dv, radius, max_distance, use_qk)


def _rows_backward(ctx, g_out, g_lse, backward=None):
    qkv, scales, rq, rk, rv, out, lse, affine = ctx.saved_tensors
    # lse is an auxiliary output: its gradient is not propagated (it only feeds the backward)
    g_qkv, g_scales, g_rq, g_rk, g_rv = (backward or attention_rows_backward)(
        qkv, scales, rq, rk, rv, out, lse, g_out.contiguous(), *ctx.args, affine
    )
    return (
        g_qkv,
        g_scales,
        g_rq if rq is not None else None,
        g_rk if rk is not None else None,
        g_rv if rv is not None else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


attention_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)


class _AttentionRowsEager(torch.autograd.Function):
    """:func:`attention_rows` with its registered autograd, for eager calls: the same
    implementations and the same backward, without the custom operator's dispatch (Python wrappers
    around the dispatcher and an autograd node of its own: 0.3 ms of 2.4 per layer call forward
    and backward, at every size). Traced code calls the operator (:func:`attention_rows_entry`)."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _attention_rows(*inputs)
        _rows_setup_context(ctx, inputs, (out, lse))
        ctx.mark_non_differentiable(lse)
        ctx.inputs = len(inputs)  # the optional trailing ones may be left out
        return out, lse

    @staticmethod
    def backward(ctx, g_out, g_lse):
        return _rows_backward(ctx, g_out, g_lse, backward=_attention_rows_backward)[: ctx.inputs]


def attention_rows_entry(qkv: Tensor):
    """:func:`attention_rows` as eager code calls it (:class:`_AttentionRowsEager`: plain
    tensors outside tracing), else the operator itself (torch.compile / export, fake tensors)."""
    if runs_eagerly(qkv):
        return _AttentionRowsEager.apply
    return attention_rows


# --------------------------------------------------------------------------- whole layer in inference
@torch.library.custom_op(f"{_NS}::attention_eval", mutates_args=())
def attention_eval(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    sim_scales: Tensor,
    query_table: Optional[Tensor],
    key_table: Optional[Tensor],
    value_table: Optional[Tensor],
    value_scale: Optional[Tensor],
    out_bias: Tensor,
    heads: int,
    dk: int,
    dv: int,
    radius: int,
    max_distance: int,
    use_qk: bool,
    height_axis: bool,
    query_step: int,
) -> Tensor:
    """The layer in inference with every BN folded: ``weight`` (heads*(2dk+dv), C_in) and ``bias``
    the projection (bn_qkv and the output BN's a.v scale folded in), ``sim_scales`` (3, heads),
    ``value_scale`` (heads*dv) the output BN's a.r^v scale, ``out_bias`` (heads*dv) its shift.
    Returns (B, heads*dv, Lq, W) or (B, heads*dv, H, Lq) in channels_last memory format."""
    geo = layer_from_args(heads, dk, dv, radius, max_distance, use_qk, query_table, key_table, value_table)
    if cpu_kernel.supports(geo, x):
        y = cpu_kernel.eval_with_operands(
            geo, x, weight, bias, sim_scales, value_scale, out_bias, height_axis, query_step
        )
        if y is not None:
            return y
    return _attention_eval_torch(geo, x, weight, bias, sim_scales, value_scale, out_bias, height_axis, query_step)


def _attention_eval_torch(geo, x, weight, bias, sim_scales, value_scale, out_bias, height_axis, query_step):
    """The same with the chunked PyTorch path (no compiler, float64)."""
    batch, cin, height, width = x.shape
    heads, dv = geo.num_heads, geo.value_depth
    c = heads * dv
    xs = x.permute(0, 3, 1, 2) if height_axis else x.permute(0, 2, 1, 3)  # (B, other, C_in, L)
    xs = xs.reshape(-1, cin, xs.shape[-1])
    qkv = torch.baddbmm(bias[None, :, None].to(x.dtype), weight.to(x.dtype).expand(xs.shape[0], -1, -1), xs)
    n, c2, length = qkv.shape
    with torch.no_grad():
        sv, sve = attend(geo, qkv.reshape(n * heads, c2 // heads, length), sim_scales.to(x.dtype), query_step)
    out = sv.reshape(n, c, -1)
    if sve is not None:
        out = out + sve.reshape(n, c, -1) * value_scale.to(x.dtype)[:, None]
    out = out + out_bias.to(x.dtype)[:, None]
    lq = out.shape[-1]
    if height_axis:  # (B*W, C, Lq) -> (B, Lq, W, C)
        rows = out.view(batch, width, c, lq).permute(0, 3, 1, 2)
    else:  # (B*H, C, Lq) -> (B, H, Lq, C)
        rows = out.view(batch, height, c, lq).permute(0, 1, 3, 2)
    return rows.contiguous().permute(0, 3, 1, 2)


@attention_eval.register_fake
def _(
    x,
    weight,
    bias,
    sim_scales,
    query_table,
    key_table,
    value_table,
    value_scale,
    out_bias,
    heads,
    dk,
    dv,
    radius,
    max_distance,
    use_qk,
    height_axis,
    query_step,
):
    batch, _, height, width = x.shape
    if height_axis:
        shape = (batch, (height + query_step - 1) // query_step, width, heads * dv)
    else:
        shape = (batch, height, (width + query_step - 1) // query_step, heads * dv)
    return x.new_empty(shape).permute(0, 3, 1, 2)
