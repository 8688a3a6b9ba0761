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


CASES = [  # (heads, d, r, length, use_qk, query table, key table, by band)
    (2, 4, 4, 50, True, True, True, False),  # tables by position Grams
    (2, 4, 4, 50, True, True, True, True),
    (2, 16, 3, 29, True, True, True, True),
    (2, 5, 6, 23, True, False, True, True),  # no specialised loop for d = 5
    (2, 2, 4, 17, False, True, True, False),
    (2, 8, 7, 9, True, True, False, False),  # every window reaches across the axis
    (2, 3, 1, 5, True, True, True, True),
    # eight heads at once (d <= 8, tables by position Grams or off; q.k by window Grams)
    (8, 4, 32, 129, True, True, True, False),  # Axial-DeepLab's span 65 at stage 1
    (8, 8, 32, 65, True, True, True, False),  # and at stage 2
    (16, 4, 5, 23, True, False, True, False),
    (8, 3, 2, 9, True, True, False, False),  # no specialised loop for d = 3
    (8, 8, 7, 9, False, True, True, False),
    (8, 4, 4, 50, True, True, True, True),  # tables by band: head by head
    (8, 16, 32, 65, True, True, True, False),  # Axial-DeepLab's stages 3 and 4 at 513x1025
    (8, 32, 6, 19, True, True, True, False),
    (8, 12, 3, 11, True, True, False, False),  # no specialised loop for d = 12
]


@pytest.mark.parametrize("heads, d, r, length, use_qk, on_q, on_k, by_band", CASES)
def test_the_kernel_gives_the_explicit_moments_and_gradients(counted, heads, d, r, length, use_qk, on_q, on_k, by_band):
    gen = torch.Generator().manual_seed(d * 100 + length)
    q = torch.randn(3, heads, d, length, generator=gen) + 0.5
    k = torch.randn(3, heads, d, length, generator=gen) - 0.3
    tq = torch.randn(d, 2 * r + 1, generator=gen) if on_q else None
    tk = torch.randn(d, 2 * r + 1, generator=gen) if on_k else None
    weights = torch.randn(2, 3, heads, generator=gen, dtype=torch.float64)
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


@pytest.mark.parametrize("heads", [2, 8])  # 8: the heads together
def test_position_major_rows_match_the_pytorch_path_and_leave_the_values_alone(counted, monkeypatch, heads):
    n, length, d, dv, r = 3, 21, 4, 6, 5
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


@pytest.mark.parametrize("openmp", [True, False])
def test_threads_give_the_one_thread_result(counted, monkeypatch, openmp):
    # 7 sequences of 16 heads over 1, 2 and 3 threads (the heads in groups of eight): every
    # sequence is one share's, so each head takes the same path whatever the split
    if openmp and not cpu_kernel._state.get("openmp"):
        pytest.skip("the kernel was built without OpenMP")
    monkeypatch.setitem(cpu_kernel._state, "openmp", openmp)
    gen = torch.Generator().manual_seed(9)
    q, k = torch.randn(7, 16, 4, 40, generator=gen), torch.randn(7, 16, 4, 40, generator=gen)
    tq, tk = torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen)
    weights = torch.randn(2, 3, 16, generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(run(lambda *a: BandMoments.apply(*a, True, 4, False, None), q, k, tq, tk, weights))
    finally:
        torch.set_num_threads(threads)
    one = results[0]
    for other in results[1:]:
        for a, b in zip(one[:4], other[:4]):  # each (sequence, head) is one share's alone
            assert torch.equal(a, b)
        for a, b in zip(one[4:], other[4:]):  # the tables' gradients: shares summed in another order
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("heads", [2, 8])
def test_a_large_logit_mean_keeps_the_variance(counted, heads):
    # logits ~ 400 with a spread ~ 1: the variance is ~1e-5 of the mean square (eight heads
    # together square uncentred window Grams: ~11 of float64's digits remain, the band keeps all)
    gen = torch.Generator().manual_seed(4)
    q = 10.0 + 0.1 * torch.randn(2, heads, 4, 300, generator=gen)
    k = 10.0 + 0.1 * torch.randn(2, heads, 4, 300, generator=gen)
    sums, sumsq = BandMoments.apply(q, k, None, None, True, 16, False, None)
    want_s, want_q = explicit(q.double(), k.double(), None, None, True, 16)
    count = 2 * sum(min(300, o + 17) - max(0, o - 16) for o in range(300))
    var = sumsq[0] / count - (sums[0] / count) ** 2
    want_var = want_q[0] / count - (want_s[0] / count) ** 2
    torch.testing.assert_close(var, want_var, rtol=1e-6, atol=0)
    assert counted["fwd"] == 1


def test_heads_in_groups_of_eight_take_the_tables_by_gram_up_to_depth_32():
    assert not cpu_kernel.band_tables_by_band(32, 32, 8) and not cpu_kernel.band_tables_by_band(16, 4, 16)
    assert cpu_kernel.band_tables_by_band(64, 32, 8) and cpu_kernel.band_tables_by_band(16, 32, 4)
    assert not cpu_kernel.band_tables_by_band(4, 32, 2)  # shallow heads one at a time: Grams too
