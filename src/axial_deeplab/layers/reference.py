"""The plain reference implementation of position-sensitive axial attention.

Written straight from the equation, materialising every L x L tensor. It is slow
on purpose: it is the oracle every faster path is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .axial_attention import register_attention_impl
from .sync import all_reduce_count, differentiable_all_reduce, should_sync


def relative_index(length: int, max_distance: int, device=None) -> torch.Tensor:
    """(L, L) table row for query o (dim 0) and key p (dim 1): clip(p - o, -D, D) + D."""
    pos = torch.arange(length, device=device)
    return (pos[None, :] - pos[:, None]).clamp(-max_distance, max_distance) + max_distance


def span_mask(length: int, span, device=None) -> torch.Tensor:
    """(L, L) bool: key p lies in the span of query o (|p - o| <= (m-1)/2; all for global)."""
    pos = torch.arange(length, device=device)
    if span is None:
        return torch.ones(length, length, dtype=torch.bool, device=device)
    return (pos[None, :] - pos[:, None]).abs() <= (span - 1) // 2


def masked_batch_norm(x: torch.Tensor, mask: torch.Tensor, bn: nn.BatchNorm2d, sync: bool = False) -> torch.Tensor:
    """BatchNorm2d over (N, C, L, L) whose statistics use only entries where ``mask`` (L, L)
    is true, with nn.BatchNorm2d's running-statistics semantics. ``sync``: sum the statistics
    over processes (DDP; see ``layers.sync``)."""
    if bool(mask.all()) and not sync:
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


def to_sequences(t: torch.Tensor, axis: str) -> torch.Tensor:
    """(B, C, H, W) -> (B*other, C, L) with L the attended axis."""
    if axis == "height":
        return t.permute(0, 3, 1, 2).reshape(-1, t.shape[1], t.shape[2])
    return t.permute(0, 2, 1, 3).reshape(-1, t.shape[1], t.shape[3])


def from_sequences(s: torch.Tensor, axis: str, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`to_sequences`."""
    c = s.shape[1]
    if axis == "height":
        return s.reshape(batch, width, c, height).permute(0, 2, 3, 1)
    return s.reshape(batch, height, c, width).permute(0, 2, 1, 3)


def apply_stride(y: torch.Tensor, layer) -> torch.Tensor:
    """Stride after the layer, on its own axis (or 2-D for the port's avgpool2d).

    Every mode keeps ceil(L / s) positions, like a strided conv shortcut does on odd lengths
    (pooling windows cut by the border average the positions they hold)."""
    s = layer.stride
    if s == 1:
        return y
    if layer.stride_mode == "avgpool2d":
        return F.avg_pool2d(y, s, s, ceil_mode=True)
    if layer.stride_mode == "avgpool":
        k = (s, 1) if layer.axis == "height" else (1, s)
        return F.avg_pool2d(y, k, k, ceil_mode=True)
    return y[:, :, ::s, :] if layer.axis == "height" else y[:, :, :, ::s]


def axial_attention_reference(layer, x: torch.Tensor) -> torch.Tensor:
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
    stacked = masked_batch_norm(stacked, mask, layer.bn_similarity, sync=should_sync(layer))
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
    out = torch.stack([sv, sve], dim=3).reshape(N, 2 * heads * dv, L)  # interleaved [c, retrieval]
    out = layer.bn_output(out).reshape(N, heads * dv, 2, L)
    out = out.sum(dim=2) if layer.use_value_rpe else out[:, :, 0]
    y = from_sequences(out, layer.axis, B, H, W)
    return apply_stride(y, layer)


register_attention_impl("reference", axial_attention_reference)
