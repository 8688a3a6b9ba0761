"""The plain reference implementation of position-sensitive axial attention.

Written straight from the equation, materialising every L x L tensor. It is slow
on purpose: it is the oracle every faster path is tested against.

:func:`axial_attention_banded` is the same math for local spans in O(L x span) memory, built
from standard tensor ops only: the path ``axial-deeplab export`` decomposes the layer into. In
inference it takes the form that exported graph runs fastest: query blocks for long or symbolic
axes (a subsampling stride computes only the queries it keeps), plain (queries x L) tensors on a
static axis where those are no larger than span x span.

Neither path looks at tensor values in Python: masks and branches come from sizes and the
layer's settings, so both trace (torch.export, ONNX, torch.jit.trace) with symbolic H and W.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .geometry import (
    apply_stride,
    bn_affine,
    from_sequences,
    layer_query_step,
    num_queries,
    pair_table_rows,
    to_sequences,
)
from .sync import all_reduce_count, differentiable_all_reduce, should_sync

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__ = [
    "axial_attention_reference",
    "axial_attention_banded",
    "relative_index",
    "span_mask",
    "span_covers_axis",
    "masked_batch_norm",
]


def relative_index(length: int, max_distance: int, device=None) -> torch.Tensor:
    """(L, L) table row for query o (dim 0) and key p (dim 1): clip(p - o, -D, D) + D."""
    pos = torch.arange(length, device=device)
    return pair_table_rows(pos, pos, max_distance)


def span_mask(length: int, span, device=None) -> torch.Tensor:
    """(L, L) bool: key p lies in the span of query o (|p - o| <= (m-1)/2; all for global)."""
    pos = torch.arange(length, device=device)
    if span is None:
        return torch.ones(length, length, dtype=torch.bool, device=device)
    return (pos[None, :] - pos[:, None]).abs() <= (span - 1) // 2


def span_covers_axis(length, span) -> bool:
    """True when every key lies in every query's span (global span, or L - 1 <= (m-1)/2), so
    :func:`span_mask` is all true. Decided from sizes alone; a symbolic length (torch.export
    with a dynamic H or W) that is not provably covered counts as not covered, which is
    always correct (the masked statistics then simply see every entry)."""
    if span is None:
        return True
    if isinstance(length, torch.Tensor):  # torch.jit.trace hands sizes over as traced tensors
        return False
    return statically_known_true(length - 1 <= (span - 1) // 2)


def masked_batch_norm(
    x: torch.Tensor, mask: torch.Tensor, bn: nn.BatchNorm2d, sync: bool = False, full: bool = False
) -> torch.Tensor:
    """BatchNorm2d over (N, C, A, B) whose statistics use only entries where ``mask`` (A, B)
    is true, with nn.BatchNorm2d's running-statistics semantics. ``full``: the caller
    knows from sizes that ``mask`` is all true (plain ``bn``). ``sync``: sum the statistics
    over processes (DDP; see ``layers.sync``)."""
    if full and not sync:
        return bn(x)  # a SyncBatchNorm here synchronises itself
    shape = (1, -1, 1, 1)
    if bn.training:
        m = mask.to(x.dtype)
        count = m.sum() * x.shape[0]
        total = (x * m).sum(dim=(0, 2, 3))
        if sync:
            total, count = differentiable_all_reduce(total), all_reduce_count(count)
        mean = total / count
        squares = (((x - mean.view(shape)) ** 2) * m).sum(dim=(0, 2, 3))
        if sync:
            squares = differentiable_all_reduce(squares)
        var = squares / count
        if bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked += 1
                f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.mul_(1 - f).add_(f * mean.detach())
                bn.running_var.mul_(1 - f).add_(f * var.detach() * count / (count - 1))
    else:
        mean, var = bn.running_mean, bn.running_var
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    return y * bn.weight.view(shape) + bn.bias.view(shape)


def axial_attention_reference(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> torch.Tensor:
    B, _, H, W = x.shape
    L = H if layer.axis == "height" else W
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth

    qkv = to_sequences(layer.bn_qkv(layer.qkv(x)), layer.axis)  # (N, 2K+V, L)
    N = qkv.shape[0]
    qkv = qkv.reshape(N, heads, 2 * dk + dv, L)
    q, k, v = qkv.split([dk, dk, dv], dim=2)  # (N, heads, d, L)

    idx = relative_index(L, layer.max_relative_distance, x.device)  # (L_o, L_p)
    mask = span_mask(L, layer.span, x.device)

    zeros = q.new_zeros(N, heads, L, L)
    qk = torch.einsum("nhco,nhcp->nhop", q, k) if layer.use_qk else zeros
    if layer.use_query_rpe:
        qr = torch.einsum("nhco,cop->nhop", q, layer.query_table[:, idx])  # q_o . r^q_{p-o}
    else:
        qr = zeros
    if layer.use_key_rpe:
        kr = torch.einsum("nhcp,cop->nhop", k, layer.key_table[:, idx])  # k_p . r^k_{p-o}
    else:
        kr = zeros
    stacked = torch.cat([qk, qr, kr], dim=1)  # (N, 3*heads, L, L)
    stacked = masked_batch_norm(
        stacked, mask, layer.bn_similarity, sync=should_sync(layer), full=span_covers_axis(L, layer.span)
    )
    stacked = stacked.reshape(N, 3, heads, L, L)
    on = [layer.use_qk, layer.use_query_rpe, layer.use_key_rpe]
    logits = sum(stacked[:, t] for t in range(3) if on[t])
    logits = logits.masked_fill(~mask, float("-inf"))
    attn = torch.softmax(logits, dim=-1)  # over keys p

    sv = torch.einsum("nhop,nhcp->nhco", attn, v)
    if layer.use_value_rpe:
        sve = torch.einsum("nhop,cop->nhco", attn, layer.value_table[:, idx])  # sum a * r^v_{p-o}
    else:
        sve = torch.zeros_like(sv)
    return _output(layer, sv, sve, B, H, W)


def _output(
    layer: PositionSensitiveAxialAttention, sv: torch.Tensor, sve: torch.Tensor, B: int, H: int, W: int
) -> torch.Tensor:
    """Output BN over the interleaved [a.v, a.r^v] channels, their sum, back to (B, C, H', W')."""
    N, heads, dv, L = sv.shape
    out = torch.stack([sv, sve], dim=3).reshape(N, 2 * heads * dv, L)  # interleaved [c, retrieval]
    out = layer.bn_output(out).reshape(N, heads * dv, 2, L)
    out = out.sum(dim=2) if layer.use_value_rpe else out[:, :, 0]
    y = from_sequences(out, layer.axis, B, H, W)
    return apply_stride(y, layer)


def _query_blocks(L, b: int):
    """How many query blocks of b cover an axis of L: at least two. Traced where an axis fits one
    block, a dimension of size 1 would be specialised (export guards on it) and the graph would
    run at that size only; the extra block is padding, sliced off. ``L`` is an int, a SymInt
    (export, compile) or a 0-d tensor (``torch.jit.trace``)."""
    blocks = (L + b - 1) // b
    return blocks.clamp(min=2) if isinstance(blocks, torch.Tensor) else torch.sym_max(2, blocks)


def axial_attention_banded(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> torch.Tensor:
    """The reference math for a local span m = 2r+1 in O(L x m) memory (global spans: the
    reference itself, which is O(L^2) by nature).

    Queries go in blocks of b = r+1; block k attends the window of w = b+2r keys starting r
    before it (zero padding beyond the axis), so every (query, key) pair of the span appears
    once as (block, i, t) with key offset p - o = t - r - i. All tensors are (.., L, w) or
    (.., C, L * w / b): standard gathers, einsums, softmax and BatchNorm, nothing of size L x L,
    and the block count is the only size derived from L (export keeps H and W symbolic)."""
    # inference forms drop the similarity-BN shifts (they cancel in the softmax), so with
    # gradients on (or BN training/synchronised) the plain forms keep every parameter in the graph
    inference = not (
        layer.bn_similarity.training or layer.bn_output.training or should_sync(layer) or torch.is_grad_enabled()
    )
    if layer.span is None:
        return _global_eval(layer, x) if inference else axial_attention_reference(layer, x)
    if inference:
        length = x.shape[2] if layer.axis == "height" else x.shape[3]
        r = layer.max_relative_distance
        # a static length (a plain int; never a SymInt, so a dynamic export is not specialised)
        # whose (queries x L) logits are no larger than m x m (a subsampling stride computes every
        # s-th query) takes that form: exact when every key is in every query's span, else with an
        # additive mask; ONNX Runtime runs it faster than the query blocks (their padding, windows
        # and skews) there, and slower beyond (a stride-2 layer with m queries: blocks)
        m = 2 * r + 1
        if type(length) is int and num_queries(length, layer_query_step(layer)) * length <= m * m:
            return _global_eval(layer, x, radius=None if length - 1 <= r else r)
        return _banded_eval(layer, x)
    B, _, H, W = x.shape
    L = H if layer.axis == "height" else W
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    r = layer.max_relative_distance  # (m - 1) / 2: local tables have exactly m rows
    b, w = r + 1, 3 * r + 1
    dev = x.device

    qkv = to_sequences(layer.bn_qkv(layer.qkv(x)), layer.axis)
    N = qkv.shape[0]
    q, k, v = qkv.reshape(N, heads, 2 * dk + dv, L).split([dk, dk, dv], dim=2)
    blocks = _query_blocks(L, b)
    padded = blocks * b
    q = F.pad(q, (0, padded - L)).reshape(N, heads, dk, blocks, b)  # (n, h, c, k, i)
    kv = F.pad(torch.cat([k, v], dim=2), (r, padded - L + r))  # key p sits at r + p
    window = (torch.arange(blocks, device=dev) * b)[:, None] + torch.arange(w, device=dev)[None, :]
    k, v = kv[..., window].split([dk, dv], dim=2)  # (n, h, c, k, t)

    i = torch.arange(b, device=dev)[:, None]
    t = torch.arange(w, device=dev)[None, :]
    row = (t - i).clamp(0, 2 * r)  # table row of offset p - o = t - r - i, clipped off-span
    in_span = (t - i >= 0) & (t - i <= 2 * r)  # (b, w)
    o = (torch.arange(blocks, device=dev) * b)[:, None, None] + i  # (k, i, 1) query position
    p = o - i - r + t  # (k, i, w) key position
    valid = in_span & (p >= 0) & (p < L) & (o < L)  # the pairs the reference's span mask holds
    keep = valid | (in_span & (o >= L))  # padded queries keep their padded keys: no empty rows

    zeros = q.new_zeros(N, heads, blocks, b, w)
    qk = torch.einsum("nhcki,nhckt->nhkit", q, k) if layer.use_qk else zeros
    qr = torch.einsum("nhcki,cit->nhkit", q, layer.query_table[:, row]) if layer.use_query_rpe else zeros
    kr = torch.einsum("nhckt,cit->nhkit", k, layer.key_table[:, row]) if layer.use_key_rpe else zeros
    stacked = torch.cat([qk, qr, kr], dim=1).reshape(N, 3 * heads, padded, w)
    stacked = masked_batch_norm(stacked, valid.reshape(padded, w), layer.bn_similarity, sync=should_sync(layer))
    stacked = stacked.reshape(N, 3, heads, blocks, b, w)
    on = [layer.use_qk, layer.use_query_rpe, layer.use_key_rpe]
    logits = sum(stacked[:, s] for s in range(3) if on[s])
    attn = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)  # over the window

    sv = torch.einsum("nhkit,nhckt->nhcki", attn, v).reshape(N, heads, dv, padded)[..., :L]
    if layer.use_value_rpe:
        sve = torch.einsum("nhkit,cit->nhcki", attn, layer.value_table[:, row]).reshape(N, heads, dv, padded)
        sve = sve[..., :L]
    else:
        sve = torch.zeros_like(sv)
    return _output(layer, sv, sve, B, H, W)


def _far(dtype: torch.dtype) -> float:
    """Added to the logit of a key out of reach (beyond the span or the axis) through a matmul:
    exp() of it is exactly 0, like the -inf of a mask, and 0 times it is 0 (the keys in reach),
    where -inf would give NaN. Finite in ``dtype`` (half of its most negative value)."""
    return torch.finfo(dtype).min / 2


def _global_eval(layer: PositionSensitiveAxialAttention, x: torch.Tensor, radius=None) -> torch.Tensor:
    """The reference in inference as (queries x L) tensors, in few passes (what an exported
    graph pays for): global spans, and local ones on a short static axis. The similarity BN's
    scales go into q and k and its shifts are dropped (constant along each softmax row, they
    cancel); no concatenation or split of the logits; the output BN and the sum of the two
    retrievals are one affine combination. ``radius``: a local span's r, keys farther away get an
    additive -inf (from sizes). With ``stride_mode="subsample"`` only the kept queries are
    computed (every key still attended).

    Plain 3-D matmuls, no Einsum. The logits are (n h, o, p): q . k and a . v are matmuls batched
    over n h. A relative term's table differs per query (or key), so it is a matmul batched over o
    (or p) instead, whose output must be transposed into the logits' layout: q . r^q is
    (o, n h, p), k . r^k is (p, n h, o), one transpose each, both moving a single axis (which
    ONNX Runtime does fast; others are many times slower). a . r^v reads the attention as
    (o, n h, p): a transpose of the two leading dimensions of a matmul input, which ONNX Runtime
    folds into the matmul. n h stays one dimension throughout: the ONNX exporter's optimizer turns a
    reshape to 3-D, product with a 3-D table, reshape back into one 4-D product, which broadcasts
    the table over n instead (wrong values, no error, where n equals L)."""
    B, _, H, W = x.shape
    L = H if layer.axis == "height" else W
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    step = layer_query_step(layer)

    qkv = to_sequences(layer.bn_qkv(layer.qkv(x)), layer.axis)
    N = qkv.shape[0]
    q, k, v = qkv.reshape(N, heads, 2 * dk + dv, L).split([dk, dk, dv], dim=2)  # (n, h, d, L)
    keys = torch.arange(L, device=x.device)
    queries = keys if step == 1 else torch.arange(0, L, step, device=x.device)
    if step > 1:
        q = q[..., ::step]
    lq = q.shape[-1]
    sim = bn_affine(layer.bn_similarity)[0].reshape(3, 1, heads, 1, 1)
    idx = pair_table_rows(queries, keys, layer.max_relative_distance)  # (L_o, L_p): table row

    # keys beyond a local span (every query keeps its own key): _far() added through the q . r^q
    # product (a channel of ones in q, a row of _far() or 0 in the table: no pass of its own), else -inf
    far = None if radius is None else (keys[None, :] - queries[:, None]).abs() > radius
    terms = []
    if layer.use_qk:
        qs = (q * sim[0]).reshape(N * heads, dk, lq)
        terms.append(torch.matmul(qs.transpose(-1, -2), k.reshape(N * heads, dk, L)))
    if layer.use_query_rpe:  # q_o . r^q_{p-o}: per query o, (n h, c) x (c, p)
        qs, table = q * sim[1], layer.query_table[:, idx]
        if far is not None:
            qs = torch.cat([qs, torch.ones_like(qs[:, :, :1])], dim=2)
            table = torch.cat([table, torch.zeros_like(table[:1]).masked_fill(far, _far(table.dtype))])
            far = None
        qs = qs.reshape(N * heads, qs.shape[2], lq).permute(2, 0, 1)
        terms.append(torch.matmul(qs, table.permute(1, 0, 2)).transpose(0, 1))
    if layer.use_key_rpe:  # k_p . r^k_{p-o}: per key p, (n h, c) x (c, o)
        ks = (k * sim[2]).reshape(N * heads, dk, L).permute(2, 0, 1)
        terms.append(torch.matmul(ks, layer.key_table[:, idx].permute(2, 0, 1)).permute(1, 2, 0))
    logits = sum(terms[1:], terms[0]) if terms else q.new_zeros(N * heads, lq, L)
    if far is not None:
        logits = logits + torch.zeros(far.shape, device=x.device, dtype=logits.dtype).masked_fill(far, float("-inf"))
    attn = torch.softmax(logits, dim=-1)  # (n h, o, p), over keys p

    scale, shift = bn_affine(layer.bn_output)  # channels interleaved [a.v, a.r^v] per value channel
    scale, shift = scale.reshape(heads, 1, dv, 2), shift.reshape(heads, 1, dv, 2)
    out = torch.matmul(attn, v.reshape(N * heads, dv, L).transpose(-1, -2)).reshape(N, heads, lq, dv)
    if layer.use_value_rpe:  # sum a * r^v_{p-o}: per query o, (n h, p) x (p, c)
        sve = torch.matmul(attn.transpose(0, 1), layer.value_table[:, idx].permute(1, 2, 0))
        sve = sve.transpose(0, 1).reshape(N, heads, lq, dv)
        out = out * scale[..., 0] + sve * scale[..., 1] + (shift[..., 0] + shift[..., 1])
    else:
        out = out * scale[..., 0] + shift[..., 0]
    out = out.transpose(-1, -2).reshape(N, heads * dv, lq)
    if step > 1:  # the queries were the strided ones already
        return from_sequences(
            out, layer.axis, B, lq if layer.axis == "height" else H, W if layer.axis == "height" else lq
        )
    return apply_stride(from_sequences(out, layer.axis, B, H, W), layer)


def _take(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``t`` at ``index`` (1-D) along ``dim``: one gather (ONNX Gather) of whole rows, whose output
    size is the index's. Used instead of padding to, or slicing at, a size derived from the axis
    length: those compare sizes (is the padding empty? does the slice reach the end?), and
    torch.export turns each comparison into a guard that fixes the graph to one side of it."""
    return torch.index_select(t, dim, index)


