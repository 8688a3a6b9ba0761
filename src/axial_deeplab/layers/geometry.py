"""Geometry, table slicing and BatchNorm folding shared by every attention path.

Why one module: the reference, the chunked PyTorch path, the C kernel, the Triton kernels and
the operators must agree on which keys a query sees, which table row an offset reads, which
query positions a strided layer computes and how the eval BatchNorms fold into scales and
shifts. Written once here, the paths cannot drift apart.

Conventions: a layer attends along one axis of length L; ``layer.max_relative_distance`` (D)
is the reach the attention uses and the tables it reads have ``layer.table_rows`` = 2D+1 rows,
offsets -D..D (longer offsets are clipped to the edge rows).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__ = [
    "LOG2E",
    "attention_radius",
    "span_radius",
    "in_span_pairs",
    "layer_query_step",
    "num_queries",
    "pair_table_rows",
    "offset_table_rows",
    "offset_tables",
    "to_sequences",
    "from_sequences",
    "apply_stride",
    "eval_bn",
    "bn_affine",
    "folded_projection",
    "folded_constants",
]

# The softmax runs in base 2 (exp2 is several times faster than exp): logits are scaled by log2(e).
LOG2E = 1.0 / math.log(2.0)


# --------------------------------------------------------------------------- spans and queries
def attention_radius(layer: PositionSensitiveAxialAttention) -> int:
    """Half-width (m-1)/2 of a local span m, or -1 for a global span (the kernels' convention)."""
    return -1 if layer.span is None else (layer.span - 1) // 2


def span_radius(layer: PositionSensitiveAxialAttention, length) -> Optional[int]:
    """Half-width r of the local span on an axis of ``length``, or None when every key is in
    span (global span, or an axis no longer than the span).

    A symbolic ``length`` (torch.compile / export with dynamic sizes) gives r unless the shape
    environment already knows the axis is covered: comparing would guard on L vs the span and
    recompile when an axis crosses it. Callers handle r >= L - 1 (every window clamped to the
    axis; :func:`in_span_pairs`)."""
    if layer.span is None:
        return None
    r = (layer.span - 1) // 2
    return None if statically_known_true(r >= length - 1) else r  # plain ints: the comparison


def in_span_pairs(length, radius: int):
    """Number of (query, key) pairs with |p - o| <= radius on an axis of ``length``, for any
    radius (an int, or a SymInt without a guard: ``torch.sym_min``)."""
    r = torch.sym_min(radius, length - 1)
    return length * (2 * r + 1) - r * (r + 1)  # each edge loses r(r+1)/2 of the 2r+1 per query


def layer_query_step(layer: PositionSensitiveAxialAttention) -> int:
    """Query positions computed directly: every ``stride``-th with ``stride_mode="subsample"``
    when ``bn_output`` normalises with running statistics (its batch statistics would need every
    position); else 1 and the stride is applied to the output (:func:`apply_stride`)."""
    if layer.stride > 1 and layer.stride_mode == "subsample" and eval_bn(layer.bn_output):
        return layer.stride
    return 1


def num_queries(length: int, step: int) -> int:
    """Query positions 0, step, 2*step, ... below ``length``."""
    return (length + step - 1) // step


# --------------------------------------------------------------------------- table rows
def pair_table_rows(q_pos: torch.Tensor, k_pos: torch.Tensor, max_distance: int) -> torch.Tensor:
    """(len(q_pos), len(k_pos)) table row of each (query, key) pair: clip(p - o, -D, D) + D."""
    return (k_pos[None, :] - q_pos[:, None]).clamp(-max_distance, max_distance) + max_distance


def offset_table_rows(layer: PositionSensitiveAxialAttention, length: int, device=None) -> torch.Tensor:
    """Table row of each offset -(L-1)..L-1 (2L-1 entries, clipped to the reach): the column
    order of the offset ("skewed") tables the C and Triton kernels read."""
    d = layer.max_relative_distance
    return torch.arange(-(length - 1), length, device=device).clamp(-d, d) + d


def offset_tables(layer: PositionSensitiveAxialAttention, length: int, dtype=torch.float32, device=None):
    """(query, key, value) tables gathered over offsets -(L-1)..L-1, each (depth, 2L-1),
    detached and contiguous; None where a term is off."""
    offsets = offset_table_rows(layer, length, device)

    def gather(t):
        return None if t is None else t.detach().to(dtype)[:, offsets].contiguous()

    return gather(layer.query_table), gather(layer.key_table), gather(layer.value_table)


# --------------------------------------------------------------------------- layouts
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
    y = y[:, :, ::s, :] if layer.axis == "height" else y[:, :, :, ::s]
    # traced, a node rather than a strided view: Inductor (dynamic shapes) fails ordering the
    # symbolic strides of a 4-D view it keeps for a convolution's backward
    return y.clone(memory_format=torch.preserve_format) if torch.compiler.is_compiling() else y


# --------------------------------------------------------------------------- BatchNorm folding
def eval_bn(bn) -> bool:
    """Whether ``bn`` normalises with running statistics (and so folds into an affine map)."""
    return not bn.training and bn.running_mean is not None


def bn_affine(bn):
    """An eval BatchNorm as y = x * scale + shift, per channel: (scale, shift)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def folded_projection(layer: PositionSensitiveAxialAttention):
    """The layer's eval BatchNorms folded: (weight (c2, C_in), bias (c2)) of the projection with
    bn_qkv and the output BN's scale of a.v folded in (sum_p a_p (s v_p) = s sum_p a_p v_p), the
    output BN's per-channel scale of a.r^v (None when r^v is off), its shift (both retrievals'
    summed), and the similarity BN's scales (3, heads) (its shifts cancel in the softmax)."""
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    c2h = 2 * dk + dv
    scale, shift = bn_affine(layer.bn_qkv)
    oscale, oshift = (t.view(heads * dv, 2) for t in bn_affine(layer.bn_output))
    mult = torch.ones(heads, c2h, dtype=scale.dtype, device=scale.device)
    mult[:, 2 * dk :] = oscale[:, 0].view(heads, dv)
    scale, shift = scale * mult.view(-1), shift * mult.view(-1)
    w = (layer.qkv.weight.flatten(1) * scale[:, None]).contiguous()
    alpha_r = oscale[:, 1] if layer.use_value_rpe else None
    beta = oshift[:, 0] + oshift[:, 1] if layer.use_value_rpe else oshift[:, 0]
    sim_scales = bn_affine(layer.bn_similarity)[0].view(3, heads)
    return w, shift.contiguous(), alpha_r, beta, sim_scales


