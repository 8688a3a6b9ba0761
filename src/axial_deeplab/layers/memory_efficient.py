"""Memory-efficient training path (``impl="memory_efficient"``).

The forward is :func:`.chunked.attend` (the compiled kernel on CPU); a custom autograd
function keeps only its inputs, its two small outputs and one log-sum-exp per query
row, and recomputes the L x L logits in the backward (as memory-efficient / flash
attention does): row by row in the compiled kernel of :mod:`.cpu_kernel` (float32 on
CPU), else chunk by chunk in PyTorch (both in :mod:`.recompute`).
The similarity BN batch statistics are exact and come from :mod:`.similarity_stats` (closed
forms for a global span, banded blocks of in-span logits for a local one, each with its own
backward), so no L x L tensor of any term is ever kept for the backward; the live L x L memory
is one chunk's.

On CPU (float32 and float64) the layer runs through the registered operators of :mod:`.ops`
instead, so ``torch.compile`` and ``torch.export`` see it: inference as one operator with every
BN folded (:func:`run_layer_eval_op`), training in position-major layout (rows of channels,
:func:`run_layer_position_major`): no sequence-layout copies, both BatchNorms on rows, the
operator's kernels reading the projection and the gradients where they lie, the similarity
moments with closed-form or banded backwards (:class:`.similarity_stats.RowMoments`,
:class:`.similarity_stats.BandMoments`).
The sequence-layout function above stays the path of other devices and the operators' fallback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .activation_recompute import reused
from .chunked import attend, needs_grad, run_layer
from .dispatch import graph_recorder, runs_eagerly
from .geometry import apply_stride, eval_bn, folded_constants, folded_projection, layer_query_step, normalised
from .recompute import recompute_backward
from .row_batch_norm import formed_from, normalised_sum, output_batch_norm_sum
from .similarity_stats import similarity_moments_rows, similarity_scales
from .sync import should_sync

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention

__all__ = [
    "axial_attention_memory_efficient",
    "AxialAttentionFunction",
    "memory_efficient_core",
    "run_layer_position_major",
    "run_layer_eval_op",
    "routes",
    "select_route",
    "refusal",
    "ROUTES",
]


class AxialAttentionFunction(torch.autograd.Function):
    """(qkv, scales) -> (sv, sve) with recomputation in the backward.

    ``qkv``: (nh, 2dk+dv, L) float tensor; ``scales``: (3, heads) per-term BN multipliers;
    the relative tables are passed so autograd routes their gradients. ``attend_fn`` and
    ``backward_fn`` (same contract as :func:`recompute_backward`, the default) let a device kernel
    supply both halves (the Triton path)."""

    @staticmethod
    def forward(
        ctx, qkv, scales, query_table, key_table, value_table, layer, query_step, attend_fn=attend, backward_fn=None
    ):
        with torch.no_grad():
            sv, sve, lse = attend_fn(layer, qkv, scales, query_step, return_lse=True)
        if sve is None:
            sve = sv.new_zeros(0)
        ctx.layer = layer
        ctx.query_step = query_step
        ctx.backward_fn = recompute_backward if backward_fn is None else backward_fn
        ctx.save_for_backward(qkv, scales, sv, sve, lse)
        return sv, sve

    @staticmethod
    def backward(ctx, g_sv, g_sve):
        qkv, scales, sv, sve, lse = ctx.saved_tensors
        layer, step = ctx.layer, ctx.query_step
        with torch.no_grad():
            grads = ctx.backward_fn(layer, step, qkv, scales, sv, sve, lse, g_sv, g_sve)
        g_qkv, g_scales, g_rq, g_rk, g_rv = grads
        return g_qkv, g_scales, g_rq, g_rk, g_rv, None, None, None, None


def memory_efficient_core(
    layer: PositionSensitiveAxialAttention, qkv, scales, step, attend_fn=attend, backward_fn=None
):
    """``attend_fn(layer, qkv, scales, step)`` (default :func:`.chunked.attend`) with the
    recompute-in-backward function around it when gradients are needed (its backward
    ``backward_fn``, default :func:`recompute_backward`)."""
    if not needs_grad(layer, qkv, scales):
        return attend_fn(layer, qkv, scales, step)
    sv, sve = AxialAttentionFunction.apply(
        qkv, scales, layer.query_table, layer.key_table, layer.value_table, layer, step, attend_fn, backward_fn
    )
    return sv, (sve if layer.use_value_rpe else None)


# --------------------------------------------------------------------------- position-major CPU path
# Training runs in position-major layout end to end: the input is read as rows of channels (one
# copy at most, none for channels_last input along the width), the projection is one matrix
# product, both BatchNorms normalise rows of channels (several times faster on CPU than the
# (N, C, L) layout), and the operator's forward and backward kernels read the projection and the
# incoming gradients where they lie and write the output and the qkv gradient in the same
# layout, so no sequence-layout tensor is ever built.
class _SumHalves(torch.autograd.Function):
    """(M, 2C) -> (M, C): the two halves of each row added; the backward is one copy of the
    gradient into both halves (slicing would zero-fill a full-size gradient per half)."""

    @staticmethod
    def forward(ctx, t):
        c = t.shape[1] // 2
        return t[:, :c] + t[:, c:]

    @staticmethod
    def backward(ctx, g):
        return g.repeat(1, 2)


def _rows_of(x: torch.Tensor, axis: str) -> torch.Tensor:
    """(B, C, H, W) -> (N*L, C): the layer's position-major rows, sequence by sequence (a view
    for a channels_last input along the width, else a copy)."""
    return (x.permute(0, 3, 2, 1) if axis == "height" else x.permute(0, 2, 3, 1)).reshape(-1, x.shape[1])


def _input_of(rows: torch.Tensor, shape, axis: str) -> torch.Tensor:
    """The inverse of :func:`_rows_of`: rows (N*L, C) as a (B, C, H, W) view."""
    batch, c, height, width = shape
    if axis == "height":
        return rows.view(batch, width, height, c).permute(0, 3, 2, 1)
    return rows.view(batch, height, width, c).permute(0, 3, 1, 2)


class _ProjectRows(torch.autograd.Function):
    """(x (B, C, H, W), weight (C2, C)) -> the rows of x (:func:`_rows_of`) @ weight.t(),
    keeping x itself for the weight's gradient, or nothing of it where x is another layer's
    output BatchNorm sum (``formed``, :func:`.row_batch_norm.formed_from`), and forming the rows
    again in the backward.

    Why: autograd's product would keep the rows, which for the height axis (and an NCHW input
    along the width) are a copy of x, beside x, which the block's ReLU before the layer keeps
    anyway: 28 of the 658 MiB that an Axial-DeepLab-S training step at 2x3x257x257 keeps for its
    backward, 38 of 667 for Axial-ResNet-S at 4x3x224x224. And the width layer's input, the
    height layer's output, is kept by nothing else: it is formed again from the height layer's
    output BatchNorm input, which that BatchNorm keeps anyway (peaks 633 -> 612 MiB for that
    Axial-DeepLab-S step, 648 -> 623 for that Axial-ResNet-S one). Forming them again costs one
    copy of the input per layer in the backward (for the width layer, one pass over the height
    layer's two retrievals). The products are autograd's own (bit-identical gradients)."""

    @staticmethod
    def forward(ctx, x, weight, axis, formed=None):
        if formed is None:
            ctx.save_for_backward(x, weight)
        else:  # (y, coef, grid, swap, step): x = normalised_sum(y, coef, grid, swap, step)
            ctx.save_for_backward(formed[0], weight, formed[1])
        ctx.axis, ctx.shape, ctx.formed = axis, x.shape, None if formed is None else formed[2:]
        return _rows_of(x, axis) @ weight.t()

    @staticmethod
    def backward(ctx, g):
        if ctx.formed is None:
            x, weight = ctx.saved_tensors
        else:
            y, weight, coef = ctx.saved_tensors
            x = normalised_sum(y, coef, *ctx.formed) if ctx.needs_input_grad[1] else None
        g_x = g_w = None
        if ctx.needs_input_grad[0]:
            g_x = _input_of(g @ weight, ctx.shape, ctx.axis)
        if ctx.needs_input_grad[1]:
            g_w = (_rows_of(x, ctx.axis).t() @ g).t()  # as autograd's mm backward forms it
        return g_x, g_w, None, None


def _projection(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> torch.Tensor:
    """The qkv projection of ``x``'s rows (N*L, C2); in eager training through :class:`_ProjectRows`."""
    weight = layer.qkv.weight.flatten(1)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and runs_eagerly(x):
        formed = formed_from(x) if FORM_INPUT_AGAIN else None
        return _ProjectRows.apply(x, weight, layer.axis, formed)
    return _rows_of(x, layer.axis) @ weight.t()


# Off only to compare against keeping another layer's output that feeds the projection (tests).
FORM_INPUT_AGAIN = True


class _RowsBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm of rows (M, C) with batch statistics (running statistics updated
    in place, as ``F.batch_norm`` does), with a backward of two elementwise passes:
    g_y = g * A + y * B + C per channel, from the weight and bias gradients. PyTorch's CPU
    ``native_batch_norm_backward`` walks a (M, C) input one element per channel-row (several
    times slower at the widths of the attention layers).

    The output is formed as ``alpha * y + beta`` (:func:`.geometry.normalised`) from the
    per-channel affine terms, which are returned too (non-differentiable): its consumers can keep
    ``y`` (which this keeps anyway) and them for their backwards instead of the output (the
    ``source`` and ``affine`` of ``ops.attention_rows`` and of the moments), so the output is freed
    after the forward.

    ``grad_in_place``: the caller guarantees that the output's gradient reaches the backward as a
    tensor nobody else holds (its consumers' gradients are fresh tensors, summed by autograd), so
    the input gradient is written over it: no fresh (M, C) tensor and its page faults."""

    @staticmethod
    def forward(ctx, y, weight, bias, running_mean, running_var, momentum, eps, grad_in_place=False):
        # batch mean and biased variance in one pass, the running statistics updated as
        # native_batch_norm does (unbiased variance); then the output in one more pass
        mean, var = reused(
            ("qkv batch norm", tuple(y.shape)),
            lambda: torch.batch_norm_update_stats(y, running_mean, running_var, momentum),
        )
        invstd = torch.rsqrt(var + eps)
        alpha = weight.detach() * invstd
        beta = bias.detach() - mean * alpha
        out = normalised(y, alpha, beta)
        ctx.save_for_backward(y, weight, mean, invstd)
        ctx.eps = eps
        ctx.grad_in_place = grad_in_place
        ctx.mark_non_differentiable(alpha, beta)
        return out, alpha, beta

    @staticmethod
    def backward(ctx, g, _g_alpha, _g_beta):
        y, weight, mean, invstd = ctx.saved_tensors
        g = g.contiguous()
        _, g_w, g_b = torch.ops.aten.native_batch_norm_backward(
            g, y, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True]
        )
        g_y = None
        if ctx.needs_input_grad[0]:
            m = y.shape[0]
            a = weight * invstd
            b = a * invstd * g_w / -m
            c = a * g_b / -m - b * mean
            if ctx.grad_in_place and g.dtype == y.dtype and not torch.is_grad_enabled():
                g_y = torch.addcmul(c, g, a, out=g).addcmul_(y, b)
            else:
                g_y = torch.addcmul(c, g, a).addcmul_(y, b)
        return g_y, g_w, g_b, None, None, None, None, None


def _batch_norm(
    y,
    mean,
    var,
    weight,
    bias,
    use_batch: bool,
    factor: float,
    eps: float,
    grad_in_place: bool = False,
    affine: bool = False,
):
    """``F.batch_norm`` on rows, through :class:`_RowsBatchNorm` in eager training (``grad_in_place``
    as there). ``affine``: returns ``(out, (alpha, beta))``, the affine terms that formed ``out``
    from ``y``, or ``(out, None)`` where ``F.batch_norm`` ran."""
    if (
        use_batch
        and weight is not None
        and bias is not None
        and y.dim() == 2
        and y.shape[0] > 1
        and y.device.type == "cpu"
        and not torch.compiler.is_compiling()
    ):
        out, alpha, beta = _RowsBatchNorm.apply(y.contiguous(), weight, bias, mean, var, factor, eps, grad_in_place)
        return (out, (alpha, beta)) if affine else out
    out = F.batch_norm(y, mean, var, weight, bias, use_batch, factor, eps)
    return (out, None) if affine else out


# Off only to compare against keeping the normalised projection (tests).
FREE_NORMALIZED_PROJECTION = True


def _batch_norm_rows(
    bn, y: torch.Tensor, perm: Optional[torch.Tensor] = None, grad_in_place: bool = False, affine: bool = False
):
    """``bn`` (BatchNorm1d/2d, same semantics) on rows (M, C) of channels, channel j of ``y``
    being the module's channel ``perm[j]`` when given (``grad_in_place``: see :class:`_RowsBatchNorm`;
    ``affine`` as in :func:`_batch_norm`, without ``perm``)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    mean = bn.running_mean if keep else None
    var = bn.running_var if keep else None
    weight, bias = bn.weight, bn.bias
    if perm is not None:
        weight = weight[perm] if weight is not None else None
        bias = bias[perm] if bias is not None else None
        mean_p = mean[perm] if mean is not None else None
        var_p = var[perm] if var is not None else None
        out = _batch_norm(y, mean_p, var_p, weight, bias, use_batch, factor, bn.eps)
        if use_batch and mean is not None:
            with torch.no_grad():
                mean.index_copy_(0, perm, mean_p)
                var.index_copy_(0, perm, var_p)
        return out
    return _batch_norm(y, mean, var, weight, bias, use_batch, factor, bn.eps, grad_in_place, affine)


def _fused_output_bn(bn, out: torch.Tensor) -> bool:
    """Whether ``axial_deeplab::output_bn_sum`` (:mod:`.row_batch_norm`) takes the output BN:
    training with batch statistics and an affine BN, on CPU."""
    return bn.training and bn.affine and out.dim() == 2 and out.shape[0] > 1 and out.device.type == "cpu"


# --------------------------------------------------------------------------- through the operators
# The default CPU path: the attention as the registered operators of :mod:`.ops` (the C kernel
# inside, the PyTorch path when it cannot run), so torch.compile / torch.export see one opaque
# node with known shapes. Nothing here reads tensor values: every data-dependent choice is made
# inside the operators.
def _op_refusal(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> Optional[str]:
    """Why the operators of :mod:`.ops` cannot take this layer and input, or None."""
    plain_bn = (nn.BatchNorm1d, nn.BatchNorm2d)
    if x.device.type != "cpu":
        return f"the operators have CPU implementations only (input on {x.device.type})"
    if x.dtype not in (torch.float32, torch.float64):
        return f"the operators take float32 and float64 (input is {x.dtype})"
    if layer.qkv.weight.dtype != x.dtype:
        return f"parameters ({layer.qkv.weight.dtype}) and input ({x.dtype}) differ in dtype"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on"
    if type(layer.bn_qkv) not in plain_bn or type(layer.bn_output) not in plain_bn:
        return "a BatchNorm is not a plain nn.BatchNorm (SyncBatchNorm?)"
    if should_sync(layer):
        return "the similarity statistics are summed over processes (DDP)"
    recorder = graph_recorder()
    if recorder == "ONNX export":
        return "ONNX export is running and ONNX has no axial_deeplab operators"
    if recorder is not None:
        return (
            "torch.jit.trace is running and a trace holding axial_deeplab operators "
            "would load only where this package is imported"
        )
    return None


def _route_refusal(route: str, layer, x: torch.Tensor) -> Optional[str]:
    if route == "chunked":
        recorder = graph_recorder()
        if recorder is not None:
            return (
                f"{recorder} is running and this route calls the C kernel through ctypes (on CPU) and "
                f"branches on tensor values (invisible to the tracer: the trace would be silently wrong)"
            )
        if x.device.type == "meta":
            return "meta tensors hold no values (this route branches on them)"
        if x.device.type == "cpu" and torch.compiler.is_compiling():
            return "torch.compile/export is tracing and this route calls the C kernel through ctypes"
        return None
    reason = _op_refusal(layer, x)
    if reason is not None or route == "rows_op":
        return reason
    if torch.is_grad_enabled():
        return "gradients are enabled"
    if not all(eval_bn(bn) for bn in (layer.bn_qkv, layer.bn_similarity, layer.bn_output)):
        return "a BatchNorm uses batch statistics (training mode)"
    return None


ROUTES = ("eval_op", "rows_op", "chunked")
ROUTE_DESCRIPTIONS = {
    "eval_op": "inference as one operator, axial_deeplab::attention_eval, every BN folded (CPU)",
    "rows_op": "position-major rows through axial_deeplab::attention_rows, recompute backward (CPU)",
    "chunked": "sequence layout, chunked PyTorch attention with a recompute backward (any device)",
}


def routes(layer: PositionSensitiveAxialAttention, x: torch.Tensor):
    """``[(route, None or why not)]`` in the order :func:`axial_attention_memory_efficient`
    tries them: the eval operator, the rows operator, the chunked sequence-layout path."""
    return [(r, _route_refusal(r, layer, x)) for r in ROUTES]


def refusal(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> Optional[str]:
    """None when some route can run (the chunked one, the cheapest to ask, first), else every
    route's reason."""
    if _route_refusal("chunked", layer, x) is None or select_route(layer, x) is not None:
        return None
    return "; ".join(f"{route}: {why}" for route, why in routes(layer, x))


def select_route(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> Optional[str]:
    """The first route that can run, or None."""
    for route in ROUTES:
        if _route_refusal(route, layer, x) is None:
            return route
    return None


def _tables(layer: PositionSensitiveAxialAttention):
    return layer.query_table, layer.key_table, layer.value_table


def run_layer_eval_op(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> torch.Tensor:
    """Inference with every BN folded, through ``axial_deeplab::attention_eval``. In eager the
    folded constants are kept on the layer until a parameter changes; traced, they are
    ordinary operations of the graph."""
    if torch.compiler.is_compiling():
        folded = folded_projection(layer)
    else:
        cache = folded_constants(layer)
        if "projection" not in cache:
            cache["projection"] = folded_projection(layer)
        folded = cache["projection"]
    w, shift, alpha_r, beta, sim_scales = folded
    step = layer_query_step(layer)
    y = ops.attention_eval(
        x,
        w,
        shift,
        sim_scales,
        *_tables(layer),
        alpha_r,
        beta,
        *ops.layer_args(layer),
        layer.axis == "height",
        step,
    )
    return apply_stride(y, layer) if step == 1 else y


def run_layer_position_major(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer in position-major layout, the attention as ``axial_deeplab::attention_rows``
    (training, or inference with batch statistics)."""
    batch, _, height, width = x.shape
    heads, dv = layer.num_heads, layer.value_depth
    c = heads * dv
    if layer.axis == "height":  # sequences (b, w) along h
        nseq, length = batch * width, height
    else:  # sequences (b, h) along w
        nseq, length = batch * height, width
    projection = _projection(layer, x)  # (N*L, C2)
    # the normalised projection feeds only the attention operator and the moments, whose backwards
    # return fresh gradients: its gradient is ours to write over
    y, affine = _batch_norm_rows(layer.bn_qkv, projection, grad_in_place=True, affine=True)
    # their backwards keep the projection (kept for the BatchNorm's backward anyway) and the affine
    # terms instead, and their kernels apply those as they load: y is freed after the forward
    source = None
    if affine is not None and FREE_NORMALIZED_PROJECTION:
        source, affine = projection, torch.stack(affine)
    else:
        affine = None
    scales = similarity_scales(
        layer, None, None, moments=lambda: similarity_moments_rows(layer, y, nseq, length, source, affine)
    )
    out, _ = ops.attention_rows_entry(y)(
        y,
        scales,
        *_tables(layer),
        nseq,
        *ops.layer_args(layer),
        length,
        source,
        affine,
    )
    # bn_output's channel 2j + r is retrieval r of value channel j; ours are [sv | sve]
    if layer.use_value_rpe and _fused_output_bn(layer.bn_output, out):
        # (b, c, h, w) laid out (b, h, w, c), channels_last, as the width layer after a height
        # layer reads its input: the height layer's rows (b, w, h) are written swapped
        grid = (batch, width, height) if layer.axis == "height" else (batch, height, width)
        # a subsample is kept by the operator itself (its gradient comes back channels_last; a
        # slice in the graph would guard on the length's parity); pooling modes stay after it
        step = layer.stride if layer.stride_mode == "subsample" else 1
        y4 = output_batch_norm_sum(layer.bn_output, out, grid, swap=layer.axis == "height", step=step)
        return y4 if step > 1 else apply_stride(y4, layer)
    perm = torch.arange(2 * c, device=x.device).view(c, 2).t().reshape(-1)
    out = _batch_norm_rows(layer.bn_output, out, perm)
    out = _SumHalves.apply(out) if layer.use_value_rpe else out[:, :c]
    if layer.axis == "height":
        y4 = out.reshape(batch, width, height, c).permute(0, 3, 2, 1)
    else:
        y4 = out.reshape(batch, height, width, c).permute(0, 3, 1, 2)  # channels_last
    return apply_stride(_graph_node(y4), layer)


def _graph_node(y4: torch.Tensor) -> torch.Tensor:
    """Traced, a copy of the 4-D view ``y4`` of the layer's rows (a graph node, not a view):
    Inductor (dynamic shapes) cannot order the symbolic strides of a channels_last 4-D view and
    fails; in eager the view itself."""
    return y4.clone(memory_format=torch.preserve_format) if torch.compiler.is_compiling() else y4


def axial_attention_memory_efficient(layer: PositionSensitiveAxialAttention, x: torch.Tensor) -> torch.Tensor:
    """``impl="memory_efficient"``: recompute-in-backward training path."""
    route = select_route(layer, x)
    if route == "eval_op":
        return run_layer_eval_op(layer, x)
    if route == "rows_op":
        return run_layer_position_major(layer, x)
    if route == "chunked":  # other devices (CUDA without Triton) and dtypes
        return run_layer(layer, x, memory_efficient_core)
    raise ValueError(
        "attention impl 'memory_efficient' cannot run here: " + "; ".join(f"{r}: {why}" for r, why in routes(layer, x))
    )
