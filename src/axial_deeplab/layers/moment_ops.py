"""The similarity-BN moments' C kernels as PyTorch operators: the Gram matrices of a global span
(``torch.ops.axial_deeplab.row_grams`` and ``row_grams_backward``) and the band walk of a local
one (``band_moments`` and ``band_moments_backward``).

Why: :class:`.similarity_stats.RowMoments` forms the exact similarity-BN statistics of a global
span from Gram matrices of q and k, which the C kernel of :mod:`.cpu_kernel` builds straight from
the position-major projection in one pass; :class:`.similarity_stats.BandMoments` walks a local
span's in-span logits in C. A ctypes call is invisible to FakeTensor tracing, so traced by
``torch.compile`` the moments were float64 copies and batched products in the graph (for a local
span, windowed Gram matrices: 20-24x the band kernel's time in eager, and a compiled
Axial-DeepLab-S training step 2.6x slower than eager); as registered operators (exact fake shapes
for symbolic sizes) the compiled graph calls the same kernels as eager. The Gram operators fall
back to PyTorch where the kernel cannot run (float64, no C compiler); the band operators are used
only where it can (:func:`band_kernel_applies`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import cpu_kernel

__all__ = [
    "row_grams",
    "row_grams_backward",
    "row_moments",
    "row_moments_backward",
    "band_moments",
    "band_moments_backward",
    "band_views",
    "band_kernel_applies",
]

_NS = "axial_deeplab"


def _qk_rows(y: Tensor, nseq: int, length: int, heads: int, dk: int) -> Tensor:
    """(N*L, heads*c2h) rows -> (N, L, heads, 2dk) view of [q, k]."""
    return y.view(nseq, length, heads, -1)[..., : 2 * dk]


@torch.library.custom_op(f"{_NS}::row_grams", mutates_args=())
def row_grams(
    y: Tensor, nseq: int, length: int, heads: int, dk: int, by_sequence: bool, by_position: bool
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grams of the queries and of the keys (q q^T, k k^T) of the rows ``y``
    (N*L, heads*(2dk+dv)) in float64: (gram (N, h, 2, dk, dk), xsum (N, h, 2dk)) summed over
    positions when ``by_sequence``, (gram (h, L, 2, dk, dk), xsum (h, L, 2dk)) summed over
    sequences when ``by_position`` (xsum: the sums of [q, k]); a family not asked for is two
    empty tensors. :func:`.cpu_kernel.row_moments`, else the same in PyTorch."""
    y = y.detach().contiguous()
    fast = cpu_kernel.row_moments(y, nseq, length, heads, dk, by_sequence, by_position)
    if fast is None:
        x = _qk_rows(y, nseq, length, heads, dk).to(torch.float64)
        xt = x.unflatten(-1, (2, dk))  # (N, L, h, 2, dk)
        fast = (
            (torch.einsum("nohtc,nohtd->nhtcd", xt, xt), x.sum(1)) if by_sequence else None,
            (torch.einsum("nohtc,nohtd->hotcd", xt, xt), x.sum(0).transpose(0, 1)) if by_position else None,
        )
    out = []
    for fam in fast:  # (outputs may not alias each other: one empty tensor each)
        if fam is None:
            out += [y.new_empty(0, dtype=torch.float64), y.new_empty(0, dtype=torch.float64)]
        else:
            out += [fam[0].contiguous(), fam[1].contiguous()]
    return tuple(out)


@row_grams.register_fake
def _(y, nseq, length, heads, dk, by_sequence, by_position):
    f64 = torch.float64

    def family(on, a, b):
        if not on:
            return [y.new_empty(0, dtype=f64), y.new_empty(0, dtype=f64)]
        return [y.new_empty(a, b, 2, dk, dk, dtype=f64), y.new_empty(a, b, 2 * dk, dtype=f64)]

    return tuple(family(by_sequence, nseq, heads) + family(by_position, heads, length))


@torch.library.custom_op(f"{_NS}::row_grams_backward", mutates_args=())
def row_grams_backward(
    y: Tensor,
    nseq: int,
    length: int,
    heads: int,
    dk: int,
    ws: Optional[Tensor],
    cs: Optional[Tensor],
    tp: Optional[Tensor],
    bp: Optional[Tensor],
    cp: Optional[Tensor],
) -> Tensor:
    """The gradient of y (its layout, zero in the value channels) of a linear-quadratic objective
    of the Grams: for block t of x = [q, k] (0 queries, 1 keys), g_t[n, o, h] = x_t ws[n, h, t] +
    cs[n, h, t] + bp[h, t] * (x_t tp[o, t]) + cp[h, o, t]; ws (N, h, 2, dk, dk), cs (N, h, 2dk),
    tp (L, 2, dk, dk), bp (h, 2dk), cp (h, L, 2dk); either family may be None.
    :func:`.cpu_kernel.row_moments_backward`, else the same in PyTorch."""
    y = y.detach().contiguous()
    g = cpu_kernel.row_moments_backward(y, nseq, length, heads, dk, ws, cs, tp, bp, cp)
    if g is not None:
        return g
    dt = y.dtype
    x = _qk_rows(y, nseq, length, heads, dk).unflatten(-1, (2, dk))  # (N, L, h, 2, dk)
    g = torch.zeros_like(y)
    gq = _qk_rows(g, nseq, length, heads, dk).unflatten(-1, (2, dk))
    if ws is not None:
        gq += torch.einsum("nohtc,nhtcd->nohtd", x, ws.to(dt)) + cs.to(dt).view(nseq, 1, heads, 2, dk)
    if tp is not None:
        xt = torch.einsum("nohtc,otcd->nohtd", x, tp.to(dt)) * bp.to(dt).view(1, 1, heads, 2, dk)
        gq += xt + cp.to(dt).transpose(0, 1).reshape(1, length, heads, 2, dk)
    return g


