"""Chunked PyTorch attention: the reference's math in any dtype, on any device.

What it does differently from :mod:`.reference` (every L x L tensor of every term stored) and
from the C kernel of :mod:`.cpu_kernel` (float32 CPU rows, no autograd): ordinary PyTorch
operators, organised so that no per-position embedding tensor (L x L x d) and no stacked
(3 x heads) similarity tensor is ever built, with autograd through it. It is the attention of
``impl="fast"`` (the C kernel in inference where it applies, else this, with autograd's
backward) and the forward of the memory-efficient path's "chunked" route off CPU, in float64,
or without a C compiler.

* Eval folds ``bn_qkv`` into the 1x1 projection, and ``bn_similarity`` into one scale
  per (term, head): a BN shift is a per-row constant of the logits and cancels in the
  softmax (also under a local span: it is constant over the in-span keys of a row).
  ``bn_output`` becomes a per-channel affine map applied to the small outputs.
* Training needs the similarity BN *batch* statistics: :mod:`.similarity_stats` gives them
  in closed form, never from the L x L logits.
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

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

import torch

from . import cpu_kernel
from .geometry import (
    LOG2E,
    apply_stride,
    bn_affine,
    eval_bn,
    from_sequences,
    layer_query_step,
    pair_table_rows,
    span_radius,
    to_sequences,
)
from .similarity_stats import similarity_scales

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__ = [
    "axial_attention_fast",
    "project_sequences",
    "plan_blocks",
    "gather_tables",
    "attend",
    "finish_output",
    "run_layer",
    "needs_grad",
    "CHUNK_ELEMENTS",
]

# Masked (out-of-span) logits: a large finite negative, so exp2 gives exactly 0 and
# no inf*0 appears in any product.
MASK_VALUE = -1.0e30
# Budget for one chunk's L x L logits (elements): 512 KB in fp32, so a chunk's few
# L x L temporaries stay in a core's L2 cache.
CHUNK_ELEMENTS = 1 << 17


# --------------------------------------------------------------------------- projection
def project_sequences(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> qkv sequences (N*heads, 2*dk+dv, L), BN applied.

    With ``bn_qkv`` in eval mode the BN is folded into the projection (one batched
    matrix product); in training the module runs on the sequence layout, which gives
    BatchNorm2d's statistics exactly (same elements per channel)."""
    xs = to_sequences(x, layer.axis)  # (N, C_in, L)
    weight = layer.qkv.weight.flatten(1)  # (C2, C_in)
    bn = layer.bn_qkv
    if eval_bn(bn):
        scale, b = bn_affine(bn)
        w = weight * scale[:, None]
        y = torch.baddbmm(b[None, :, None].to(xs.dtype), w.to(xs.dtype).expand(xs.shape[0], -1, -1), xs)
    else:
        y = torch.matmul(weight.to(xs.dtype), xs)
        y = bn(y.unsqueeze(-1)).squeeze(-1)
    n, c2, length = y.shape
    return y.reshape(n * layer.num_heads, c2 // layer.num_heads, length)


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


def gather_tables(
    layer: PositionSensitiveAxialAttention, block: Block, radius: Optional[int], dtype, device
) -> BlockTables:
    q_pos = torch.arange(block.q_start, block.q_stop, block.q_step, device=device)
    k_pos = torch.arange(block.k0, block.k1, device=device)
    idx = pair_table_rows(q_pos, k_pos, layer.max_relative_distance)
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


def prepare_operands(
    layer, qkv: torch.Tensor, scales: torch.Tensor, query_step: int, local: bool, diagonal_shift: bool = True
) -> Operands:
    dk = layer.key_depth
    nh, _, length = qkv.shape
    q, k, v = qkv[:, :dk], qkv[:, dk : 2 * dk], qkv[:, 2 * dk :]
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


def diagonal_logits(layer: PositionSensitiveAxialAttention, q_qk, q_qr, k, k_kr) -> torch.Tensor:
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
    return [
        Operands(*fields, ops.shift_col)
        for fields in zip(parts(ops.qo, 1), parts(ops.qt, 0), parts(ops.k, 0), parts(ops.ko, 1), parts(ops.v, 0))
    ]


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


def block_logits(layer: PositionSensitiveAxialAttention, tabs: BlockTables, ops: Operands, block: Block):
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


def attend(
    layer: PositionSensitiveAxialAttention,
    qkv: torch.Tensor,
    scales: torch.Tensor,
    query_step: int = 1,
    return_lse: bool = False,
):
    """sum_p a_op v_p and sum_p a_op r^v_{p-o} for qkv (nh, 2dk+dv, L).

    Returns ``(sv, sve)``, each (nh, dv, L_out) with L_out = ceil(L / query_step)
    (``sve`` is None when r^v is off), and optionally the per-row log2-sum-exp2
    (nh, L_out) used by the memory-efficient backward."""
    if not needs_grad(layer, qkv, scales):
        out = cpu_kernel.attend_eval(layer, qkv, scales, query_step, return_lse)
        if out is not None:
            return out
    nh, _, length = qkv.shape
    radius = span_radius(layer, length)
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


def needs_grad(layer: PositionSensitiveAxialAttention, qkv, scales) -> bool:
    """Whether autograd records this call (an input or a table needs a gradient)."""
    if not torch.is_grad_enabled():
        return False
    tables = (layer.query_table, layer.key_table, layer.value_table)
    return qkv.requires_grad or scales.requires_grad or any(t is not None and t.requires_grad for t in tables)


def _attend_blocks(layer: PositionSensitiveAxialAttention, ops: Operands, blocks, radius, qkv, exact_max: bool):
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
                shift = -ch.qo[o0 : o0 + nq, :, ops.shift_col].t()
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
def finish_output(
    layer, sv: torch.Tensor, sve: Optional[torch.Tensor], batch: int, height: int, width: int, out_dtype
) -> torch.Tensor:
    """bn_output on the two retrievals (interleaved channels), their sum, back to
    (B, C, H, W). In eval the BN is an affine map on the small outputs."""
    nh, dv, length = sv.shape
    n = nh // layer.num_heads
    c = layer.num_heads * dv
    sv = sv.reshape(n, c, length)
    sve = sve.reshape(n, c, length) if sve is not None else None
    bn = layer.bn_output
    if eval_bn(bn):
        scale, shift = (t.view(c, 2) for t in bn_affine(bn))
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
def run_layer(layer: PositionSensitiveAxialAttention, x: torch.Tensor, core) -> torch.Tensor:
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
        scales = similarity_scales(layer, qkv[:, :dk].reshape(shape4), qkv[:, dk : 2 * dk].reshape(shape4))
        step = layer_query_step(layer)
        sv, sve = core(layer, qkv, scales, step)
        y = finish_output(layer, sv, sve, batch, height, width, out_dtype)
    if step == 1:
        y = apply_stride(y, layer)
    return y


def _autograd_core(layer: PositionSensitiveAxialAttention, qkv, scales, step):
    return attend(layer, qkv, scales, step)


def axial_attention_fast(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> torch.Tensor:
    """``impl="fast"``: the CPU fast path (training backward by autograd)."""
    y = cpu_kernel.forward_eval(layer, x)  # inference with the compiled kernel, when it applies
    if y is not None:
        return y
    return run_layer(layer, x, _autograd_core)
