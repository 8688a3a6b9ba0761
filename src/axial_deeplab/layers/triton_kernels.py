"""Triton kernels for position-sensitive axial attention (``impl="triton"``).

Forward: one program per (sequence-head, block of query rows): the three similarity terms
from the compact tables, the softmax (exp2, log2(e) folded into the BN term scales) and
both retrievals stay in registers; only q, k, v, the tables and the small outputs touch
memory. The same kernel serves inference (BN folded, ``fast_cpu.run_layer`` around it)
and the forward of training, where it also stores each row's log-sum-exp.

Backward (training): the same programs recompute the logits and P = exp2(z - lse), then
dP, dY = P (dP - delta) and every gradient of the layer's core in one pass: q rows
(plain stores), k / v columns (stores, atomics when a sequence-head has several query
blocks), the three tables (diagonal sums in skewed coordinates, added into a few partial
slots) and the per-head BN term scales (per-program partial sums). The math is the one of
:mod:`.memory_efficient`; :class:`.memory_efficient.AxialAttentionFunction` runs both
kernels, so no L x L tensor exists outside registers.

Triton is optional: without it this module registers nothing. On a CPU it runs only
through Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use on tiny
shapes; speed figures need a GPU.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

__all__ = ["triton_available", "attend_triton", "attention_backward_triton", "axial_attention_triton",
           "BACKWARD_BLOCK_Q", "TABLE_GRAD_SLOTS"]

_LOG2E = 1.0 / math.log(2.0)
# Query rows per backward program; None picks them from the length (one block per
# sequence-head up to L = 64). Tests set a small value to run the atomic k/v path.
BACKWARD_BLOCK_Q: Optional[int] = None
# Partial buffers of the table gradients: programs add into slot (program id mod this).
TABLE_GRAD_SLOTS = 32


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _tile(qb, L, LQ, QSTEP, RADIUS, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
        """Geometry of one program's tile: query indices and positions, key positions, their
        masks, the offset-table column rel = p - o + L - 1, and which pairs are in the span."""
        iq = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)  # output (query) index
        o = iq * QSTEP  # query position
        p = tl.arange(0, BLOCK_K)  # key position
        mq = iq < LQ
        mk = p < L
        rel = p[None, :] - o[:, None] + L - 1
        inside = mq[:, None] & mk[None, :]
        if RADIUS >= 0:
            inside = inside & (p[None, :] - o[:, None] <= RADIUS) & (o[:, None] - p[None, :] <= RADIUS)
        return iq, o, p, mq, mk, rel, inside

    @triton.jit
    def _tile_logits(base, rqe, rke, scale, h, o, p, mq, mk, rel, inside, L, HEADS,
                     DK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                     USE_QK: tl.constexpr, USE_QR: tl.constexpr, USE_KR: tl.constexpr):
        """Logits of the tile in log2 units (scales already times log2 e), -inf outside the
        span: the forward and the backward's recomputation share this one code."""
        s_qk = tl.load(scale + h)
        s_qr = tl.load(scale + HEADS + h)
        s_kr = tl.load(scale + 2 * HEADS + h)
        J = 2 * L - 1
        z = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
        for c in tl.static_range(DK):
            qc = tl.load(base + c * L + o, mask=mq, other=0.0)
            kc = tl.load(base + (DK + c) * L + p, mask=mk, other=0.0)
            if USE_QK:
                z += (qc * s_qk)[:, None] * kc[None, :]
            if USE_QR:
                t = tl.load(rqe + c * J + rel, mask=inside, other=0.0)
                z += (qc * s_qr)[:, None] * t
            if USE_KR:
                t = tl.load(rke + c * J + rel, mask=inside, other=0.0)
                z += (kc * s_kr)[None, :] * t
        return tl.where(inside, z, float("-inf"))

    @triton.jit
    def _axial_forward_kernel(
        qkv, rqe, rke, rve, scale, sv, sve, lse,
        L, LQ, QSTEP, RADIUS, HEADS, C2H,
        DK: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        USE_QK: tl.constexpr, USE_QR: tl.constexpr, USE_KR: tl.constexpr, USE_RV: tl.constexpr,
    ):
        nh = tl.program_id(0)
        qb = tl.program_id(1)
        h = nh % HEADS
        J = 2 * L - 1
        base = qkv + nh * C2H * L
        iq, o, p, mq, mk, rel, inside = _tile(qb, L, LQ, QSTEP, RADIUS, BLOCK_Q, BLOCK_K)
        z = _tile_logits(base, rqe, rke, scale, h, o, p, mq, mk, rel, inside, L, HEADS,
                         DK, BLOCK_Q, BLOCK_K, USE_QK, USE_QR, USE_KR)
        m = tl.max(z, axis=1)
        m = tl.where(mq, m, 0.0)
        e = tl.exp2(z - m[:, None])
        e = tl.where(inside, e, 0.0)
        s = tl.sum(e, axis=1)
        s = tl.where(mq, s, 1.0)
        inv = 1.0 / s
        for c in tl.static_range(DV):
            vc = tl.load(base + (2 * DK + c) * L + p, mask=mk, other=0.0)
            out = tl.sum(e * vc[None, :], axis=1) * inv
            tl.store(sv + (nh * DV + c) * LQ + iq, out, mask=mq)
            if USE_RV:
                t = tl.load(rve + c * J + rel, mask=inside, other=0.0)
                out2 = tl.sum(e * t, axis=1) * inv
                tl.store(sve + (nh * DV + c) * LQ + iq, out2, mask=mq)
        tl.store(lse + nh * LQ + iq, m + tl.log2(s), mask=mq)


    @triton.jit
    def _axial_backward_kernel(
        qkv, rqe, rke, rve, scale, nscale, lse, delta, gsv, gsve,
        gqkv, grq_part, grk_part, grv_part, gscale_part,
        L, LQ, QSTEP, RADIUS, HEADS, C2H, SLOTS,
        DK: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        JB: tl.constexpr, ATOMIC_KV: tl.constexpr,
        USE_QK: tl.constexpr, USE_QR: tl.constexpr, USE_KR: tl.constexpr, USE_RV: tl.constexpr,
    ):
        nh = tl.program_id(0)
        qb = tl.program_id(1)
        prog = nh * tl.num_programs(1) + qb
        slot = prog % SLOTS
        h = nh % HEADS
        iq, o, p, mq, mk, rel, inside = _tile(qb, L, LQ, QSTEP, RADIUS, BLOCK_Q, BLOCK_K)
        # natural-unit scales for the gradients (the logits use the log2-unit ones, as the forward)
        a_qk = tl.load(nscale + h)
        a_qr = tl.load(nscale + HEADS + h)
        a_kr = tl.load(nscale + 2 * HEADS + h)
        J = 2 * L - 1
        base = qkv + nh * C2H * L
        gbase = gqkv + nh * C2H * L

        # Logits by the forward's own code, then P from the saved lse.
        z = _tile_logits(base, rqe, rke, scale, h, o, p, mq, mk, rel, inside, L, HEADS,
                         DK, BLOCK_Q, BLOCK_K, USE_QK, USE_QR, USE_KR)
        row_lse = tl.load(lse + nh * LQ + iq, mask=mq, other=0.0)
        pr = tl.where(inside, tl.exp2(z - row_lse[:, None]), 0.0)

        # dP = g_sv . v_p + g_sve . r^v_{p-o}; dv_p = sum_o P g_sv_o
        dp = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
        for c in tl.static_range(DV):
            g1 = tl.load(gsv + (nh * DV + c) * LQ + iq, mask=mq, other=0.0)
            vc = tl.load(base + (2 * DK + c) * L + p, mask=mk, other=0.0)
            dp += g1[:, None] * vc[None, :]
            gv = tl.sum(pr * g1[:, None], axis=0)
            if ATOMIC_KV:
                tl.atomic_add(gbase + (2 * DK + c) * L + p, gv, mask=mk)
            else:
                tl.store(gbase + (2 * DK + c) * L + p, gv, mask=mk)
            if USE_RV:
                g2 = tl.load(gsve + (nh * DV + c) * LQ + iq, mask=mq, other=0.0)
                t = tl.load(rve + c * J + rel, mask=inside, other=0.0)
                dp += g2[:, None] * t
        row_delta = tl.load(delta + nh * LQ + iq, mask=mq, other=0.0)
        dy = pr * (dp - row_delta[:, None])  # gradient of the natural logits

        # q rows, k columns and the term-scale gradients (sum dY * S_t).
        ga_q = tl.zeros((BLOCK_Q,), dtype=tl.float32)  # q.k and q.r^q terms
        ga_qr = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        ga_kr = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for c in tl.static_range(DK):
            qc = tl.load(base + c * L + o, mask=mq, other=0.0)
            kc = tl.load(base + (DK + c) * L + p, mask=mk, other=0.0)
            gq = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            gk = tl.zeros((BLOCK_K,), dtype=tl.float32)
            if USE_QK:
                r = tl.sum(dy * kc[None, :], axis=1)
                ga_q += qc * r
                gq += a_qk * r
                gk += a_qk * tl.sum(dy * qc[:, None], axis=0)
            if USE_QR:
                t = tl.load(rqe + c * J + rel, mask=inside, other=0.0)
                r = tl.sum(dy * t, axis=1)
                ga_qr += qc * r
                gq += a_qr * r
            if USE_KR:
                t = tl.load(rke + c * J + rel, mask=inside, other=0.0)
                r = tl.sum(dy * t, axis=0)
                ga_kr += kc * r
                gk += a_kr * r
            tl.store(gbase + c * L + o, gq, mask=mq)
            if USE_QK or USE_KR:
                if ATOMIC_KV:
                    tl.atomic_add(gbase + (DK + c) * L + p, gk, mask=mk)
                else:
                    tl.store(gbase + (DK + c) * L + p, gk, mask=mk)
        tl.store(gscale_part + prog * 3, tl.sum(ga_q))
        tl.store(gscale_part + prog * 3 + 1, tl.sum(ga_qr))
        tl.store(gscale_part + prog * 3 + 2, tl.sum(ga_kr))

        # Table gradients are sums along the diagonals p - o = const. Skew the tile:
        # row i, column jj holds key p = jj + (i - (BLOCK_Q - 1)) * QSTEP, so each column
        # is one offset, rel = jj - (BLOCK_Q - 1) * QSTEP - o0 + L - 1.
        if USE_QR or USE_KR or USE_RV:
            i = tl.arange(0, BLOCK_Q)
            jj = tl.arange(0, JB)
            src = jj[None, :] + (i[:, None] - (BLOCK_Q - 1)) * QSTEP
            valid = (src >= 0) & (src < BLOCK_K)
            idx = tl.where(valid, src, 0)
            relj = jj - (BLOCK_Q - 1) * QSTEP - qb * BLOCK_Q * QSTEP + L - 1
            mj = (relj >= 0) & (relj < J)
            if USE_QR or USE_KR:
                sdy = tl.where(valid, tl.gather(dy, idx, 1), 0.0)
            if USE_QR:  # g_rq[c, j] = a_qr sum_{p - o = j} dY q_c[o]
                for c in tl.static_range(DK):
                    qc = tl.load(base + c * L + o, mask=mq, other=0.0)
                    g = tl.sum(sdy * (qc * a_qr)[:, None], axis=0)
                    tl.atomic_add(grq_part + (slot * DK + c) * J + relj, g, mask=mj)
            if USE_KR:  # g_rk[c, j] = a_kr sum_{p - o = j} dY k_c[p]
                for c in tl.static_range(DK):
                    ks = tl.load(base + (DK + c) * L + src, mask=valid & (src < L), other=0.0)
                    g = tl.sum(sdy * ks, axis=0) * a_kr
                    tl.atomic_add(grk_part + (slot * DK + c) * J + relj, g, mask=mj)
            if USE_RV:  # g_rv[c, j] = sum_{p - o = j} P g_sve_c[o]
                spr = tl.where(valid, tl.gather(pr, idx, 1), 0.0)
                for c in tl.static_range(DV):
                    g2 = tl.load(gsve + (nh * DV + c) * LQ + iq, mask=mq, other=0.0)
                    g = tl.sum(spr * g2[:, None], axis=0)
                    tl.atomic_add(grv_part + (slot * DV + c) * J + relj, g, mask=mj)


