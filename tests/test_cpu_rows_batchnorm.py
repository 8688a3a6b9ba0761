"""The position-major path's BatchNorm of rows (M, C) in training, with its two-pass backward,
against ``nn.BatchNorm1d``: outputs, input / weight / bias gradients and running statistics,
also with the channels permuted (the output BN, whose channel 2j + r is ours r*C + j), and the
output BN fused with the sum of its halves."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from axial_deeplab.layers import memory_efficient
from axial_deeplab.layers.row_batch_norm import output_batch_norm_sum, output_bn_sum, output_bn_sum_backward


def _assert_same_step(out, want, y, y_ref, bn, ref):
    """Output, input and parameter gradients, and running statistics of our BN step equal the
    module's."""
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.grad, y_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_rows_batch_norm_equals_batchnorm1d(permuted, momentum):
    torch.manual_seed(0)
    rows, channels = 37, 6
    bn = nn.BatchNorm1d(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels))
        bn.bias.copy_(torch.randn(channels))
    ref = copy.deepcopy(bn)
    y = (3.0 + 2.0 * torch.randn(rows, channels)).requires_grad_(True)
    g = torch.randn(rows, channels)
    perm = torch.arange(channels).view(-1, 2).t().reshape(-1) if permuted else None
    out = memory_efficient._batch_norm_rows(bn, y, perm)
    out.backward(g)
    y_ref = y.detach().clone().requires_grad_(True)
    order = perm if permuted else torch.arange(channels)
    inverse = torch.argsort(order)
    # the module sees channel order[j] where we hold j: feed it in its own order
    want = ref(y_ref[:, inverse])[:, order]
    want.backward(g)
    _assert_same_step(out, want, y, y_ref, bn, ref)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 1


@pytest.mark.parametrize("momentum", [0.1, None])
def test_output_batch_norm_with_summed_halves_equals_batchnorm1d_then_the_sum(momentum):
    # the output BN of a layer with value tables: BN over (M, 2C) rows, channel order perm, then
    # the halves [sv | sve] of each row added
    torch.manual_seed(1)
    rows, half = 29, 4
    bn = nn.BatchNorm1d(2 * half, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(2 * half))
        bn.bias.copy_(torch.randn(2 * half))
    ref = copy.deepcopy(bn)
    perm = torch.arange(2 * half).view(half, 2).t().reshape(-1)
    y = (1.0 + 3.0 * torch.randn(rows, 2 * half)).requires_grad_(True)
    g = torch.randn(rows, half)
    for _ in range(2):  # twice: the running statistics are updated from their previous values
        out = output_batch_norm_sum(bn, y)
        y_ref = y.detach().clone().requires_grad_(True)
        normed = ref(y_ref[:, torch.argsort(perm)])[:, perm]
        want = normed[:, :half] + normed[:, half:]
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        y.grad = None
        out.backward(g)
        want.backward(g)
        torch.testing.assert_close(y.grad, y_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 2


def test_output_batch_norm_with_summed_halves_writes_swapped_rows_and_reads_strided_gradients():
    # rows (b, s, t) written out as (b, t, s, C) (the height layer's output, laid out for the width
    # layer); the incoming gradient arrives in that layout, a strided view of the rows' order
    torch.manual_seed(2)
    b, s, t, half = 2, 3, 5, 4
    bn = nn.BatchNorm1d(2 * half)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(2 * half))
        bn.bias.copy_(torch.randn(2 * half))
    ref = copy.deepcopy(bn)
    perm = torch.arange(2 * half).view(half, 2).t().reshape(-1)
    y = (1.0 - 2.0 * torch.randn(b * s * t, 2 * half)).requires_grad_(True)
    g = torch.randn(b, t, s, half)

    out = output_batch_norm_sum(bn, y, (b, s, t), swap=True)
    assert out.shape == (b, half, t, s) and out.is_contiguous(memory_format=torch.channels_last)
    out.backward(g.permute(0, 3, 1, 2))

    y_ref = y.detach().clone().requires_grad_(True)
    normed = ref(y_ref[:, torch.argsort(perm)])[:, perm]
    want = (normed[:, :half] + normed[:, half:]).view(b, s, t, half).transpose(1, 2)
    want.backward(g)
    want = want.permute(0, 3, 1, 2)
    _assert_same_step(out, want, y, y_ref, bn, ref)


class _FreshGradient(torch.autograd.Function):
    """Identity whose backward returns a fresh copy of its incoming gradient, kept in ``made``."""

    made = []

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        _FreshGradient.made.append(g.clone())
        return _FreshGradient.made[-1]


