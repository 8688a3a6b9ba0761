"""The similarity-BN moments' Gram matrices as PyTorch operators
(``torch.ops.axial_deeplab.row_grams`` and ``row_grams_backward``).

Why: :class:`.similarity_stats.RowMoments` forms the exact similarity-BN statistics of a global
span from Gram matrices of q and k, which the C kernel of :mod:`.cpu_kernel` builds straight from
the position-major projection in one pass. A ctypes call is invisible to FakeTensor tracing, so
traced by ``torch.compile`` the moments were float64 copies and batched products in the graph;
as registered operators (exact fake shapes for symbolic sizes) the compiled graph calls the same
kernel as eager. Each implementation falls back to PyTorch where the kernel cannot run
(float64, no C compiler).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import cpu_kernel

__all__ = ["row_grams", "row_grams_backward", "row_moments", "row_moments_backward"]

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