def _skew_rows(x: torch.Tensor, width: int, step: int = 1) -> torch.Tensor:
    """(.., R, C) -> (.., R, width) with out[i, u] = x[i, u - step * i] (zero where u - step * i is
    outside [0, C)); needs width + step >= C + step * (R - 1). Pad, reshape and slice by constant
    sizes: no guard, and ONNX Runtime copies whole rows (a gather of single elements is many times
    slower)."""
    rows, cols = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    x = F.pad(x, (0, width + step - cols)).reshape(*lead, rows * (width + step))
    return x[..., : rows * width].reshape(*lead, rows, width)


def _unskew_rows(x: torch.Tensor, width, step: int = 1) -> torch.Tensor:
    """(.., R, C) -> (.., R, width) with out[i, j] = x[i, step * i + j] (the inverse of
    :func:`_skew_rows`); needs step * i + j < C for every entry kept."""
    rows, cols = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    x = F.pad(x.reshape(*lead, rows * cols), (0, step * rows))
    return x.reshape(*lead, rows, cols + step)[..., :width]


def _diagonals(x: torch.Tensor, width, step: int = 1) -> torch.Tensor:
    """(.., R, C) -> (.., R, width) with out[j, o] = x[j, j + step * o]: row j read from column j on,
    every step-th column; needs j + step * o < C for every entry kept."""
    rows, cols = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    x = F.pad(x.reshape(*lead, rows * cols), (0, rows)).reshape(*lead, rows, cols + 1)
    return x[..., :width] if step == 1 else x[..., : step * width : step]