@pytest.mark.parametrize("in_place", [False, True])
def test_rows_batch_norm_input_gradient_written_over_a_fresh_incoming_gradient(in_place):
    # the projection's BN writes its input gradient over the incoming one when told it is its own
    # (same numbers either way); without the flag the incoming gradient is left as it was
    torch.manual_seed(3)
    rows, channels = 23, 6
    bn = nn.BatchNorm1d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels))
        bn.bias.copy_(torch.randn(channels))
    ref = copy.deepcopy(bn)
    y = (2.0 + torch.randn(rows, channels)).requires_grad_(True)
    g = torch.randn(rows, channels)
    _FreshGradient.made.clear()
    out = _FreshGradient.apply(memory_efficient._batch_norm_rows(bn, y, grad_in_place=in_place))
    out.backward(g)
    y_ref = y.detach().clone().requires_grad_(True)
    ref(y_ref).backward(g)
    torch.testing.assert_close(out, ref(y_ref.detach()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.grad, y_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    (incoming,) = _FreshGradient.made
    if in_place:
        torch.testing.assert_close(incoming, y.grad, rtol=0, atol=0)
    else:
        torch.testing.assert_close(incoming, g, rtol=0, atol=0)


@pytest.mark.parametrize("gradient", ["rows_swapped", "channels_outer", "expanded"])
def test_output_batch_norm_kernel_over_many_blocks_equals_float64(gradient):
    # the C functions behind the output BN: rows (b, s, t) over several 256-row blocks, shared out
    # over two threads, an odd channel count, the gradient a strided view: rows swapped (the height
    # layer's), channels outermost (an NCHW gradient) or one value everywhere (the backward of a sum)
    from axial_deeplab.layers import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no C compiler: the output BN runs its PyTorch form")
    torch.manual_seed(3)
    b, s, t, c = 3, 5, 41, 13
    y = 2.0 + torch.randn(b * s * t, 2 * c)
    if gradient == "rows_swapped":
        g = torch.randn(b, t, s, c).transpose(1, 2)  # (b, s, t, C) rows, not contiguous
    elif gradient == "channels_outer":
        g = torch.randn(b, c, s, t).permute(0, 2, 3, 1)
    else:
        g = torch.randn(()).expand(b, s, t, c)
    coef = torch.randn(3, c)
    y64, g64 = y.double().view(b, s, t, 2 * c), g.double()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = torch.empty(b, t, s, c)
        assert cpu_kernel.output_bn_forward(y, coef, out.transpose(1, 2), (b, s, t))
        sums = cpu_kernel.output_bn_sums(y, g, (b, s, t))
        coef2 = torch.randn(3, 2, c)
        gy = cpu_kernel.output_bn_backward(y, g, coef2, (b, s, t))
    finally:
        torch.set_num_threads(threads)
    c64 = coef.double()
    want = c64[0] * y64[..., :c] + c64[1] * y64[..., c:] + c64[2]
    torch.testing.assert_close(out.transpose(1, 2).double(), want, rtol=1e-5, atol=1e-5)
    want_sums = torch.stack(
        [(g64 * y64[..., :c]).sum((0, 1, 2)), (g64 * y64[..., c:]).sum((0, 1, 2)), g64.sum((0, 1, 2))]
    )
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-4)
    a, bb, sh = coef2.double()
    halves = torch.stack([y64[..., :c], y64[..., c:]], -2)  # (b, s, t, 2, C)
    want_gy = sh + bb * halves + a * g64.unsqueeze(-2)
    torch.testing.assert_close(gy.double().view(b, s, t, 2, c), want_gy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grid, swap", [(None, False), ((2, 3, 5), True), ((2, 3, 5), False)])
def test_opcheck_output_bn_sum(dtype, grid, swap):
    # float32 takes the C kernels (where built), float64 the PyTorch form of the same operator
    torch.manual_seed(4)
    m, half = 30, 4
    y = (1.0 + 2.0 * torch.randn(m, 2 * half, dtype=dtype)).requires_grad_(True)
    weight = torch.randn(2 * half, dtype=dtype, requires_grad=True)
    bias = torch.randn(2 * half, dtype=dtype, requires_grad=True)
    torch.library.opcheck(output_bn_sum, (y, weight, bias, 1e-5, grid, swap))
    g = torch.randn(m, half, dtype=dtype)
    if grid is not None:  # (B, C, T, S) or unswapped (B, C, S, T), channels_last as the output
        inner = (grid[2], grid[1]) if swap else (grid[1], grid[2])
        g = torch.randn(grid[0], *inner, half, dtype=dtype).permute(0, 3, 1, 2)
    mean, var = torch.randn(2, half, dtype=dtype), torch.rand(2, half, dtype=dtype) + 0.5
    for input_grad in (True, False):
        args = (g, y.detach(), weight.detach(), mean, var, 1e-5, grid, swap, input_grad)
        torch.library.opcheck(output_bn_sum_backward, args)


def test_output_batch_norm_sum_float64_equals_float32_kernels():
    # the PyTorch form (float64) and the C kernels (float32) give the same step
    torch.manual_seed(5)
    b, s, t, half = 2, 3, 7, 5
    y = 1.0 + 2.0 * torch.randn(b * s * t, 2 * half, dtype=torch.float64)
    g = torch.randn(b, t, s, half, dtype=torch.float64).permute(0, 3, 1, 2)
    results = []
    for dtype in (torch.float64, torch.float32):
        bn = nn.BatchNorm1d(2 * half).to(dtype)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2.0, 2 * half))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, 2 * half))
        yd = y.to(dtype).detach().requires_grad_(True)
        out = output_batch_norm_sum(bn, yd, (b, s, t), swap=True)
        out.backward(g.to(dtype))
        results.append([out, yd.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var])
    for a, want in zip(results[1], results[0]):
        torch.testing.assert_close(a.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("swap", [False, True])
def test_output_bn_sum_backward_reads_any_gradient_layout(swap):
    # a gradient may arrive NCHW (a slice's backward builds one), a sum's expanded (stride 0);
    # every layout gives the channels_last gradient's numbers exactly
    torch.manual_seed(6)
    b, s, t, half = 2, 5, 7, 6
    y = 1.0 + 2.0 * torch.randn(b * s * t, 2 * half)
    weight = torch.randn(2 * half)
    mean, var = torch.randn(2, half), torch.rand(2, half) + 0.5
    inner = (t, s) if swap else (s, t)
    g = torch.randn(b, half, *inner)
    layouts = {
        "nchw": g.contiguous(),
        "sliced nchw": torch.randn(b, half, 2 * inner[0], inner[1])[:, :, ::2].copy_(g),
        "expanded": g[:, :1, :1, :1].expand_as(g),
    }
    for name, grad in layouts.items():
        dense = grad.contiguous(memory_format=torch.channels_last)
        want = output_bn_sum_backward(dense, y, weight, mean, var, 1e-5, (b, s, t), swap, True)
        got = output_bn_sum_backward(grad, y, weight, mean, var, 1e-5, (b, s, t), swap, True)
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_bn_sum_step_keeps_every_step_th_position(swap, dtype):
    # a strided layer's subsample inside the operator: its output is the full output's every
    # step-th t, its backward the full backward of a gradient that is zero at the dropped t
    torch.manual_seed(7)
    b, s, t, half, step = 2, 3, 7, 4, 2
    y = (1.0 + 2.0 * torch.randn(b * s * t, 2 * half, dtype=dtype)).requires_grad_(True)
    weight = torch.randn(2 * half, dtype=dtype, requires_grad=True)
    bias = torch.randn(2 * half, dtype=dtype, requires_grad=True)
    grid = (b, s, t)
    torch.library.opcheck(output_bn_sum, (y, weight, bias, 1e-5, grid, swap, step))
    full, mean, var = output_bn_sum(y.detach(), weight.detach(), bias.detach(), 1e-5, grid, swap)
    kept, mean2, var2 = output_bn_sum(y.detach(), weight.detach(), bias.detach(), 1e-5, grid, swap, step)
    dim = 2 if swap else 3
    want = full[(slice(None),) * dim + (slice(None, None, step),)]
    assert kept.shape == want.shape and kept.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(kept, want) and torch.equal(mean2, mean) and torch.equal(var2, var)
    g = torch.randn(kept.shape, dtype=dtype)
    g_full = torch.zeros_like(full)
    g_full[(slice(None),) * dim + (slice(None, None, step),)] = g
    args = (y.detach(), weight.detach(), mean, var, 1e-5, grid, swap, True)
    torch.library.opcheck(output_bn_sum_backward, (g, *args, step))
    for a, w in zip(output_bn_sum_backward(g, *args, step), output_bn_sum_backward(g_full, *args)):
        torch.testing.assert_close(a, w, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grid, swap, step", [(None, False, 1), ((2, 3, 5), True, 2)])
def test_eager_entry_equals_the_operator(dtype, grid, swap, step):
    # output_batch_norm_sum's eager Function: the operator's implementations and backward, bit for bit
    from axial_deeplab.layers.row_batch_norm import _OutputBnSumEager

    torch.manual_seed(5)
    m, half = 30, 4
    y = (1.0 + 2.0 * torch.randn(m, 2 * half, dtype=dtype)).requires_grad_(True)
    weight = torch.randn(2 * half, dtype=dtype, requires_grad=True)
    bias = torch.randn(2 * half, dtype=dtype, requires_grad=True)
    results = []
    for run in (output_bn_sum, _OutputBnSumEager.apply):
        out, mean, var = run(y, weight, bias, 1e-5, grid, swap, step)
        g = torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape)
        results.append((out, mean, var, torch.autograd.grad(out, (y, weight, bias), g)))
    for a, b in zip(results[0][:3], results[1][:3]):
        assert torch.equal(a, b)
    for a, b in zip(results[0][3], results[1][3]):
        assert torch.equal(a, b)
