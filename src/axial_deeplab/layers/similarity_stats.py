"""The similarity BatchNorm's batch statistics in closed form, without any L x L logits.

Why: in training, ``bn_similarity`` normalises each (term, head) of the logits with the
mean and variance over every in-span (query, key) pair. Only the variance matters for the
output (the mean and the BN bias cancel in the softmax), and both are exact functions of
(d x d) Gram matrices, prefix sums and the compact tables, so the paths that never form
the logits (the chunked PyTorch path, the operators, the Triton kernels) get the same
statistics as the reference. A global span uses (d x d) Gram matrices (:class:`RowMoments`
for position-major rows, with a closed-form backward); a local span forms its in-span logits
block by block in the input's dtype, centred on each sequence's exact float64 mean so that
no cancellation can cost the variance digits, with a closed-form backward that recomputes
them (:class:`BandMoments`). :func:`similarity_scales` turns the moments into the
per-(term, head) multipliers every fast path applies, updating the running statistics as
the reference does.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn.functional as F

from . import cpu_kernel, moment_ops
from .activation_recompute import reused
from .geometry import in_span_pairs, normalised, pair_table_rows, span_radius
from .sync import all_reduce_count, differentiable_all_reduce, should_sync

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__ = [
    "similarity_moments",
    "similarity_moments_rows",
    "similarity_scales",
    "RowMoments",
    "BandMoments",
    "BandMomentsOp",
    "BandMomentsRowsOp",
    "band_moments_rows",
    "band_moments_backward_rows",
]


def similarity_moments(layer: PositionSensitiveAxialAttention, q: torch.Tensor, k: torch.Tensor):
    """Exact sum and sum of squares over (sequences, in-span pairs) of each similarity
    term, per head, without forming any L x L logits.

    q, k: (N, heads, dk, L). Returns ``(sums, sumsq, count)`` with sums/sumsq of shape
    (3, heads) in float64 (term order qk, q.r^q, k.r^k; switched-off terms are 0).

    * global span: q.k sum = sum_o q_o . (sum_p k_p), sum of squares =
      sum_o q_o^T (sum_p k_p k_p^T) q_o (Gram matrices); q.r^q and k.r^k the same with the
      table rows each position meets, whose sums and Grams depend on positions only.
    * local span (eager): :class:`BandMoments`, the in-span logits block by block (L x ~1.5
      span per head, never L x L); traced by torch.compile, the same C band walk as operators
      (:class:`BandMomentsOp`) where it can run, else the windowed Gram form below (prefix sums
      of k_p k_p^T), which has no data-dependent loop.
    """
    n, heads, dk, length = q.shape
    device = q.device
    r = span_radius(layer, length)
    if r is not None and (not torch.compiler.is_compiling() or moment_ops.band_kernel_applies(q)):
        return _local_moments(layer, q, k, r)
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


def _table_counts(layer: PositionSensitiveAxialAttention, length: int, device):
    """(L, rows) counts of how often each table row meets each query / each key among
    the pairs of a global span."""
    pos = torch.arange(length, device=device)
    idx = pair_table_rows(pos, pos, layer.max_relative_distance)
    ones = torch.ones(length, length, dtype=torch.float64, device=device)
    zeros = torch.zeros(length, layer.table_rows, dtype=torch.float64, device=device)
    return zeros.scatter_add(1, idx, ones), zeros.scatter_add(1, idx.t(), ones)


@functools.lru_cache(maxsize=64)
def _cached_counts(length: int, reach: int, rows: int, lo: int, hi: int, device: torch.device):
    """:func:`_table_counts` columns [lo, hi), kept per geometry (they depend on positions only;
    read, never written, by their users)."""
    pos = torch.arange(length, device=device)
    idx = pair_table_rows(pos, pos, reach)
    ones = torch.ones(length, length, dtype=torch.float64, device=device)
    zeros = torch.zeros(length, rows, dtype=torch.float64, device=device)
    # (2, L, hi - lo): [per query, per key], the two tables' products then batched
    return torch.stack([zeros.scatter_add(1, idx, ones), zeros.scatter_add(1, idx.t(), ones)])[:, :, lo:hi].contiguous()


class RowMoments(torch.autograd.Function):
    """:func:`similarity_moments` of a global span for the position-major projection
    ``y`` (N*L, heads*(2dk+dv)) (q and k read from it), with a closed-form backward that
    writes the gradient of ``y`` in its own layout. Returns (sums, sumsq) (3, heads) float64.

    Per head, with Gx_n = sum_o x_no x_no^T (Gram matrices over positions, batched over
    (n, h)), X_o = sum_n x_no x_no^T (over sequences, batched over (h, o)),
    R_o = sum_j counts[o, j] t_j and T_o = sum_j counts[o, j] t_j t_j^T:
    sum(q.k) = sum_n (sum_o q_no) . (sum_p k_np), sumsq(q.k) = sum_n <Gq_n, Gk_n>,
    sum(x.r) = sum_o (sum_n x_no) . R_o, sumsq(x.r) = sum_o <X_o, T_o>;
    the derivatives follow term by term (d sumsq(q.k) / d q_no = 2 Gk_n q_no, etc.).

    Only the q-q and k-k blocks of the Grams enter (no q-k cross terms), kept as (..., 2, dk, dk).
    On CPU in float32 the compiled kernel (:func:`.cpu_kernel.row_moments`) forms both families
    in one pass over ``y`` each, accumulating the float32 products (exact in float64) in float64,
    and its backward (:func:`.cpu_kernel.row_moments_backward`) reads q and k from ``y`` again:
    no copies at all (the eager PyTorch version below spent most of its time on them and on
    batched products of tiny matrices). Elsewhere, q and k are read from ``y`` once per family
    of Grams, straight into float64 (float32
    products are exact there, so the Grams are exact up to float64 rounding) and into the
    layout in which that family's blocks are contiguous (L, 2dk) or (N, 2dk) matrices:
    (N, h, L, 2dk) for the Grams over positions, (h, L, N, 2dk) for those over sequences.
    Copies whose innermost run is 2dk channels cost a fraction of the transposing ones
    (positions or sequences innermost), and the products then run on contiguous blocks. The
    backward runs its products on the same copies in the input's dtype (float32 products
    run twice as fast as float64 ones) and writes the gradient of ``y`` with
    one strided pass."""

    @staticmethod
    def forward(ctx, y, query_table, key_table, layer, nseq, length, source=None, affine=None):
        heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
        y4 = y.detach().view(nseq, length, heads, 2 * dk + dv)
        f64, d2 = torch.float64, 2 * dk
        zero = y.new_zeros(heads, dtype=f64)
        sums, sumsq = [zero, zero, zero], [zero, zero, zero]
        on_table = (layer.use_query_rpe and query_table is not None, layer.use_key_rpe and key_table is not None)
        saved = {}
        x = None
        # the compiled kernel forms both families of Grams in float64 straight from y (no copies)
        # (traced: through its operator, which torch.compile sees)
        grams = moment_ops if torch.compiler.is_compiling() else cpu_kernel
        fast = grams.row_moments(y, nseq, length, heads, dk, layer.use_qk, any(on_table))
        if layer.use_qk and fast is not None:
            gram, xsum = fast[0]
        elif layer.use_qk:  # (N*h, 2d, 2d) Grams over positions; q and k together: one copy for both
            x = _sequence_copy(y4, d2, f64)
            xs = x.view(nseq * heads, length, d2)
            gram = _diagonal_blocks(torch.bmm(xs.transpose(1, 2), xs).view(nseq, heads, d2, d2), dk)
            xsum = x.sum(2)  # (N, h, 2d)
        if layer.use_qk:  # gram (N, h, 2, d, d): [Gq_n, Gk_n]
            sums[0] = (xsum[..., :dk] * xsum[..., dk:]).sum((0, 2))
            sumsq[0] = (gram[:, :, 0] * gram[:, :, 1]).sum((0, 2, 3))
            # kept for the backward in the input's dtype: float64 Grams would hold ~10% of an
            # Axial-DeepLab-S training step's peak; the backward's products are in that dtype anyway
            saved["seq"] = (xsum.to(y.dtype), gram.to(y.dtype))
        if any(on_table):  # (h*L, 2d, 2d) Grams over sequences
            # only the rows of offsets -(L-1)..L-1 meet any pair: the other rows of a long table
            # (509 by default) would cost products of zeros
            reach = layer.max_relative_distance
            lo, hi = max(0, reach - (length - 1)), min(layer.table_rows, reach + length)
            if torch.compiler.is_compiling():  # traced: graph operations (a cache would hold fake tensors)
                counts = torch.stack(_table_counts(layer, length, y.device))[:, :, lo:hi]
            else:
                counts = _cached_counts(length, reach, layer.table_rows, lo, hi, y.device)  # (2, L, w)
            ctx.row_range = (lo, hi, layer.table_rows)
            # both tables in batched products, a switched-off one as zeros (its sums, Grams and
            # gradients are then exact zeros): few operations, whatever the number of terms
            tab_q = query_table.detach()[:, lo:hi] if on_table[0] else None
            tab_k = key_table.detach()[:, lo:hi] if on_table[1] else None
            tabs = torch.stack(
                [
                    tab_q if tab_q is not None else torch.zeros_like(tab_k),
                    tab_k if tab_k is not None else torch.zeros_like(tab_q),
                ]
            ).to(f64)  # (2, d, w)
            tabs_t = tabs.transpose(1, 2)  # (2, w, d)
            row_sum2 = torch.bmm(counts, tabs_t)  # (2, L, d): [R^q_o, R^k_o]
            outer = (tabs_t.unsqueeze(-1) * tabs_t.unsqueeze(-2)).view(2, -1, dk * dk)
            tgram = torch.bmm(counts, outer).view(2, length, dk, dk).transpose(0, 1)  # (L, 2, d, d): [T^q_o, T^k_o]
            row_sum = row_sum2.transpose(0, 1).reshape(length, d2)  # (L, 2d)
            if fast is not None:
                xp, (xx, xsum_p) = None, fast[1]
            else:
                xp = _position_copy(y4, d2, f64)
                xx = torch.bmm(xp.view(-1, nseq, d2).transpose(1, 2), xp.view(-1, nseq, d2))
                xx = _diagonal_blocks(xx.view(heads, length, d2, d2), dk)  # (h, L, 2, d, d)
                xsum_p = xp.sum(2)  # (h, L, 2d)
            sums[1], sums[2] = (xsum_p * row_sum).view(heads, length, 2, dk).sum((1, 3)).t()
            sumsq[1], sumsq[2] = (xx * tgram).sum((1, 3, 4)).t()
            # the backward's products run in the input's dtype (float32 ones are twice as fast), so
            # the copies are kept in it: float64 ones would double the memory held for the backward
            saved["pos"] = (
                None if xp is None else xp.to(y.dtype),
                xx.to(y.dtype),
                xsum_p.to(y.dtype),
                row_sum,
                tgram,
                counts,
                tabs,
                on_table,
            )
        ctx.layer, ctx.nseq, ctx.length, ctx.saved, ctx.y_dtype = layer, nseq, length, saved, y.dtype
        ctx.x, ctx.device = None if x is None else x.to(y.dtype), y.device
        # the kernel's backward reads q and k from y itself (saved, not held, so that saved-tensor hooks
        # see it), or with ``source`` (y = affine[0] * source + affine[1], a BatchNorm's output) from the
        # BatchNorm's input, which that BatchNorm keeps anyway, the affine terms applied as it reads
        kept = (y, None) if source is None or affine is None else (source, affine)
        ctx.save_for_backward(*(kept if fast is not None else (None, None)))
        return torch.stack(sums), torch.stack(sumsq)

    @staticmethod
    def backward(ctx, g_sums, g_sumsq):
        layer, nseq, length, saved = ctx.layer, ctx.nseq, ctx.length, ctx.saved
        heads, dk = layer.num_heads, layer.key_depth
        f64, d2 = torch.float64, 2 * dk
        dev, dtype = ctx.device, ctx.y_dtype
        g_sums = torch.zeros(3, heads, dtype=f64, device=dev) if g_sums is None else g_sums.to(f64)
        g_sumsq = torch.zeros(3, heads, dtype=f64, device=dev) if g_sumsq is None else g_sumsq.to(f64)
        # d/dx_no = x_no (ws_n + wp_o) + cs_n + cp_o per head: ws, cs from the Grams over positions,
        # wp, cp from those over sequences (x_no^T W = (W^T x_no)^T, every W symmetric)
        ws = cs = tp = bp = cp = None
        if "seq" in saved:  # d/dq_no = a K_n + 2 b Gk_n q_no, d/dk_np = a Q_n + 2 b Gq_n k_np
            xsum, gram = saved["seq"]
            a, b = g_sums[0].view(1, heads, 1), 2 * g_sumsq[0].view(1, heads, 1, 1)
            ws = gram.flip(2) * b.unsqueeze(-1)  # (N, h, 2, d, d): [b Gk_n, b Gq_n]
            cs = xsum.roll(dk, -1) * a  # (N, h, 2d)
        g_tables = [None, None]
        xp = None
        if "pos" in saved:  # d/dx_no = a R_o + 2 b T_o x_no
            xp, xx, xsum_p, row_sum, tgram, counts, tabs, on_table = saved["pos"]
            coef = torch.stack([g_sums[1:], 2 * g_sumsq[1:]])  # (a or 2b, term, head)
            if not all(on_table):  # a switched-off term contributes nothing
                coef[:, on_table.index(False)] = 0.0
            a_t, b_t = coef[0].t(), coef[1].t()  # (h, 2) per (head, term)
            a_hc = a_t.unsqueeze(-1).expand(heads, 2, dk).reshape(heads, d2)  # per (head, channel)
            b_hc = b_t.unsqueeze(-1).expand(heads, 2, dk).reshape(heads, d2)
            # d/dt_j = sum_o counts[o, j] (sum_nh a_h x_no + sum_nh 2 b_h x_no x_no^T t_j), both tables batched
            a_x = (xsum_p * a_hc[:, None, :]).sum(0)  # (L, 2d)
            xb = (xx * b_t.view(heads, 1, 2, 1, 1)).sum(0)  # (L, 2, d, d)
            cnt_t = counts.transpose(1, 2)  # (2, w, L)
            m = torch.bmm(cnt_t, xb.transpose(0, 1).reshape(2, length, dk * dk)).view(2, -1, dk, dk)
            tab_rows = tabs.transpose(1, 2).unsqueeze(-1)  # (2, w, d, 1)
            g_tab = torch.bmm(cnt_t, a_x.view(length, 2, dk).transpose(0, 1)) + (m @ tab_rows).squeeze(-1)  # (2, w, d)
            lo, hi, rows = ctx.row_range
            for t in (0, 1):
                if on_table[t]:
                    g_tables[t] = F.pad(g_tab[t].t(), (lo, rows - hi)).to(dtype)
            # x_no^T (T_o diag(2b_h)) = 2b_h T_o x_no (T_o symmetric), batched over (h, o)
            tp, bp = tgram, b_hc
            cp = row_sum[None] * a_hc[:, None, :]  # (h, L, 2d)
        g_rq = g_tables[0] if ctx.needs_input_grad[1] else None
        g_rk = g_tables[1] if ctx.needs_input_grad[2] else None
        g_y = None
        y, affine = ctx.saved_tensors
        y = None if y is None else y.detach()
        if y is not None and affine is not None and not torch.compiler.is_compiling():
            g_y = cpu_kernel.row_moments_backward(y, nseq, length, heads, dk, ws, cs, tp, bp, cp, affine.detach())
            if g_y is None:  # the kernel refused: the BatchNorm's output formed again
                y = normalised(y, affine[0], affine[1]).detach()
        elif y is not None:
            grams = moment_ops if torch.compiler.is_compiling() else cpu_kernel
            g_y = grams.row_moments_backward(y, nseq, length, heads, dk, ws, cs, tp, bp, cp)
        if g_y is None:
            g_y = _rows_gradient(ctx, y, ws, cs, tp, bp, cp, xp)
        return g_y.view(nseq * length, -1), g_rq, g_rk, None, None, None, None, None


def _diagonal_blocks(g: torch.Tensor, dk: int) -> torch.Tensor:
    """(..., 2d, 2d) -> (..., 2, d, d): the q-q and k-k blocks of Grams of [q, k]."""
    return torch.stack([g[..., :dk, :dk], g[..., dk:, dk:]], -3)


def _block_diagonal(b: torch.Tensor) -> torch.Tensor:
    """(..., 2, d, d) -> (..., 2d, 2d) with zero off-diagonal blocks."""
    dk = b.shape[-1]
    out = b.new_zeros(*b.shape[:-3], 2 * dk, 2 * dk)
    out[..., :dk, :dk] = b[..., 0, :, :]
    out[..., dk:, dk:] = b[..., 1, :, :]
    return out


def _sequence_copy(y4: torch.Tensor, d2: int, dtype) -> torch.Tensor:
    """(N, L, h, c2h) rows -> (N, h, L, 2d) copy of [q, k]: the (n, h) blocks contiguous."""
    nseq, length, heads, _ = y4.shape
    x = torch.empty(nseq, heads, length, d2, dtype=dtype, device=y4.device)
    x.permute(0, 2, 1, 3).copy_(y4[..., :d2])
    return x


def _position_copy(y4: torch.Tensor, d2: int, dtype) -> torch.Tensor:
    """(N, L, h, c2h) rows -> (h, L, N, 2d) copy of [q, k]: the (h, o) blocks contiguous."""
    nseq, length, heads, _ = y4.shape
    xp = torch.empty(heads, length, nseq, d2, dtype=dtype, device=y4.device)
    xp.permute(2, 1, 0, 3).copy_(y4[..., :d2])
    return xp


def _rows_gradient(ctx, y, ws, cs, tp, bp, cp, xp) -> torch.Tensor:
    """:class:`RowMoments`' gradient of y (N, L, h, c2h) in PyTorch: batched products on the
    copies of [q, k] (kept by the forward, or made again from y when the kernel made the
    Grams), in the input's dtype, written into y's layout with one strided pass."""
    layer, nseq, length, dtype = ctx.layer, ctx.nseq, ctx.length, ctx.y_dtype
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    d2 = 2 * dk
    y4 = None if y is None else y.view(nseq, length, heads, d2 + dv)
    gx = gp = None
    if ws is not None:
        x = ctx.x if ctx.x is not None else _sequence_copy(y4, d2, dtype)
        w = _block_diagonal(ws).to(dtype).view(-1, d2, d2)
        gx = torch.bmm(x.view(nseq * heads, length, d2), w)
        gx = gx.view(nseq, heads, length, d2)
        gx += cs.to(dtype).unsqueeze(2)
    if tp is not None:
        xp = xp if xp is not None else _position_copy(y4, d2, dtype)
        wp = (_block_diagonal(tp)[None] * bp[:, None, None, :]).to(dtype)  # (h, L, 2d, 2d)
        gp = torch.bmm(xp.view(-1, nseq, d2), wp.view(-1, d2, d2)).view(heads, length, nseq, d2)
        gp += cp.to(dtype).unsqueeze(2)
        gp = gp.permute(2, 1, 0, 3)  # (N, L, h, 2d) view
    g_y = torch.empty(nseq, length, heads, d2 + dv, dtype=dtype, device=ctx.device)
    g_y[..., d2:] = 0
    g_qk = g_y[..., :d2]  # written with one strided pass
    if gx is not None and gp is not None and torch.compiler.is_compiling():
        g_qk.copy_(gx.transpose(1, 2) + gp)  # Dynamo refuses a non-contiguous out=
    elif gx is not None and gp is not None:
        torch.add(gx.transpose(1, 2), gp, out=g_qk)
    elif gx is not None:
        g_qk.copy_(gx.transpose(1, 2))
    elif gp is not None:
        g_qk.copy_(gp)
    else:
        g_qk.zero_()
    return g_y


# --------------------------------------------------------------------------- local span
# Budget (elements) of one chunk's block of in-span logits in the banded products: 1 MB in
# float32, so the few passes over a block stay in a core's L2 cache.
BAND_CHUNK_ELEMENTS = 1 << 18


def _local_moments(
    layer: PositionSensitiveAxialAttention,
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    r: int,
    rows=None,
    source: Optional[torch.Tensor] = None,
    affine: Optional[torch.Tensor] = None,
):
    """:func:`similarity_moments` of a local span of radius r < L - 1: q.k from the band of
    in-span logits (:class:`BandMoments`; traced by torch.compile, the same C band walk as
    operators, :class:`BandMomentsOp`, on q and k views); q.r^q and k.r^k the same way for deep
    heads one at a time, else (d*d small against the span, or heads in groups of eight up to
    d = 32: :func:`.cpu_kernel.band_tables_by_band`) from position-only table Grams (d x d per
    position, shared by every sequence). ``source``, ``affine``: as in :func:`similarity_moments_rows`."""
    n, heads, d, length = q.shape if rows is None else (rows[0], rows[2], rows[3], rows[1])
    tables = (
        layer.query_table if layer.use_query_rpe else None,
        layer.key_table if layer.use_key_rpe else None,
    )
    by_band = cpu_kernel.band_tables_by_band(d, r, heads)
    if torch.compiler.is_compiling() and rows is not None:
        sums, sumsq = BandMomentsRowsOp.apply(q, *tables, *rows[:4], layer.use_qk, r, by_band)
    elif torch.compiler.is_compiling():
        sums, sumsq = BandMomentsOp.apply(q, k, *tables, layer.use_qk, r, by_band)
    else:
        sums, sumsq = BandMoments.apply(q, k, *tables, layer.use_qk, r, by_band, rows, source, affine)
    return sums, sumsq, n * in_span_pairs(length, r)


def _band_blocks(length: int, r: int):
    """Query blocks ``(q0, q1, k0, k1)`` of about r+1 positions with their in-span key windows
    (about 1.5 x the span wide: a third of a block's logits lie outside the band)."""
    size = max(16, r + 1)
    return [(s, min(length, s + size), max(0, s - r), min(length, s + size + r)) for s in range(0, length, size)]


def _window_sums(xt: torch.Tensor, r: int) -> torch.Tensor:
    """(nh, L, d) -> (nh, L, d): sum of x_p over |p - o| <= r (clipped to the axis), by one
    cumulative sum and two slices (edge-replicated prefix sums, no gather)."""
    nh, length, d = xt.shape
    c = F.pad(xt.cumsum(1), (0, 0, 1, 0))  # (nh, L+1, d): c[j] = sum_{p<j} x_p
    c = torch.cat([c[:, :1].expand(nh, r, d), c, c[:, -1:].expand(nh, r, d)], 1)  # c'[i] = c[clamp(i-r, 0, L)]
    return c[:, 2 * r + 1 : 2 * r + 1 + length] - c[:, :length]


def _sum_squares(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) -> (b,) float64: sum of squares of each batch entry (one dot product each)."""
    f = x.reshape(x.shape[0], -1)
    return torch.linalg.vecdot(f, f).double()


class BandMoments(torch.autograd.Function):
    """:func:`similarity_moments` of a local span, from the in-span logits themselves, block
    by block, with a closed-form backward that recomputes them.

    On float32 CPU tensors the compiled kernel (:func:`.cpu_kernel.band_moments` and its
    backward) walks the band itself, one (sequence, head) at a time in cache: no blocks of
    logits, masks or operand copies in memory, the forward in float64 throughout (so at least as
    exact as the products below) and the table terms of shallow heads from per-position Gram
    matrices as here. Heads of depth <= 32 in groups of eight (every local layer of the models) go
    through it together, one per lane of float64 vectors, with q.k from windowed Gram matrices
    of the keys slid along the axis (the reference's form, :func:`_windowed_gram_quadratic`;
    its variance keeps ~16 - log10(mean^2 / variance) digits rather than all of them): 2.9-3.2x
    faster forward + backward at Axial-DeepLab-S's local layers. The PyTorch implementation below
    serves float64, other devices and a missing compiler (torch.compile traces the windowed Gram
    form instead).

    Why not the Gram form of a global span: windowed (d x d) Gram matrices need prefix sums of
    k_p k_p^T at every position (float64 tensors of d*d per position, gathers, autograd through
    all of it), while the band is only ~1.5 x span logits per query: batched products in the
    input's dtype that stay in cache. Exact where it matters:

    * the sums are float64 closed forms (window sums of k and of the table rows), so each
      (sequence, head) mean c of each term is known before the logits are formed;
    * the products form the *centred* logits x - c (c rides along as one more column of the
      operands), and the sum of their squares is accumulated in float64, so
      sumsq = sum (x-c)^2 + 2 c sum x - pairs c^2 (an identity for any c) suffers no
      cancellation however large the mean: the variance is as accurate as the reference's,
      which normalises the stored logits;
    * the backward: d/dx of (a.sums + b.sumsq) is a + 2 b x on every in-span pair, formed by
      the same products (a and 2b ride along in the operands), then dq = D k and dk = D^T q
      (q.k), dq = D r^T and dr = q^T D (q.r^q), the same for k.r^k.

    Inputs q, k (N, heads, d, L) any strides; tables (d, 2r+1) or None (term off). Returns
    (sums, sumsq), (3, heads) float64."""

    @staticmethod
    def forward(ctx, q, k, query_table, key_table, use_qk, r, tables_by_band=True, rows=None, source=None, affine=None):
        ctx.rows = rows
        # q (rows) a BatchNorm's output affine[0] * source + affine[1]: the backward keeps its input
        keep_source = rows is not None and source is not None and affine is not None
        q_in, k_in = (source if keep_source else q), k
        if rows is not None:  # q is the position-major projection y (N*L, heads*c2h), k is None
            n, length, heads, d, c2h = rows
            y4 = q.detach().view(n, length, heads, c2h)
            q, k = y4[..., :d].permute(0, 2, 3, 1), y4[..., d : 2 * d].permute(0, 2, 3, 1)
        n, heads, d, length = q.shape
        ctx.kernel = None
        tables_in = (query_table, key_table)
        out = reused(
            ("band moments", tuple(q.shape), r),
            lambda: cpu_kernel.band_moments(q.detach(), k.detach(), tables_in, use_qk, r, tables_by_band),
        )
        if out is not None:  # the compiled band walk: float64 throughout, no blocks of logits in memory
            # the inputs saved (not views of them held), so that saved-tensor hooks see them
            ctx.kernel = (use_qk, r, tables_by_band)
            ctx.save_for_backward(query_table, key_table, q_in, k_in, affine if keep_source else None)
            return out[0].view(3, n, heads).sum(1), out[1].view(3, n, heads).sum(1)
        nh = n * heads
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        dev = q.device
        # Operands with two extra channels: qa = [q, -c_qk, 1], ka = [k, 1, 0]; then
        # qa.ka = q.k - c_qk, qa.[r; 0; -c_qr] = q.r - c_qr, ka.[r; -c_kr; 0] = k.r - c_kr.
        # Padded with zero channels to a multiple of 8, queries position-major and keys
        # channel-major: the layouts in which these small products run fastest (2-3x).
        width = -(-(d + 2) // 8) * 8
        qa = torch.zeros(nh, length, width, dtype=dtype, device=dev)
        ka_t = torch.zeros(nh, width, length, dtype=dtype, device=dev)
        qa.view(n, heads, length, width)[..., :d] = q.detach().transpose(2, 3)
        ka_t.view(n, heads, width, length)[:, :, :d] = k.detach()
        qa[..., d + 1] = 1.0
        ka_t[:, d] = 1.0
        q64, k64 = qa[..., :d].double(), ka_t[:, :d].transpose(1, 2).double()  # (nh, L, d)
        pairs = in_span_pairs(length, r)
        pos = torch.arange(length, device=dev)
        offsets = torch.arange(-r, r + 1, device=dev)
        # in-span (position, table row) pairs: query o meets row j iff o + j - r is on the axis,
        # key p meets row j iff p - (j - r) is
        qmask = ((pos[:, None] + offsets[None, :]) >= 0) & ((pos[:, None] + offsets[None, :]) < length)
        kmask = qmask.flip(1)
        tables = {1: query_table, 2: key_table}
        terms = [t for t, on in ((0, use_qk), (1, query_table is not None), (2, key_table is not None)) if on]
        band = [t for t in terms if t == 0 or tables_by_band]
        ka = ka_t.transpose(1, 2).contiguous() if 2 in band else None  # rows for k.r^k
        grams = {}
        s1 = torch.zeros(3, nh, dtype=torch.float64, device=dev)
        with torch.no_grad():
            if 0 in terms:
                s1[0] = (q64 * _window_sums(k64, r)).sum((1, 2))
            for t in (1, 2):
                if t in terms:
                    mask = qmask if t == 1 else kmask
                    tab64 = tables[t].detach().t().to(torch.float64)  # (m, d)
                    rows = mask.to(torch.float64) @ tab64  # (L, d): sum of the rows each position meets
                    x64 = q64 if t == 1 else k64
                    s1[t] = (x64 * rows).sum((1, 2))
                    if t not in band:  # sumsq = sum_o x_o^T T_o x_o with T_o the Gram of those rows
                        outer = (tab64[:, :, None] * tab64[:, None, :]).reshape(-1, d * d)
                        gram = (mask.to(torch.float64) @ outer).view(length, d, d)
                        x_l = x64.transpose(0, 1).contiguous()  # (L, nh, d)
                        t_x = torch.bmm(x_l, gram)  # (L, nh, d): T_o x_o (T symmetric)
                        grams[t] = (x_l, t_x, rows)
            c = (s1 / pairs).to(dtype)  # the centring constant of each (term, sequence, head)
            qa[..., d] = -c[0][:, None]
            css = torch.zeros(3, nh, dtype=torch.float64, device=dev)
            if 0 in terms:
                blocks = _band_blocks(length, r)
                masks = [_block_mask(b, r, dtype, dev) for b in blocks]
                step = max(1, BAND_CHUNK_ELEMENTS // max(m.numel() for m in masks))
                for c0 in range(0, nh, step):
                    c1 = min(nh, c0 + step)
                    for (q0, q1, k0, k1), mask in zip(blocks, masks):
                        x = torch.bmm(qa[c0:c1, q0:q1], ka_t[c0:c1, :, k0:k1]).mul_(mask)
                        css[0, c0:c1] += _sum_squares(x)
            for t in (1, 2):
                if t in grams:
                    x_l, t_x, _ = grams[t]
                    css[t] = (x_l * t_x).sum((0, 2))
                elif t in band:
                    mask = (qmask if t == 1 else kmask).to(dtype)
                    x_op = qa if t == 1 else ka
                    step = max(1, BAND_CHUNK_ELEMENTS // mask.numel())
                    for c0 in range(0, nh, step):
                        c1 = min(nh, c0 + step)
                        ra = _augmented_table(tables[t], t, -c[t, c0:c1], dtype, width)
                        x = torch.bmm(x_op[c0:c1], ra).mul_(mask)
                        css[t, c0:c1] += _sum_squares(x)
            c64 = c.double()
            c64[list(grams)] = 0.0  # the Gram terms give the plain sum of squares
            s2 = css + 2 * c64 * s1 - pairs * c64 * c64
        ctx.save = (qa, ka_t, ka, qmask, kmask, grams)
        ctx.args = (n, heads, d, length, r, terms, q.dtype, dtype)
        ctx.save_for_backward(query_table, key_table)
        sums = s1.view(3, n, heads).sum(1)
        sumsq = s2.view(3, n, heads).sum(1)
        return sums, sumsq

    @staticmethod
    def backward(ctx, g_sums, g_sumsq):
        if ctx.kernel is not None:
            return _band_kernel_backward(ctx, g_sums, g_sumsq)
        qa, ka_t, ka, qmask, kmask, grams = ctx.save
        n, heads, d, length, r, terms, in_dtype, dtype = ctx.args
        query_table, key_table = ctx.saved_tensors
        tables = {1: query_table, 2: key_table}
        nh = n * heads
        dev = qa.device
        a = torch.zeros(3, heads, dtype=torch.float64, device=dev) if g_sums is None else g_sums.double()
        b2 = torch.zeros(3, heads, dtype=torch.float64, device=dev) if g_sumsq is None else 2 * g_sumsq.double()
        # per (sequence, head): head is the fast index of nh
        a_nh = a.to(dtype).repeat(1, n)  # (3, nh)
        b_nh = b2.to(dtype).repeat(1, n)
        q_t = qa[..., :d].transpose(1, 2).contiguous()  # (nh, d, L)
        k_t = ka_t[:, :d]  # (nh, d, L) view
        gq_t = torch.zeros(nh, d, length, dtype=dtype, device=dev)  # channel-major, as the inputs
        gk_t = torch.zeros(nh, d, length, dtype=dtype, device=dev)
        g_tab = {}
        if 0 in terms:  # D = a + 2b q.k on the band: qb.ka with qb = [2b q, a, 0]
            qb = torch.zeros_like(qa)
            qb[..., :d] = qa[..., :d] * b_nh[0].view(nh, 1, 1)
            qb[..., d] = a_nh[0].view(nh, 1)
            blocks = _band_blocks(length, r)
            masks = [_block_mask(blk, r, dtype, dev) for blk in blocks]
            step = max(1, BAND_CHUNK_ELEMENTS // max(m.numel() for m in masks))
            for c0 in range(0, nh, step):
                c1 = min(nh, c0 + step)
                for (q0, q1, k0, k1), mask in zip(blocks, masks):
                    dmat = torch.bmm(qb[c0:c1, q0:q1], ka_t[c0:c1, :, k0:k1]).mul_(mask)  # (nh_c, B, W)
                    gq_t[c0:c1, :, q0:q1] += torch.bmm(k_t[c0:c1, :, k0:k1], dmat.transpose(1, 2))
                    gk_t[c0:c1, :, k0:k1] += torch.bmm(q_t[c0:c1, :, q0:q1], dmat)
        for t in (1, 2):
            if t not in terms:
                continue
            if t in grams:
                g_tab[t] = _gram_backward(grams[t], qmask if t == 1 else kmask, tables[t], a[t], b2[t], n, heads)
                x_l, t_x, rows = grams[t]
                # d/dx_o = a R_o + 2b T_o x_o
                g_x = rows[:, None, :] * a[t].repeat(n)[None, :, None] + t_x * b2[t].repeat(n)[None, :, None]
                (gq_t if t == 1 else gk_t).add_(g_x.permute(1, 2, 0).to(dtype))
                continue
            mask = (qmask if t == 1 else kmask).to(dtype)
            x_op, x_t, g_t = (qa, q_t, gq_t) if t == 1 else (ka, k_t, gk_t)
            tab = tables[t].detach().to(dtype)  # (d, m)
            gt = torch.zeros(d, 2 * r + 1, dtype=dtype, device=dev)
            step = max(1, BAND_CHUNK_ELEMENTS // mask.numel())
            for c0 in range(0, nh, step):
                c1 = min(nh, c0 + step)
                # D = a + 2b x.r: the operand rows [x, ., .] against [2b r; a; 0] or [2b r; 0; a]
                # (the channel of ones is d+1 in qa, d in ka)
                rb = torch.zeros(c1 - c0, qa.shape[-1], 2 * r + 1, dtype=dtype, device=dev)
                rb[:, :d] = tab * b_nh[t, c0:c1].view(-1, 1, 1)
                rb[:, d + 1 if t == 1 else d] = a_nh[t, c0:c1].view(-1, 1)
                dmat = torch.bmm(x_op[c0:c1], rb).mul_(mask)  # (nh_c, L, m)
                g_t[c0:c1] += torch.matmul(tab, dmat.transpose(1, 2))
                gt += torch.bmm(x_t[c0:c1], dmat).sum(0)
            g_tab[t] = gt
        if ctx.rows is not None:  # the gradient of y in its own layout, written once
            c2h = ctx.rows[-1]
            g_q = torch.zeros(n, length, heads, c2h, dtype=in_dtype, device=dev)
            g_q[..., :d] = gq_t.view(n, heads, d, length).permute(0, 3, 1, 2)
            g_q[..., d : 2 * d] = gk_t.view(n, heads, d, length).permute(0, 3, 1, 2)
            g_q, g_k = g_q.view(n * length, heads * c2h), None
        else:
            g_q = gq_t.view(n, heads, d, length).to(in_dtype) if ctx.needs_input_grad[0] else None
            g_k = gk_t.view(n, heads, d, length).to(in_dtype) if ctx.needs_input_grad[1] else None
        g_rq = g_tab[1].to(query_table.dtype) if 1 in g_tab and ctx.needs_input_grad[2] else None
        g_rk = g_tab[2].to(key_table.dtype) if 2 in g_tab and ctx.needs_input_grad[3] else None
        return g_q, g_k, g_rq, g_rk, None, None, None, None, None, None


def _band_kernel_backward(ctx, g_sums, g_sumsq):
    """:class:`BandMoments`' backward through the compiled band walk (its forward ran there too)."""
    use_qk, r, by_band = ctx.kernel
    query_table, key_table, q, k, affine = ctx.saved_tensors
    if affine is not None:  # q is the BatchNorm's input: its output formed again
        q = normalised(q.detach(), affine[0], affine[1])
    if ctx.rows is not None:  # q is the position-major projection: its q and k channels as views
        n, length, heads, d, c2h = ctx.rows
        y4 = q.detach().view(n, length, heads, c2h)
        q, k = y4[..., :d].permute(0, 2, 3, 1), y4[..., d : 2 * d].permute(0, 2, 3, 1)
    else:
        q, k = q.detach(), k.detach()
    n, heads, d, length = q.shape
    zero = torch.zeros(3, heads, dtype=torch.float64)
    coef = torch.stack([zero if g_sums is None else g_sums, zero if g_sumsq is None else 2 * g_sumsq])
    if ctx.rows is not None:  # the gradient of y in its own layout, the value channels zero
        c2h = ctx.rows[-1]
        g_y = torch.zeros(n, length, heads, c2h, dtype=q.dtype)
        gq, gk = g_y[..., :d].permute(0, 2, 3, 1), g_y[..., d : 2 * d].permute(0, 2, 3, 1)
    else:
        gq, gk = torch.empty(2, n, heads, d, length, dtype=q.dtype).unbind(0)
    g_tab = cpu_kernel.band_moments_backward(q, k, (query_table, key_table), use_qk, r, by_band, coef, gq, gk)
    if g_tab is None:
        raise RuntimeError("the band-moments C kernel refused its backward after running the forward")
    g_rq = g_tab[0].to(query_table.dtype) if query_table is not None and ctx.needs_input_grad[2] else None
    g_rk = g_tab[1].to(key_table.dtype) if key_table is not None and ctx.needs_input_grad[3] else None
    if ctx.rows is not None:
        return g_y.view(n * length, heads * ctx.rows[-1]), None, g_rq, g_rk, None, None, None, None, None, None
    g_q = gq if ctx.needs_input_grad[0] else None
    g_k = gk if ctx.needs_input_grad[1] else None
    return g_q, g_k, g_rq, g_rk, None, None, None, None, None, None


class BandMomentsOp(torch.autograd.Function):
    """:class:`BandMoments` through the operators ``axial_deeplab::band_moments`` and its backward
    (:mod:`.moment_ops`): the same C band walk, visible to ``torch.compile`` (which traces this
    instead of the eager class, whose ctypes calls it cannot see). q, k (N, heads, d, L) float32
    CPU at any strides, tables (d, 2r+1) or None; returns (sums, sumsq), (3, heads) float64."""

    @staticmethod
    def forward(ctx, q, k, query_table, key_table, use_qk, r, by_band):
        n, heads = q.shape[0], q.shape[1]
        out = moment_ops.band_moments(q, k, query_table, key_table, use_qk, r, by_band)
        ctx.save_for_backward(q, k, query_table, key_table)
        ctx.args = (use_qk, r, by_band)
        return out[0].view(3, n, heads).sum(1), out[1].view(3, n, heads).sum(1)

    @staticmethod
    def backward(ctx, g_sums, g_sumsq):
        q, k, query_table, key_table = ctx.saved_tensors
        use_qk, r, by_band = ctx.args
        coef = _band_coef(g_sums, g_sumsq, q, q.shape[1])
        gq, gk, g_tab = moment_ops.band_moments_backward(q, k, query_table, key_table, use_qk, r, by_band, coef)
        return gq, gk, *_table_grads(g_tab, query_table, key_table), None, None, None


def _band_coef(g_sums, g_sumsq, like: torch.Tensor, heads: int) -> torch.Tensor:
    """The band operators' ``coef`` (2, 3, heads) float64, a and 2b, from the gradients of the
    sums and sums of squares (None: zeros)."""
    zero = like.new_zeros(3, heads, dtype=torch.float64)
    return torch.stack([zero if g_sums is None else g_sums, zero if g_sumsq is None else 2 * g_sumsq])


def _table_grads(g_tab: torch.Tensor, query_table, key_table):
    """(g_rq, g_rk) in the tables' dtypes from the band operators' (2, d, 2r+1) float64, None for
    a switched-off table."""
    return tuple(None if t is None else g_tab[i].to(t.dtype) for i, t in enumerate((query_table, key_table)))


class BandMomentsRowsOp(torch.autograd.Function):
    """:class:`BandMomentsOp` for q and k read from the position-major rows ``y``
    (N*L, heads*(2dk+dv)), through ``axial_deeplab::band_moments_rows`` and its backward
    (below): the backward writes the gradient in the rows' layout, which the traced graph adds to
    the projection's other gradients elementwise, and an axis that the span covers takes the
    global span's Gram form inside the operators (traced with a symbolic length, every
    local-span layer comes here, whatever its axis)."""

    @staticmethod
    def forward(ctx, y, query_table, key_table, nseq, length, heads, dk, use_qk, r, by_band):
        out = band_moments_rows(y, query_table, key_table, nseq, length, heads, dk, use_qk, r, by_band)
        ctx.save_for_backward(y, query_table, key_table)
        ctx.args = (nseq, length, heads, dk, use_qk, r, by_band)
        return out[0], out[1]

    @staticmethod
    def backward(ctx, g_sums, g_sumsq):
        y, query_table, key_table = ctx.saved_tensors
        nseq, length, heads, dk, use_qk, r, by_band = ctx.args
        coef = _band_coef(g_sums, g_sumsq, y, heads)
        g_y, g_tab = band_moments_backward_rows(
            y, query_table, key_table, nseq, length, heads, dk, use_qk, r, by_band, coef
        )
        return g_y, *_table_grads(g_tab, query_table, key_table), None, None, None, None, None, None, None


class _PlainContext(SimpleNamespace):
    """The context of an autograd Function whose forward and backward are called directly (inside
    an operator, below autograd): saved tensors are plain references."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _covered_moments(y, tables, nseq: int, length: int, heads: int, dk: int, use_qk: bool, r: int, coef=None):
    """Inside the rows operators, an axis no longer than the span (r >= L - 1): every pair is in
    span, so the moments are the global span's, from (d x d) Gram matrices (:class:`RowMoments`'
    forward and, given ``coef`` (a, 2b), its backward, called directly: the operators run below
    autograd), in ~1/4 of the band walk's time at Axial-DeepLab-S's deep layers. The tables
    (d, 2r+1) are the span's rows: a reach of r. Returns (2, 3, heads), or (g_y, g_tab)."""
    tq, tk = (None if t is None else t.detach() for t in tables)
    geo = SimpleNamespace(
        num_heads=heads,
        key_depth=dk,
        value_depth=y.shape[1] // heads - 2 * dk,
        use_qk=use_qk,
        use_query_rpe=tq is not None,
        use_key_rpe=tk is not None,
        max_relative_distance=r,
        table_rows=2 * r + 1,
    )
    ctx = _PlainContext(needs_input_grad=(True, tq is not None, tk is not None))
    sums, sumsq = RowMoments.forward(ctx, y, tq, tk, geo, nseq, length)
    if coef is None:
        return torch.stack([sums, sumsq])
    g_y, g_rq, g_rk = RowMoments.backward(ctx, coef[0], coef[1] / 2)[:3]
    g_tab = y.new_zeros(2, dk, 2 * r + 1, dtype=torch.float64)
    for t, g in enumerate((g_rq, g_rk)):
        if g is not None:
            g_tab[t] = g
    return g_y.contiguous(), g_tab


