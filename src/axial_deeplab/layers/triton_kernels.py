"""Triton kernels for position-sensitive axial attention (``impl="triton"``): the
``@triton.jit`` code only. Choosing tiles and launching them is :mod:`.triton_launch`; the
per-GPU correctness check is :mod:`.triton_self_check`.

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
term scales (per-program partial sums). The math is the one of :mod:`.recompute`.

Tiles are compile-time arguments of both kernels: ``BLOCK_Q`` query rows and ``BLOCK_K``
keys (at least 16 each, as ``tl.dot`` needs) and ``JB``, the width of a tile's offset
window (:func:`offset_window`); the caller passes them explicitly. Triton is optional:
without it the kernels are None.
"""

from __future__ import annotations

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

__all__ = [
    "triton",
    "triton_available",
    "next_pow2",
    "offset_window",
    "kernel_constants",
    "axial_forward_kernel",
    "axial_backward_kernel",
]


def triton_available() -> bool:
    return triton is not None


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def offset_window(block_q: int, block_k: int, query_step: int = 1) -> int:
    """JB: width of a tile's offset window, a power of two >= the BLOCK_K + (BLOCK_Q - 1) * step
    offsets p - o its pairs take."""
    return next_pow2(block_k + (block_q - 1) * query_step)


def kernel_constants(dk: int, dv: int, terms, precision: str) -> dict:
    """The compile-time constants both kernels take, tiles aside (depths padded for ``tl.dot``);
    terms: (q.k, q.r^q, k.r^k, r^v) switched on; precision: ``tl.dot``'s input precision."""
    use_qk, use_qr, use_kr, use_rv = (bool(t) for t in terms)
    return dict(
        DK=dk,
        DV=dv,
        DKP=max(16, next_pow2(dk)),
        DVP=max(16, next_pow2(dv)),
        DOT=precision,
        USE_QK=use_qk,
        USE_QR=use_qr,
        USE_KR=use_kr,
        USE_RV=use_rv,
    )


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
    def _tile(qb, kb0, L, LQ, QSTEP, RADIUS, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, JB: tl.constexpr):
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
    def _tile_logits(
        q,
        kt,
        rq,
        rk,
        s_qk,
        s_qr,
        s_kr,
        u,
        inside,
        DOT: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_QK: tl.constexpr,
        USE_QR: tl.constexpr,
        USE_KR: tl.constexpr,
    ):
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
    def axial_forward_kernel(
        qkv,
        rqe,
        rke,
        rve,
        scale,
        sv,
        sve,
        lse,
        L,
        LQ,
        QSTEP,
        RADIUS,
        HEADS,
        C2H,
        DK: tl.constexpr,
        DV: tl.constexpr,
        DKP: tl.constexpr,
        DVP: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        JB: tl.constexpr,
        DOT: tl.constexpr,
        USE_QK: tl.constexpr,
        USE_QR: tl.constexpr,
        USE_KR: tl.constexpr,
        USE_RV: tl.constexpr,
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
            iq, o, p, mq, mk, inside, shift, col, mcol, u = _tile(qb, kb0, L, LQ, QSTEP, RADIUS, BLOCK_Q, BLOCK_K, JB)
            kt = tl.trans(_load_rows(base + DK * L, p, mk, ck, mck, L))  # (DKP, BLOCK_K)
            rq = _load_rows(rqe, col, mcol, ck, mck & USE_QR, J)  # (JB, DKP)
            rk = _load_rows(rke, col, mcol, ck, mck & USE_KR, J)
            z = _tile_logits(q, kt, rq, rk, s_qk, s_qr, s_kr, u, inside, DOT, BLOCK_Q, BLOCK_K, USE_QK, USE_QR, USE_KR)
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            e = tl.exp2(z - m_use[:, None])
            l_i = l_i * alpha + tl.sum(e, axis=1)
            v = _load_rows(base + 2 * DK * L, p, mk, cv, mcv, L)  # (BLOCK_K, DVP)
            acc = acc * alpha[:, None] + tl.dot(e, v, input_precision=DOT)
            if USE_RV:
                rv = _load_rows(rve, col, mcol, cv, mcv, J)  # (JB, DVP)
                acc_e = acc_e * alpha[:, None] + tl.dot(_to_offsets(e, shift, BLOCK_K, JB), rv, input_precision=DOT)
            m_i = m_new
        l_safe = tl.where(mq, l_i, 1.0)
        out_mask = mq[:, None] & mcv[None, :]
        out_at = (nh * DV + cv[None, :]) * LQ + iq[:, None]
        tl.store(sv + out_at, acc / l_safe[:, None], mask=out_mask)
        if USE_RV:
            tl.store(sve + out_at, acc_e / l_safe[:, None], mask=out_mask)
        tl.store(lse + nh * LQ + iq, tl.where(mq, m_i, 0.0) + tl.log2(l_safe), mask=mq)

    @triton.jit
    def axial_backward_kernel(
        qkv,
        rqe,
        rke,
        rve,
        scale,
        nscale,
        lse,
        delta,
        gsv,
        gsve,
        gqkv,
        grq_part,
        grk_part,
        grv_part,
        gscale_part,
        L,
        LQ,
        QSTEP,
        RADIUS,
        HEADS,
        C2H,
        SLOTS,
        DK: tl.constexpr,
        DV: tl.constexpr,
        DKP: tl.constexpr,
        DVP: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        JB: tl.constexpr,
        DOT: tl.constexpr,
        ATOMIC_KV: tl.constexpr,
        USE_QK: tl.constexpr,
        USE_QR: tl.constexpr,
        USE_KR: tl.constexpr,
        USE_RV: tl.constexpr,
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
            iq, o, p, mq, mk, inside, shift, col, mcol, u = _tile(qb, kb0, L, LQ, QSTEP, RADIUS, BLOCK_Q, BLOCK_K, JB)
            k = _load_rows(base + DK * L, p, mk, ck, mck, L)  # (BLOCK_K, DKP)
            kt = tl.trans(k)
            v = _load_rows(base + 2 * DK * L, p, mk, cv, mcv, L)  # (BLOCK_K, DVP)
            rq = _load_rows(rqe, col, mcol, ck, mck & USE_QR, J)  # (JB, DKP)
            rk = _load_rows(rke, col, mcol, ck, mck & USE_KR, J)
            z = _tile_logits(q, kt, rq, rk, s_qk, s_qr, s_kr, u, inside, DOT, BLOCK_Q, BLOCK_K, USE_QK, USE_QR, USE_KR)
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
                tl.atomic_add(
                    grq_part + slot * DK * J + ck[None, :] * J + col[:, None], g, mask=mcol[:, None] & mck[None, :]
                )
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
                tl.atomic_add(
                    grk_part + slot * DK * J + ck[None, :] * J + col[:, None], g, mask=mcol[:, None] & mck[None, :]
                )
            if USE_RV:
                g = tl.dot(tl.trans(_to_offsets(pr, shift, BLOCK_K, JB)), g2, input_precision=DOT)  # (JB, DVP)
                tl.atomic_add(
                    grv_part + slot * DV * J + cv[None, :] * J + col[:, None], g, mask=mcol[:, None] & mcv[None, :]
                )
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

else:  # pragma: no cover - depends on the environment
    axial_forward_kernel = axial_backward_kernel = None
