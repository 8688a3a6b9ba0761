"""Triton kernel for the forward of position-sensitive axial attention (``impl="triton"``).

One program per (sequence-head, block of query rows): the three similarity terms from
the compact tables, the softmax (exp2, log2(e) folded into the BN term scales) and both
retrievals stay in registers; only q, k, v, the tables and the small outputs touch
memory. The same kernel serves inference (BN folded, ``fast_cpu.run_layer`` around it)
and the forward of training, where it also stores each row's log-sum-exp for the
recompute-in-backward of :class:`.memory_efficient.AxialAttentionFunction` (whose
backward is the chunked PyTorch one, so training runs on any device Triton runs on).

Triton is optional: without it this module registers nothing. On a CPU it runs only
through Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use on tiny
shapes; speed figures need a GPU.
"""
from __future__ import annotations

import math

import torch

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

__all__ = ["triton_available", "attend_triton", "axial_attention_triton"]

_LOG2E = 1.0 / math.log(2.0)


def triton_available() -> bool:
    return triton is not None


if triton is not None:

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
        iq = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)  # output (query) index
        o = iq * QSTEP  # query position
        p = tl.arange(0, BLOCK_K)  # key position
        mq = iq < LQ
        mk = p < L
        rel = p[None, :] - o[:, None] + L - 1  # column of the offset-indexed tables
        inside = mq[:, None] & mk[None, :]
        if RADIUS >= 0:
            inside = inside & (p[None, :] - o[:, None] <= RADIUS) & (o[:, None] - p[None, :] <= RADIUS)
        s_qk = tl.load(scale + h)
        s_qr = tl.load(scale + HEADS + h)
        s_kr = tl.load(scale + 2 * HEADS + h)
        J = 2 * L - 1
        base = qkv + nh * C2H * L
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
        z = tl.where(inside, z, float("-inf"))
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


def _offset_tables(layer, length: int, dtype, device):
    """Tables gathered over offsets -(L-1)..L-1, clipped to the reach: (d, 2L-1) each."""
    d = layer.max_relative_distance
    offsets = torch.arange(-(length - 1), length, device=device).clamp(-d, d) + d
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


def axial_attention_triton(layer, x: torch.Tensor) -> torch.Tensor:
    """``impl="triton"``: the Triton forward; in training, the recompute-in-backward of
    the memory-efficient function (chunked PyTorch backward)."""
    from .fast_cpu import run_layer
    from .memory_efficient import memory_efficient_core

    def core(layer_, qkv, scales, step):
        return memory_efficient_core(layer_, qkv, scales, step, attend_fn=attend_triton)

    return run_layer(layer, x, core)
