"""Memory-efficient training path (``impl="memory_efficient"``).

The forward is :func:`.fast_cpu.attend` (the compiled kernel on CPU); a custom autograd
function keeps only its inputs, its two small outputs and one log-sum-exp per query
row, and recomputes the L x L logits in the backward (as memory-efficient / flash
attention does): row by row in the compiled kernel of :mod:`.cpu_kernel` (float32 on
CPU), else chunk by chunk in PyTorch (:func:`_backward_torch`, any device and dtype).
The similarity BN batch statistics are exact and come from the closed form of
:func:`.fast_cpu.similarity_moments` (ordinary autograd, no logits), so no L x L tensor
of any term is ever kept for the backward; the live L x L memory is one chunk's.

On CPU (float32 and float64) the layer runs through the registered operators of :mod:`.ops`
instead, so ``torch.compile`` and ``torch.export`` see it: inference as one operator with every
BN folded (:func:`run_layer_eval_op`), training in position-major layout (rows of channels,
:func:`run_layer_position_major`): no sequence-layout copies, both BatchNorms on rows, the
operator's kernels reading the projection and the gradients where they lie, the similarity
moments of a global span with a closed-form backward (:class:`.fast_cpu.RowMoments`).
The sequence-layout function above stays the path of other devices and the operators' fallback.

Backward of one chunk, with P the attention, Y = sum_t a_t S_t its natural logits,
g_sv / g_sve the incoming gradients of sum_p P v_p and sum_p P r^v_{p-o}:

    dP = g_sv . v_p + g_sve . r^v_{p-o}
    dY = P * (dP - delta),   delta_o = g_sv_o . sv_o + g_sve_o . sve_o
    dq = a_qk dY k + a_qr sum_p dY r^q_{p-o};   dk = a_qk dY^T q + a_kr sum_o dY r^k_{p-o}
    da_t = sum dY * S_t  (= q . (dY k) etc., from the same products)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernel, ops
from .dispatch import graph_recorder
from .reference import apply_stride
from .sync import should_sync
from .fast_cpu import (
    _span_radius,
    attend,
    block_logits,
    chunk_size_for,
    gather_tables,
    plan_blocks,
    prepare_operands,
    run_layer,
    similarity_moments_rows,
    similarity_scales,
    split_operands,
)

__all__ = ["axial_attention_memory_efficient", "AxialAttentionFunction", "memory_efficient_core",
           "run_layer_position_major", "run_layer_eval_op", "routes", "select_route", "refusal", "ROUTES"]


class AxialAttentionFunction(torch.autograd.Function):
    """(qkv, scales) -> (sv, sve) with recomputation in the backward.

    ``qkv``: (nh, 2dk+dv, L) float tensor; ``scales``: (3, heads) per-term BN multipliers;
    the relative tables are passed so autograd routes their gradients. ``attend_fn`` and
    ``backward_fn`` (same contract as :func:`_backward`, the default) let a device kernel
    supply both halves (the Triton path)."""

    @staticmethod
    def forward(ctx, qkv, scales, query_table, key_table, value_table, layer, query_step, attend_fn=attend,
                backward_fn=None):
        with torch.no_grad():
            sv, sve, lse = attend_fn(layer, qkv, scales, query_step, return_lse=True)
        if sve is None:
            sve = sv.new_zeros(0)
        ctx.layer = layer
        ctx.query_step = query_step
        ctx.backward_fn = _backward if backward_fn is None else backward_fn
        ctx.save_for_backward(qkv, scales, sv, sve, lse)
        return sv, sve

    @staticmethod
    def backward(ctx, g_sv, g_sve):
        qkv, scales, sv, sve, lse = ctx.saved_tensors
        layer, step = ctx.layer, ctx.query_step
        with torch.no_grad():
            grads = ctx.backward_fn(layer, step, qkv, scales, sv, sve, lse, g_sv, g_sve)
        g_qkv, g_scales, g_rq, g_rk, g_rv = grads
        return g_qkv, g_scales, g_rq, g_rk, g_rv, None, None, None, None


def _backward(layer, step, qkv, scales, sv, sve, lse, g_sv, g_sve):
    if g_sv is None:
        g_sv = torch.zeros_like(sv)
    if layer.use_value_rpe and (g_sve is None or g_sve.numel() == 0):
        g_sve = torch.zeros_like(sv)
    if step == 1:  # the compiled kernel when available (float32 on CPU)
        delta = (g_sv * sv).sum(1)
        if layer.use_value_rpe:
            delta = delta + (g_sve * sve).sum(1)
        out = cpu_kernel.attention_backward(layer, qkv, scales, lse, delta, g_sv,
                                            g_sve if layer.use_value_rpe else None)
        if out is not None:
            return out
    return _backward_torch(layer, step, qkv, scales, sv, sve, lse, g_sv, g_sve)


def _backward_torch(layer, step, qkv, scales, sv, sve, lse, g_sv, g_sve):
    nh, c2, length = qkv.shape
    dk, dv, heads = layer.key_depth, layer.value_depth, layer.num_heads
    dtype = qkv.dtype
    use_rv = layer.use_value_rpe
    if g_sv is None:
        g_sv = torch.zeros_like(sv)
    if use_rv and (g_sve is None or g_sve.numel() == 0):
        g_sve = torch.zeros_like(sv)
    radius = _span_radius(layer, length)
    blocks = plan_blocks(length, radius, step)
    ops = prepare_operands(layer, qkv, scales, step, radius is not None, diagonal_shift=False)

    q_sub = qkv[:, :dk, ::step].contiguous()  # (nh, dk, Lq) raw queries at the outputs
    k, v = qkv[:, dk:2 * dk], qkv[:, 2 * dk:]
    lq = q_sub.shape[-1]
    head = torch.arange(nh, device=qkv.device) % heads
    a = scales[:, head]  # (3, nh) natural-unit term scales

    # delta_o = sum_p P dP = g_sv . sv + g_sve . sve
    delta = (g_sv * sv).sum(1)
    if use_rv:
        delta = delta + (g_sve * sve).sum(1)
        g_sve_o = g_sve.permute(2, 0, 1).contiguous()  # (Lq, nh, dv)
    # Queries / keys pre-scaled (natural units) in the layouts of the batched products
    # over positions, for the table gradients.
    qa_o = (q_sub * a[1].view(nh, 1, 1)).permute(2, 1, 0).contiguous() if layer.use_query_rpe else None
    ka_p = (k * a[2].view(nh, 1, 1)).permute(2, 1, 0).contiguous() if layer.use_key_rpe else None

    g_q_qk = torch.zeros(nh, lq, dk, dtype=dtype, device=qkv.device)  # dY k
    g_q_qr = torch.zeros(lq, nh, dk, dtype=dtype, device=qkv.device)  # dY r^q
    g_k_qk = torch.zeros(nh, dk, length, dtype=dtype, device=qkv.device)  # q^T dY
    g_k_kr = torch.zeros(length, nh, dk, dtype=dtype, device=qkv.device)  # dY^T r^k
    g_v = torch.zeros(nh, dv, length, dtype=dtype, device=qkv.device)
    rows = layer.table_rows
    g_rq = torch.zeros(dk, rows, dtype=dtype, device=qkv.device) if layer.use_query_rpe else None
    g_rk = torch.zeros(dk, rows, dtype=dtype, device=qkv.device) if layer.use_key_rpe else None
    g_rv = torch.zeros(dv, rows, dtype=dtype, device=qkv.device) if use_rv else None

    chunk = chunk_size_for(blocks, nh)
    chunks = split_operands(ops, chunk)
    for block in blocks:
        tabs = gather_tables(layer, block, radius, dtype, qkv.device)
        nq, nk = block.num_queries, block.k1 - block.k0
        ks = slice(block.k0, block.k1)
        oq = slice(block.out_start, block.out_start + nq)
        g_rq_blk = torch.zeros(nq, dk, nk, dtype=dtype, device=qkv.device) if g_rq is not None else None
        g_rk_blk = torch.zeros(nk, dk, nq, dtype=dtype, device=qkv.device) if g_rk is not None else None
        g_rv_blk = torch.zeros(nq, nk, dv, dtype=dtype, device=qkv.device) if g_rv is not None else None
        for ch, c0 in zip(chunks, range(0, nh, chunk)):
            c1 = c0 + ch.k.shape[0]
            logits = block_logits(layer, tabs, ch, block)
            p = logits.sub_(lse[c0:c1, oq].unsqueeze(-1)).exp2_()  # attention, (nh_c, Bq, Wk)
            p_o = p.transpose(0, 1)  # (Bq, nh_c, Wk) view
            gsv = g_sv[c0:c1, :, oq]  # (nh_c, dv, Bq)
            # dP = g_sv . v_p (+ g_sve . r^v_{p-o})
            if use_rv:
                gsve_o = g_sve_o[oq, c0:c1]  # (Bq, nh_c, dv)
                rel = torch.bmm(gsve_o, tabs.rv.transpose(1, 2)).transpose(0, 1)
                dp = torch.baddbmm(rel, gsv.transpose(1, 2), v[c0:c1, :, ks])
                g_rv_blk += torch.bmm(p_o.transpose(1, 2), gsve_o)
            else:
                dp = torch.bmm(gsv.transpose(1, 2), v[c0:c1, :, ks])
            g_v[c0:c1, :, ks] += torch.bmm(gsv, p)
            dy = dp.sub_(delta[c0:c1, oq].unsqueeze(-1)).mul_(p)  # natural-logit gradient
            if layer.use_qk:
                g_q_qk[c0:c1, oq] += torch.bmm(dy, k[c0:c1, :, ks].transpose(1, 2))
                g_k_qk[c0:c1, :, ks] += torch.bmm(q_sub[c0:c1, :, oq], dy)
            if layer.use_query_rpe:
                dy_o = dy.transpose(0, 1)  # (Bq, nh_c, Wk)
                g_q_qr[oq, c0:c1] += torch.bmm(dy_o, tabs.rq[:, :dk].transpose(1, 2))
                g_rq_blk += torch.bmm(qa_o[oq, :, c0:c1], dy_o)
            if layer.use_key_rpe:
                dy_p = dy.permute(2, 0, 1).contiguous()  # (Wk, nh_c, Bq)
                g_k_kr[ks, c0:c1] += torch.bmm(dy_p, tabs.rk.transpose(1, 2))
                g_rk_blk += torch.bmm(ka_p[ks, :, c0:c1], dy_p)
        flat = tabs.idx.reshape(-1)
        if g_rq is not None:
            g_rq.index_add_(1, flat, g_rq_blk.permute(1, 0, 2).reshape(dk, -1))
        if g_rk is not None:
            g_rk.index_add_(1, flat, g_rk_blk.permute(1, 2, 0).reshape(dk, -1))
        if g_rv is not None:
            g_rv.index_add_(1, flat, g_rv_blk.permute(2, 0, 1).reshape(dv, -1))

    # Term scales: da_t = sum dY * S_t, from the accumulated products.
    q_t = q_sub.transpose(1, 2)  # (nh, Lq, dk)
    zero = torch.zeros(nh, dtype=dtype, device=qkv.device)
    ga_qk = (q_t * g_q_qk).sum((1, 2)) if layer.use_qk else zero
    ga_qr = (q_sub.permute(2, 0, 1) * g_q_qr).sum((0, 2)) if layer.use_query_rpe else zero
    ga_kr = (k.permute(2, 0, 1) * g_k_kr).sum((0, 2)) if layer.use_key_rpe else zero
    g_scales = torch.stack([ga_qk, ga_qr, ga_kr]).view(3, nh // heads, heads).sum(1)

    g_q_sub = g_q_qk * a[0].view(nh, 1, 1) + g_q_qr.transpose(0, 1) * a[1].view(nh, 1, 1)  # (nh, Lq, dk)
    g_k = g_k_qk * a[0].view(nh, 1, 1) + g_k_kr.permute(1, 2, 0) * a[2].view(nh, 1, 1)
    g_q = torch.zeros(nh, dk, length, dtype=dtype, device=qkv.device)
    g_q[:, :, ::step] = g_q_sub.transpose(1, 2)
    g_qkv = torch.cat([g_q, g_k, g_v], dim=1)
    return g_qkv, g_scales, g_rq, g_rk, g_rv


def memory_efficient_core(layer, qkv, scales, step, attend_fn=attend, backward_fn=None):
    """``attend_fn(layer, qkv, scales, step)`` (default :func:`.fast_cpu.attend`) with the
    recompute-in-backward function around it when gradients are needed (its backward
    ``backward_fn``, default :func:`_backward`)."""
    needs_grad = torch.is_grad_enabled() and (
        qkv.requires_grad or scales.requires_grad
        or any(t is not None and t.requires_grad
               for t in (layer.query_table, layer.key_table, layer.value_table)))
    if not needs_grad:
        return attend_fn(layer, qkv, scales, step)
    sv, sve = AxialAttentionFunction.apply(
        qkv, scales, layer.query_table, layer.key_table, layer.value_table, layer, step, attend_fn,
        backward_fn)
    return sv, (sve if layer.use_value_rpe else None)


# --------------------------------------------------------------------------- position-major CPU path
# Training runs in position-major layout end to end: the input is read as rows of channels (one
# copy at most, none for channels_last input along the width), the projection is one matrix
# product, both BatchNorms normalise rows of channels (several times faster on CPU than the
# (N, C, L) layout), and the operator's forward and backward kernels read the projection and the
# incoming gradients where they lie and write the output and the qkv gradient in the same
# layout, so no sequence-layout tensor is ever built.
class _SumHalves(torch.autograd.Function):
    """(M, 2C) -> (M, C): the two halves of each row added; the backward is one copy of the
    gradient into both halves (slicing would zero-fill a full-size gradient per half)."""

    @staticmethod
    def forward(ctx, t):
        c = t.shape[1] // 2
        return t[:, :c] + t[:, c:]

    @staticmethod
    def backward(ctx, g):
        return g.repeat(1, 2)


def _batch_norm_rows(bn, y: torch.Tensor, perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``bn`` (BatchNorm1d/2d, same semantics) on rows (M, C) of channels, channel j of ``y``
    being the module's channel ``perm[j]`` when given."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    mean = bn.running_mean if keep else None
    var = bn.running_var if keep else None
    weight, bias = bn.weight, bn.bias
    if perm is not None:
        weight = weight[perm] if weight is not None else None
        bias = bias[perm] if bias is not None else None
        mean_p = mean[perm] if mean is not None else None
        var_p = var[perm] if var is not None else None
        out = F.batch_norm(y, mean_p, var_p, weight, bias, use_batch, factor, bn.eps)
        if use_batch and mean is not None:
            with torch.no_grad():
                mean.index_copy_(0, perm, mean_p)
                var.index_copy_(0, perm, var_p)
        return out
    return F.batch_norm(y, mean, var, weight, bias, use_batch, factor, bn.eps)


# --------------------------------------------------------------------------- through the operators
# The default CPU path: the attention as the registered operators of :mod:`.ops` (the C kernel
# inside, the PyTorch path when it cannot run), so torch.compile / torch.export see one opaque
# node with known shapes. Nothing here reads tensor values: every data-dependent choice is made
# inside the operators.
def _op_refusal(layer, x: torch.Tensor) -> Optional[str]:
    """Why the operators of :mod:`.ops` cannot take this layer and input, or None."""
    plain_bn = (nn.BatchNorm1d, nn.BatchNorm2d)
    if x.device.type != "cpu":
        return f"the operators have CPU implementations only (input on {x.device.type})"
    if x.dtype not in (torch.float32, torch.float64):
        return f"the operators take float32 and float64 (input is {x.dtype})"
    if layer.qkv.weight.dtype != x.dtype:
        return f"parameters ({layer.qkv.weight.dtype}) and input ({x.dtype}) differ in dtype"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on"
    if type(layer.bn_qkv) not in plain_bn or type(layer.bn_output) not in plain_bn:
        return "a BatchNorm is not a plain nn.BatchNorm (SyncBatchNorm?)"
    if should_sync(layer):
        return "the similarity statistics are summed over processes (DDP)"
    recorder = graph_recorder()
    if recorder == "ONNX export":
        return "ONNX export is running and ONNX has no axial_deeplab operators"
    if recorder is not None:
        return ("torch.jit.trace is running and a trace holding axial_deeplab operators "
                "would load only where this package is imported")
    return None


def _route_refusal(route: str, layer, x: torch.Tensor) -> Optional[str]:
    if route == "chunked":
        recorder = graph_recorder()
        if recorder is not None:
            return (f"{recorder} is running and this route calls the C kernel through ctypes (on CPU) and "
                    f"branches on tensor values (invisible to the tracer: the trace would be silently wrong)")
        if x.device.type == "meta":
            return "meta tensors hold no values (this route branches on them)"
        if x.device.type == "cpu" and torch.compiler.is_compiling():
            return "torch.compile/export is tracing and this route calls the C kernel through ctypes"
        return None
    reason = _op_refusal(layer, x)
    if reason is not None or route == "rows_op":
        return reason
    if torch.is_grad_enabled():
        return "gradients are enabled"
    if not all(cpu_kernel._eval_bn(bn) for bn in (layer.bn_qkv, layer.bn_similarity, layer.bn_output)):
        return "a BatchNorm uses batch statistics (training mode)"
    return None


ROUTES = ("eval_op", "rows_op", "chunked")
ROUTE_DESCRIPTIONS = {
    "eval_op": "inference as one operator, axial_deeplab::attention_eval, every BN folded (CPU)",
    "rows_op": "position-major rows through axial_deeplab::attention_rows, recompute backward (CPU)",
    "chunked": "sequence layout, chunked PyTorch attention with a recompute backward (any device)",
}


def routes(layer, x: torch.Tensor):
    """``[(route, None or why not)]`` in the order :func:`axial_attention_memory_efficient`
    tries them: the eval operator, the rows operator, the chunked sequence-layout path."""
    return [(r, _route_refusal(r, layer, x)) for r in ROUTES]


def refusal(layer, x: torch.Tensor) -> Optional[str]:
    """None when some route can run (the chunked one, the cheapest to ask, first), else every
    route's reason."""
    if _route_refusal("chunked", layer, x) is None or select_route(layer, x) is not None:
        return None
    return "; ".join(f"{route}: {why}" for route, why in routes(layer, x))


