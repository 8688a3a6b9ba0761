"""The training path's output BatchNorm of rows, fused with the sum of its halves, as a PyTorch
operator (``torch.ops.axial_deeplab.output_bn_sum`` and its backward).

Why an operator: the position-major layer's output BatchNorm normalises rows (M, 2C) =
[sv | sve] and adds the two halves, through the C kernels of :mod:`.cpu_kernel` (two passes
forward, two backward, no normalised (M, 2C) tensor). As plain PyTorch operations traced by
``torch.compile``, the same step became a channel-permuted ``native_batch_norm`` and its backward,
which Inductor's generated loops ran at 4-5x the kernels' time (about 250 ms of a 2.5 s
Axial-DeepLab-S training step). As an operator with a registered backward, eager and compiled
graphs call the same kernels.

The operator is functional: it returns the batch mean and variance, and the caller updates the
module's running statistics from them (:func:`output_batch_norm_sum`).
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import cpu_kernel
from .activation_recompute import reused
from .dispatch import runs_eagerly

__all__ = ["output_bn_sum", "output_bn_sum_backward", "output_batch_norm_sum", "formed_from", "normalised_sum"]

_NS = "axial_deeplab"


def _ours(t: Tensor, c: int) -> Tensor:
    """A (2C,) per-channel vector of bn_output, in its order (2j + r), as a (2, C) view in ours (r, j)."""
    return t.view(c, 2).t()


def _module_order(t: Tensor) -> Tensor:
    """(2, C) in our order (r, j) -> (2C,) in bn_output's (2j + r)."""
    return t.t().reshape(-1)


def _rows_grid(m: int, grid: Optional[Sequence[int]]):
    return tuple(grid) if grid is not None else (m, 1, 1)


def _output_bn_sum(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    grid: Optional[Sequence[int]],
    swap: bool,
    step: int = 1,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(M, 2C) rows [sv | sve] -> (out, mean, var): the rows normalised with their batch
    statistics and the module's affine ``weight``, ``bias`` (2C,) in its channel order (channel
    2j + r is our r*C + j), the two halves added; out (M, C), or for rows (b, s, t) of ``grid``
    (B, S, T) a channels_last 4-D tensor: (B, C, S, T), or (B, C, T, S) with ``swap`` (the rows
    written as (b, t, s, C)); mean and the biased variance (2, C) in our order.

    ``step`` > 1 (with a grid): only every ``step``-th t is output (a strided layer's subsample;
    the statistics still cover every row). Done here rather than by slicing the output in the
    graph: traced with symbolic sizes, a strided slice guards on the parity of the length, and a
    training step recompiled at each new parity."""
    m, c2 = y.shape
    c = c2 // 2
    y = y.detach().contiguous()
    # the batch statistics of PyTorch's CPU BatchNorm (the same numbers as F.batch_norm's);
    # torch.var_mean over the rows' outer dim is ~25x slower
    # (a recomputed layer's replay reuses its first forward's)
    mean, var = reused(("output batch norm", tuple(y.shape)), lambda: torch.batch_norm_update_stats(y, None, None, 0.0))
    mean2, var2 = mean.view(2, c), var.view(2, c)
    coef = _sum_terms(mean2, var2, weight, bias, eps)
    return normalised_sum(y, coef, grid, swap, step), mean2.clone(), var2.clone()


def _sum_terms(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """(3, C): a0, a1 and the summed shift that form :func:`output_bn_sum`'s output from its input,
    for the batch ``mean`` and ``var`` (2, C) in our order and the module's affine terms."""
    c = mean.shape[1]
    a = _ours(weight.detach(), c) * torch.rsqrt(var + eps)
    shift = _ours(bias.detach(), c) - mean * a
    return torch.stack([a[0], a[1], shift[0] + shift[1]])


def normalised_sum(y: Tensor, coef: Tensor, grid: Optional[Sequence[int]], swap: bool, step: int = 1) -> Tensor:
    """The output of :func:`output_bn_sum` from its input ``y`` (M, 2C) and ``coef`` (3, C): a0, a1
    and shift, out = a0 y[:, :C] + a1 y[:, C:] + shift (``grid``, ``swap``, ``step`` as there). The
    one home of that formula: a backward that forms the output again (:func:`formed_from`) gets
    the forward's numbers bit for bit."""
    m, c2 = y.shape
    c = c2 // 2
    y = y.detach().contiguous()
    b, s, t = _rows_grid(m, grid)
    out = _output_like(y, m, c, grid, swap)
    rows = _as_rows(out, grid, swap)  # (b, s, t, C)
    if not cpu_kernel.output_bn_forward(y, coef, rows, (b, s, t)):
        y4 = y.view(b, s, t, c2)
        torch.addcmul(coef[2], y4[..., :c], coef[0], out=rows)
        rows.addcmul_(y4[..., c:], coef[1])
    if step > 1:
        kept = _kept_grid(grid, step)
        sub = _output_like(y, None, c, kept, swap)
        _as_rows(sub, kept, swap).copy_(rows[:, :, ::step])
        out = sub
    return out


