"""Position-sensitive axial attention (Axial-DeepLab, Wang et al. 2020, eq. 4).

    y_o = sum_{p in span(o)} softmax_p(q_o.k_p + q_o.r^q_{p-o} + k_p.r^k_{p-o}) (v_p + r^v_{p-o})

One layer attends along one axis (height or width); the other axis is folded into
the batch. The module only holds parameters; the math lives in the paths that
:mod:`.dispatch` chooses between (``reference.axial_attention_reference`` is the plain
oracle; ``impl`` names one, ``"auto"`` lets the priority lists pick).

Relative tables are tied neither to an input size nor to the span. Every layer stores
tables of ``2D+1`` rows, offsets ``-D..D`` (``D`` = 254 by default: deeplab2's 2*255-1 rows),
so a checkpoint fits a model of any span (the paper's Axial-DeepLab-L has the same parameters at
spans 5..65):

* global span: the attention uses all rows; on axes longer than ``D+1`` the offsets beyond are
  clipped to the edge rows (as deeplab2 does), so any length runs.
* local span ``m`` (odd): offsets never exceed ``(m-1)/2``, so the attention uses only the
  ``m`` centre rows; the other rows are kept (and get no gradient) so that the same weights
  serve any span. An axis shorter than ``m`` simply sees all of it.

The attention paths read ``layer.query_table`` / ``key_table`` / ``value_table``,
``layer.max_relative_distance`` and ``layer.table_rows``: these describe the rows the math
uses (the centre ``m`` rows and reach ``(m-1)/2`` for a local span), so every path sees
the same operands whatever ``D`` is. The stored parameters (state-dict keys of the same
names) hold all ``2D+1`` rows; ``table_reach`` is ``D``. Loading a state dict whose tables
have another length fits them (:func:`fit_relative_table`): see
``PositionSensitiveAxialAttention._load_from_state_dict``.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from . import dispatch
from .activation_recompute import recompute_applies, run_recomputed
from .dispatch import available_attention_impls, register_attention_impl  # noqa: F401  (public API)

__all__ = [
    "PositionSensitiveAxialAttention",
    "register_attention_impl",
    "available_attention_impls",
    "DEFAULT_MAX_RELATIVE_DISTANCE",
    "TABLE_NAMES",
    "fit_relative_table",
]

# deeplab2 tables hold 2*255-1 rows; we default to the same reach.
DEFAULT_MAX_RELATIVE_DISTANCE = 254
TABLE_NAMES = ("query_table", "key_table", "value_table")


def fit_relative_table(table: torch.Tensor, reach: int) -> torch.Tensor:
    """A relative table ``(depth, 2R+1)`` (offsets ``-R..R``) as ``(depth, 2*reach+1)``.

    Offsets beyond ``R`` take the edge rows, exactly what clipping to ``R`` does at run time,
    so a shorter table extends without changing any output; a longer one keeps its centre
    ``2*reach+1`` rows."""
    if table.dim() != 2 or table.shape[1] % 2 == 0:
        raise ValueError(f"a relative table is (depth, 2R+1), got shape {tuple(table.shape)}")
    have = (table.shape[1] - 1) // 2
    rows = torch.arange(-reach, reach + 1, device=table.device).clamp(-have, have) + have
    return table[:, rows].contiguous()


def _table_view(name: str):
    def get(self):
        try:
            table = self._parameters[name]
        except (AttributeError, KeyError):  # not registered yet (inside __init__)
            raise AttributeError(name) from None
        start = self.table_reach - self.max_relative_distance  # python ints: a static slice
        if table is None or start == 0:
            return table
        return table[:, start : start + self.table_rows]

    return property(
        get,
        doc=f"The rows of the ``{name}`` parameter that the attention uses "
        f"(the centre ``span`` rows for a local span, else all).",
    )


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
        max_relative_distance: reach D of the stored tables (``2D+1`` rows), default 254
            whatever the span; a local span m needs ``D >= (m-1)/2``. (The attribute
            ``max_relative_distance`` is the reach the attention uses: ``D``, or ``(m-1)/2``
            for a local span; ``table_reach`` is ``D``.)
        use_qk / use_query_rpe / use_key_rpe / use_value_rpe: switch the content term,
            q.r^q, k.r^k and the r^v retrieval on or off (the paper's ablation).
        impl: ``"auto"`` (the dispatcher's priority list for the device and mode), or a path
            by name: ``"reference"``, ``"banded"``, ``"memory_efficient"``, ``"fast"``, ``"triton"``
            (see ``axial_deeplab.layers.explain``).
        recompute_activations: in training, keep only the input and replay the forward in the
            backward (less activation memory for one more forward; exact, see
            :mod:`.activation_recompute`).
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
        recompute_activations: bool = False,
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
        if max_relative_distance is None:
            reach = (
                DEFAULT_MAX_RELATIVE_DISTANCE if span is None else max(DEFAULT_MAX_RELATIVE_DISTANCE, (span - 1) // 2)
            )
        else:
            reach = int(max_relative_distance)
            if reach < 0 or (span is not None and reach < (span - 1) // 2):
                raise ValueError(
                    f"max_relative_distance must be >= 0 and, with span {span}, >= "
                    f"{(span - 1) // 2 if span else 0}; got {max_relative_distance}"
                )
        self.table_reach = reach  # the stored tables: 2 * reach + 1 rows
        # the reach the attention uses (offsets beyond it are clipped, or never occur)
        self.max_relative_distance = reach if span is None else (span - 1) // 2
        self.use_qk = use_qk
        self.use_query_rpe = use_query_rpe
        self.use_key_rpe = use_key_rpe
        self.use_value_rpe = use_value_rpe
        self.impl = impl
        self.recompute_activations = bool(recompute_activations)
        # Set by layers.sync_batchnorm.convert_sync_batchnorm: sum the similarity-BN statistics,
        # which the attention math forms itself, over processes (see layers.sync).
        self.sync_statistics = False

        # Per head the projection's channels are laid out [q (d_q), k (d_q), v (d_v)].
        self.qkv = nn.Conv2d(in_channels, 2 * key_channels + out_channels, 1, bias=False)
        self.bn_qkv = nn.BatchNorm2d(2 * key_channels + out_channels, eps=bn_eps, momentum=bn_momentum)
        # One BN channel per (term, head), term-major: [qk heads, qr heads, kr heads].
        self.bn_similarity = nn.BatchNorm2d(3 * num_heads, eps=bn_eps, momentum=bn_momentum)
        # One BN channel per (value channel, retrieval), interleaved: [c0 a.v, c0 a.r^v, c1 ...].
        self.bn_output = nn.BatchNorm1d(2 * out_channels, eps=bn_eps, momentum=bn_momentum)
        rows = 2 * self.table_reach + 1
        for name, depth, on in (
            ("query_table", self.key_depth, use_query_rpe),
            ("key_table", self.key_depth, use_key_rpe),
            ("value_table", self.value_depth, use_value_rpe),
        ):
            self.register_parameter(name, nn.Parameter(torch.empty(depth, rows)) if on else None)
        self.reset_parameters()

    # Read by every attention path: only the rows the attention uses (see the module docstring).
    query_table = _table_view("query_table")
    key_table = _table_view("key_table")
    value_table = _table_view("value_table")

    def reset_parameters(self):
        # deeplab2: qkv kernel ~ truncated normal, std C_in^-0.5; tables ~ N(0, 1).
        nn.init.trunc_normal_(
            self.qkv.weight, std=self.in_channels**-0.5, a=-2 * self.in_channels**-0.5, b=2 * self.in_channels**-0.5
        )
        for t in self.relative_table_parameters():
            if t is not None:
                nn.init.normal_(t, 0.0, 1.0)

    @property
    def table_rows(self) -> int:
        """The table rows the attention uses (offsets ``-max_relative_distance..``)."""
        return 2 * self.max_relative_distance + 1

    def relative_table_parameters(self) -> Tuple[Optional[nn.Parameter], ...]:
        """The stored (query, key, value) table parameters, all ``2 * table_reach + 1`` rows
        (None where a term is off)."""
        return tuple(self._parameters[name] for name in TABLE_NAMES)

    def fit_table(self, name: str, table: torch.Tensor) -> Tuple[torch.Tensor, Optional[str]]:
        """``table`` (a checkpoint's ``name``, any odd number of rows) as this layer stores it,
        and None, or a sentence when the fitted layer computes other outputs than the
        checkpoint's layer on some inputs.

        A shorter table extends by its edge rows: exactly the clipping its own layer did. A
        longer one is centre-cropped: exact for a local span (its offsets never pass
        ``(m-1)/2 <= table_reach``) and, for a global span, on every axis up to
        ``table_reach + 1`` long; beyond, this layer clips offsets at its own reach where the
        checkpoint's layer had rows. That is this layer's architecture, which a checkpoint
        cannot change, so the load goes on with a warning rather than refusing (refusing would
        leave no way to fine-tune a shorter-reach model from longer-reach weights)."""
        fitted = fit_relative_table(table, self.table_reach)
        have = (table.shape[1] - 1) // 2
        if self.span is None and have > self.table_reach:
            return fitted, (
                f"its {name} reaches offset {have}, this global-span layer {self.table_reach}: "
                f"outputs on axes longer than {self.table_reach + 1} differ from the checkpoint's "
                f"(offsets beyond {self.table_reach} are clipped)"
            )
        return fitted, None

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Tables of another length (another reach, or a span-sized table of an older checkpoint) fit
        # this layer's (fit_table); other shape errors are left to nn.Module's own message.
        note = None
        for name in TABLE_NAMES:
            own, table = self._parameters.get(name), state_dict.get(prefix + name)
            if (
                own is None
                or not isinstance(table, torch.Tensor)
                or table.dim() != 2
                or table.shape[0] != own.shape[0]
                or table.shape[1] == own.shape[1]
                or table.shape[1] % 2 == 0
            ):
                continue
            state_dict[prefix + name], cropped = self.fit_table(name, table)
            note = note or cropped
        if note:  # one warning per layer (its tables share one length)
            warnings.warn(
                f"{prefix.rstrip('.') or type(self).__name__}: a checkpoint's relative table was cropped: {note}",
                UserWarning,
                stacklevel=2,
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def resolve_impl(self, x: torch.Tensor) -> str:
        """The name of the path ``self(x)`` runs (see :mod:`.dispatch`; ``explain`` says why)."""
        return dispatch.select_backend(self, x)

    def __prepare_scriptable__(self):
        # torch.jit.script cannot compile the Python dispatch; say what works instead of failing
        # deep inside TorchScript's compiler
        raise RuntimeError(
            "torch.jit.script does not support PositionSensitiveAxialAttention (its attention paths are "
            "chosen in Python); use torch.jit.trace, torch.export / torch.compile, or "
            "`axial-deeplab export --format torchscript|exported-program|onnx`"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if self.recompute_activations and recompute_applies(self):
            return run_recomputed(self, self._run, x)
        return dispatch.run(self, x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.run(self, x)

    def extra_repr(self) -> str:
        terms = [
            n
            for n, on in (
                ("qk", self.use_qk),
                ("qr", self.use_query_rpe),
                ("kr", self.use_key_rpe),
                ("rv", self.use_value_rpe),
            )
            if on
        ]
        span = "global" if self.span is None else self.span
        return (
            f"{self.in_channels}->{self.out_channels}, axis={self.axis}, heads={self.num_heads}, "
            f"key_channels={self.key_channels}, span={span}, stride={self.stride}, "
            f"table_rows={self.table_rows}/{2 * self.table_reach + 1}, terms={'+'.join(terms)}, "
            f"impl={self.impl}" + (", recompute_activations=True" if self.recompute_activations else "")
        )
