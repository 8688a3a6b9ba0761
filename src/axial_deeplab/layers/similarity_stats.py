"""The similarity BatchNorm's batch statistics in closed form, without any L x L logits.

Why: in training, ``bn_similarity`` normalises each (term, head) of the logits with the
mean and variance over every in-span (query, key) pair. Only the variance matters for the
output (the mean and the BN bias cancel in the softmax), and both are exact functions of
(d x d) Gram matrices, prefix sums and the compact tables, so the paths that never form
the logits (the chunked PyTorch path, the operators, the Triton kernels) get the same
statistics as the reference, with gradients to q, k and the tables by ordinary autograd
(:func:`similarity_moments`) or by a closed-form backward for position-major rows
(:class:`RowMoments`). :func:`similarity_scales` turns them into the per-(term, head)
multipliers every fast path applies, updating the running statistics as the reference does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .geometry import in_span_pairs, pair_table_rows, span_radius
from .sync import all_reduce_count, differentiable_all_reduce, should_sync

__all__ = ["similarity_moments", "similarity_moments_rows", "similarity_scales", "RowMoments"]


def similarity_moments(layer, q: torch.Tensor, k: torch.Tensor):
    """Exact sum and sum of squares over (sequences, in-span pairs) of each similarity
    term, per head, without forming any L x L logits.

    q, k: (N, heads, dk, L). Returns ``(sums, sumsq, count)`` with sums/sumsq of shape
    (3, heads) in float64 (term order qk, q.r^q, k.r^k; switched-off terms are 0).

    * q.k: sum = sum_o q_o . (sum_{p in span(o)} k_p); sum of squares =
      sum_o q_o^T (sum_{p in span(o)} k_p k_p^T) q_o (Gram matrices; windowed by
      prefix sums for a local span).
    * q.r^q and k.r^k: the same with the table rows each position meets, whose sums
      and Grams depend on positions only.
    """
    n, heads, dk, length = q.shape
    device = q.device
    r = span_radius(layer, length)
    pos = torch.arange(length, device=device)
    if r is None:
        mask = None
        pairs = length * length
    else:
        mask = ((pos[None, :] - pos[:, None]).abs() <= r).to(torch.float64)  # (o, p)
        pairs = in_span_pairs(length, r)
    count = n * pairs
    qd, kd = q.to(torch.float64), k.to(torch.float64)
    zero = qd.new_zeros(heads)
    sums, sumsq = [zero, zero, zero], [zero, zero, zero]

    if layer.use_qk:
        if r is None:
            sums[0] = (qd.sum(-1) * kd.sum(-1)).sum(-1).sum(0)
            gq = _channel_gram(qd, qd)  # (N, h, dk, dk)
            gk = _channel_gram(kd, kd)
            sumsq[0] = (gq * gk).sum((-1, -2)).sum(0)
        else:
            lo = (pos - r).clamp(min=0)
            hi = (pos + r + 1).clamp(max=length)
            kc = F.pad(kd.cumsum(-1), (1, 0))  # (N, h, dk, L+1)
            kwin = kc[..., hi] - kc[..., lo]
            sums[0] = (qd * kwin).sum((-1, -2)).sum(0)
            sumsq[0] = _windowed_gram_quadratic(qd, kd, lo, hi)

    if layer.use_query_rpe or layer.use_key_rpe:
        # How often each table row meets each query (rows of `per_query`) or key
        # (`per_key`) among the in-span pairs: the table-side sums and Grams are then
        # one (L x rows) @ (rows x d*d) product each.
        idx = pair_table_rows(pos, pos, layer.max_relative_distance)  # (o, p)
        weight = mask if mask is not None else torch.ones(length, length, dtype=torch.float64, device=device)
        rows = layer.table_rows
        per_query = torch.zeros(length, rows, dtype=torch.float64, device=device).scatter_add_(1, idx, weight)
        per_key = torch.zeros(length, rows, dtype=torch.float64, device=device).scatter_add_(1, idx.t(), weight.t())
    if layer.use_query_rpe:
        sums[1], sumsq[1] = _table_moments(qd, layer.query_table, per_query)
    if layer.use_key_rpe:
        sums[2], sumsq[2] = _table_moments(kd, layer.key_table, per_key)
    return torch.stack(sums), torch.stack(sumsq), count


# The statistics are float64 contractions over small d x d blocks. Each is written as
# one contraction (one batched product) rather than per-channel elementwise passes:
# broadcast float64 products are slow on CPU, and every extra operator is one more
# parallel region (costly when the threads share cores with other work).
def _position_quadratic(x: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """sum_{n, o} x_o^T G_o x_o per head for x (N, h, d, L) and G (L, d, d)."""
    n, heads, d, length = x.shape
    xo = x.permute(3, 0, 1, 2).reshape(length, n * heads, d).contiguous()
    gx = torch.einsum("lnd,lcd->lnc", xo, gram)  # (L, N*h, d): G_o x_o
    return (gx * xo).sum(-1).view(length, n, heads).sum((0, 1))


def _table_moments(x: torch.Tensor, table: torch.Tensor, counts: torch.Tensor):
    """Sum and sum of squares of x_o . r_j over the (position o, table row j) pairs that
    ``counts`` (L, rows) enumerate with multiplicity; x (N, h, d, L), table (d, rows)."""
    n, heads, d, length = x.shape
    t = table.to(torch.float64)
    row_sum = counts @ t.t()  # (L, d): sum of the rows each position meets
    outer = (t.t()[:, :, None] * t.t()[:, None, :]).reshape(-1, d * d)  # (rows, d*d)
    gram = (counts @ outer).view(length, d, d)  # (L, d, d)
    sums = torch.einsum("nhco,oc->h", x, row_sum)
    return sums, _position_quadratic(x, gram)


def _channel_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., c, L) x (..., e, L) -> (..., c, e): sums over the last dim of a_c * b_e."""
    return torch.einsum("...cl,...el->...ce", a, b)