def select_route(layer, x: torch.Tensor) -> Optional[str]:
    """The first route that can run, or None."""
    for route in ROUTES:
        if _route_refusal(route, layer, x) is None:
            return route
    return None


def _tables(layer):
    return layer.query_table, layer.key_table, layer.value_table


def run_layer_eval_op(layer, x: torch.Tensor) -> torch.Tensor:
    """Inference with every BN folded, through ``axial_deeplab::attention_eval``. In eager the
    folded constants are kept on the layer until a parameter changes; traced, they are
    ordinary operations of the graph."""
    if torch.compiler.is_compiling():
        folded = cpu_kernel._folded_projection(layer)
    else:
        cache = cpu_kernel._eval_cache(layer)
        if "projection" not in cache:
            cache["projection"] = cpu_kernel._folded_projection(layer)
        folded = cache["projection"]
    w, shift, alpha_r, beta, sim_scales = folded
    step = layer.stride if layer.stride > 1 and layer.stride_mode == "subsample" else 1
    y = ops.attention_eval(x, w, shift, sim_scales, *_tables(layer), alpha_r, beta, layer.num_heads,
                           layer.key_depth, layer.value_depth, cpu_kernel._radius(layer),
                           layer.max_relative_distance, layer.use_qk, layer.axis == "height", step)
    return apply_stride(y, layer) if step == 1 else y


