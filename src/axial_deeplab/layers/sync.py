"""Cross-process sums for BatchNorm statistics the attention layer computes itself.

The similarity BatchNorm's statistics are formed inside the attention math (over in-span
pairs, or in closed form by the fast paths), so SyncBatchNorm cannot synchronise them. A layer
whose ``sync_statistics`` flag is set (``sync_batchnorm.convert_sync_batchnorm`` sets it)
sums them over processes with a differentiable all-reduce instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # the layer's type, for annotations only (axial_attention imports this module)
    from .axial_attention import PositionSensitiveAxialAttention


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is again the sum over processes (every process's
    loss depends on the summed value, so d(sum of the losses)/d(local part) is the sum of the
    processes' upstream gradients).

    Kept instead of ``torch.distributed.nn.functional.all_reduce``, which computes exactly the
    same (its backward is an all-reduce SUM of the gradient; tests/test_sync.py checks equal
    values and gradients on two processes) but, in torch 2.13, warns FutureWarning ("deprecated")
    on every call, i.e. per attention layer per step, and raises under torch.compile. Its
    suggested successor, ``torch.distributed._functional_collectives.all_reduce``, is private
    and has its autograd only in recent torch releases (the package supports torch >= 2.1)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def differentiable_all_reduce(t: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(t)


def should_sync(layer: PositionSensitiveAxialAttention) -> bool:
    return bool(getattr(layer, "sync_statistics", False)) and is_distributed()


def all_reduce_count(count):
    """Sum a number (python or tensor) over processes; returns the same kind."""
    t = torch.as_tensor(count, dtype=torch.float64).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t if isinstance(count, torch.Tensor) else type(count)(t.item())