def folded_constants(layer: PositionSensitiveAxialAttention) -> dict:
    """A dict for constants derived from the layer's parameters and BN statistics (the folded
    projection, kernel operands), emptied whenever one of them changes: replaced, updated in
    place (tensor version) or given new data (``.data =``, as ``module.to`` does: storage
    address). A fresh, unkept dict for parameters made in ``torch.inference_mode``, which have
    no version counters."""
    tensors = [layer.qkv.weight, *layer.relative_table_parameters()]  # the stored parameters, not views
    for bn in (layer.bn_qkv, layer.bn_similarity, layer.bn_output):
        tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
    tensors = [t for t in tensors if t is not None]
    if any(t.is_inference() for t in tensors):  # no version counters (made in inference_mode)
        return {}
    key = [(t, t._version, t.data_ptr()) for t in tensors]
    key += [bn.eps for bn in (layer.bn_qkv, layer.bn_similarity, layer.bn_output)]
    key += [layer.use_qk, layer.use_query_rpe, layer.use_key_rpe, layer.use_value_rpe, layer.max_relative_distance]
    cached = layer.__dict__.get("_axial_folded_constants")
    if (
        cached is None
        or len(cached[0]) != len(key)
        or not all(
            (a[0] is b[0] and a[1:] == b[1:]) if isinstance(a, tuple) else a == b for a, b in zip(cached[0], key)
        )
    ):
        cached = (key, {})
        layer.__dict__["_axial_folded_constants"] = cached  # a plain attribute: not state, not a buffer
    return cached[1]


def normalised(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """A training BatchNorm's output ``scale * y + shift`` from its input and per-channel affine
    terms: the one call the qkv BatchNorm's forward and every backward that forms its output again
    make, so that output comes out with the same bits each time."""
    return torch.addcmul(shift, y, scale)
