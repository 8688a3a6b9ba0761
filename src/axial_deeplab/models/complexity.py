"""Parameter and multiply-add counts per stage, with the attention matmuls counted.

Common FLOP counters see only convolutions and linear layers, which makes an axial model look
almost free. Here every ``PositionSensitiveAxialAttention`` adds its own matmuls (q.k, q.r^q,
k.r^k, a.v, a.r^v over the span). The model runs on the ``meta`` device, so even
Axial-DeepLab-XL at 1025x2049 is counted instantly without memory.

``PAPER_FIGURES`` holds the paper's own parameter and M-Adds figures (Tables 1, 6 and 7) with the
input size they were measured at; :func:`paper_figure` finds the one that matches a model build.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..layers.axial_attention import PositionSensitiveAxialAttention

STRIDED_ATTENTION = ("kept", "computed")


def attention_madds(layer: PositionSensitiveAxialAttention, in_shape, strided: str = "kept") -> int:
    """Multiply-adds of the attention matmuls (not the qkv projection, counted as a conv).

    A strided layer (``stride_mode="subsample"``) here computes only the queries it keeps
    (``strided="kept"``); deeplab2 computes every query and subsamples afterwards, which
    ``strided="computed"`` counts."""
    if strided not in STRIDED_ATTENTION:
        raise ValueError(f"strided must be one of {STRIDED_ATTENTION}, got {strided!r}")
    B, _, H, W = in_shape
    L, other = (H, W) if layer.axis == "height" else (W, H)
    keys = L if layer.span is None else min(L, layer.span)
    kept = layer.stride_mode == "subsample" and strided == "kept"
    queries = math.ceil(L / layer.stride) if kept else L
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


def count_complexity(
    model: nn.Module, input_shape: Tuple[int, ...], depth: int = 1, strided_attention: str = "kept"
) -> Dict[str, Dict[str, int]]:
    """Returns ``{group: {"params": n, "madds": n}}`` plus a ``"total"`` row, for one forward pass of a
    (B, C, H, W) input. ``depth`` sets how many name components form a group (1: stem, layer1, ...).
    ``strided_attention``: see :func:`attention_madds`."""
    if strided_attention not in STRIDED_ATTENTION:
        raise ValueError(f"strided_attention must be one of {STRIDED_ATTENTION}, got {strided_attention!r}")
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
                row_for(_n)["madds"] += attention_madds(_m, x.shape, strided_attention)
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
    rows["total"] = {
        "params": sum(p.numel() for p in model.parameters()),
        "madds": sum(v["madds"] for v in rows.values()),
    }
    return rows


def build_on_meta(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered model on the meta device (no memory, no init cost)."""
    from .registry import create_model

    with torch.device("meta"):
        return create_model(name, **kwargs)


class PaperFigure(NamedTuple):
    """One row of the paper's tables: parameters (M) and multiply-adds (B) at ``input_size`` (H, W)."""

    params_m: float
    madds_b: float
    input_size: Tuple[int, int]
    source: str


# The paper's figures. Cityscapes (Table 6) at 1025x2049 with local span 65; Table 7 varies the
# span of Axial-DeepLab-L (44.9M parameters at every span); ImageNet (Table 1) at 224x224.
_CITYSCAPES = (1025, 2049)
PAPER_FIGURES: Dict[str, PaperFigure] = {
    "axial_deeplab_s": PaperFigure(12.1, 220.8, _CITYSCAPES, "Table 6, Cityscapes"),
    "axial_deeplab_m": PaperFigure(25.9, 419.6, _CITYSCAPES, "Table 6, Cityscapes"),
    "axial_deeplab_l": PaperFigure(44.9, 687.4, _CITYSCAPES, "Table 6, Cityscapes"),
    "axial_deeplab_xl": PaperFigure(173.0, 2446.8, _CITYSCAPES, "Table 6, Cityscapes"),
    "resnet50": PaperFigure(25.6, 4.1, (224, 224), "Table 1, ImageNet"),
    "axial_resnet_s_conv": PaperFigure(12.4, 2.8, (224, 224), "Table 1, ImageNet (Conv-Stem + Axial)"),
    "axial_resnet_s_full": PaperFigure(12.5, 3.3, (224, 224), "Table 1, ImageNet (Full Axial)"),
}
PAPER_SPAN_FIGURES: Dict[int, PaperFigure] = {  # Axial-DeepLab-L, Table 7
    span: PaperFigure(44.9, madds, _CITYSCAPES, f"Table 7, span {span}")
    for span, madds in ((5, 617.4), (9, 622.1), (17, 631.5), (33, 650.2), (65, 687.4))
}


def paper_figure(name: str, kwargs: Optional[Mapping] = None) -> Optional[PaperFigure]:
    """The paper's figure for registered model ``name`` built with ``kwargs`` (overrides), or
    ``None`` when the paper has no figure for it. Panoptic models are tabulated at span 65 (other
    spans: Axial-DeepLab-L only). Overrides that make another network than the tabulated one
    (width, depth, stem kind, heads, output stride, classes, backbone only) leave no figure; the
    rest (layout, stem width, decoder widths, BatchNorm, ...) are what a comparison is for."""
    kwargs = dict(kwargs or {})
    panoptic = name.startswith("axial_deeplab_")
    span = kwargs.pop("span", 65 if panoptic else None)
    classes = kwargs.pop("num_classes", None)
    if classes is not None and classes != (19 if panoptic else 1000):
        return None  # the paper counts 19 Cityscapes classes, 1000 ImageNet classes
    other_network = {
        "width",
        "layers",
        "block",
        "stem",
        "num_heads",
        "output_stride",
        "features_only",
        "backbone",
        "stage_filters",
        "width_factor",
        "out_factor",
        "key_channels",
    }
    if other_network & set(kwargs):
        return None
    if name == "axial_deeplab_l":
        return PAPER_SPAN_FIGURES.get(span)
    if panoptic:
        return PAPER_FIGURES.get(name) if span == 65 else None
    return PAPER_FIGURES.get(name) if span is None else None


def percent_diff(ours: float, paper: float) -> float:
    """Signed difference of ``ours`` from ``paper`` in percent of the paper's figure."""
    return 100.0 * (ours / paper - 1.0)