@row_grams_backward.register_fake
def _(y, nseq, length, heads, dk, ws, cs, tp, bp, cp):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def row_moments(y: Tensor, nseq: int, length: int, heads: int, dk: int, by_sequence: bool, by_position: bool):
    """:func:`.cpu_kernel.row_moments` through the operator (never None: the operator falls back
    to PyTorch itself): ``((gram, xsum) or None, (gram, xsum) or None)``."""
    gs, xs, gp, xp = row_grams(y, nseq, length, heads, dk, by_sequence, by_position)
    return ((gs, xs) if by_sequence else None, (gp, xp) if by_position else None)


def row_moments_backward(y: Tensor, nseq: int, length: int, heads: int, dk: int, ws, cs, tp, bp, cp) -> Tensor:
    """:func:`.cpu_kernel.row_moments_backward` through the operator (never None)."""
    return row_grams_backward(y, nseq, length, heads, dk, ws, cs, tp, bp, cp)


# --------------------------------------------------------------------------- local span: the band walk
@torch.compiler.assume_constant_result
def _kernel_built() -> bool:
    """Whether the C kernel is built (building it on the first call). A constant while tracing:
    the call is made, not traced (a first build takes a lock, which Dynamo cannot enter)."""
    return cpu_kernel.available()


def band_kernel_applies(q: Tensor) -> bool:
    """Whether the band operators can run on q (and a k like it): float32 on CPU, key depth within
    the kernel's limit, and the C kernel built. Decided from dtype, device and sizes only."""
    return (
        q.dtype == torch.float32
        and q.device.type == "cpu"
        and q.shape[2] <= cpu_kernel.MAX_KEY_DEPTH
        and _kernel_built()
    )


@torch.library.custom_op(f"{_NS}::band_moments", mutates_args=())
def band_moments(
    q: Tensor,
    k: Tensor,
    query_table: Optional[Tensor],
    key_table: Optional[Tensor],
    use_qk: bool,
    r: int,
    by_band: bool,
) -> Tensor:
    """Sums and sums of squares (2, 3, N*heads) float64 of the three similarity terms over the
    in-span pairs |p - o| <= r of q, k (N, heads, d, L), float32 at any strides; tables (d, 2r+1)
    or None for a term switched off (:func:`.cpu_kernel.band_moments`)."""
    out = cpu_kernel.band_moments(q.detach(), k.detach(), (query_table, key_table), use_qk, r, by_band)
    if out is None:
        raise RuntimeError(f"the band-moments C kernel refused q {tuple(q.shape)} {q.dtype} (see band_kernel_applies)")
    return out


@band_moments.register_fake
def _(q, k, query_table, key_table, use_qk, r, by_band):
    return q.new_empty(2, 3, q.shape[0] * q.shape[1], dtype=torch.float64)


@torch.library.custom_op(f"{_NS}::band_moments_backward", mutates_args=())
def band_moments_backward(
    q: Tensor,
    k: Tensor,
    query_table: Optional[Tensor],
    key_table: Optional[Tensor],
    use_qk: bool,
    r: int,
    by_band: bool,
    coef: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_t a_t sums_t + b_t sumsq_t (``coef`` (2, 3, heads): a and 2b) of
    :func:`band_moments`: (gq, gk) (N, heads, d, L) contiguous float32 and the tables' (2, d, 2r+1)
    float64 (:func:`.cpu_kernel.band_moments_backward`)."""
    gq = torch.empty(q.shape, dtype=q.dtype)
    gk = torch.empty(q.shape, dtype=q.dtype)
    tables = (query_table, key_table)
    g_tab = cpu_kernel.band_moments_backward(q.detach(), k.detach(), tables, use_qk, r, by_band, coef, gq, gk)
    if g_tab is None:
        raise RuntimeError(f"the band-moments C kernel refused its backward for q {tuple(q.shape)} {q.dtype}")
    return gq, gk, g_tab


@band_moments_backward.register_fake
def _(q, k, query_table, key_table, use_qk, r, by_band, coef):
    d = q.shape[2]
    return (
        q.new_empty(q.shape),
        q.new_empty(q.shape),
        q.new_empty(2, d, 2 * r + 1, dtype=torch.float64),
    )


def band_views(y: Tensor, nseq: int, length: int, heads: int, dk: int) -> Tuple[Tensor, Tensor]:
    """(q, k) (N, heads, dk, L) views of the position-major rows ``y`` (N*L, heads*(2dk+dv))."""
    qkv4 = y.view(nseq, length, heads, -1).permute(0, 2, 3, 1)  # (N, heads, c2h, L)
    return qkv4[:, :, :dk], qkv4[:, :, dk : 2 * dk]
