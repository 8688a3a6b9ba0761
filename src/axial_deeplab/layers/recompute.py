"""Backward of the attention core by recomputation (as memory-efficient / flash attention does).

Why its own module: the memory-efficient autograd function and the training operator
``axial_deeplab::attention_rows`` both need it, and neither keeps any L x L tensor for it:
from the inputs, the two small outputs and one log-sum-exp per query row, the logits are
recomputed row by row in the C kernel of :mod:`.cpu_kernel` (float32 on CPU) or chunk by
chunk in PyTorch (:func:`recompute_backward_torch`, any device and dtype, on the blocks and
chunks of :mod:`.chunked`).

Backward of one chunk, with P the attention, Y = sum_t a_t S_t its natural logits,
g_sv / g_sve the incoming gradients of sum_p P v_p and sum_p P r^v_{p-o}:

    dP = g_sv . v_p + g_sve . r^v_{p-o}
    dY = P * (dP - delta),   delta_o = g_sv_o . sv_o + g_sve_o . sve_o
    dq = a_qk dY k + a_qr sum_p dY r^q_{p-o};   dk = a_qk dY^T q + a_kr sum_o dY r^k_{p-o}
    da_t = sum dY * S_t  (= q . (dY k) etc., from the same products)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import cpu_kernel
from .chunked import block_logits, chunk_size_for, gather_tables, plan_blocks, prepare_operands, split_operands
from .geometry import span_radius

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__ = ["recompute_backward", "recompute_backward_torch"]


def recompute_backward(layer: PositionSensitiveAxialAttention, step, qkv, scales, sv, sve, lse, g_sv, g_sve):
    """Gradients ``(g_qkv, g_scales (3, heads), g_query_table, g_key_table, g_value_table)`` of
    :func:`.chunked.attend` with ``return_lse`` (a switched-off table's gradient is None): the C
    kernel where it takes the operands (query step 1, float32 CPU), else PyTorch."""
    if g_sv is None:
        g_sv = torch.zeros_like(sv)
    if layer.use_value_rpe and (g_sve is None or g_sve.numel() == 0):
        g_sve = torch.zeros_like(sv)
    if step == 1:  # the compiled kernel when available (float32 on CPU)
        delta = (g_sv * sv).sum(1)
        if layer.use_value_rpe:
            delta = delta + (g_sve * sve).sum(1)
        out = cpu_kernel.attention_backward(
            layer, qkv, scales, lse, delta, g_sv, g_sve if layer.use_value_rpe else None
        )
        if out is not None:
            return out
    return recompute_backward_torch(layer, step, qkv, scales, sv, sve, lse, g_sv, g_sve)


def recompute_backward_torch(layer: PositionSensitiveAxialAttention, step, qkv, scales, sv, sve, lse, g_sv, g_sve):
    """:func:`recompute_backward` in PyTorch, block by block and chunk by chunk (any device, dtype, step)."""
    nh, c2, length = qkv.shape
    dk, dv, heads = layer.key_depth, layer.value_depth, layer.num_heads
    dtype = qkv.dtype
    use_rv = layer.use_value_rpe
    if g_sv is None:
        g_sv = torch.zeros_like(sv)
    if use_rv and (g_sve is None or g_sve.numel() == 0):
        g_sve = torch.zeros_like(sv)
    radius = span_radius(layer, length)
    blocks = plan_blocks(length, radius, step)
    ops = prepare_operands(layer, qkv, scales, step, radius is not None, diagonal_shift=False)

    q_sub = qkv[:, :dk, ::step].contiguous()  # (nh, dk, Lq) raw queries at the outputs
    k, v = qkv[:, dk : 2 * dk], qkv[:, 2 * dk :]
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
