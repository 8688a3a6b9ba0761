"""The compiled band walk of the local-span similarity-BN moments (:class:`BandMoments` on float32
CPU tensors) against every in-span logit formed explicitly in float64 and against the PyTorch
implementation it replaces: q.k and the table terms by band and by position Grams, terms switched
off, windows that reach across the whole axis, key depths with and without a specialised loop, the
position-major entry point, and its shares on two threads."""

from __future__ import annotations

import pytest
import torch

from axial_deeplab.layers import cpu_kernel
from axial_deeplab.layers.similarity_stats import BandMoments

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="the C kernel does not build here")


def explicit(q, k, tq, tk, use_qk, r):
    """(sums, sumsq) (3, heads) of every in-span logit, formed in float64 (differentiable)."""
    length = q.shape[-1]
    pos = torch.arange(length)
    rel = pos[None, :] - pos[:, None]  # p - o
    inside = (rel.abs() <= r).double()
    rows = (rel.clamp(-r, r) + r).reshape(-1)
    d = q.shape[2]
    zero = torch.zeros_like(inside).expand(*q.shape[:2], length, length)
    terms = [
        torch.einsum("nhco,nhcp->nhop", q, k) if use_qk else zero,
        zero if tq is None else torch.einsum("nhco,cop->nhop", q, tq[:, rows].view(d, length, length)),
        zero if tk is None else torch.einsum("nhcp,cop->nhop", k, tk[:, rows].view(d, length, length)),
    ]
    sums = torch.stack([(x * inside).sum((0, 2, 3)) for x in terms])
    sumsq = torch.stack([(x * x * inside).sum((0, 2, 3)) for x in terms])
    return sums, sumsq


def run(fn, q, k, tq, tk, weights):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k)]
    tabs = [None if t is None else t.detach().clone().requires_grad_(True) for t in (tq, tk)]
    sums, sumsq = fn(*leaves, *tabs)
    ((sums * weights[0]).sum() + (sumsq * weights[1]).sum()).backward()
    grads = [t.grad for t in leaves] + [torch.zeros(1) if t is None else t.grad for t in tabs]
    return [sums.detach(), sumsq.detach()] + grads


@pytest.fixture
def counted(monkeypatch):
    """Counts the kernel's forward and backward calls that returned a result."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = cpu_kernel.band_moments, cpu_kernel.band_moments_backward

    def count(name, fn):
        def wrapped(*args):
            out = fn(*args)
            calls[name] += out is not None
            return out

        return wrapped

    monkeypatch.setattr(cpu_kernel, "band_moments", count("fwd", fwd))
    monkeypatch.setattr(cpu_kernel, "band_moments_backward", count("bwd", bwd))
    return calls


CASES = [  # (d, r, length, use_qk, query table, key table, by band)
    (4, 4, 50, True, True, True, False),  # the model's shape: tables by position Grams
    (4, 4, 50, True, True, True, True),
    (16, 3, 29, True, True, True, True),
    (5, 6, 23, True, False, True, True),  # no specialised loop for d = 5
    (2, 4, 17, False, True, True, False),
    (8, 7, 9, True, True, False, False),  # every window reaches across the axis
    (3, 1, 5, True, True, True, True),
]


@pytest.mark.parametrize("d, r, length, use_qk, on_q, on_k, by_band", CASES)
def test_the_kernel_gives_the_explicit_moments_and_gradients(counted, d, r, length, use_qk, on_q, on_k, by_band):
    gen = torch.Generator().manual_seed(d * 100 + length)
    q = torch.randn(3, 2, d, length, generator=gen) + 0.5
    k = torch.randn(3, 2, d, length, generator=gen) - 0.3
    tq = torch.randn(d, 2 * r + 1, generator=gen) if on_q else None
    tk = torch.randn(d, 2 * r + 1, generator=gen) if on_k else None
    weights = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64)
    got = run(lambda *a: BandMoments.apply(*a, use_qk, r, by_band, None), q, k, tq, tk, weights)
    assert counted == {"fwd": 1, "bwd": 1}
    want = run(
        lambda *a: explicit(*(None if t is None else t.double() for t in a), use_qk, r),
        q,
        k,
        tq,
        tk,
        weights,
    )
    # the forward is float64 throughout on exact float32 inputs: as close as the float64 reference
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-9)
    for name, a, b in zip(["grad q", "grad k", "grad query table", "grad key table"], got[2:], want[2:]):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-5 * scale, msg=lambda m: f"{name}: {m}")


def test_position_major_rows_match_the_pytorch_path_and_leave_the_values_alone(counted, monkeypatch):
    n, length, heads, d, dv, r = 3, 21, 2, 4, 6, 5
    c2h = 2 * d + dv
    gen = torch.Generator().manual_seed(7)
    y = torch.randn(n * length, heads * c2h, generator=gen)
    tq, tk = torch.randn(d, 2 * r + 1, generator=gen), torch.randn(d, 2 * r + 1, generator=gen)
    weights = torch.randn(2, 3, heads, generator=gen, dtype=torch.float64)

    def rows(y, _k, a, b):
        return BandMoments.apply(y, None, a, b, True, r, False, (n, length, heads, d, c2h))

    got = run(rows, y, y, tq, tk, weights)
    assert counted == {"fwd": 1, "bwd": 1}
    monkeypatch.setattr(cpu_kernel, "ENABLED", False)  # the PyTorch implementation
    want = run(rows, y, y, tq, tk, weights)
    assert counted == {"fwd": 1, "bwd": 1}
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(got[2:], want[2:]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    g4 = got[2].view(n, length, heads, c2h)
    assert torch.count_nonzero(g4[..., 2 * d :]) == 0 and torch.count_nonzero(g4[..., : 2 * d]) > 0


def test_two_threads_give_the_one_thread_result(counted):
    gen = torch.Generator().manual_seed(9)
    q, k = torch.randn(4, 8, 4, 40, generator=gen), torch.randn(4, 8, 4, 40, generator=gen)
    tq, tk = torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen)
    weights = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append(run(lambda *a: BandMoments.apply(*a, True, 4, False, None), q, k, tq, tk, weights))
    finally:
        torch.set_num_threads(threads)
    one, two = results
    for a, b in zip(one[:4], two[:4]):  # each (sequence, head) is one share's alone
        assert torch.equal(a, b)
    for a, b in zip(one[4:], two[4:]):  # the tables' gradients: shares summed in another order
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_large_logit_mean_keeps_the_variance(counted):
    # logits ~ 400 with a spread ~ 1: the variance is ~1e-5 of the mean square
    gen = torch.Generator().manual_seed(4)
    q = 10.0 + 0.1 * torch.randn(2, 2, 4, 300, generator=gen)
    k = 10.0 + 0.1 * torch.randn(2, 2, 4, 300, generator=gen)
    sums, sumsq = BandMoments.apply(q, k, None, None, True, 16, False, None)
    want_s, want_q = explicit(q.double(), k.double(), None, None, True, 16)
    count = 2 * sum(min(300, o + 17) - max(0, o - 16) for o in range(300))
    var = sumsq[0] / count - (sums[0] / count) ** 2
    want_var = want_q[0] / count - (want_s[0] / count) ** 2
    torch.testing.assert_close(var, want_var, rtol=1e-6, atol=0)
    assert counted["fwd"] == 1