@torch.library.custom_op("axial_deeplab::band_moments_rows", mutates_args=())
def band_moments_rows(
    y: torch.Tensor,
    query_table: Optional[torch.Tensor],
    key_table: Optional[torch.Tensor],
    nseq: int,
    length: int,
    heads: int,
    dk: int,
    use_qk: bool,
    r: int,
    by_band: bool,
) -> torch.Tensor:
    """(sums, sumsq) (2, 3, heads) float64 of the similarity terms over the in-span pairs of q, k
    read from the rows ``y`` (:func:`.moment_ops.band_views`): the C band walk, or the Gram form
    where the span covers the axis (:func:`_covered_moments`)."""
    y = y.detach().contiguous()
    if r >= length - 1:
        return _covered_moments(y, (query_table, key_table), nseq, length, heads, dk, use_qk, r)
    q, k = moment_ops.band_views(y, nseq, length, heads, dk)
    out = moment_ops.band_moments(q, k, query_table, key_table, use_qk, r, by_band)
    return out.view(2, 3, nseq, heads).sum(2)


@band_moments_rows.register_fake
def _(y, query_table, key_table, nseq, length, heads, dk, use_qk, r, by_band):
    return y.new_empty(2, 3, heads, dtype=torch.float64)


@torch.library.custom_op("axial_deeplab::band_moments_backward_rows", mutates_args=())
def band_moments_backward_rows(
    y: torch.Tensor,
    query_table: Optional[torch.Tensor],
    key_table: Optional[torch.Tensor],
    nseq: int,
    length: int,
    heads: int,
    dk: int,
    use_qk: bool,
    r: int,
    by_band: bool,
    coef: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum_t a_t sums_t + b_t sumsq_t (``coef`` (2, 3, heads): a and 2b) of
    :func:`band_moments_rows`: (g_y (N*L, C2) in the rows' layout, zero in the value channels;
    the tables' (2, d, 2r+1) float64). Why the rows' layout: returned as (N, heads, d, L) tensors,
    the traced graph added them into the rows gradient through a per-element gather (a compiled
    Axial-DeepLab-S step spent ~250 ms there, against the kernel's ~150 ms)."""
    y = y.detach().contiguous()
    if r >= length - 1:
        return _covered_moments(y, (query_table, key_table), nseq, length, heads, dk, use_qk, r, coef)
    g_y = torch.empty_like(y)
    g_y.view(nseq, length, heads, -1)[..., 2 * dk :] = 0
    q, k = moment_ops.band_views(y, nseq, length, heads, dk)
    gq, gk = moment_ops.band_views(g_y, nseq, length, heads, dk)
    g_tab = cpu_kernel.band_moments_backward(q, k, (query_table, key_table), use_qk, r, by_band, coef, gq, gk)
    if g_tab is None:
        raise RuntimeError(f"the band-moments C kernel refused its backward for rows {tuple(y.shape)} {y.dtype}")
    return g_y, g_tab


@band_moments_backward_rows.register_fake
def _(y, query_table, key_table, nseq, length, heads, dk, use_qk, r, by_band, coef):
    return (
        torch.empty_like(y, memory_format=torch.contiguous_format),
        y.new_empty(2, dk, 2 * r + 1, dtype=torch.float64),
    )


def _gram_backward(
    saved, mask: torch.Tensor, table: torch.Tensor, a: torch.Tensor, b2: torch.Tensor, n: int, heads: int
):
    """Gradient (d, m) of a.sums + b.sumsq of a table term in Gram form with respect to the
    table: d/dr_j = sum_o mask[o, j] (sum_nh a x_o + (sum_nh 2b x_o x_o^T) r_j)."""
    x_l, _, _ = saved  # (L, nh, d) float64
    length, nh, d = x_l.shape
    m64 = mask.to(torch.float64)
    a_x = (x_l * a.repeat(n)[None, :, None]).sum(1)  # (L, d)
    xx = torch.bmm((x_l * b2.repeat(n)[None, :, None]).transpose(1, 2), x_l)  # (L, d, d)
    per_row = (m64.t() @ xx.reshape(length, d * d)).view(-1, d, d)  # (m, d, d)
    tab = table.detach().to(torch.float64)  # (d, m)
    g = m64.t() @ a_x + torch.bmm(per_row, tab.t().unsqueeze(-1)).squeeze(-1)  # (m, d)
    return g.t()


def _block_mask(block, r: int, dtype, device) -> torch.Tensor:
    """(q1-q0, k1-k0) 1 on the in-span pairs of a query block, 0 elsewhere."""
    q0, q1, k0, k1 = block
    o = torch.arange(q0, q1, device=device)
    p = torch.arange(k0, k1, device=device)
    return ((p[None, :] - o[:, None]).abs() <= r).to(dtype)


def _augmented_table(table: torch.Tensor, term: int, shift: torch.Tensor, dtype, width: int) -> torch.Tensor:
    """(nh_c, width, m): the table with the centring row ``shift`` (nh_c,) where the operand
    holds its column of ones (d+1 for queries, d for keys) and zeros in the others."""
    d, m = table.shape
    out = torch.zeros(shift.shape[0], width, m, dtype=dtype, device=table.device)
    out[:, :d] = table.detach().to(dtype)
    out[:, d + 1 if term == 1 else d] = shift.view(-1, 1)
    return out


def similarity_moments_rows(
    layer: PositionSensitiveAxialAttention,
    y: torch.Tensor,
    nseq: int,
    length: int,
    source: Optional[torch.Tensor] = None,
    affine: Optional[torch.Tensor] = None,
):
    """:func:`similarity_moments` for the position-major projection ``y`` (N*L, C2):
    the closed-form-backward :class:`RowMoments` for a global span, else the general
    function on strided views. ``source``, ``affine``: as for ``ops.attention_rows`` (y is a
    BatchNorm's output ``affine[0] * source + affine[1]``; the backward keeps ``source`` instead)."""
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    if span_radius(layer, length) is None:
        sums, sumsq = RowMoments.apply(y, layer.query_table, layer.key_table, layer, nseq, length, source, affine)
        return sums, sumsq, nseq * length * length
    q, k = moment_ops.band_views(y, nseq, length, heads, dk)
    if not torch.compiler.is_compiling() or moment_ops.band_kernel_applies(q):
        rows = (nseq, length, heads, dk, 2 * dk + dv)
        return _local_moments(layer, y, None, span_radius(layer, length), rows=rows, source=source, affine=affine)
    return similarity_moments(layer, q, k)


def _at_least_one(n):
    """max(n, 1) for an int, a SymInt (no guard on a symbolic size) or a tensor (summed counts)."""
    return n.clamp(min=1) if isinstance(n, torch.Tensor) else torch.sym_max(n, 1)


def similarity_scales(
    layer: PositionSensitiveAxialAttention, q: Optional[torch.Tensor], k: Optional[torch.Tensor], moments=None
) -> torch.Tensor:
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