# the implementation stays a plain function too: eager calls skip the operator (_OutputBnSumEager)
output_bn_sum = torch.library.custom_op(f"{_NS}::output_bn_sum", mutates_args=())(_output_bn_sum)


def _kept_grid(grid, step: int):
    """The grid (B, S, ceil(T / step)) of the rows a strided layer keeps."""
    if grid is None:
        raise ValueError("output_bn_sum: a step > 1 needs the rows' grid")
    b, s, t = grid
    return b, s, (t + step - 1) // step


def _output_like(y: Tensor, m, c, grid, swap: bool) -> Tensor:
    """The output of :func:`output_bn_sum`: (M, C) rows, or for ``grid`` (B, S, T) a channels_last
    (B, C, S, T) or (``swap``) (B, C, T, S) tensor, allocated with those strides rather than as a
    permuted view: traced with symbolic sizes, Inductor fails ordering the strides of a 4-D view."""
    if grid is None:
        return y.new_empty(m, c)
    b, s, t = grid
    if swap:
        s, t = t, s
    return y.new_empty_strided((b, c, s, t), (s * t * c, 1, t * c, c))


def _as_rows(t4: Tensor, grid, swap: bool) -> Tensor:
    """The (B, S, T, C) rows view of an output (or output gradient) of :func:`output_bn_sum`."""
    if grid is None:
        return t4[:, None, None, :]
    return t4.permute(0, 3, 2, 1) if swap else t4.permute(0, 2, 3, 1)


@output_bn_sum.register_fake
def _(y, weight, bias, eps, grid, swap, step=1):
    m, c2 = y.shape
    c = c2 // 2
    out_grid = _kept_grid(grid, step) if step > 1 else grid
    return _output_like(y, m, c, out_grid, swap), y.new_empty(2, c), y.new_empty(2, c)


