"""Triton kernels for position-sensitive axial attention (``impl="triton"``).

The layer's core is flash attention with three relative terms. One program owns a
(sequence-head, block of query rows) and walks the key blocks its span reaches (a local
span skips the others), keeping everything L x L in registers. Every contraction is a
``tl.dot`` (tensor cores): q k^T, and the relative terms through the skew trick --
for a tile of queries o and keys p the offsets p - o fill one window of the compact
offset table, so ``q @ R_window^T`` (queries x offsets) holds every q.r^q_{p-o} and one
``tl.gather`` per row moves it to key coordinates (likewise k.r^k along columns, and
P -> offset coordinates for P @ r^v). Softmax is online (exp2, log2 e folded into the
term scales) and the forward stores each row's log-sum-exp for training.

Backward (training): the same programs recompute the logits and P = exp2(z - lse), then
dP, dY = P (dP - delta) and, again by ``tl.dot`` on skewed tiles, the gradients of q
(accumulated over key blocks), k and v (stores, atomics when several query blocks share
a key block), the three tables (added into a few partial slots) and the per-head BN
term scales (per-program partial sums). The math is the one of :mod:`.memory_efficient`;
:class:`.memory_efficient.AxialAttentionFunction` runs both kernels.

The layer stands in for a convolution, so its products follow PyTorch's switch for
convolutions, ``torch.backends.cudnn.allow_tf32`` (on by default): TF32 tensor-core
products like cuDNN's, or with it off "tf32x3" (three TF32 products: float32 accuracy,
still on tensor cores; Triton's exact "ieee" dot fails to compile with these gathers in
Triton 3.9, and would run on the CUDA cores).

The first layer on each GPU runs :func:`self_check` (a tiny layer against the reference
on that GPU): should the kernels ever compute wrong on a GPU / Triton they were not tested
on, the layer warns and runs the PyTorch memory-efficient path instead.

Tile sizes, warps and pipeline stages are tuned on the GPU by ``triton.autotune`` at the
first call of each shape (:data:`CONFIGS`); :data:`BLOCK_SIZES` fixes them instead (tests,
the interpreter). Triton is optional: without it this module registers nothing. On a CPU
it runs only through Triton's interpreter (``TRITON_INTERPRET=1``, tests on tiny shapes);
speed figures need a GPU, and :func:`compile_for_gpu` compiles the kernels for a GPU
architecture without one (registers, spills, shared memory).
"""
from __future__ import annotations

import copy
import math
import os
import re
from typing import Optional, Tuple

import torch

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

__all__ = ["triton_available", "attend_triton", "attention_backward_triton", "axial_attention_triton",
           "block_sizes", "offset_window", "dot_precision", "compile_for_gpu", "tuned_configs",
           "self_check", "trusted", "BLOCK_SIZES", "CONFIGS", "TABLE_GRAD_SLOTS"]

_LOG2E = 1.0 / math.log(2.0)
# (query rows, keys) per tile for both kernels, optionally with (num_warps, num_stages);
# None: the autotuner picks on a GPU, :func:`block_sizes` elsewhere. Tests set small
# values to run several blocks; benchmarks/triton_tile_sweep.py times each config.
BLOCK_SIZES: Optional[Tuple[int, ...]] = None
# Partial buffers of the table gradients: programs add into slot (program id mod this).
TABLE_GRAD_SLOTS = 32


def triton_available() -> bool:
    return triton is not None


def dot_precision() -> str:
    """``tl.dot`` input precision: "tf32" where PyTorch lets cuDNN's float32 convolutions use
    TF32 (its default), else "tf32x3" (float32 accuracy)."""
    return "tf32" if torch.backends.cudnn.allow_tf32 else "tf32x3"


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def offset_window(block_q: int, block_k: int, query_step: int = 1) -> int:
    """JB: width of a tile's offset window, a power of two >= the BLOCK_K + (BLOCK_Q - 1) * step
    offsets p - o its pairs take."""
    return _pow2(block_k + (block_q - 1) * query_step)


