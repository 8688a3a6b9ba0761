"""The similarity-BN statistics of a local span (sums and sums of squares of every in-span
logit of each term, and their gradients) against the logits formed explicitly in float64:
the banded products of q.k, the table terms by band (deep heads) and by position Grams
(shallow heads), terms switched off, the position-major entry point (its compiled Grams against
its PyTorch ones), and a large logit mean at a long axis, where a float32 sum of squares would
cancel."""

from __future__ import annotations

import pytest
import torch

from axial_deeplab.layers import PositionSensitiveAxialAttention, cpu_kernel, similarity_stats


def make_layer(dk, span, heads=2, **kwargs):
    torch.manual_seed(0)
    return PositionSensitiveAxialAttention(4, 2 * heads, num_heads=heads, key_channels=dk * heads, span=span, **kwargs)


def explicit_moments(layer, q, k):
    """Every in-span logit of each term, formed in float64: (sums, sumsq) (3, heads)."""
    n, heads, d, length = q.shape
    r = length if layer.span is None else (layer.span - 1) // 2
    reach = layer.max_relative_distance
    pos = torch.arange(length)
    rel = pos[None, :] - pos[:, None]  # p - o
    inside = (rel.abs() <= r).double()
    rows = (rel.clamp(-reach, reach) + reach).reshape(-1)
    q64, k64 = q.double(), k.double()
    logits = []
    if layer.use_qk:
        logits.append(torch.einsum("nhco,nhcp->nhop", q64, k64))
    else:
        logits.append(None)
    for on, x, table, eq in (
        (layer.use_query_rpe, q64, layer.query_table, "nhco,cop->nhop"),
        (layer.use_key_rpe, k64, layer.key_table, "nhcp,cop->nhop"),
    ):
        if on:
            r_op = table.double()[:, rows].view(d, length, length)  # row of offset p - o
            logits.append(torch.einsum(eq, x, r_op))
        else:
            logits.append(None)
    zero = q64.new_zeros(heads)
    sums = torch.stack([zero if x is None else (x * inside).sum((0, 2, 3)) for x in logits])
    sumsq = torch.stack([zero if x is None else (x * x * inside).sum((0, 2, 3)) for x in logits])
    return sums, sumsq


def moments_and_grads(fn, layer, q, k, weights):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    tables = [t for t in layer.relative_table_parameters() if t is not None]
    for t in tables:
        t.grad = None
    sums, sumsq = fn(layer, q, k)[:2]
    ((sums * weights[0]).sum() + (sumsq * weights[1]).sum()).backward()
    grads = [q.grad, k.grad] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in tables]
    return [sums.detach(), sumsq.detach()] + grads