def _windows(t: torch.Tensor, blocks, b: int, w: int, r: int, step: int = 1) -> torch.Tensor:
    """(n, h, c, L) -> (n * h * blocks, w, c): block k's window of keys, positions
    k * step * b - r + t of the axis (zeros beyond it), in one gather of whole rows. The padding is
    a constant (w + (step - 1) b covers the last window whatever L mod (step b) is); the flat index
    is built without broadcasting a (blocks, 1) column: traced where blocks is 1, a broadcast
    would fix the exported graph to one block (a guard on a size that is 1), and other sizes would
    fail. Three dimensions, contiguous: the matmuls then fold no batch dimensions of strided views
    (which guards on sizes)."""
    t = F.pad(t, (r, w + (step - 1) * b)).transpose(-1, -2)
    flat = torch.arange(blocks * w, device=t.device)
    index = torch.div(flat, w, rounding_mode="floor") * (step * b) + torch.remainder(flat, w)
    return torch.index_select(t, 2, index).reshape(*t.shape[:2], blocks, w, t.shape[-1]).flatten(0, 2)


def _banded_eval(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> torch.Tensor:
    """:func:`axial_attention_banded` in inference, in few passes over the (.., queries, span)
    tensors (what an exported graph pays for). Logits live in query-relative form (o, j), key
    p = s o - r + j for the query at s o (s: the layer's query step, :func:`layer_query_step`; a
    subsampling stride computes only the queries it keeps), so q . r^q and a . r^v are plain
    matmuls with the tables; q . k and a . v go through blocks of b queries (block k's queries
    against its window of w = s (b - 1) + 2r + 1 keys), turned into and out of the (o, j) form by
    skews (pad, reshape, slice by constant sizes), and k . r^k is a (j, key) product read along
    its diagonals into (o, j). The queries are padded to whole blocks by a gather (the last query
    repeated), the keys of k . r^k likewise (the edge keys repeated, then pushed to exp() = 0 by an
    extra channel), and the output rows beyond the queries dropped by another gather: no size is
    compared with another, so a dynamic export stays valid at every length (an axis the blocks
    fill exactly included). The similarity BN's scales go into q and k and its shifts are dropped
    (constant along each softmax row); the output BN and the sum of the two retrievals are one
    affine combination; gradients and BN statistics: :func:`axial_attention_banded`."""
    B, _, H, W = x.shape
    L = H if layer.axis == "height" else W
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    r = layer.max_relative_distance
    s = layer_query_step(layer)
    m = 2 * r + 1
    b = r + 1 if s == 1 else (r + s) // s  # (r + s) // s: the fastest in ONNX Runtime at s = 2
    w = s * (b - 1) + m
    dev = x.device

    qkv = to_sequences(layer.bn_qkv(layer.qkv(x)), layer.axis)
    N = qkv.shape[0]
    q, k, v = qkv.reshape(N, heads, 2 * dk + dv, L).split([dk, dk, dv], dim=2)  # (n, h, d, L)
    sim = bn_affine(layer.bn_similarity)[0].reshape(3, 1, heads, 1, 1)
    lq = L if s == 1 else (L + s - 1) // s  # the queries computed, at positions 0, s, 2s, ..
    blocks = _query_blocks(lq, b)
    padded = blocks * b
    o = torch.arange(padded, device=dev).clamp(max=lq - 1) * s  # query rows; those past lq repeat the last
    q = _take(q.transpose(-1, -2), 2, o)  # (n, h, padded, c), contiguous

    # k . r^k in the blocks' windows when they are narrow enough (a strided layer: its diagonal
    # reading of the (j, key) product below would cover every key, s times the queries)
    windowed_kr = s > 1 and layer.use_qk and layer.use_key_rpe
    terms = []
    if layer.use_qk:  # block k's queries against its window, then (i, t) -> (i, j = t - s i)
        qb = (q * sim[0]).reshape(N, heads, blocks, b, dk).flatten(0, 2)
        kw = _windows(k, blocks, b, w, r, s)  # (n h k, t, c)
        if windowed_kr:  # keys beyond the axis: a channel of ones in q, _far() in theirs
            flat = torch.arange(blocks * w, device=dev)
            pos = torch.div(flat, w, rounding_mode="floor") * (s * b) + torch.remainder(flat, w) - r
            far = torch.zeros(blocks * w, device=dev, dtype=k.dtype).masked_fill((pos < 0) | (pos >= L), _far(k.dtype))
            far = far.reshape(1, blocks, w, 1).expand(N * heads, blocks, w, 1).reshape(kw.shape[0], w, 1)
            qb, kw = torch.cat([qb, torch.ones_like(qb[..., :1])], dim=-1), torch.cat([kw, far], dim=-1)
        qk = torch.matmul(qb, kw.transpose(-1, -2))  # (n h k, i, t)
        if windowed_kr:  # k_t . r^k_{t - s i}: per window key t, (c) x (c, i)
            rows = (torch.arange(w, device=dev)[:, None] - s * torch.arange(b, device=dev)[None, :]).clamp(0, 2 * r)
            kt = _windows(k * sim[2], blocks, b, w, r, s).transpose(0, 1)  # (t, n h k, c)
            qk = qk + torch.matmul(kt, layer.key_table[:, rows].permute(1, 0, 2)).permute(1, 2, 0)
        terms.append(_unskew_rows(qk, m, s).reshape(N, heads, blocks, b, m).flatten(2, 3))
    if layer.use_query_rpe:  # q_o . r^q_j
        terms.append(torch.matmul(q * sim[1], layer.query_table))
    if layer.use_key_rpe and not windowed_kr:  # k_p . r^k_j for keys p = -r .. s padded + r - s,
        # then (j, p) -> (o, j); keys beyond the axis (edge keys repeated) carry a channel that adds
        # _far() to their logits
        p = torch.arange(s * padded + m - s, device=dev) - r
        far = ((p < 0) | (p >= L)).to(k.dtype)[:, None].expand(N, heads, p.shape[0], 1)
        kp = torch.cat([_take((k * sim[2]).transpose(-1, -2), 2, p.clamp(0, L - 1)), far], dim=3)  # (n, h, p, c+1)
        table = torch.cat([layer.key_table, torch.full_like(layer.key_table[:1], _far(k.dtype))])
        kr = torch.matmul(table.t(), kp.transpose(-1, -2))  # (n, h, j, p)
        terms.append(_diagonals(kr, padded, s).transpose(-1, -2))  # [o, j] = kr[j, j + s o]
    logits = sum(terms[1:], terms[0])
    if not layer.use_key_rpe:  # keys beyond the axis: an additive -inf from sizes
        p = o[:, None] - r + torch.arange(m, device=dev)[None, :]
        logits = logits + torch.zeros(padded, m, device=dev, dtype=q.dtype).masked_fill(
            (p < 0) | (p >= L), float("-inf")
        )
    attn = torch.softmax(logits, dim=-1)  # over the span's keys

    ab = _skew_rows(attn.reshape(N, heads, blocks, b, m).flatten(0, 2), w, s)  # (n h k, i, t)
    out = torch.matmul(ab, _windows(v, blocks, b, w, r, s)).reshape(N, heads, blocks, b, dv).flatten(2, 3)
    scale, shift = bn_affine(layer.bn_output)  # channels interleaved [a.v, a.r^v] per value channel
    scale, shift = scale.reshape(heads, 1, dv, 2), shift.reshape(heads, 1, dv, 2)
    if layer.use_value_rpe:  # sum a * r^v_j
        sve = torch.matmul(attn, layer.value_table.t())
        out = out * scale[..., 0] + sve * scale[..., 1] + (shift[..., 0] + shift[..., 1])
    else:
        out = out * scale[..., 0] + shift[..., 0]
    out = _take(out, 2, torch.arange(lq, device=dev))  # the real queries
    out = out.transpose(-1, -2).reshape(N, heads * dv, lq)
    if s > 1:  # the queries were the kept ones already
        hq, wq = (lq, W) if layer.axis == "height" else (H, lq)
        return from_sequences(out, layer.axis, B, hq, wq)
    return apply_stride(from_sequences(out, layer.axis, B, H, W), layer)