def _atomic_kv(lq: int, block_q: int) -> bool:
    """k / v gradients need atomics when several query blocks add into the same key block."""
    return -(-lq // block_q) > 1


def block_sizes(length: int, query_step: int = 1) -> Tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_K, JB): query rows and keys of a tile (at least 16 each, as
    ``tl.dot`` needs), and the width of its offset window (:func:`offset_window`)."""
    if BLOCK_SIZES is not None:
        block_q, block_k = (_pow2(b) for b in BLOCK_SIZES[:2])
    else:
        block_k = 16 if length <= 16 else 32
        block_q = max(16, block_k // max(1, query_step))
    lq = len(range(0, length, query_step))
    block_q = max(16, min(block_q, _pow2(lq)))
    block_k = max(16, min(block_k, _pow2(length)))
    return block_q, block_k, offset_window(block_q, block_k, query_step)


if triton is not None:

    @triton.jit
    def _key_range(qb, L, LQ, QSTEP, RADIUS, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
        """First key block and end of the keys a query block's span reaches."""
        o_first = qb * BLOCK_Q * QSTEP
        o_last = tl.minimum(qb * BLOCK_Q + BLOCK_Q - 1, LQ - 1) * QSTEP
        lo = 0
        hi = L
        if RADIUS >= 0:
            lo = tl.maximum(o_first - RADIUS, 0)
            hi = tl.minimum(o_last + RADIUS + 1, L)
        return (lo // BLOCK_K) * BLOCK_K, hi

    @triton.jit
    def _tile(qb, kb0, L, LQ, QSTEP, RADIUS,
              BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, JB: tl.constexpr):
        """Geometry of one tile. Offsets p - o of the tile lie in a window of the offset
        table starting at column r0; pair (i, j) sits at window column u = shift_i + j with
        shift_i = (BLOCK_Q - 1 - i) * QSTEP. Returns query indices, key positions, masks, the
        pairs in the span, the window's columns and their mask, and the gather index u."""
        i = tl.arange(0, BLOCK_Q)
        j = tl.arange(0, BLOCK_K)
        iq = qb * BLOCK_Q + i
        o = iq * QSTEP
        p = kb0 + j
        mq = iq < LQ
        mk = p < L
        inside = mq[:, None] & mk[None, :]
        if RADIUS >= 0:
            inside = inside & (p[None, :] - o[:, None] <= RADIUS) & (o[:, None] - p[None, :] <= RADIUS)
        shift = (BLOCK_Q - 1 - i) * QSTEP
        r0 = kb0 - (qb * BLOCK_Q + BLOCK_Q - 1) * QSTEP + L - 1
        col = r0 + tl.arange(0, JB)
        mcol = (col >= 0) & (col < 2 * L - 1)
        u = shift[:, None] + j[None, :]
        return iq, o, p, mq, mk, inside, shift, col, mcol, u

    @triton.jit
    def _load_rows(ptr, rows, mrows, cols, mcols, stride):
        """Tile t[r, c] = ptr[c * stride + rows[r]] (channels strided, positions contiguous)."""
        return tl.load(ptr + cols[None, :] * stride + rows[:, None], mask=mrows[:, None] & mcols[None, :], other=0.0)

    @triton.jit
    def _to_offsets(x, shift, BLOCK_K: tl.constexpr, JB: tl.constexpr):
        """Row i of x (queries x keys) moved to offset coordinates: out[i, u] = x[i, u - shift_i]."""
        src = tl.arange(0, JB)[None, :] - shift[:, None]
        ok = (src >= 0) & (src < BLOCK_K)
        return tl.where(ok, tl.gather(x, tl.where(ok, src, 0), 1), 0.0)

    @triton.jit
    def _tile_logits(q, kt, rq, rk, s_qk, s_qr, s_kr, u, inside, DOT: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                     USE_QK: tl.constexpr, USE_QR: tl.constexpr, USE_KR: tl.constexpr):
        """Logits of a tile in log2 units (the scales carry log2 e), -inf outside the span;
        q: (BLOCK_Q, DKP), kt: (DKP, BLOCK_K), rq / rk: offset windows (JB, DKP). The forward
        and the backward's recomputation share this one code."""
        z = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
        if USE_QK:
            z += tl.dot(q * s_qk, kt, input_precision=DOT)
        if USE_QR:  # queries x offsets, then each row to its keys
            z += tl.gather(tl.dot(q * s_qr, tl.trans(rq), input_precision=DOT), u, 1)
        if USE_KR:  # offsets x keys, then each column to its queries
            z += tl.gather(tl.dot(rk, kt * s_kr, input_precision=DOT), u, 0)
        return tl.where(inside, z, float("-inf"))

    @triton.jit
    def _axial_forward_kernel(
        qkv, rqe, rke, rve, scale, sv, sve, lse,
        L, LQ, QSTEP, RADIUS, HEADS, C2H,
        DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, JB: tl.constexpr, DOT: tl.constexpr,
        USE_QK: tl.constexpr, USE_QR: tl.constexpr, USE_KR: tl.constexpr, USE_RV: tl.constexpr,
    ):
        nh = tl.program_id(0)
        qb = tl.program_id(1)
        h = nh % HEADS
        J = 2 * L - 1
        base = qkv + nh * C2H * L
        ck = tl.arange(0, DKP)
        cv = tl.arange(0, DVP)
        mck = ck < DK
        mcv = cv < DV
        s_qk = tl.load(scale + h)
        s_qr = tl.load(scale + HEADS + h)
        s_kr = tl.load(scale + 2 * HEADS + h)
        iq = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        mq = iq < LQ
        q = _load_rows(base, iq * QSTEP, mq, ck, mck, L)  # (BLOCK_Q, DKP)

        m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_Q, DVP), dtype=tl.float32)
        acc_e = tl.zeros((BLOCK_Q, DVP), dtype=tl.float32)
        k_start, k_end = _key_range(qb, L, LQ, QSTEP, RADIUS, BLOCK_Q, BLOCK_K)
        for kb0 in range(k_start, k_end, BLOCK_K):
            iq, o, p, mq, mk, inside, shift, col, mcol, u = _tile(
                qb, kb0, L, LQ, QSTEP, RADIUS, BLOCK_Q, BLOCK_K, JB)
            kt = tl.trans(_load_rows(base + DK * L, p, mk, ck, mck, L))  # (DKP, BLOCK_K)
            rq = _load_rows(rqe, col, mcol, ck, mck & USE_QR, J)  # (JB, DKP)
            rk = _load_rows(rke, col, mcol, ck, mck & USE_KR, J)
            z = _tile_logits(q, kt, rq, rk, s_qk, s_qr, s_kr, u, inside, DOT,
                             BLOCK_Q, BLOCK_K, USE_QK, USE_QR, USE_KR)
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            e = tl.exp2(z - m_use[:, None])
            l_i = l_i * alpha + tl.sum(e, axis=1)
            v = _load_rows(base + 2 * DK * L, p, mk, cv, mcv, L)  # (BLOCK_K, DVP)
            acc = acc * alpha[:, None] + tl.dot(e, v, input_precision=DOT)
            if USE_RV:
                rv = _load_rows(rve, col, mcol, cv, mcv, J)  # (JB, DVP)
                acc_e = acc_e * alpha[:, None] + tl.dot(_to_offsets(e, shift, BLOCK_K, JB), rv,
                                                         input_precision=DOT)
            m_i = m_new
        l_safe = tl.where(mq, l_i, 1.0)
        out_mask = mq[:, None] & mcv[None, :]
        out_at = (nh * DV + cv[None, :]) * LQ + iq[:, None]
        tl.store(sv + out_at, acc / l_safe[:, None], mask=out_mask)
        if USE_RV:
            tl.store(sve + out_at, acc_e / l_safe[:, None], mask=out_mask)
        tl.store(lse + nh * LQ + iq, tl.where(mq, m_i, 0.0) + tl.log2(l_safe), mask=mq)

    @triton.jit
    def _axial_backward_kernel(
        qkv, rqe, rke, rve, scale, nscale, lse, delta, gsv, gsve,
        gqkv, grq_part, grk_part, grv_part, gscale_part,
        L, LQ, QSTEP, RADIUS, HEADS, C2H, SLOTS,
        DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, DVP: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, JB: tl.constexpr, DOT: tl.constexpr,
        ATOMIC_KV: tl.constexpr,
        USE_QK: tl.constexpr, USE_QR: tl.constexpr, USE_KR: tl.constexpr, USE_RV: tl.constexpr,
    ):
        nh = tl.program_id(0)
        qb = tl.program_id(1)
        prog = nh * tl.num_programs(1) + qb
        slot = prog % SLOTS
        h = nh % HEADS
        J = 2 * L - 1
        base = qkv + nh * C2H * L
        gbase = gqkv + nh * C2H * L
        ck = tl.arange(0, DKP)
        cv = tl.arange(0, DVP)
        mck = ck < DK
        mcv = cv < DV
        s_qk = tl.load(scale + h)  # log2 units, for the recomputation
        s_qr = tl.load(scale + HEADS + h)
        s_kr = tl.load(scale + 2 * HEADS + h)
        a_qk = tl.load(nscale + h)  # natural units, for the gradients
        a_qr = tl.load(nscale + HEADS + h)
        a_kr = tl.load(nscale + 2 * HEADS + h)
        iq = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        mq = iq < LQ
        q = _load_rows(base, iq * QSTEP, mq, ck, mck, L)  # (BLOCK_Q, DKP)
        g1 = _load_rows(gsv + nh * DV * LQ, iq, mq, cv, mcv, LQ)  # (BLOCK_Q, DVP)
        g2 = _load_rows(gsve + nh * DV * LQ, iq, mq, cv, mcv & USE_RV, LQ)
        row_lse = tl.load(lse + nh * LQ + iq, mask=mq, other=0.0)
        row_delta = tl.load(delta + nh * LQ + iq, mask=mq, other=0.0)

        dq = tl.zeros((BLOCK_Q, DKP), dtype=tl.float32)
        ga_qk = tl.zeros((BLOCK_Q, DKP), dtype=tl.float32)  # elementwise partials of sum dY * S_t
        ga_qr = tl.zeros((BLOCK_Q, DKP), dtype=tl.float32)
        ga_kr = tl.zeros((BLOCK_K, DKP), dtype=tl.float32)
        k_start, k_end = _key_range(qb, L, LQ, QSTEP, RADIUS, BLOCK_Q, BLOCK_K)
        for kb0 in range(k_start, k_end, BLOCK_K):
            iq, o, p, mq, mk, inside, shift, col, mcol, u = _tile(
                qb, kb0, L, LQ, QSTEP, RADIUS, BLOCK_Q, BLOCK_K, JB)
            k = _load_rows(base + DK * L, p, mk, ck, mck, L)  # (BLOCK_K, DKP)
            kt = tl.trans(k)
            v = _load_rows(base + 2 * DK * L, p, mk, cv, mcv, L)  # (BLOCK_K, DVP)
            rq = _load_rows(rqe, col, mcol, ck, mck & USE_QR, J)  # (JB, DKP)
            rk = _load_rows(rke, col, mcol, ck, mck & USE_KR, J)
            z = _tile_logits(q, kt, rq, rk, s_qk, s_qr, s_kr, u, inside, DOT,
                             BLOCK_Q, BLOCK_K, USE_QK, USE_QR, USE_KR)
            pr = tl.where(inside, tl.exp2(z - row_lse[:, None]), 0.0)

            # dP = g_sv . v_p + g_sve . r^v_{p-o}; dY, the gradient of the natural logits
            dp = tl.dot(g1, tl.trans(v), input_precision=DOT)
            if USE_RV:
                rv = _load_rows(rve, col, mcol, cv, mcv, J)  # (JB, DVP)
                dp += tl.gather(tl.dot(g2, tl.trans(rv), input_precision=DOT), u, 1)
            dy = pr * (dp - row_delta[:, None])

            gv = tl.dot(tl.trans(pr), g1, input_precision=DOT)  # (BLOCK_K, DVP)
            gk = tl.zeros((BLOCK_K, DKP), dtype=tl.float32)
            if USE_QK:
                t = tl.dot(dy, k, input_precision=DOT)  # sum_p dY k_p
                dq += a_qk * t
                ga_qk += q * t
                gk += a_qk * tl.dot(tl.trans(dy), q, input_precision=DOT)
            if USE_QR:
                sdy = _to_offsets(dy, shift, BLOCK_K, JB)  # (BLOCK_Q, JB)
                t = tl.dot(sdy, rq, input_precision=DOT)  # sum_p dY r^q_{p-o}
                dq += a_qr * t
                ga_qr += q * t
                g = a_qr * tl.dot(tl.trans(sdy), q, input_precision=DOT)  # (JB, DKP)
                tl.atomic_add(grq_part + slot * DK * J + ck[None, :] * J + col[:, None], g,
                              mask=mcol[:, None] & mck[None, :])
            if USE_KR:
                # column j of dY to offset coordinates: T[w, j] = dY[i, j] where shift_i = w - j
                w = tl.arange(0, JB)[:, None] - tl.arange(0, BLOCK_K)[None, :]
                i_of = (BLOCK_Q - 1) - w // QSTEP
                ok = (w >= 0) & (w % QSTEP == 0) & (i_of >= 0)
                tdy = tl.where(ok, tl.gather(dy, tl.where(ok, i_of, 0), 0), 0.0)  # (JB, BLOCK_K)
                t = tl.dot(tl.trans(tdy), rk, input_precision=DOT)  # (BLOCK_K, DKP): sum_o dY r^k_{p-o}
                gk += a_kr * t
                ga_kr += k * t
                g = a_kr * tl.dot(tdy, k, input_precision=DOT)  # (JB, DKP)
                tl.atomic_add(grk_part + slot * DK * J + ck[None, :] * J + col[:, None], g,
                              mask=mcol[:, None] & mck[None, :])
            if USE_RV:
                g = tl.dot(tl.trans(_to_offsets(pr, shift, BLOCK_K, JB)), g2, input_precision=DOT)  # (JB, DVP)
                tl.atomic_add(grv_part + slot * DV * J + cv[None, :] * J + col[:, None], g,
                              mask=mcol[:, None] & mcv[None, :])
            k_at = gbase + (DK + ck[None, :]) * L + p[:, None]
            v_at = gbase + (2 * DK + cv[None, :]) * L + p[:, None]
            mk_k = mk[:, None] & mck[None, :]
            mk_v = mk[:, None] & mcv[None, :]
            if ATOMIC_KV:
                tl.atomic_add(v_at, gv, mask=mk_v)
                if USE_QK or USE_KR:
                    tl.atomic_add(k_at, gk, mask=mk_k)
            else:
                tl.store(v_at, gv, mask=mk_v)
                if USE_QK or USE_KR:
                    tl.store(k_at, gk, mask=mk_k)
        tl.store(gbase + ck[None, :] * L + (iq * QSTEP)[:, None], dq, mask=mq[:, None] & mck[None, :])
        tl.store(gscale_part + prog * 3, tl.sum(tl.sum(ga_qk, axis=1), axis=0))
        tl.store(gscale_part + prog * 3 + 1, tl.sum(tl.sum(ga_qr, axis=1), axis=0))
        tl.store(gscale_part + prog * 3 + 2, tl.sum(tl.sum(ga_kr, axis=1), axis=0))


    def _tile_rows(args) -> int:
        return offset_window(args["BLOCK_Q"], args["BLOCK_K"], args["QSTEP"])

    def _prune(configs, named_args, **kwargs):
        """Drop tiles larger than the sequence needs (keep the smallest when all are)."""
        length, lq = named_args["L"], named_args["LQ"]
        fit = [c for c in configs if c.kwargs["BLOCK_K"] <= max(16, _pow2(length))
               and c.kwargs["BLOCK_Q"] <= max(16, _pow2(lq))]
        return fit or [min(configs, key=lambda c: (c.kwargs["BLOCK_Q"] * c.kwargs["BLOCK_K"], c.num_warps))]

    _TUNE_KEY = ["L", "LQ", "QSTEP", "RADIUS", "DK", "DV", "DOT", "USE_QK", "USE_QR", "USE_KR", "USE_RV"]