def _table_offsets(layer, length: int, device) -> torch.Tensor:
    """Table row of each offset -(L-1)..L-1 (clipped to the reach D)."""
    d = layer.max_relative_distance
    return torch.arange(-(length - 1), length, device=device).clamp(-d, d) + d


def _offset_tables(layer, length: int, dtype, device):
    """Tables gathered over offsets -(L-1)..L-1, clipped to the reach: (d, 2L-1) each."""
    offsets = _table_offsets(layer, length, device)
    def gather(t):
        return None if t is None else t.detach().to(dtype)[:, offsets].contiguous()
    return gather(layer.query_table), gather(layer.key_table), gather(layer.value_table)


def attend_triton(layer, qkv: torch.Tensor, scales: torch.Tensor, query_step: int = 1,
                  return_lse: bool = False):
    """Same contract as :func:`.fast_cpu.attend`, computed by the Triton kernel (no autograd;
    :class:`.memory_efficient.AxialAttentionFunction` provides the backward)."""
    if triton is None:
        raise RuntimeError("impl='triton' needs the optional package triton (pip install triton)")
    nh, c2h, length = qkv.shape
    dk, dv = layer.key_depth, layer.value_depth
    qkv = qkv.detach().float().contiguous()
    lq = len(range(0, length, query_step))
    rqe, rke, rve = _offset_tables(layer, length, torch.float32, qkv.device)
    scale = (scales.detach().float() * _LOG2E).contiguous()
    sv = torch.empty(nh, dv, lq, device=qkv.device)
    sve = torch.empty(nh, dv, lq, device=qkv.device) if layer.use_value_rpe else sv
    lse = torch.empty(nh, lq, device=qkv.device)
    block_k = max(16, triton.next_power_of_2(length))
    block_q = max(1, min(triton.next_power_of_2(lq), max(16, 4096 // block_k)))
    dummy = scale
    radius = -1 if layer.span is None else (layer.span - 1) // 2
    grid = (nh, triton.cdiv(lq, block_q))
    _axial_forward_kernel[grid](
        qkv, rqe if rqe is not None else dummy, rke if rke is not None else dummy,
        rve if rve is not None else dummy, scale, sv, sve, lse,
        length, lq, query_step, radius, layer.num_heads, c2h,
        DK=dk, DV=dv, BLOCK_Q=block_q, BLOCK_K=block_k,
        USE_QK=layer.use_qk, USE_QR=layer.use_query_rpe, USE_KR=layer.use_key_rpe,
        USE_RV=layer.use_value_rpe,
    )
    out_sve = sve if layer.use_value_rpe else None
    if return_lse:
        return sv, out_sve, lse
    return sv, out_sve


def _backward_block_q(lq: int, block_k: int) -> int:
    if BACKWARD_BLOCK_Q is not None:
        return max(1, min(triton.next_power_of_2(lq), triton.next_power_of_2(BACKWARD_BLOCK_Q)))
    return max(1, min(triton.next_power_of_2(lq), max(16, 4096 // block_k)))


def attention_backward_triton(layer, query_step: int, qkv: torch.Tensor, scales: torch.Tensor,
                              sv: torch.Tensor, sve: torch.Tensor, lse: torch.Tensor,
                              g_sv: Optional[torch.Tensor], g_sve: Optional[torch.Tensor]):
    """Backward of :func:`attend_triton` by recomputation in one Triton kernel; the
    ``backward_fn`` of :class:`.memory_efficient.AxialAttentionFunction` (same contract
    as its ``_backward``). Returns ``(g_qkv, g_scales (3, heads), g_query_table,
    g_key_table, g_value_table)`` (a switched-off table's gradient is None)."""
    if triton is None:
        raise RuntimeError("impl='triton' needs the optional package triton (pip install triton)")
    nh, c2h, length = qkv.shape
    dk, dv, heads = layer.key_depth, layer.value_depth, layer.num_heads
    use_rv = layer.use_value_rpe
    device = qkv.device
    lq = len(range(0, length, query_step))
    f32 = torch.float32
    sv = sv.detach().to(f32)
    g_sv = torch.zeros_like(sv) if g_sv is None else g_sv.detach().to(f32).contiguous()
    delta = (g_sv * sv).sum(1)  # (nh, Lq): sum_p P dP
    if use_rv:
        g_sve = torch.zeros_like(sv) if g_sve is None or g_sve.numel() == 0 else g_sve.detach().to(f32).contiguous()
        delta = delta + (g_sve * sve.detach().to(f32)).sum(1)
    delta = delta.contiguous()

    x = qkv.detach().to(f32).contiguous()
    rqe, rke, rve = _offset_tables(layer, length, f32, device)
    nscale = scales.detach().to(f32).contiguous()
    scale = (scales.detach().float() * _LOG2E).contiguous()  # as attend_triton computes it
    block_k = max(16, triton.next_power_of_2(length))
    block_q = _backward_block_q(lq, block_k)
    num_qb = triton.cdiv(lq, block_q)
    jb = triton.next_power_of_2(block_k + (block_q - 1) * query_step)
    programs = nh * num_qb
    slots = max(1, min(TABLE_GRAD_SLOTS, programs))
    span = 2 * length - 1

    g_qkv = torch.zeros(nh, c2h, length, dtype=f32, device=device)
    g_scale_part = torch.empty(programs, 3, dtype=f32, device=device)
    g_rq_part = torch.zeros(slots, dk, span, dtype=f32, device=device) if layer.use_query_rpe else None
    g_rk_part = torch.zeros(slots, dk, span, dtype=f32, device=device) if layer.use_key_rpe else None
    g_rv_part = torch.zeros(slots, dv, span, dtype=f32, device=device) if use_rv else None
    dummy = nscale
    radius = -1 if layer.span is None else (layer.span - 1) // 2

    def ptr(t):
        return dummy if t is None else t

    _axial_backward_kernel[(nh, num_qb)](
        x, ptr(rqe), ptr(rke), ptr(rve), scale, nscale, lse.detach().to(f32).contiguous(), delta,
        g_sv, g_sve if use_rv else dummy,
        g_qkv, ptr(g_rq_part), ptr(g_rk_part), ptr(g_rv_part), g_scale_part,
        length, lq, query_step, radius, heads, c2h, slots,
        DK=dk, DV=dv, BLOCK_Q=block_q, BLOCK_K=block_k, JB=jb, ATOMIC_KV=num_qb > 1,
        USE_QK=layer.use_qk, USE_QR=layer.use_query_rpe, USE_KR=layer.use_key_rpe, USE_RV=use_rv,
    )

    # Deterministic reductions of the partial sums, back to the parameters' rows.
    g_scales = g_scale_part.view(nh // heads, heads, num_qb, 3).sum((0, 2)).t()
    offsets = _table_offsets(layer, length, device)

    def to_rows(part, table):
        if part is None:
            return None
        flat = part.sum(0)
        rows = torch.zeros(flat.shape[0], layer.table_rows, dtype=f32, device=device)
        return rows.index_add_(1, offsets, flat).to(table.dtype)

    g_rq = to_rows(g_rq_part, layer.query_table)
    g_rk = to_rows(g_rk_part, layer.key_table)
    g_rv = to_rows(g_rv_part, layer.value_table)
    return g_qkv.to(qkv.dtype), g_scales.to(scales.dtype), g_rq, g_rk, g_rv


def axial_attention_triton(layer, x: torch.Tensor) -> torch.Tensor:
    """``impl="triton"``: the Triton forward; in training, the memory-efficient autograd
    function with the Triton backward (both kernels fused, nothing kept but the inputs,
    the small outputs and one log-sum-exp per row)."""
    from .fast_cpu import run_layer
    from .memory_efficient import memory_efficient_core

    def core(layer_, qkv, scales, step):
        return memory_efficient_core(layer_, qkv, scales, step, attend_fn=attend_triton,
                                     backward_fn=attention_backward_triton)

    return run_layer(layer, x, core)