CASES = [  # (dk, span, length, flags): several query blocks; d*d above and below 2 * span
    (2, 9, 50, {}),
    (6, 9, 50, {}),
    (6, 5, 40, {"use_qk": False}),
    (2, 7, 23, {"use_query_rpe": False}),
    (6, 7, 23, {"use_key_rpe": False}),
    (3, 3, 5, {}),  # the window reaches across the whole axis from its middle
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dk, span, length, flags", CASES)
def test_local_moments_and_gradients_equal_the_explicit_logits(dtype, dk, span, length, flags):
    layer = make_layer(dk, span, **flags).to(dtype)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, dk, length, generator=gen, dtype=dtype) + 0.5
    k = torch.randn(3, 2, dk, length, generator=gen, dtype=dtype) - 0.3
    weights = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64)
    got = moments_and_grads(similarity_stats.similarity_moments, layer, q, k, weights)
    want = moments_and_grads(explicit_moments, layer, q, k, weights)
    count = similarity_stats.similarity_moments(layer, q, k)[2]
    r = (span - 1) // 2
    assert count == 3 * sum(min(length, o + r + 1) - max(0, o - r) for o in range(length))
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    names = ["sums", "sumsq", "grad q", "grad k", "grad tables"]
    for name, a, b in zip(names + [f"grad table {i}" for i in range(3)], got, want):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "span, reach, length, flags",
    [
        (9, None, 30, {}),  # local
        (None, 254, 6, {}),  # global with a long table
        (None, 3, 9, {}),  # offsets clipped
        (None, 3, 9, {"use_qk": False}),  # global: the table Grams alone
        (None, 3, 9, {"use_query_rpe": False}),  # one table term
        (None, 3, 9, {"use_query_rpe": False, "use_key_rpe": False}),  # the q.k Grams alone
    ],
)
def test_position_major_rows_give_the_same_moments(span, reach, length, flags):
    layer = make_layer(4, span, heads=3, max_relative_distance=reach, **flags)
    nseq, heads, dk = 4, 3, 4
    c2 = heads * (2 * dk + layer.value_depth)
    y = torch.randn(nseq * length, c2, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def rows(layer, q, k):
        return similarity_stats.similarity_moments_rows(layer, y_rows, nseq, length)

    y_rows = y.clone().requires_grad_(True)
    sums, sumsq, count = rows(layer, None, None)
    ((sums * weights[0]).sum() + (sumsq * weights[1]).sum()).backward()
    tables = [t for t in layer.relative_table_parameters() if t is not None]
    got_tables = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tables]
    y4 = y.view(nseq, length, heads, -1).permute(0, 2, 3, 1)
    want = moments_and_grads(explicit_moments, layer, y4[:, :, :dk], y4[:, :, dk : 2 * dk], weights)
    torch.testing.assert_close(sums, want[0], rtol=2e-5, atol=1e-3)
    torch.testing.assert_close(sumsq, want[1], rtol=2e-5, atol=1e-2)
    g4 = y_rows.grad.view(nseq, length, heads, -1).permute(0, 2, 3, 1)
    torch.testing.assert_close(g4[:, :, :dk].double(), want[2].double(), rtol=2e-5, atol=1e-3)
    torch.testing.assert_close(g4[:, :, dk : 2 * dk].double(), want[3].double(), rtol=2e-5, atol=1e-3)
    assert torch.count_nonzero(g4[:, :, 2 * dk :]) == 0  # the values take no part in the statistics
    for got, want_grad in zip(got_tables, want[4:], strict=True):
        torch.testing.assert_close(got.double(), want_grad.double(), rtol=2e-5, atol=1e-3)


def test_large_logit_mean_on_a_long_axis_keeps_the_variance_in_float32():
    # Logits ~ 400 with a spread ~ 1: the variance is ~1e-5 of the mean square, so a float32
    # sum of squares minus the squared mean would keep about two digits of it.
    layer = make_layer(4, 33, use_query_rpe=False, use_key_rpe=False)
    gen = torch.Generator().manual_seed(4)
    q = 10.0 + 0.1 * torch.randn(2, 2, 4, 600, generator=gen)
    k = 10.0 + 0.1 * torch.randn(2, 2, 4, 600, generator=gen)
    sums, sumsq, count = similarity_stats.similarity_moments(layer, q, k)
    want_s, want_q = explicit_moments(layer, q, k)

    def variance(s, sq):
        mean = s[0] / count
        return sq[0] / count - mean * mean

    want = variance(want_s, want_q)
    torch.testing.assert_close(variance(sums, sumsq), want, rtol=1e-4, atol=0)
    # the same logits summed in float32 the plain way miss by far more: the test can fail
    r = 16
    pos = torch.arange(600)
    inside = (pos[None, :] - pos[:, None]).abs() <= r
    logits = torch.einsum("nhco,nhcp->nhop", q, k)[:, :, inside]  # float32
    naive = (logits * logits).sum((0, 2)) / count - (logits.sum((0, 2)) / count) ** 2
    assert float(((naive.double() - want) / want).abs().max()) > 1e-3


def _row_moments_and_grads(layer, y, nseq, length, weights):
    tables = [t for t in layer.relative_table_parameters() if t is not None]
    for t in tables:
        t.grad = None
    y = y.clone().requires_grad_(True)
    sums, sumsq, _ = similarity_stats.similarity_moments_rows(layer, y, nseq, length)
    ((sums * weights[0]).sum() + (sumsq * weights[1]).sum()).backward()
    return [sums.detach(), sumsq.detach(), y.grad] + [torch.zeros_like(t) if t.grad is None else t.grad for t in tables]


