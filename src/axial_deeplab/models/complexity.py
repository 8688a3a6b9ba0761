"""Parameter and multiply-add counts per stage, with the attention matmuls counted.

Common FLOP counters see only convolutions and linear layers, which makes an axial model look
almost free. Here every ``PositionSensitiveAxialAttention`` adds its own matmuls (q.k, q.r^q,
k.r^k, a.v, a.r^v over the span). The model runs on the ``meta`` device, so even
Axial-DeepLab-XL at 1025x2049 is counted instantly without memory.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Tuple

import torch
from torch import nn

from ..layers.axial_attention import PositionSensitiveAxialAttention


def attention_madds(layer: PositionSensitiveAxialAttention, in_shape) -> int:
    """Multiply-adds of the attention matmuls (not the qkv projection, counted as a conv)."""
    B, _, H, W = in_shape
    L, other = (H, W) if layer.axis == "height" else (W, H)
    keys = L if layer.span is None else min(L, layer.span)
    queries = math.ceil(L / layer.stride) if layer.stride_mode == "subsample" else L
    dk, dv = layer.key_depth, layer.value_depth
    per_pair = dk * (int(layer.use_qk) + int(layer.use_query_rpe) + int(layer.use_key_rpe))
    per_pair += dv * (1 + int(layer.use_value_rpe))
    return B * other * layer.num_heads * queries * keys * per_pair


def _out_shape(layer, shape):
    B, _, H, W = shape
    s = layer.stride
    if s > 1:
        if layer.stride_mode == "avgpool2d":
            H, W = math.ceil(H / s), math.ceil(W / s)
        elif layer.axis == "height":
            H = math.ceil(H / s)
        else:
            W = math.ceil(W / s)
    return (B, layer.out_channels, H, W)


def _group(name: str, depth: int) -> str:
    parts = name.split(".")
    return ".".join(parts[:depth]) if parts[0] != "" else "(root)"


def count_complexity(model: nn.Module, input_shape: Tuple[int, ...], depth: int = 1) -> Dict[str, Dict[str, int]]:
    """Returns ``{group: {"params": n, "madds": n}}`` plus a ``"total"`` row, for one forward pass of a
    (B, C, H, W) input. ``depth`` sets how many name components form a group (1: stem, layer1, ...)."""
    rows: "OrderedDict[str, Dict[str, int]]" = OrderedDict()
    for name, child in model.named_children():
        if name == "backbone" and depth == 1:
            for sub, grandchild in child.named_children():
                rows[f"backbone.{sub}"] = {"params": sum(p.numel() for p in grandchild.parameters()), "madds": 0}
            continue
        rows[name] = {"params": sum(p.numel() for p in child.parameters()), "madds": 0}

    def row_for(name):
        for key in rows:
            if name == key or name.startswith(key + "."):
                return rows[key]
        return rows.setdefault("(other)", {"params": 0, "madds": 0})

    hooks = []
    originals = {}

    for name, mod in model.named_modules():
        if isinstance(mod, PositionSensitiveAxialAttention):
            def att_forward(x, _m=mod, _n=name):
                row_for(_n)["madds"] += attention_madds(_m, x.shape)
                y = _m.qkv(x)  # lets the conv hook count the projection
                return y.new_zeros(_out_shape(_m, x.shape))

            originals[mod] = mod.forward
            mod.forward = att_forward
        elif isinstance(mod, nn.Conv2d):
            def conv_hook(m, inp, out, _n=name):
                k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
                row_for(_n)["madds"] += out.numel() * k
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            def linear_hook(m, inp, out, _n=name):
                row_for(_n)["madds"] += out.numel() * m.in_features
            hooks.append(mod.register_forward_hook(linear_hook))

    was_training = model.training
    try:
        model.train()  # the raw forward path: no post-processing on meta tensors
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        for mod, fwd in originals.items():
            mod.forward = fwd
        model.train(was_training)
    rows = OrderedDict((k, v) for k, v in rows.items() if v["params"] or v["madds"])
    rows["total"] = {"params": sum(p.numel() for p in model.parameters()),
                     "madds": sum(v["madds"] for v in rows.values())}
    return rows


def build_on_meta(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered model on the meta device (no memory, no init cost)."""
    from .registry import create_model

    with torch.device("meta"):
        return create_model(name, **kwargs)
