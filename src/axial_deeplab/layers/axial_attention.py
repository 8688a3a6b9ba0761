"""Position-sensitive axial attention (Axial-DeepLab, Wang et al. 2020, eq. 4).

    y_o = sum_{p in span(o)} softmax_p(q_o.k_p + q_o.r^q_{p-o} + k_p.r^k_{p-o}) (v_p + r^v_{p-o})

One layer attends along one axis (height or width); the other axis is folded into
the batch. The module only holds parameters; the math lives in the paths that
:mod:`.dispatch` chooses between (``reference.axial_attention_reference`` is the plain
oracle; ``impl`` names one, ``"auto"`` lets the priority lists pick).

Relative tables are never tied to an input size:

* local span ``m`` (odd): tables have exactly ``m`` rows (offsets -(m-1)/2..(m-1)/2);
  an axis shorter than ``m`` simply sees all of it.
* global span: tables cover offsets ``-D..D`` (``2D+1`` rows, ``D =
  max_relative_distance``); on axes longer than ``D+1`` the offsets beyond are
  clipped to the edge rows (as deeplab2 does), so any length runs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import dispatch
from .dispatch import available_attention_impls, register_attention_impl  # noqa: F401  (public API)

__all__ = [
    "PositionSensitiveAxialAttention",
    "register_attention_impl",
    "available_attention_impls",
    "DEFAULT_MAX_RELATIVE_DISTANCE",
]

# deeplab2 tables hold 2*255-1 rows; we default to the same reach.
DEFAULT_MAX_RELATIVE_DISTANCE = 254


class PositionSensitiveAxialAttention(nn.Module):
    """One multi-head position-sensitive axial-attention layer.

    Args:
        in_channels: input channels.
        out_channels: total value depth (= output channels), split over heads.
        axis: ``"height"`` or ``"width"``.
        num_heads: number of heads N.
        key_channels: total query/key depth; default ``out_channels // 2``.
        span: ``None`` for global attention along the axis, or an odd local span m.
        stride: output stride applied after the layer on its own axis.
        stride_mode: ``"subsample"`` (every s-th position, deeplab2), ``"avgpool"``
            (average over s positions on the axis) or ``"avgpool2d"`` (s x s average
            pooling of the 2-D map, as the PyTorch ImageNet port does after its width layer).
        max_relative_distance: reach D of global-span tables (ignored for local spans).
        use_qk / use_query_rpe / use_key_rpe / use_value_rpe: switch the content term,
            q.r^q, k.r^k and the r^v retrieval on or off (the paper's ablation).
        impl: ``"auto"`` (the dispatcher's priority list for the device and mode), or a path
            by name: ``"reference"``, ``"banded"``, ``"memory_efficient"``, ``"fast"``, ``"triton"``
            (see ``axial_deeplab.layers.explain``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: Optional[int] = None,
        axis: str = "height",
        num_heads: int = 8,
        key_channels: Optional[int] = None,
        span: Optional[int] = None,
        stride: int = 1,
        stride_mode: str = "subsample",
        max_relative_distance: Optional[int] = None,
        use_qk: bool = True,
        use_query_rpe: bool = True,
        use_key_rpe: bool = True,
        use_value_rpe: bool = True,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        impl: str = "auto",
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        key_channels = out_channels // 2 if key_channels is None else key_channels
        if axis not in ("height", "width"):
            raise ValueError(f"axis must be 'height' or 'width', got {axis!r}")
        if out_channels % num_heads or key_channels % num_heads:
            raise ValueError(
                f"out_channels ({out_channels}) and key_channels ({key_channels}) "
                f"must be divisible by num_heads ({num_heads})"
            )
        if span is not None and (span < 1 or span % 2 == 0):
            raise ValueError(f"span must be None (global) or a positive odd integer, got {span}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if stride_mode not in ("subsample", "avgpool", "avgpool2d"):
            raise ValueError(f"unknown stride_mode {stride_mode!r}")
        if not (use_qk or use_query_rpe or use_key_rpe):
            raise ValueError("at least one similarity term (qk, q.r^q, k.r^k) must be on")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.key_channels = key_channels
        self.axis = axis
        self.num_heads = num_heads
        self.key_depth = key_channels // num_heads  # d_q per head
        self.value_depth = out_channels // num_heads  # d_v per head
        self.span = span
        self.stride = stride
        self.stride_mode = stride_mode
        if span is not None:
            self.max_relative_distance = (span - 1) // 2
        else:
            self.max_relative_distance = (
                DEFAULT_MAX_RELATIVE_DISTANCE if max_relative_distance is None else int(max_relative_distance)
            )
        self.use_qk = use_qk
        self.use_query_rpe = use_query_rpe
        self.use_key_rpe = use_key_rpe
        self.use_value_rpe = use_value_rpe
        self.impl = impl
        # Set by engine.distributed.convert_sync_batchnorm: sum the similarity-BN statistics,
        # which the attention math forms itself, over processes (see layers.sync).
        self.sync_statistics = False

        # Per head the projection's channels are laid out [q (d_q), k (d_q), v (d_v)].
        self.qkv = nn.Conv2d(in_channels, 2 * key_channels + out_channels, 1, bias=False)
        self.bn_qkv = nn.BatchNorm2d(2 * key_channels + out_channels, eps=bn_eps, momentum=bn_momentum)
        # One BN channel per (term, head), term-major: [qk heads, qr heads, kr heads].
        self.bn_similarity = nn.BatchNorm2d(3 * num_heads, eps=bn_eps, momentum=bn_momentum)
        # One BN channel per (value channel, retrieval), interleaved: [c0 a.v, c0 a.r^v, c1 ...].
        self.bn_output = nn.BatchNorm1d(2 * out_channels, eps=bn_eps, momentum=bn_momentum)
        rows = 2 * self.max_relative_distance + 1
        self.query_table = nn.Parameter(torch.empty(self.key_depth, rows)) if use_query_rpe else None
        self.key_table = nn.Parameter(torch.empty(self.key_depth, rows)) if use_key_rpe else None
        self.value_table = nn.Parameter(torch.empty(self.value_depth, rows)) if use_value_rpe else None
        self.reset_parameters()

    def reset_parameters(self):
        # deeplab2: qkv kernel ~ truncated normal, std C_in^-0.5; tables ~ N(0, 1).
        nn.init.trunc_normal_(self.qkv.weight, std=self.in_channels ** -0.5,
                              a=-2 * self.in_channels ** -0.5, b=2 * self.in_channels ** -0.5)
        for t in (self.query_table, self.key_table, self.value_table):
            if t is not None:
                nn.init.normal_(t, 0.0, 1.0)

    @property
    def table_rows(self) -> int:
        return 2 * self.max_relative_distance + 1

    def resolve_impl(self, x: torch.Tensor) -> str:
        """The name of the path ``self(x)`` runs (see :mod:`.dispatch`; ``explain`` says why)."""
        return dispatch.select_backend(self, x)

    def __prepare_scriptable__(self):
        # torch.jit.script cannot compile the Python dispatch; say what works instead of failing
        # deep inside TorchScript's compiler
        raise RuntimeError(
            "torch.jit.script does not support PositionSensitiveAxialAttention (its attention paths are "
            "chosen in Python); use torch.jit.trace, torch.export / torch.compile, or "
            "`axial-deeplab export --format torchscript|exported-program|onnx`")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return dispatch.run(self, x)

    def extra_repr(self) -> str:
        terms = [n for n, on in (("qk", self.use_qk), ("qr", self.use_query_rpe),
                                 ("kr", self.use_key_rpe), ("rv", self.use_value_rpe)) if on]
        span = "global" if self.span is None else self.span
        return (f"{self.in_channels}->{self.out_channels}, axis={self.axis}, heads={self.num_heads}, "
                f"key_channels={self.key_channels}, span={span}, stride={self.stride}, "
                f"table_rows={self.table_rows}, terms={'+'.join(terms)}, impl={self.impl}")