_forward_tuned = None  # built on first use on a GPU (:func:`_tuned_kernels`)
_backward_tuned = None


# (BLOCK_Q, BLOCK_K, num_warps, num_stages) the autotuner times on a GPU.
CONFIGS = [(16, 16, 2, 1), (16, 16, 4, 1), (16, 16, 4, 2), (16, 32, 4, 1), (32, 16, 4, 1), (32, 32, 2, 1),
           (32, 32, 4, 1), (32, 32, 8, 1), (32, 32, 4, 2), (64, 32, 8, 1), (64, 64, 8, 1)]


def _tuned_kernels():
    """The autotuned kernels (built once, from :data:`CONFIGS`)."""
    global _forward_tuned, _backward_tuned
    if _forward_tuned is None:
        configs = [triton.Config({"BLOCK_Q": bq, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                   for bq, bk, w, s in CONFIGS]
        prune = {"early_config_prune": _prune}
        _forward_tuned = triton.autotune(configs, key=_TUNE_KEY, prune_configs_by=prune)(
            triton.heuristics({"JB": _tile_rows})(_axial_forward_kernel))
        _backward_tuned = triton.autotune(
            configs, key=_TUNE_KEY, prune_configs_by=prune,
            reset_to_zero=["gqkv", "grq_part", "grk_part", "grv_part"])(
            triton.heuristics({"JB": _tile_rows,
                               "ATOMIC_KV": lambda a: _atomic_kv(a["LQ"], a["BLOCK_Q"])})(_axial_backward_kernel))
    return _forward_tuned, _backward_tuned


def tuned_configs() -> dict:
    """What the autotuner chose so far: {kernel: {tuning key: config}} (for the benchmark)."""
    chosen = {}
    for name, tuned in (("forward", _forward_tuned), ("backward", _backward_tuned)):
        if tuned is not None and tuned.cache:
            chosen[name] = {str(key): str(config) for key, config in tuned.cache.items()}
    return chosen


def _launch_options() -> dict:
    """Options of every launch: fused multiply-adds on (Triton 3.9 warns that its default will
    turn them off), and num_warps / num_stages where :data:`BLOCK_SIZES` gives them."""
    options = {"enable_fp_fusion": True}
    if BLOCK_SIZES is not None and len(BLOCK_SIZES) == 4:
        options.update(num_warps=int(BLOCK_SIZES[2]), num_stages=int(BLOCK_SIZES[3]))
    return options


def _autotuning(device: torch.device) -> bool:
    return (BLOCK_SIZES is None and device.type == "cuda"
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


def _launch(backward: bool, args: tuple, layer, length: int, lq: int, query_step: int) -> int:
    """One program per (sequence-head, query block): the autotuned kernel on a GPU, else tiles
    from :func:`block_sizes`. Returns the BLOCK_Q that ran (the backward's partial sums need it)."""
    nh, device = args[0].shape[0], args[0].device
    options = {**_constants(layer), **_launch_options()}
    if _autotuning(device):
        tuned = _tuned_kernels()[int(backward)]
        tuned[lambda meta: (nh, triton.cdiv(lq, meta["BLOCK_Q"]))](*args, **options)
        return tuned.best_config.kwargs["BLOCK_Q"]
    block_q, block_k, jb = block_sizes(length, query_step)
    kernel = _axial_backward_kernel if backward else _axial_forward_kernel
    if backward:
        options["ATOMIC_KV"] = _atomic_kv(lq, block_q)
    kernel[(nh, triton.cdiv(lq, block_q))](*args, BLOCK_Q=block_q, BLOCK_K=block_k, JB=jb, **options)
    return block_q


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


def _kernel_constants(dk: int, dv: int, terms, precision: str) -> dict:
    """The compile-time constants both kernels take, tiles aside (depths padded for ``tl.dot``);
    terms: (q.k, q.r^q, k.r^k, r^v) switched on."""
    use_qk, use_qr, use_kr, use_rv = (bool(t) for t in terms)
    return dict(DK=dk, DV=dv, DKP=max(16, _pow2(dk)), DVP=max(16, _pow2(dv)), DOT=precision,
                USE_QK=use_qk, USE_QR=use_qr, USE_KR=use_kr, USE_RV=use_rv)


def _constants(layer) -> dict:
    terms = (layer.use_qk, layer.use_query_rpe, layer.use_key_rpe, layer.use_value_rpe)
    return _kernel_constants(layer.key_depth, layer.value_depth, terms, dot_precision())


def _radius(layer) -> int:
    return -1 if layer.span is None else (layer.span - 1) // 2


def _require_triton():
    if triton is None:
        raise RuntimeError("impl='triton' needs the optional package triton (pip install triton)")


def _placeholder(t: Optional[torch.Tensor], device) -> torch.Tensor:
    """A switched-off operand: a one-element tensor of its own (never read or written)."""
    return torch.zeros(1, device=device) if t is None else t


def attend_triton(layer, qkv: torch.Tensor, scales: torch.Tensor, query_step: int = 1,
                  return_lse: bool = False):
    """Same contract as :func:`.fast_cpu.attend`, computed by the Triton kernel (no autograd;
    :class:`.memory_efficient.AxialAttentionFunction` provides the backward)."""
    _require_triton()
    nh, c2h, length = qkv.shape
    dv, device = layer.value_depth, qkv.device
    qkv = qkv.detach().float().contiguous()
    lq = len(range(0, length, query_step))
    rqe, rke, rve = _offset_tables(layer, length, torch.float32, device)
    scale = (scales.detach().float() * _LOG2E).contiguous()
    sv = torch.empty(nh, dv, lq, device=device)
    sve = torch.empty(nh, dv, lq, device=device) if layer.use_value_rpe else None
    lse = torch.empty(nh, lq, device=device)
    args = (qkv, _placeholder(rqe, device), _placeholder(rke, device), _placeholder(rve, device), scale,
            sv, _placeholder(sve, device), lse, length, lq, query_step, _radius(layer), layer.num_heads, c2h)
    _launch(False, args, layer, length, lq, query_step)
    if return_lse:
        return sv, sve, lse
    return sv, sve


def attention_backward_triton(layer, query_step: int, qkv: torch.Tensor, scales: torch.Tensor,
                              sv: torch.Tensor, sve: torch.Tensor, lse: torch.Tensor,
                              g_sv: Optional[torch.Tensor], g_sve: Optional[torch.Tensor]):
    """Backward of :func:`attend_triton` by recomputation in one Triton kernel; the
    ``backward_fn`` of :class:`.memory_efficient.AxialAttentionFunction` (same contract
    as its ``_backward``). Returns ``(g_qkv, g_scales (3, heads), g_query_table,
    g_key_table, g_value_table)`` (a switched-off table's gradient is None)."""
    _require_triton()
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
    else:
        g_sve = None
    delta = delta.contiguous()

    x = qkv.detach().to(f32).contiguous()
    rqe, rke, rve = _offset_tables(layer, length, f32, device)
    nscale = scales.detach().to(f32).contiguous()
    scale = (scales.detach().float() * _LOG2E).contiguous()  # as attend_triton computes it
    slots = max(1, min(TABLE_GRAD_SLOTS, nh))
    span = 2 * length - 1
    most_programs = nh * triton.cdiv(lq, 16)  # tiles have at least 16 query rows

    g_qkv = torch.zeros(nh, c2h, length, dtype=f32, device=device)
    g_scale_part = torch.zeros(most_programs, 3, dtype=f32, device=device)
    g_rq_part = torch.zeros(slots, dk, span, dtype=f32, device=device) if layer.use_query_rpe else None
    g_rk_part = torch.zeros(slots, dk, span, dtype=f32, device=device) if layer.use_key_rpe else None
    g_rv_part = torch.zeros(slots, dv, span, dtype=f32, device=device) if use_rv else None

    def ptr(t):
        return _placeholder(t, device)

    args = (x, ptr(rqe), ptr(rke), ptr(rve), scale, nscale, lse.detach().to(f32).contiguous(), delta,
            g_sv, ptr(g_sve), g_qkv, ptr(g_rq_part), ptr(g_rk_part), ptr(g_rv_part), g_scale_part,
            length, lq, query_step, _radius(layer), heads, c2h, slots)
    num_qb = triton.cdiv(lq, _launch(True, args, layer, length, lq, query_step))

    # Deterministic reductions of the partial sums, back to the parameters' rows.
    g_scales = g_scale_part[: nh * num_qb].view(nh // heads, heads, num_qb, 3).sum((0, 2)).t()
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
    the small outputs and one log-sum-exp per row). On a device where the kernels failed
    :func:`self_check`, the PyTorch memory-efficient path instead (after one warning)."""
    if not trusted(x.device):
        from .memory_efficient import axial_attention_memory_efficient

        return axial_attention_memory_efficient(layer, x)
    return _triton_layer(layer, x)


def _triton_layer(layer, x: torch.Tensor) -> torch.Tensor:
    from .fast_cpu import run_layer
    from .memory_efficient import memory_efficient_core

    def core(layer_, qkv, scales, step):
        return memory_efficient_core(layer_, qkv, scales, step, attend_fn=attend_triton,
                                     backward_fn=attention_backward_triton)

    return run_layer(layer, x, core)


# --------------------------------------------------------------------------- self-check
# Device types whose first Triton layer runs :func:`self_check` (tests add "cpu", where the
# kernels run through the interpreter). AXIAL_DEEPLAB_TRITON_SELF_CHECK=0 skips the check.
SELF_CHECK_DEVICE_TYPES = ("cuda",)
_TRUST: dict = {}  # (device, dot precision) -> passed


def trusted(device: torch.device) -> bool:
    """Whether the Triton kernels may run on ``device``: :func:`self_check` once per process,
    device and product precision; a failure warns once, naming the reason."""
    if (device.type not in SELF_CHECK_DEVICE_TYPES
            or os.environ.get("AXIAL_DEEPLAB_TRITON_SELF_CHECK", "1") in ("0", "false", "no")):
        return True
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dot_precision())
    if key not in _TRUST:
        reason = self_check(device)
        _TRUST[key] = reason is None
        if reason is not None:
            import warnings

            name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            warnings.warn(
                f"impl='triton': the Triton kernels failed their self-check on {device} ({reason}); "
                f"this process runs the PyTorch memory-efficient path there instead (same results, "
                f"slower). Please report it, with these versions: {name}, torch {torch.__version__}, "
                f"triton {triton.__version__}.", RuntimeWarning)
    return _TRUST[key]


def self_check(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot be trusted on ``device``, or None when they pass.

    Why: a kernel that compiles can still compute wrong on a GPU, Triton or driver it was
    never tested on, and the layer must not give a silent wrong answer. A tiny layer (L = 37
    in tiles of 16: several query and key blocks, the atomic k/v path, tables clipped
    beyond their reach, and a local span that skips key blocks) runs forward and backward
    in training, and forward in eval, through the kernels and through the reference
    equation on the same device; outputs and every gradient must agree (TF32 products:
    within 3e-2 of the largest value, else 1e-3). Fixed tiles keep it to two compiles."""
    from .axial_attention import PositionSensitiveAxialAttention
    from .reference import axial_attention_reference

    global BLOCK_SIZES
    tol = 3e-2 if dot_precision() == "tf32" else 1e-3
    saved = BLOCK_SIZES
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            torch.manual_seed(0)
            BLOCK_SIZES = (16, 16, 4, 1)
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(1, 8, 2, 37, generator=gen).to(device)
            g = torch.randn(1, 16, 2, 37, generator=gen).to(device)
            for span in (None, 7):
                layer = PositionSensitiveAxialAttention(8, 16, axis="width", num_heads=2, span=span,
                                                        max_relative_distance=20).to(device)
                runs = {}
                for name, fn in (("triton", _triton_layer), ("reference", axial_attention_reference)):
                    probe = copy.deepcopy(layer)
                    xi = x.clone().requires_grad_(True)
                    y = fn(probe, xi)
                    (y * g).sum().backward()
                    probe.eval()
                    with torch.no_grad():
                        y_eval = fn(probe, x)
                    runs[name] = {"output": y.detach(), "eval output": y_eval, "input gradient": xi.grad,
                                  **{f"gradient of {n}": p.grad for n, p in probe.named_parameters()}}
                for what, want in runs["reference"].items():
                    got = runs["triton"][what]
                    bound = tol * max(1.0, float(want.abs().max()))
                    err = float((got - want).abs().max()) if got is not None else float("inf")
                    if not err <= bound:
                        span_name = "global span" if span is None else f"span {span}"
                        return f"{what}, {span_name}: max difference {err:.3g} > {bound:.3g}"
    except Exception as exc:  # a compile or launch failure is a failed check, not a crash
        return f"{type(exc).__name__}: {exc}"[:500]
    finally:
        BLOCK_SIZES = saved
    return None


# --------------------------------------------------------------------------- without a GPU
_FORWARD_POINTERS = ("qkv", "rqe", "rke", "rve", "scale", "sv", "sve", "lse")
_BACKWARD_POINTERS = ("qkv", "rqe", "rke", "rve", "scale", "nscale", "lse", "delta", "gsv", "gsve",
                      "gqkv", "grq_part", "grk_part", "grv_part", "gscale_part")


def compile_for_gpu(kernel: str, *, key_depth: int = 16, value_depth: int = 32, block_q: int = 32,
                    block_k: int = 32, query_step: int = 1, num_warps: int = 4, num_stages: int = 1,
                    precision: str = "tf32", terms=(True, True, True, True), arch: int = 90) -> dict:
    """Compile ``kernel`` ("forward" or "backward") for an NVIDIA GPU of compute capability
    ``arch`` (90: Hopper) on any machine, with Triton's bundled ptxas, and read the machine
    code's resource use: ``{"registers", "spill_bytes" (the stack frame), "shared_bytes"}``.
    Catches compile failures and register spills before a GPU session."""
    _require_triton()
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, pointers = ((_axial_forward_kernel, _FORWARD_POINTERS) if kernel == "forward"
                    else (_axial_backward_kernel, _BACKWARD_POINTERS))
    constexprs = {fn.arg_names[i] for i in fn.constexprs}
    ints = [n for n in fn.arg_names if n not in pointers and n not in constexprs]
    const = dict(_kernel_constants(key_depth, value_depth, terms, precision),
                 BLOCK_Q=block_q, BLOCK_K=block_k, JB=offset_window(block_q, block_k, query_step))
    if kernel != "forward":
        const["ATOMIC_KV"] = True
    signature = {n: "*fp32" for n in pointers}
    signature.update({n: "i32" for n in ints})
    signature.update({n: "constexpr" for n in const})
    compiled = triton.compile(ASTSource(fn, signature, constexprs=const), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line
                  for item in line.split() if ":" in item)
    result = {"registers": int(fields["REG"]), "spill_bytes": int(fields["STACK"]),
              "shared_bytes": int(compiled.metadata.shared)}
    result.update(_key_loop_counts(sass, num_warps * 32 / (block_q * block_k)))
    return result


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)[^;]*?(?:0x([0-9a-f]+))?\s*;")
_SASS_GROUPS = {"shared": ("LDS", "STS", "LDSM", "STSM"), "barriers": ("BAR",), "shuffles": ("SHFL",),
                "tensor": ("HMMA", "HGMMA"), "local": ("LDL", "STL")}


def _key_loop_counts(sass: str, lanes_per_logit: float) -> dict:
    """Machine instructions of the key-block loop (the longest backward branch of the SASS),
    per logit of a tile: all of them, and those touching shared memory, barriers, shuffles,
    tensor-core products and spilled registers. Counts lanes (a warp instruction is 32), the
    issue budget a GPU must spend on each of the L x L pairs."""
    body = []
    lines = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_SASS_LINE.search, sass.splitlines()) if m]
    loops = [(int(target, 16), at) for at, op, target in lines if op == "BRA" and target and int(target, 16) < at]
    if loops:
        start, end = max(loops, key=lambda t: t[1] - t[0])
        body = [op for at, op, _ in lines if start <= at <= end]
    counts = {"loop_per_logit": len(body) * lanes_per_logit}
    for name, ops in _SASS_GROUPS.items():
        counts[f"{name}_per_logit"] = sum(op in ops for op in body) * lanes_per_logit
    return counts
