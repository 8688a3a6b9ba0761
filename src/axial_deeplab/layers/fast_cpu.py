"""Fast path for position-sensitive axial attention (``impl="fast"``), in PyTorch.

Same math as :mod:`.reference`, organised so that no per-position embedding tensor
(L x L x d) and no stacked (3 x heads) similarity tensor is ever built. On CPU in
float32 the forward is handed to the compiled kernel of :mod:`.cpu_kernel` when it is
available; this module is the rest of the layer, the training path, and the forward
used without a C compiler, in float64, or on other devices.

* Eval folds ``bn_qkv`` into the 1x1 projection, and ``bn_similarity`` into one scale
  per (term, head): a BN shift is a per-row constant of the logits and cancels in the
  softmax (also under a local span: it is constant over the in-span keys of a row).
  ``bn_output`` becomes a per-channel affine map applied to the small outputs.
* Training needs the similarity BN *batch* statistics. Only the variance matters for
  the output (the mean and the BN bias cancel in the softmax); both are computed
  exactly in closed form from (d x d) Gram matrices, prefix sums and the compact
  tables, never from the L x L logits (:func:`similarity_moments`). Gradients reach
  q, k and the tables through that closed form by ordinary autograd.
* The relative terms use the compact tables gathered per (query, key) pair once per
  block (shared by every sequence and head) and batched matrix products over query
  positions (q.r^q, a.r^v) or key positions (k.r^k): each is one GEMM writing L x L
  values, the same work as the content term q.k.
* The softmax uses ``exp2`` with ``log2(e)`` folded into the term scales (``exp2`` is
  several times faster than ``exp`` on CPU), shifts each row by its own diagonal logit
  (a member of the row, so no row can underflow; folded into the q.r^q product as one
  more column; rows that would overflow are redone with the exact maximum) and divides
  the small outputs by the row sums instead of normalising the L x L weights.
* Work is chunked over (sequence, head) pairs so the live L x L tensors stay within a
  fixed budget (``CHUNK_ELEMENTS``), and a local span m is computed in query blocks
  that only see their in-span key window (about L x 1.5m instead of L x L).
* Eval with ``stride_mode="subsample"`` computes only the kept query positions.

:func:`attend` is an ordinary differentiable function: in training its backward is
autograd's (it keeps the chunk tensors); :mod:`.memory_efficient` wraps the same
forward in a custom autograd function that recomputes them instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import cpu_kernel
from .reference import apply_stride, from_sequences, to_sequences
from .sync import all_reduce_count, differentiable_all_reduce, should_sync

__all__ = [
    "axial_attention_fast",
    "project_sequences",
    "similarity_moments",
    "similarity_scales",
    "similarity_moments_rows",
    "plan_blocks",
    "gather_tables",
    "attend",
    "finish_output",
    "CHUNK_ELEMENTS",
]

LOG2E = 1.0 / math.log(2.0)
# Masked (out-of-span) logits: a large finite negative, so exp2 gives exactly 0 and
# no inf*0 appears in any product.
MASK_VALUE = -1.0e30
# Budget for one chunk's L x L logits (elements): 512 KB in fp32, so a chunk's few
# L x L temporaries stay in a core's L2 cache.
CHUNK_ELEMENTS = 1 << 17


# --------------------------------------------------------------------------- projection
def project_sequences(layer, x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> qkv sequences (N*heads, 2*dk+dv, L), BN applied.

    With ``bn_qkv`` in eval mode the BN is folded into the projection (one batched
    matrix product); in training the module runs on the sequence layout, which gives
    BatchNorm2d's statistics exactly (same elements per channel)."""
    xs = to_sequences(x, layer.axis)  # (N, C_in, L)
    weight = layer.qkv.weight.flatten(1)  # (C2, C_in)
    bn = layer.bn_qkv
    if not bn.training and bn.running_mean is not None:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        w = weight * scale[:, None]
        b = bn.bias - bn.running_mean * scale
        y = torch.baddbmm(b[None, :, None].to(xs.dtype), w.to(xs.dtype).expand(xs.shape[0], -1, -1), xs)
    else:
        y = torch.matmul(weight.to(xs.dtype), xs)
        y = bn(y.unsqueeze(-1)).squeeze(-1)
    n, c2, length = y.shape
    return y.reshape(n * layer.num_heads, c2 // layer.num_heads, length)


# --------------------------------------------------------------------------- BN statistics
def _span_radius(layer, length: int) -> Optional[int]:
    """Half-width r of the local span, or None when every key is in span."""
    if layer.span is None:
        return None
    r = (layer.span - 1) // 2
    return None if r >= length - 1 else r


def _relative_index(q_pos: torch.Tensor, k_pos: torch.Tensor, max_distance: int) -> torch.Tensor:
    return (k_pos[None, :] - q_pos[:, None]).clamp(-max_distance, max_distance) + max_distance


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
    r = _span_radius(layer, length)
    pos = torch.arange(length, device=device)
    if r is None:
        mask = None
        pairs = length * length
    else:
        mask = ((pos[None, :] - pos[:, None]).abs() <= r).to(torch.float64)  # (o, p)
        pairs = length * (2 * r + 1) - r * (r + 1)  # in-span pairs (r < L - 1): each edge loses r(r+1)/2
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
        idx = _relative_index(pos, pos, layer.max_relative_distance)  # (o, p)
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
        qc, kc = qd[s:s + step], kd[s:s + step]
        if torch.is_grad_enabled() and (qc.requires_grad or kc.requires_grad):
            total = total + torch.utils.checkpoint.checkpoint(
                _gram_chunk, qc, kc, lo, hi, use_reentrant=False)
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
    idx = _relative_index(pos, pos, layer.max_relative_distance)
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
    if _span_radius(layer, length) is None:
        sums, sumsq = RowMoments.apply(y, layer.query_table, layer.key_table, layer, nseq, length)
        return sums, sumsq, nseq * length * length
    qkv4 = y.view(nseq, length, heads, 2 * dk + dv).permute(0, 2, 3, 1)  # (N, heads, c2h, L) view
    return similarity_moments(layer, qkv4[:, :, :dk], qkv4[:, :, dk:2 * dk])


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
                v = (var.detach() * count / max(count - 1, 1)).reshape(-1).to(bn.running_var.dtype)
                bn.running_mean.mul_(1 - f).add_(f * m)
                bn.running_var.mul_(1 - f).add_(f * v)
        var = var.to(dtype).reshape(3, heads)
    else:
        var = bn.running_var.reshape(3, heads).to(dtype)
    scales = bn.weight.reshape(3, heads).to(dtype) * torch.rsqrt(var + bn.eps)
    # The BN bias cancels in the softmax; keep it in the graph so it gets an exact zero
    # gradient (as in the reference) rather than None, which optimisers treat differently.
    return scales + 0.0 * bn.bias.reshape(3, heads).to(dtype)


# --------------------------------------------------------------------------- blocks
@dataclass
class Block:
    """Queries ``q_start:q_stop:q_step`` attending to keys ``k0:k1``."""

    q_start: int
    q_stop: int
    q_step: int
    k0: int
    k1: int
    out_start: int  # index of the first query in the (possibly subsampled) output

    @property
    def num_queries(self):
        return len(range(self.q_start, self.q_stop, self.q_step))


def plan_blocks(length: int, radius: Optional[int], query_step: int = 1) -> List[Block]:
    """Split the queries of one axis into blocks with their in-span key windows.

    Global span (``radius`` None): one block, all keys. Local span: query blocks of
    about max(8, r) positions (a multiple of ``query_step``), each seeing keys
    [start - r, stop - 1 + r]."""
    if radius is None:
        return [Block(0, length, query_step, 0, length, 0)]
    size = max(8, radius)
    size = -(-size // query_step) * query_step
    blocks = []
    for start in range(0, length, size):
        stop = min(length, start + size)
        k0 = max(0, start - radius)
        k1 = min(length, stop - 1 + radius + 1)
        blocks.append(Block(start, stop, query_step, k0, k1, start // query_step))
    return blocks


@dataclass
class BlockTables:
    """Relative tables gathered for one block, laid out for batched products.

    ``rq`` is augmented for the batched product over query positions: its rows are
    the query table (when q.r^q is on), then the span-mask row (local span), then a
    row of ones that carries the per-row softmax shift."""

    rq: torch.Tensor  # (Bq, dk? + mask? + 1, Wk)
    rk: Optional[torch.Tensor]  # (Wk, dk, Bq)
    rv: Optional[torch.Tensor]  # (Bq, Wk, dv)
    idx: torch.Tensor  # (Bq, Wk) table row of each pair
    has_mask: bool


def gather_tables(layer, block: Block, radius: Optional[int], dtype, device) -> BlockTables:
    q_pos = torch.arange(block.q_start, block.q_stop, block.q_step, device=device)
    k_pos = torch.arange(block.k0, block.k1, device=device)
    idx = _relative_index(q_pos, k_pos, layer.max_relative_distance)
    rows = []
    if layer.use_query_rpe:
        rows.append(layer.query_table.to(dtype)[:, idx].permute(1, 0, 2))  # (Bq, dk, Wk)
    has_mask = radius is not None
    if has_mask:  # every block of a local span carries the row (zeros where all in span)
        outside = (k_pos[None, :] - q_pos[:, None]).abs() > radius
        mask_row = torch.zeros(outside.shape, dtype=dtype, device=device).masked_fill_(outside, MASK_VALUE)
        rows.append(mask_row[:, None, :])
    rows.append(torch.ones(len(q_pos), 1, len(k_pos), dtype=dtype, device=device))
    rq = torch.cat(rows, dim=1).contiguous()
    rk = rv = None
    if layer.use_key_rpe:
        rk = layer.key_table.to(dtype)[:, idx].permute(2, 0, 1).contiguous()  # (Wk, dk, Bq)
    if layer.use_value_rpe:
        rv = layer.value_table.to(dtype)[:, idx].permute(1, 2, 0).contiguous()  # (Bq, Wk, dv)
    return BlockTables(rq, rk, rv, idx, has_mask)


# --------------------------------------------------------------------------- core
def _head_scale(scale: torch.Tensor, nh: int) -> torch.Tensor:
    """(heads,) -> (nh, 1, 1) for nh = sequences*heads (head is the fast index)."""
    heads = scale.shape[0]
    return scale.repeat(nh // heads).view(nh, 1, 1)


def chunk_size(nh: int, num_queries: int, num_keys: int, budget: Optional[int] = None) -> int:
    budget = CHUNK_ELEMENTS if budget is None else budget
    return max(1, min(nh, budget // max(1, num_queries * num_keys)))


@dataclass
class Operands:
    """Per-layer operands of the batched products, laid out once per call.

    * ``qo``: (L_q, nh, K) rows for the product over query positions with
      :attr:`BlockTables.rq`: [q scaled for q.r^q] [1 for the span mask] [-shift].
    * ``qt``: (nh, L_q, dk) queries scaled for q.k (``None`` when q.k is off).
    * ``k``: (nh, dk, L) keys; ``ko``: (L, nh, dk) keys scaled for k.r^k.
    * ``v``: (nh, dv, L) values.
    The scales are the per-head BN multipliers times log2(e) (softmax by exp2)."""

    qo: torch.Tensor
    qt: Optional[torch.Tensor]
    k: torch.Tensor
    ko: Optional[torch.Tensor]
    v: torch.Tensor
    shift_col: int  # index of the -shift column in qo


def prepare_operands(layer, qkv: torch.Tensor, scales: torch.Tensor, query_step: int,
                     local: bool, diagonal_shift: bool = True) -> Operands:
    dk = layer.key_depth
    nh, _, length = qkv.shape
    q, k, v = qkv[:, :dk], qkv[:, dk:2 * dk], qkv[:, 2 * dk:]
    qsl = slice(0, length, query_step)
    s = scales * LOG2E
    q_qk = q[:, :, qsl] * _head_scale(s[0], nh) if layer.use_qk else None
    q_qr = q[:, :, qsl] * _head_scale(s[1], nh) if layer.use_query_rpe else None
    k_kr = k * _head_scale(s[2], nh) if layer.use_key_rpe else None
    shift = diagonal_logits(layer, q_qk, q_qr, k[:, :, qsl], None if k_kr is None else k_kr[:, :, qsl])
    nq = shift.shape[1]
    cols = []
    if q_qr is not None:
        cols.append(q_qr.permute(2, 0, 1))
    if local:
        cols.append(q.new_ones(nq, nh, 1))
    cols.append(shift.t().neg().unsqueeze(-1) if diagonal_shift else q.new_zeros(nq, nh, 1))
    qo = torch.cat(cols, dim=2)
    qt = q_qk.transpose(1, 2).contiguous() if q_qk is not None else None
    ko = k_kr.permute(2, 0, 1).contiguous() if k_kr is not None else None
    return Operands(qo, qt, k, ko, v, qo.shape[2] - 1)


def diagonal_logits(layer, q_qk, q_qr, k, k_kr) -> torch.Tensor:
    """Logit of each query with itself (offset 0), (nh, L_q). It is a member of every
    row, so subtracting it before exp2 cannot underflow a whole row; only a row whose
    maximum exceeds it by > 127 (log2 units) overflows, which :func:`attend` detects."""
    with torch.no_grad():
        d = layer.max_relative_distance
        out = None
        if q_qk is not None:
            out = (q_qk * k).sum(1)
        if q_qr is not None:
            t = torch.einsum("nco,c->no", q_qr, layer.query_table[:, d].to(q_qr.dtype))
            out = t if out is None else out + t
        if k_kr is not None:
            t = torch.einsum("nco,c->no", k_kr, layer.key_table[:, d].to(k_kr.dtype))
            out = t if out is None else out + t
    return out


def split_operands(ops: Operands, step: int) -> List[Operands]:
    """Views of the operands for consecutive chunks of ``step`` sequence-heads, made
    with ``torch.split`` so autograd concatenates their gradients once (slicing each
    chunk would allocate a full-size zero gradient per chunk)."""
    def parts(t, dim):
        return [None] * n if t is None else list(torch.split(t, step, dim))

    n = -(-ops.k.shape[0] // step)
    return [Operands(*fields, ops.shift_col) for fields in zip(
        parts(ops.qo, 1), parts(ops.qt, 0), parts(ops.k, 0), parts(ops.ko, 1), parts(ops.v, 0))]


def _narrow(t: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    return t if start == 0 and stop == t.shape[dim] else t.narrow(dim, start, stop - start)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: batched products
    whose outputs are later permuted would otherwise receive gradients without a unit
    stride, which sends ``bmm``'s backward down a per-matrix copying path."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(x) if x.requires_grad else x


def block_logits(layer, tabs: BlockTables, ops: Operands, block: Block):
    """Shifted log2-unit logits (nh_c, Bq, Wk) of one block for one chunk ``ops``."""
    o0, nq = block.out_start, block.num_queries
    qo = _narrow(ops.qo, 0, o0, o0 + nq)
    logits = torch.bmm(qo, tabs.rq).transpose(0, 1)  # (nh_c, Bq, Wk) view
    if ops.qt is not None:
        k = _narrow(ops.k, 2, block.k0, block.k1)
        logits = torch.baddbmm(logits, _narrow(ops.qt, 1, o0, o0 + nq), k)
    else:
        logits = logits.contiguous()
    if ops.ko is not None:
        kr = _contiguous_grad(torch.bmm(_narrow(ops.ko, 0, block.k0, block.k1), tabs.rk))  # (Wk, nh_c, Bq)
        # Tile-local transpose: (Wk, nh_c, Bq) -> (nh_c, Wk, Bq) copy, then add its
        # per-(sequence, head) transpose (stays in cache).
        logits.add_(kr.transpose(0, 1).contiguous().transpose(1, 2))
    return logits


def chunk_size_for(blocks, nh: int) -> int:
    return min(chunk_size(nh, b.num_queries, b.k1 - b.k0) for b in blocks)


def attend(layer, qkv: torch.Tensor, scales: torch.Tensor, query_step: int = 1,
           return_lse: bool = False):
    """sum_p a_op v_p and sum_p a_op r^v_{p-o} for qkv (nh, 2dk+dv, L).

    Returns ``(sv, sve)``, each (nh, dv, L_out) with L_out = ceil(L / query_step)
    (``sve`` is None when r^v is off), and optionally the per-row log2-sum-exp2
    (nh, L_out) used by the memory-efficient backward."""
    if not _needs_grad(layer, qkv, scales):
        out = cpu_kernel.attend_eval(layer, qkv, scales, query_step, return_lse)
        if out is not None:
            return out
    nh, _, length = qkv.shape
    radius = _span_radius(layer, length)
    blocks = plan_blocks(length, radius, query_step)
    ops = prepare_operands(layer, qkv, scales, query_step, radius is not None)
    result = _attend_blocks(layer, ops, blocks, radius, qkv, exact_max=False)
    if result is None:  # some row overflowed exp2 with the diagonal shift
        ops = prepare_operands(layer, qkv, scales, query_step, radius is not None, diagonal_shift=False)
        result = _attend_blocks(layer, ops, blocks, radius, qkv, exact_max=True)
    sv, sve, row_sum, shift = result
    inv = row_sum.reciprocal().unsqueeze(1)
    sv = sv * inv
    sve = sve * inv if sve is not None else None
    if return_lse:
        return sv, sve, shift + torch.log2(row_sum)
    return sv, sve


def _needs_grad(layer, qkv, scales) -> bool:
    if not torch.is_grad_enabled():
        return False
    tables = (layer.query_table, layer.key_table, layer.value_table)
    return qkv.requires_grad or scales.requires_grad or any(t is not None and t.requires_grad for t in tables)


def _attend_blocks(layer, ops: Operands, blocks, radius, qkv, exact_max: bool):
    nh = qkv.shape[0]
    chunks = split_operands(ops, chunk_size_for(blocks, nh))
    sv_parts, sve_parts, sum_parts, shift_parts = [], [], [], []
    for block in blocks:
        tabs = gather_tables(layer, block, radius, qkv.dtype, qkv.device)
        o0, nq = block.out_start, block.num_queries
        sv_b, sve_b, sum_b, shift_b = [], [], [], []
        for ch in chunks:
            logits = block_logits(layer, tabs, ch, block)
            if exact_max:
                shift = logits.detach().amax(-1)
                e = logits.sub_(shift.unsqueeze(-1)).exp2_()
            else:
                e = logits.exp2_()
                shift = -ch.qo[o0:o0 + nq, :, ops.shift_col].t()
            sum_b.append(e.sum(-1))  # (nh_c, Bq)
            shift_b.append(shift)
            sv_b.append(torch.bmm(_narrow(ch.v, 2, block.k0, block.k1), e.transpose(1, 2)))
            if tabs.rv is not None:
                sve = _contiguous_grad(torch.bmm(e.transpose(0, 1), tabs.rv))  # (Bq, nh_c, dv)
                sve_b.append(sve.permute(1, 2, 0))
        sv_parts.append(_cat(sv_b, 0))
        if sve_b:
            sve_parts.append(_cat(sve_b, 0))
        sum_parts.append(_cat(sum_b, 0))
        shift_parts.append(_cat(shift_b, 0))
    row_sum = _cat(sum_parts, 1)
    if not exact_max and not bool(torch.isfinite(row_sum.detach().max())):
        return None
    sv = _cat(sv_parts, 2)
    sve = _cat(sve_parts, 2) if sve_parts else None
    return sv, sve, row_sum, _cat(shift_parts, 1)


def _cat(parts, dim):
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


# --------------------------------------------------------------------------- output
def finish_output(layer, sv: torch.Tensor, sve: Optional[torch.Tensor], batch: int,
                  height: int, width: int, out_dtype) -> torch.Tensor:
    """bn_output on the two retrievals (interleaved channels), their sum, back to
    (B, C, H, W). In eval the BN is an affine map on the small outputs."""
    nh, dv, length = sv.shape
    n = nh // layer.num_heads
    c = layer.num_heads * dv
    sv = sv.reshape(n, c, length)
    sve = sve.reshape(n, c, length) if sve is not None else None
    bn = layer.bn_output
    if not bn.training and bn.running_mean is not None:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        scale, shift = scale.view(c, 2), shift.view(c, 2)
        out = torch.addcmul(shift[:, 0, None].to(sv.dtype), sv, scale[:, 0, None].to(sv.dtype))
        if layer.use_value_rpe:
            out = torch.addcmul(out + shift[:, 1, None].to(sv.dtype), sve, scale[:, 1, None].to(sv.dtype))
    else:
        if sve is None:
            sve = torch.zeros_like(sv)
        stacked = torch.stack([sv, sve], dim=2).reshape(n, 2 * c, length)
        stacked = bn(stacked).reshape(n, c, 2, length)
        out = stacked.sum(dim=2) if layer.use_value_rpe else stacked[:, :, 0]
    if layer.axis == "height":
        height = length
    else:
        width = length
    return from_sequences(out.to(out_dtype), layer.axis, batch, height, width)


# --------------------------------------------------------------------------- entry point
def _subsampled_queries(layer) -> int:
    """Query step to compute directly: only in eval-style runs (no batch statistics
    of bn_output needed) with stride_mode 'subsample'."""
    if layer.stride > 1 and layer.stride_mode == "subsample":
        bn = layer.bn_output
        if not bn.training and bn.running_mean is not None:
            return layer.stride
    return 1


def run_layer(layer, x: torch.Tensor, core) -> torch.Tensor:
    """Shared driver: projection, similarity scales, ``core(layer, qkv, scales, step)``,
    output BN, stride."""
    batch, _, height, width = x.shape
    qkv = project_sequences(layer, x)
    out_dtype = qkv.dtype
    with torch.autocast(x.device.type, enabled=False):
        qkv = qkv.float() if qkv.dtype in (torch.float16, torch.bfloat16) else qkv
        qkv = qkv.contiguous()
        dk = layer.key_depth
        n = qkv.shape[0] // layer.num_heads
        shape4 = (n, layer.num_heads, dk, qkv.shape[-1])
        scales = similarity_scales(layer, qkv[:, :dk].reshape(shape4), qkv[:, dk:2 * dk].reshape(shape4))
        step = _subsampled_queries(layer)
        sv, sve = core(layer, qkv, scales, step)
        y = finish_output(layer, sv, sve, batch, height, width, out_dtype)
    if step == 1:
        y = apply_stride(y, layer)
    return y


def _autograd_core(layer, qkv, scales, step):
    return attend(layer, qkv, scales, step)


def axial_attention_fast(layer, x: torch.Tensor) -> torch.Tensor:
    """``impl="fast"``: the CPU fast path (training backward by autograd)."""
    y = cpu_kernel.forward_eval(layer, x)  # inference with the compiled kernel, when it applies
    if y is not None:
        return y
    return run_layer(layer, x, _autograd_core)
