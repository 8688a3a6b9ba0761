"""Turning a TensorFlow (deeplab2) checkpoint into our state dict: the generic rules.

A checkpoint's variables are keyed by object path, e.g.
``encoder/_stage2/_block1/_attention/_height_axis/qkv_kernel/.ATTRIBUTES/VARIABLE_VALUE``.
:class:`TFVariables` strips the ``/.ATTRIBUTES/VARIABLE_VALUE`` suffix, sets aside what is not a
model weight (optimizer slots and variables, step counters, the object graph) and records
which variables a mapping takes, so that :func:`convert_weights` can report every variable
mapped, every one left out and why, and refuse a result that misses any key of the model.

A *mapping* is a function ``mapping(variables: TFVariables, model) -> None`` that calls the
rules below (:func:`conv`, :func:`batch_norm`, :func:`dense`, :func:`axial_attention`, ...)
or :meth:`TFVariables.put` for every module of ``model``; ``convert/deeplab2.py`` holds one
per model family.

Layouts: TensorFlow convolution kernels are HWIO (ours OIHW), dense kernels (in, out) (ours
(out, in)); Keras BatchNormalization's ``gamma/beta/moving_mean/moving_variance`` are our
``weight/bias/running_mean/running_var``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..models.weights import CheckpointError

__all__ = [
    "ConversionError",
    "TFVariables",
    "ConversionReport",
    "convert_weights",
    "skip_reason",
    "conv",
    "batch_norm",
    "dense",
    "axial_attention",
    "axial_attention_pair",
    "qkv_permutation",
]

VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


class ConversionError(CheckpointError):
    """A checkpoint that does not map onto the model: the message lists what is missing or wrong."""


def skip_reason(name: str) -> Optional[str]:
    """Why the checkpoint variable ``name`` (full TensorFlow key) is not a model weight, or None."""
    if name == "_CHECKPOINTABLE_OBJECT_GRAPH":
        return "object graph (checkpoint structure)"
    if "/.OPTIMIZER_SLOT/" in name:
        return "optimizer slot"
    top = name.split("/", 1)[0]
    if top in ("save_counter", "global_step", "step", "iterations"):
        return "step counter"
    if "optimizer" in top.lower():
        return "optimizer variable"
    if not name.endswith(VALUE_SUFFIX):
        return "not a variable value (no /.ATTRIBUTES/VARIABLE_VALUE)"
    return None


@dataclass
class ConversionReport:
    """What :func:`convert_weights` did. ``mapped``: (TensorFlow names, our key, shape);
    ``left_out``: (TensorFlow name, reason); ``filled``: our keys not in TensorFlow checkpoints
    (BatchNorm's ``num_batches_tracked``), set to 0."""

    mapped: List[Tuple[Tuple[str, ...], str, Tuple[int, ...]]] = field(default_factory=list)
    left_out: List[Tuple[str, str]] = field(default_factory=list)
    filled: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        out = [f"mapped {len(self.mapped)} tensors:"]
        for names, key, shape in self.mapped:
            out.append(f"  {' + '.join(names)} -> {key} {list(shape)}")
        out.append(f"left out {len(self.left_out)} checkpoint tensors:")
        for name, why in self.left_out:
            out.append(f"  {name}: {why}")
        if self.filled:
            out.append(f"set to 0 (not in TensorFlow checkpoints): {len(self.filled)} BatchNorm num_batches_tracked")
        return out


class TFVariables:
    """The model variables of a checkpoint, by short name (without ``/.ATTRIBUTES/VARIABLE_VALUE``),
    and the state dict a mapping builds from them."""

    def __init__(self, tensors: Dict[str, np.ndarray], source: str = "checkpoint"):
        self.source = source
        self.values: Dict[str, np.ndarray] = {}
        self.skipped: List[Tuple[str, str]] = []
        for name, value in tensors.items():
            why = skip_reason(name)
            if why:
                self.skipped.append((name, why))
            else:
                self.values[name[: -len(VALUE_SUFFIX)]] = value
        self.used: Dict[str, bool] = {}
        self.state: Dict[str, torch.Tensor] = {}
        self.sources: Dict[str, Tuple[str, ...]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def names(self, prefix: str = "") -> List[str]:
        return sorted(n for n in self.values if n.startswith(prefix))

    def take(self, name: str) -> np.ndarray:
        """The variable ``name``; a clear error naming it (and its neighbours) when absent."""
        if name not in self.values:
            parent = name.rsplit("/", 1)[0]
            near = [n for n in self.values if n.startswith(parent + "/")][:8]
            hint = f"; under {parent}/ it has: {', '.join(near)}" if near else ""
            raise ConversionError(f"{self.source}: no variable {name!r}{hint}")
        self.used[name] = True
        return self.values[name]

    def put(self, key: str, value, sources: Sequence[str]) -> None:
        if key in self.state:
            raise ConversionError(f"mapping error: {key} mapped twice (from {', '.join(sources)})")
        self.state[key] = torch.as_tensor(np.ascontiguousarray(value))
        self.sources[key] = tuple(sources)


# ----------------------------------------------------------------------------- generic rules
def conv(v: TFVariables, tf_prefix: str, key_prefix: str, bias: Optional[bool] = None, depthwise: bool = False) -> None:
    """``tf_prefix/kernel`` (HWIO; depthwise HWC1) -> ``key_prefix.weight`` (OIHW), and
    ``tf_prefix/bias`` -> ``key_prefix.bias`` (when present, or when ``bias`` is True)."""
    name = f"{tf_prefix}/depthwise_kernel" if f"{tf_prefix}/depthwise_kernel" in v else f"{tf_prefix}/kernel"
    k = v.take(name)
    if k.ndim != 4:
        raise ConversionError(f"{v.source}: {name} is {list(k.shape)}, expected a 4-d convolution kernel")
    weight = k.transpose(2, 3, 0, 1) if depthwise or name.endswith("depthwise_kernel") else k.transpose(3, 2, 0, 1)
    v.put(f"{key_prefix}.weight", weight, [name])
    if bias or (bias is None and f"{tf_prefix}/bias" in v):
        v.put(f"{key_prefix}.bias", v.take(f"{tf_prefix}/bias"), [f"{tf_prefix}/bias"])


def dense(v: TFVariables, tf_prefix: str, key_prefix: str) -> None:
    """``tf_prefix/kernel`` (in, out) and ``bias`` -> nn.Linear ``weight`` (out, in), ``bias``."""
    k = v.take(f"{tf_prefix}/kernel")
    v.put(f"{key_prefix}.weight", k.T, [f"{tf_prefix}/kernel"])
    if f"{tf_prefix}/bias" in v:
        v.put(f"{key_prefix}.bias", v.take(f"{tf_prefix}/bias"), [f"{tf_prefix}/bias"])


_BN = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var"))


def batch_norm(v: TFVariables, tf_prefix: str, key_prefix: str, reorder: Optional[Callable] = None) -> None:
    """Keras BatchNormalization -> nn.BatchNorm: gamma/beta/moving_mean/moving_variance ->
    weight/bias/running_mean/running_var (flattened, then ``reorder``-ed when given). A BN
    without ``gamma`` (``scale=False``) gets weight 1; without ``beta`` (``center=False``) bias 0."""
    ref = v.take(f"{tf_prefix}/moving_mean").reshape(-1)
    for tf_name, ours in _BN:
        name = f"{tf_prefix}/{tf_name}"
        if name in v:
            value, src = v.take(name).reshape(-1), [name]
        elif tf_name in ("gamma", "beta"):
            value, src = np.full_like(ref, 1.0 if tf_name == "gamma" else 0.0), [f"{name} (absent: constant)"]
        else:
            value, src = v.take(name), [name]
        v.put(f"{key_prefix}.{ours}", reorder(value) if reorder else value, src)


# ----------------------------------------------------------------------------- axial attention
def qkv_permutation(num_heads: int, key_depth: int, value_depth: int) -> np.ndarray:
    """Index array ``p`` with ``ours[j] = deeplab2[p[j]]`` over the 2K+V projection channels.

    deeplab2 lays its ``qkv_kernel`` columns out as all q, then all k, then all v, each grouped
    by head; ours per head are [q (d_q), k (d_q), v (d_v)]."""
    total_key = num_heads * key_depth
    perm = []
    for h in range(num_heads):
        perm += [h * key_depth + i for i in range(key_depth)]
        perm += [total_key + h * key_depth + i for i in range(key_depth)]
        perm += [2 * total_key + h * value_depth + i for i in range(value_depth)]
    return np.asarray(perm)


def _table(embeddings: np.ndarray, rows: int, name: str, source: str) -> np.ndarray:
    """deeplab2's relative embeddings ``[2R+1, depth]`` (row ``p - o + R``, R = 254, shared by
    the heads) as our ``(depth, rows)`` table: the centre rows for a shorter table, edge rows
    repeated for a longer one (what clipping the offset to R does)."""
    if embeddings.ndim != 2 or embeddings.shape[0] % 2 == 0:
        raise ConversionError(f"{source}: {name} is {list(embeddings.shape)}, expected [2R+1, depth]")
    have, reach = (embeddings.shape[0] - 1) // 2, (rows - 1) // 2
    index = np.clip(np.arange(-reach, reach + 1), -have, have) + have
    return embeddings[index].T


def axial_attention(v: TFVariables, tf_prefix: str, key_prefix: str, layer: nn.Module) -> None:
    """One deeplab2 ``AxialAttention`` (e.g. ``.../_attention/_height_axis``) -> our
    ``PositionSensitiveAxialAttention`` ``layer`` at ``key_prefix``.

    * ``qkv_kernel`` (C_in, 2K+V) -> ``qkv.weight`` (2K+V, C_in, 1, 1), columns reordered by
      :func:`qkv_permutation`; ``_batch_norm_qkv`` -> ``bn_qkv`` with the same order.
    * ``_batch_norm_similarity`` (params [3, 1, heads, 1, 1]: term-major qk, qr, kr) ->
      ``bn_similarity`` (3*heads, the same order).
    * ``_batch_norm_retrieved_output`` ([2, 1, heads, 1, d_v]: content then positional
      retrieval) -> ``bn_output`` (interleaved per value channel: [c a.v, c a.r^v, ...]).
    * ``_query_rpe`` / ``_key_rpe`` / ``_value_rpe`` ``embeddings`` [509, depth] ->
      ``query_table`` / ``key_table`` / ``value_table`` (depth, rows), see :func:`_table`.
    """
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    perm = qkv_permutation(heads, dk, dv)
    kernel_name = f"{tf_prefix}/qkv_kernel"
    kernel = v.take(kernel_name)
    want = (layer.in_channels, len(perm))
    if tuple(kernel.shape) != want:
        raise ConversionError(
            f"{v.source}: {kernel_name} is {list(kernel.shape)}, {key_prefix} needs {list(want)} "
            f"({heads} heads, key depth {dk}, value depth {dv} per head)"
        )
    v.put(f"{key_prefix}.qkv.weight", kernel[:, perm].T[:, :, None, None], [kernel_name])
    batch_norm(v, f"{tf_prefix}/_batch_norm_qkv", f"{key_prefix}.bn_qkv", reorder=lambda x: x[perm])
    batch_norm(v, f"{tf_prefix}/_batch_norm_similarity", f"{key_prefix}.bn_similarity")
    batch_norm(
        v,
        f"{tf_prefix}/_batch_norm_retrieved_output",
        f"{key_prefix}.bn_output",
        reorder=lambda x: x.reshape(2, heads * dv).T.reshape(-1),
    )
    own = dict(layer.named_parameters())
    for tf_name, ours in (("_query_rpe", "query_table"), ("_key_rpe", "key_table"), ("_value_rpe", "value_table")):
        if own.get(ours) is None:
            continue
        name = f"{tf_prefix}/{tf_name}/embeddings"
        v.put(f"{key_prefix}.{ours}", _table(v.take(name), own[ours].shape[1], name, v.source), [name])


def axial_attention_pair(
    v: TFVariables, tf_prefix: str, key_prefix_h: str, key_prefix_w: str, layer_h: nn.Module, layer_w: nn.Module
) -> None:
    """deeplab2's ``AxialAttention2D`` at ``tf_prefix`` (``_height_axis`` then ``_width_axis``)
    -> our height and width layers."""
    axial_attention(v, f"{tf_prefix}/_height_axis", key_prefix_h, layer_h)
    axial_attention(v, f"{tf_prefix}/_width_axis", key_prefix_w, layer_w)


# ----------------------------------------------------------------------------- the driver
def convert_weights(
    tensors: Dict[str, np.ndarray], model: nn.Module, mapping: Callable, source: str = "checkpoint"
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Apply ``mapping`` to the checkpoint's ``tensors`` for ``model``; return our state dict
    (dtypes and shapes of the model's) and the report. Raises :class:`ConversionError` listing
    every model key the mapping left unset, every shape that does not match, and keys the model
    does not have."""
    v = TFVariables(tensors, source)
    mapping(v, model)
    own = model.state_dict()
    report = ConversionReport()
    state: Dict[str, torch.Tensor] = {}
    problems = []
    for key, target in own.items():
        if key not in v.state:
            if key.endswith("num_batches_tracked"):
                state[key] = torch.zeros_like(target)
                report.filled.append(key)
                continue
            problems.append(f"missing {key} {list(target.shape)}")
            continue
        value = v.state[key]
        if tuple(value.shape) != tuple(target.shape):
            problems.append(
                f"{key}: checkpoint {' + '.join(v.sources[key])} gives {list(value.shape)}, model {list(target.shape)}"
            )
            continue
        state[key] = value.to(target.dtype).clone()
        report.mapped.append((v.sources[key], key, tuple(target.shape)))
    problems += [f"not in the model: {key} (from {' + '.join(v.sources[key])})" for key in v.state if key not in own]
    if problems:
        shown = "\n  ".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
        raise ConversionError(
            f"{source} does not map onto {type(model).__name__} ({len(problems)} problems):\n  {shown}"
        )
    report.left_out = sorted(v.skipped) + [
        (n + VALUE_SUFFIX, "not used by the mapping") for n in v.names() if n not in v.used
    ]
    return state, report