def _windowed_gram_quadratic(qd, kd, lo, hi, budget: int = 1 << 22):
    """sum_{n,o} q_o^T (sum_{p=lo(o)}^{hi(o)-1} k_p k_p^T) q_o per head, in chunks of
    sequences so the (N, h, L, dk, dk) prefix Grams never exist whole."""
    n, heads, dk, length = qd.shape
    per_seq = heads * (length + 1) * dk * dk
    if torch.compiler.is_compiling():  # traced: one chunk (a loop over a symbolic batch would specialise)
        return _gram_chunk(qd, kd, lo, hi)
    step = max(1, budget // max(per_seq, 1))
    total = qd.new_zeros(heads)
    for s in range(0, n, step):
        qc, kc = qd[s : s + step], kd[s : s + step]
        if torch.is_grad_enabled() and (qc.requires_grad or kc.requires_grad):
            total = total + torch.utils.checkpoint.checkpoint(_gram_chunk, qc, kc, lo, hi, use_reentrant=False)
        else:
            total = total + _gram_chunk(qc, kc, lo, hi)
    return total


def _gram_chunk(qc, kc, lo, hi):
    outer = kc[:, :, :, None, :] * kc[:, :, None, :, :]  # (n, h, dk, dk, L): k_p k_p^T
    pref = F.pad(outer.cumsum(-1), (1, 0))  # prefix sums over positions
    win = pref[..., hi] - pref[..., lo]  # (n, h, dk, dk, L): sum over the window of o
    return torch.einsum("nhco,nhcdo,nhdo->h", qc, win, qc)


def _table_counts(layer, length: int, device):
    """(L, rows) counts of how often each table row meets each query / each key among
    the pairs of a global span."""
    pos = torch.arange(length, device=device)
    idx = pair_table_rows(pos, pos, layer.max_relative_distance)
    ones = torch.ones(length, length, dtype=torch.float64, device=device)
    zeros = torch.zeros(length, layer.table_rows, dtype=torch.float64, device=device)
    return zeros.scatter_add(1, idx, ones), zeros.scatter_add(1, idx.t(), ones)


class RowMoments(torch.autograd.Function):
    """:func:`similarity_moments` of a global span for the position-major projection
    ``y`` (N*L, heads*(2dk+dv)) (q and k read from it), with a closed-form backward that
    writes the gradient of ``y`` in its own layout. Returns (sums, sumsq) (3, heads) float64.

    Per head, with Gx_n = sum_o x_no x_no^T (Gram matrices over positions, one batched
    product over (n, h)), X_o = sum_n x_no x_no^T (over sequences, batched over (o, h)),
    R_o = sum_j counts[o, j] t_j and T_o = sum_j counts[o, j] t_j t_j^T:
    sum(q.k) = sum_n (sum_o q_no) . (sum_p k_np), sumsq(q.k) = sum_n <Gq_n, Gk_n>,
    sum(x.r) = sum_o (sum_n x_no) . R_o, sumsq(x.r) = sum_o <X_o, T_o>;
    the derivatives follow term by term (d sumsq(q.k) / d q_no = 2 Gk_n q_no, etc.)."""

    @staticmethod
    def forward(ctx, y, query_table, key_table, layer, nseq, length):
        heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
        y4 = y.view(nseq, length, heads, 2 * dk + dv)
        f64, d2 = torch.float64, 2 * dk
        zero = y.new_zeros(heads, dtype=f64)
        sums, sumsq = [zero, zero, zero], [zero, zero, zero]
        on_table = (layer.use_query_rpe and query_table is not None, layer.use_key_rpe and key_table is not None)
        saved = {}
        qk = y4[..., :d2]  # q and k channels together: one copy and one product for both
        if layer.use_qk:  # (N, h, 2d, L): Grams batched over (n, h)
            xt32 = torch.empty(nseq, heads, d2, length, dtype=y.dtype).copy_(qk.permute(0, 2, 3, 1))
            xt = xt32.to(f64)
            gram = torch.bmm(xt.view(-1, d2, length), xt.view(-1, d2, length).transpose(1, 2))
            gram = gram.view(nseq, heads, d2, d2)
            xs = xt.sum(-1)  # (N, h, 2d)
            sums[0] = (xs[..., :dk] * xs[..., dk:]).sum((0, 2))
            sumsq[0] = (gram[..., :dk, :dk] * gram[..., dk:, dk:]).sum((0, 2, 3))
            saved["seq"] = (xt32, xs, gram)  # the backward is float32: its products are 10x faster
        if any(on_table):  # (L, h, 2d, N): Grams batched over (o, h)
            counts = _table_counts(layer, length, y.device)
            xl32 = torch.empty(length, heads, d2, nseq, dtype=y.dtype).copy_(qk.permute(1, 2, 3, 0))
            xl = xl32.to(f64)
            xx = torch.bmm(xl.view(-1, d2, nseq), xl.view(-1, d2, nseq).transpose(1, 2)).view(length, heads, d2, d2)
            xsum = xl.sum(-1)  # (L, h, 2d)
            saved["pos"] = (xl32, xsum, xx, counts)
            for t, table in ((1, query_table), (2, key_table)):
                if not on_table[t - 1]:
                    continue
                c = slice(0, dk) if t == 1 else slice(dk, d2)
                tab = table.detach().to(f64)
                row_sum = counts[t - 1] @ tab.t()  # (L, d)
                outer = (tab.t()[:, :, None] * tab.t()[:, None, :]).reshape(-1, dk * dk)
                tgram = (counts[t - 1] @ outer).view(length, 1, dk, dk)  # (L, 1, d, d)
                sums[t] = (xsum[..., c] * row_sum[:, None, :]).sum((0, 2))
                sumsq[t] = (xx[..., c, c] * tgram).sum((0, 2, 3))
                saved[t] = (tab, row_sum, tgram)
        ctx.layer, ctx.nseq, ctx.length, ctx.saved, ctx.y_dtype = layer, nseq, length, saved, y.dtype
        return torch.stack(sums), torch.stack(sumsq)

    @staticmethod
    def backward(ctx, g_sums, g_sumsq):
        layer, nseq, length, saved = ctx.layer, ctx.nseq, ctx.length, ctx.saved
        heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
        f64, d2 = torch.float64, 2 * dk
        g_sums = torch.zeros(3, heads, dtype=f64) if g_sums is None else g_sums.to(f64)
        g_sumsq = torch.zeros(3, heads, dtype=f64) if g_sumsq is None else g_sumsq.to(f64)
        g = None
        if "seq" in saved:  # d/dq_no = a K_n + 2 b Gk_n q_no, d/dk_np = a Q_n + 2 b Gq_n k_np
            xt, xs, gram = saved["seq"]
            a, b = g_sums[0].view(1, heads, 1), 2 * g_sumsq[0].view(1, heads, 1, 1)
            w = torch.zeros_like(gram)
            w[..., :dk, :dk] = gram[..., dk:, dk:] * b
            w[..., dk:, dk:] = gram[..., :dk, :dk] * b
            gt = torch.bmm(w.view(-1, d2, d2).to(xt.dtype), xt.view(-1, d2, length)).view(xt.shape)
            gt += (xs.roll(dk, -1) * a).unsqueeze(-1).to(xt.dtype)
            g = gt.permute(0, 3, 1, 2)  # (N, L, h, 2d) view
        g_tables = [None, None]
        if "pos" in saved:  # d/dx_no = a R_o + 2 b T_o x_no
            xl, xsum, xx, counts = saved["pos"]
            w = xx.new_zeros(length, heads, d2, d2)
            shift = xx.new_zeros(length, heads, d2)
            for t in (1, 2):
                if t not in saved:
                    continue
                c = slice(0, dk) if t == 1 else slice(dk, d2)
                tab, row_sum, tgram = saved[t]
                a, b = g_sums[t], 2 * g_sumsq[t]
                w[..., c, c] = tgram * b.view(1, heads, 1, 1)
                shift[..., c] = row_sum[:, None, :] * a.view(1, heads, 1)
                # d/dt_j = sum_o counts[o, j] (sum_h a_h xsum_oh + 2 sum_h b_h X_oh t_j)
                cnt = counts[t - 1]
                g_tab = (cnt.t() @ (xsum[..., c] * a.view(1, heads, 1)).sum(1)).t()  # (d, rows)
                xb = (xx[..., c, c] * b.view(1, heads, 1, 1)).sum(1).reshape(length, -1)
                m = (cnt.t() @ xb).view(-1, dk, dk)
                g_tab = g_tab + torch.bmm(m, tab.t().unsqueeze(-1)).squeeze(-1).t()
                g_tables[t - 1] = g_tab.to(ctx.y_dtype)
            gl = torch.bmm(w.view(-1, d2, d2).to(xl.dtype), xl.view(-1, d2, nseq)).view(xl.shape)
            gl += shift.unsqueeze(-1).to(xl.dtype)
            gl = gl.permute(3, 0, 1, 2)  # (N, L, h, 2d) view
            g = gl if g is None else g + gl
        g_y = torch.zeros(nseq, length, heads, 2 * dk + dv, dtype=ctx.y_dtype)
        if g is not None:
            g_y[..., :d2] = g
        g_rq = g_tables[0] if ctx.needs_input_grad[1] else None
        g_rk = g_tables[1] if ctx.needs_input_grad[2] else None
        return g_y.view(nseq * length, -1), g_rq, g_rk, None, None, None


def similarity_moments_rows(layer, y: torch.Tensor, nseq: int, length: int):
    """:func:`similarity_moments` for the position-major projection ``y`` (N*L, C2):
    the closed-form-backward :class:`RowMoments` for a global span, else the general
    function on strided views."""
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    if span_radius(layer, length) is None:
        sums, sumsq = RowMoments.apply(y, layer.query_table, layer.key_table, layer, nseq, length)
        return sums, sumsq, nseq * length * length
    qkv4 = y.view(nseq, length, heads, 2 * dk + dv).permute(0, 2, 3, 1)  # (N, heads, c2h, L) view
    return similarity_moments(layer, qkv4[:, :, :dk], qkv4[:, :, dk : 2 * dk])


def _at_least_one(n):
    """max(n, 1) for an int, a SymInt (no guard on a symbolic size) or a tensor (summed counts)."""
    return n.clamp(min=1) if isinstance(n, torch.Tensor) else torch.sym_max(n, 1)


def similarity_scales(layer, q: Optional[torch.Tensor], k: Optional[torch.Tensor], moments=None) -> torch.Tensor:
    """Per (term, head) multipliers a_t = gamma_t / sqrt(var_t + eps) of the similarity
    BN, shape (3, heads); the BN shifts cancel in the softmax. In training the batch
    variance over in-span pairs is used and the running statistics are updated exactly
    as :func:`.reference.masked_batch_norm` does (switched-off terms see zeros).
    ``moments``: a callable giving (sums, sumsq, count) in place of
    ``similarity_moments(layer, q, k)``."""
    bn = layer.bn_similarity
    heads = layer.num_heads
    dtype = layer.bn_similarity.weight.dtype if q is None else q.dtype
    if bn.training or bn.running_mean is None:
        sums, sumsq, count = similarity_moments(layer, q, k) if moments is None else moments()
        if should_sync(layer):  # DDP: statistics of the global batch
            sums = differentiable_all_reduce(sums)
            sumsq = differentiable_all_reduce(sumsq)
            count = all_reduce_count(count)
        mean = sums / count
        var = (sumsq / count - mean * mean).clamp(min=0.0)  # biased, as BN normalises with
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                bn.num_batches_tracked += 1
                f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                m = mean.detach().reshape(-1).to(bn.running_mean.dtype)
                v = (var.detach() * count / _at_least_one(count - 1)).reshape(-1).to(bn.running_var.dtype)
                bn.running_mean.mul_(1 - f).add_(f * m)
                bn.running_var.mul_(1 - f).add_(f * v)
        var = var.to(dtype).reshape(3, heads)
    else:
        var = bn.running_var.reshape(3, heads).to(dtype)
    scales = bn.weight.reshape(3, heads).to(dtype) * torch.rsqrt(var + bn.eps)
    # The BN bias cancels in the softmax; keep it in the graph so it gets an exact zero
    # gradient (as in the reference) rather than None, which optimisers treat differently.
    return scales + 0.0 * bn.bias.reshape(3, heads).to(dtype)