def _output_bn_sum_backward(
    g: Tensor,
    y: Tensor,
    weight: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    grid: Optional[Sequence[int]],
    swap: bool,
    input_grad: bool,
    step: int = 1,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(g_y, g_weight, g_bias) of :func:`output_bn_sum` for the output gradient ``g`` (read at any
    strides; with ``step`` > 1, of the kept rows only); g_y (M, 2C), an empty tensor unless
    ``input_grad``; the parameters' (2C,) in the module's channel order."""
    m, c2 = y.shape
    c = c2 // 2
    y, g = y.detach().contiguous(), g.detach()
    if step > 1:  # the dropped rows' gradient is zero
        kept = _kept_grid(grid, step)
        full = _output_like(y, m, c, grid, swap).zero_()
        _as_rows(full, grid, swap)[:, :, ::step].copy_(_as_rows(g, kept, swap))
        g = full
    if grid is not None and g.stride(1) > 1:
        # channels apart (an NCHW gradient, e.g. from an operation after the layer that does not
        # keep channels_last): the kernels would gather each row's channels one cache line apart
        # (2x64x129x129: 20.8 ms against 7.4); one channels_last copy first
        g = g.contiguous(memory_format=torch.channels_last)
    invstd = torch.rsqrt(var + eps)  # (2, C), ours
    # (b, s, t, C) and (b, s, t, half, C) views of the rows; g read where it lies
    full = _rows_grid(m, grid)
    g_rows = _as_rows(g, grid, swap)
    g_half = g_rows.unsqueeze(-2)  # (..., 1, C): the same gradient for both halves
    y_half = y.view(*full, 2, c)
    g_y = None
    # sum over rows of g[., j] * y[., r*C + j] and of g: in one C pass, else with the products
    # formed in the input gradient's buffer, which is overwritten below (one (M, 2C) tensor in
    # all, its pages touched once)
    sums = cpu_kernel.output_bn_sums(y, g_rows, full)
    if sums is not None:
        gy, g_b = sums[:2].to(y.dtype), sums[2].to(y.dtype)
    else:
        g_y = torch.empty_like(y)
        gy = torch.mul(g_half, y_half, out=g_y.view(*full, 2, c)).sum((0, 1, 2))  # (2, C)
        g_b = g_rows.sum((0, 1, 2))
    g_b = g_b.expand(2, c)
    g_w = (gy - mean * g_b) * invstd
    if input_grad:
        a = _ours(weight.detach(), c) * invstd
        b = a * invstd * g_w / -m
        shift = a * g_b / -m - b * mean
        fast = None if sums is None else cpu_kernel.output_bn_backward(y, g_rows, torch.stack([a, b, shift]), full)
        if fast is not None:
            g_y = fast
        else:  # shift + b y + a g
            g_y = g_y if g_y is not None else torch.empty_like(y)
            torch.addcmul(shift, y_half, b, out=g_y.view(*full, 2, c)).addcmul_(g_half, a)
    else:
        g_y = y.new_empty(0)
    return g_y, _module_order(g_w), _module_order(g_b)


output_bn_sum_backward = torch.library.custom_op(f"{_NS}::output_bn_sum_backward", mutates_args=())(
    _output_bn_sum_backward
)


@output_bn_sum_backward.register_fake
def _(g, y, weight, mean, var, eps, grid, swap, input_grad, step=1):
    return (
        torch.empty_like(y, memory_format=torch.contiguous_format) if input_grad else y.new_empty(0),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape),
    )


def _setup_context(ctx, inputs, output):
    y, weight, _, eps, grid, swap, step = inputs
    _, mean, var = output
    ctx.save_for_backward(y, weight, mean, var)
    ctx.eps, ctx.grid, ctx.swap, ctx.step = eps, grid, swap, step


def _backward(ctx, g, g_mean, g_var, backward=None):
    y, weight, mean, var = ctx.saved_tensors
    need_y, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_y or need_w or need_b):
        return None, None, None, None, None, None, None
    g_y, g_w, g_b = (backward or output_bn_sum_backward)(
        g, y, weight, mean, var, ctx.eps, ctx.grid, ctx.swap, need_y, ctx.step
    )
    return (g_y if need_y else None), (g_w if need_w else None), (g_b if need_b else None), None, None, None, None


output_bn_sum.register_autograd(_backward, setup_context=_setup_context)


class _OutputBnSumEager(torch.autograd.Function):
    """:func:`output_bn_sum` with its registered autograd, for eager calls: the same implementations
    and backward without the custom operator's dispatch (as ``ops._AttentionRowsEager``)."""

    @staticmethod
    def forward(ctx, *inputs):
        out, mean, var = _output_bn_sum(*inputs)
        _setup_context(ctx, inputs, (out, mean, var))
        ctx.mark_non_differentiable(mean, var)
        # how to form the output again (formed_from): from the input, which is saved above, and
        # the terms the forward used (formed again from its statistics: the same numbers)
        y, weight, bias, eps = inputs[:4]
        ctx.formed = (weakref.ref(y), _sum_terms(mean, var, weight, bias, eps), *inputs[4:])
        return out, mean, var

    @staticmethod
    def backward(ctx, g, g_mean, g_var):
        return _backward(ctx, g, g_mean, g_var, backward=_output_bn_sum_backward)


def formed_from(x: Tensor):
    """``(y, coef, grid, swap, step)`` from which :func:`normalised_sum` forms ``x`` again, when
    ``x`` is, unchanged, the output of an eager :func:`output_batch_norm_sum` whose graph still holds
    its input ``y`` (detached here); else None. For a consumer that would keep ``x`` for its
    backward: it can keep ``y`` (which that graph keeps anyway) and the small ``coef`` instead."""
    node = x.grad_fn
    formed = getattr(node, "formed", None) if node is not None else None
    if formed is None or getattr(node, "formed_version", None) != x._version:
        return None
    y = formed[0]()
    return None if y is None else (y.detach(), *formed[1:])


def output_batch_norm_sum(bn, y: Tensor, grid=None, swap: bool = False, step: int = 1) -> Tensor:
    """``bn`` (a training-mode affine BatchNorm over 2C channels, channel 2j + r holding retrieval
    r of value channel j) on the rows ``y`` (M, 2C) = [sv | sve] with batch statistics, then the
    halves added: :func:`output_bn_sum` (``grid``, ``swap`` as there), and the module's running statistics updated as
    ``F.batch_norm`` does (through strided (2, C) views: no gather, no scatter back). ``step``:
    a strided layer's subsample along t, as in :func:`output_bn_sum`."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    # eager: the implementations without the operator's dispatch (_OutputBnSumEager); traced: the operator
    eager = runs_eagerly(y)
    out, mean, var = (_OutputBnSumEager.apply if eager else output_bn_sum)(
        y, bn.weight, bn.bias, bn.eps, grid, swap, step
    )
    if eager and out.grad_fn is not None and hasattr(out.grad_fn, "formed"):
        out.grad_fn.formed_version = out._version  # formed_from: changed in place after this, not formed again
    if bn.track_running_stats and bn.running_mean is not None:
        m, c = y.shape[0], y.shape[1] // 2
        with torch.no_grad():
            _ours(bn.running_mean, c).mul_(1.0 - factor).add_(mean, alpha=factor)
            _ours(bn.running_var, c).mul_(1.0 - factor).add_(var * (m / torch.sym_max(m - 1, 1)), alpha=factor)
    return out