@pytest.mark.parametrize("dk", [3, 4, 8])  # the kernel's scalar, 4-wide and 8-wide loops
@pytest.mark.parametrize(
    "flags", [{}, {"use_qk": False}, {"use_query_rpe": False}, {"use_query_rpe": False, "use_key_rpe": False}]
)
def test_row_moments_kernel_equals_the_pytorch_grams(dk, flags, monkeypatch):
    if not cpu_kernel.available():
        pytest.skip("the C kernel is not built here (no C compiler)")
    layer = make_layer(dk, None, heads=3, max_relative_distance=5, **flags)
    nseq, length, heads = 5, 11, 3
    c2 = heads * (2 * dk + layer.value_depth)
    gen = torch.Generator().manual_seed(5)
    y = 2.0 + torch.randn(nseq * length, c2, generator=gen)
    weights = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    assert cpu_kernel.row_moments(y, nseq, length, heads, dk, True, True) is not None  # the kernel runs
    got = _row_moments_and_grads(layer, y, nseq, length, weights)
    monkeypatch.setattr(cpu_kernel, "ENABLED", False)
    want = _row_moments_and_grads(layer, y, nseq, length, weights)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-9)
    for g, w in zip(got[2:], want[2:], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)
    g4 = got[2].view(nseq, length, heads, -1)
    assert torch.count_nonzero(g4[..., 2 * dk :]) == 0  # the values take no part in the statistics


def test_row_moments_keep_the_variance_of_large_logits():
    # q, k ~ 10 +- 0.1 (logits ~ 400, spread ~ 5): the variance is ~1e-4 of the mean square
    layer = make_layer(4, None, heads=2, max_relative_distance=40)
    nseq, length, heads, dk = 3, 200, 2, 4
    gen = torch.Generator().manual_seed(6)
    y = 10.0 + 0.1 * torch.randn(nseq * length, heads * (2 * dk + layer.value_depth), generator=gen)
    sums, sumsq, count = similarity_stats.similarity_moments_rows(layer, y, nseq, length)
    y4 = y.view(nseq, length, heads, -1).permute(0, 2, 3, 1)
    want_s, want_q = explicit_moments(layer, y4[:, :, :dk], y4[:, :, dk : 2 * dk])
    var = sumsq / count - (sums / count) ** 2
    want = want_q / count - (want_s / count) ** 2
    torch.testing.assert_close(var, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_moments_keep_their_grams_in_the_inputs_dtype(dtype):
    """The forward sums in float64; what it keeps for the backward (the Grams over positions and
    over sequences, tens of MiB in a training step) is in the input's dtype, and the gradients
    stay those of float64 Grams within float32 rounding."""
    layer = make_layer(4, None, heads=3, max_relative_distance=5).to(dtype)
    nseq, length, heads, dk = 5, 11, 3, 4
    gen = torch.Generator().manual_seed(7)
    y = torch.randn(nseq * length, heads * (2 * dk + layer.value_depth), generator=gen, dtype=torch.float64)
    weights = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    rows = y.to(dtype, copy=True).requires_grad_(True)
    sums, sumsq, _ = similarity_stats.similarity_moments_rows(layer, rows, nseq, length)
    saved = (
        sums.grad_fn.saved
    )  # the Function's context: (sums, Grams) by sequence, (copy, Grams, sums, ...) by position
    kept = [*saved["seq"], *saved["pos"][1:3]]
    assert [tuple(t.shape) for t in kept] == [(nseq, heads, 2 * dk), (nseq, heads, 2, dk, dk)] + [
        (heads, length, 2, dk, dk),
        (heads, length, 2 * dk),
    ]
    assert all(t.dtype == dtype for t in kept)
    ((sums * weights[0]).sum() + (sumsq * weights[1]).sum()).backward()
    want = _row_moments_and_grads(layer.double(), y, nseq, length, weights)
    torch.testing.assert_close(rows.grad.double(), want[2], rtol=1e-5, atol=1e-5)
