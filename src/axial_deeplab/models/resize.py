"""Bilinear resize with aligned corners (deeplab2's resize), the one the decoders and heads use.

Eager, exported and traced models call ``F.interpolate``. While ``torch.compile`` traces a
tensor that needs a gradient, the resize is the operator ``axial_deeplab::resize_bilinear`` (and
its backward) instead, so the compiled training graph keeps ATen's upsample kernels. Traced as
it is, ``F.interpolate`` decomposes into index gathers whose backward is a scatter-add
(``index_put`` with accumulation) that Inductor's CPU code runs several times slower than ATen's
``upsample_bilinear2d_backward``: on the compiled Axial-DeepLab-S training step at 2x3x257x257
(one thread) Inductor's kernels went 277 -> 196 ms, for ~30 ms of ATen upsample forward +
backward. A compiled inference graph keeps the decomposition, which Inductor fuses with its
neighbours (the decoder's concatenation).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` (N, C, H, W) resized to ``size`` = (h, w), bilinear with aligned corners; ``x``
    itself when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.requires_grad and torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return torch.ops.axial_deeplab.resize_bilinear(x, size[0], size[1])
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _like(x: torch.Tensor, h, w) -> torch.Tensor:
    # ATen's upsample kernels (forward and backward) lay out their output in their input's
    # suggested memory format
    shape = (x.shape[0], x.shape[1], h, w)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


@torch.library.custom_op("axial_deeplab::resize_bilinear", mutates_args=())
def _resize_op(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)


@_resize_op.register_fake
def _(x, h, w):
    return _like(x, h, w)


@torch.library.custom_op("axial_deeplab::resize_bilinear_backward", mutates_args=())
def _resize_backward_op(grad: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The gradient of ``resize_bilinear`` at an input of height ``h`` and width ``w``."""
    n, c, oh, ow = grad.shape
    return torch.ops.aten.upsample_bilinear2d_backward(grad, [oh, ow], [n, c, h, w], True)


@_resize_backward_op.register_fake
def _(grad, h, w):
    return _like(grad, h, w)


def _setup_context(ctx, inputs, output):
    ctx.input_size = inputs[0].shape[-2:]


def _backward(ctx, grad):
    h, w = ctx.input_size
    return _resize_backward_op(grad, h, w), None, None


_resize_op.register_autograd(_backward, setup_context=_setup_context)