def run_layer_position_major(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer in position-major layout, the attention as ``axial_deeplab::attention_rows``
    (training, or inference with batch statistics)."""
    batch, cin, height, width = x.shape
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    c = heads * dv
    if layer.axis == "height":  # sequences (b, w) along h
        rows_in = x.permute(0, 3, 2, 1)
        nseq, length = batch * width, height
    else:  # sequences (b, h) along w
        rows_in = x.permute(0, 2, 3, 1)
        nseq, length = batch * height, width
    y = rows_in.reshape(nseq * length, cin) @ layer.qkv.weight.flatten(1).t()  # (N*L, C2)
    y = _batch_norm_rows(layer.bn_qkv, y)
    scales = similarity_scales(layer, None, None, moments=lambda: similarity_moments_rows(layer, y, nseq, length))
    out, _ = ops.attention_rows(y, scales, *_tables(layer), nseq, heads, dk, dv, cpu_kernel._radius(layer),
                                layer.max_relative_distance, layer.use_qk)
    # bn_output's channel 2j + r is retrieval r of value channel j; ours are [sv | sve]
    perm = torch.arange(2 * c, device=x.device).view(c, 2).t().reshape(-1)
    out = _batch_norm_rows(layer.bn_output, out, perm)
    out = _SumHalves.apply(out) if layer.use_value_rpe else out[:, :c]
    if layer.axis == "height":
        y4 = out.reshape(batch, width, height, c).permute(0, 3, 2, 1)
    else:
        y4 = out.reshape(batch, height, width, c).permute(0, 3, 1, 2)  # channels_last
    return apply_stride(y4, layer)


def axial_attention_memory_efficient(layer, x: torch.Tensor) -> torch.Tensor:
    """``impl="memory_efficient"``: recompute-in-backward training path."""
    route = select_route(layer, x)
    if route == "eval_op":
        return run_layer_eval_op(layer, x)
    if route == "rows_op":
        return run_layer_position_major(layer, x)
    if route == "chunked":  # other devices (CUDA without Triton) and dtypes
        return run_layer(layer, x, memory_efficient_core)
    raise ValueError("attention impl 'memory_efficient' cannot run here: "
                     + "; ".join(f"{r}: {why}" for r, why in routes(layer, x)))
