"""Recompute an attention layer's activations in the backward instead of keeping them.

Why: in training an axial-attention layer keeps, for its backward, the projection before and
after its BatchNorm, the attention's own inputs and the two retrievals before the output
BatchNorm: several times its input. In an Axial-DeepLab-S training step these are most of the
activation memory (about 60% of the saved tensors at 2x257x257). With recompute the layer keeps
only its input (which the block's preceding ReLU keeps anyway) and the backward replays the
layer's forward once, at the price of that forward's time.

``torch.utils.checkpoint`` (non-reentrant) does the replay. The one thing it would get wrong
here is BatchNorm's running statistics, which the replay would update a second time; they are
put back after the replay, so a training step with recompute equals one without: outputs,
gradients and buffers (the replay's batch statistics are computed from the same input).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["run_recomputed", "recompute_applies"]


def recompute_applies(module: nn.Module) -> bool:
    """Whether a call now would keep activations worth dropping: a training module with gradients
    on, in eager mode (torch.compile and tracing see the plain forward; Inductor makes its own
    choice of what to keep)."""
    return (
        module.training
        and torch.is_grad_enabled()
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


def run_recomputed(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with only ``x`` kept for the backward, which replays ``fn``; ``module``'s buffers
    (BatchNorm running statistics and counters) are restored after the replay. Any module works
    (timm-style ``set_grad_checkpointing`` runs whole blocks through it); random ops inside ``fn``
    (drop path) replay alike, as ``torch.utils.checkpoint`` keeps the RNG state."""
    replaying = False

    def body(inp: torch.Tensor) -> torch.Tensor:
        nonlocal replaying
        if not replaying:
            replaying = True  # the next call is the backward's replay
            return fn(inp)
        buffers = [b for b in module.buffers() if b is not None]
        kept = [b.detach().clone() for b in buffers]
        try:
            return fn(inp)
        finally:
            with torch.no_grad():
                for b, v in zip(buffers, kept):
                    b.copy_(v)

    return torch.utils.checkpoint.checkpoint(body, x, use_reentrant=False)
