"""Axial-ResNet: ResNet-50's layout with every 3x3 conv replaced by an axial-attention pair.

Families registered here (timm style, ``create_model(name, ...)``):

* ``axial_resnet_{s,m,l,xl}``: Inception stem (three 3x3 convs, full width for every size),
  widths 0.5/0.75/1/2, as the Axial-DeepLab backbone. ``axial_resnet_*_conv`` use the 7x7 conv
  stem ("Conv-Stem + Axial"), ``axial_resnet_*_full`` the full-axial stem (our reading of the
  paper, with a stem max-pool).
* ``resnet50``: the convolutional baseline in the same code.
* ``axial26s``, ``axial50s``, ``axial50m``, ``axial50l``: the PyTorch ImageNet port's variants,
  able to load that port's state dicts (see ``weights.convert_port_state_dict``).

Stage filters F = 64, 128, 256, 512 (x width): an axial block is 1x1 conv to 2F, height then
width attention (key depth F, value depth 2F, 8 heads), 1x1 conv to 4F whose BN gamma starts at 0.

Arrangement. ``axial_resnet_{s,m,l,xl}`` and ``axial_resnet_*_conv`` follow deeplab2
(``arrangement="deeplab2"``): the stem ends at stride 2 with no max-pool, the first block of the
first stage strides by 2 (height attention, subsample rows, width attention, subsample columns)
and its shortcut is a plain spatial subsample when the channels do not change (S: 128 -> 128),
else a strided 1x1 conv + BN. ``arrangement="maxpool"`` is the torchvision-style layout these
models had before (3x3/2 max-pool after the stem, unstrided first stage, a 1x1 projection
shortcut whenever the shape changes); the state-dict keys and shapes of the two are identical,
so checkpoints record which one they were trained with. For deeplab2's numerics also pass
``bn_eps=1e-3, bn_momentum=0.01`` (Keras' epsilon 1e-3 and momentum 0.99) and
``conv_init="he_normal"``; ``activation="gelu"`` gives the GeLU variants.

Names. Ours, deeplab2's (``axial_resnet_instances.get_model``) and the paper's:

==================================  ============================  =========================
ours                                deeplab2                      paper
==================================  ============================  =========================
``axial_resnet_s`` (inception stem) ``axial_deeplab_s``           Axial-DeepLab-S backbone
``axial_resnet_l``                  ``axial_deeplab_l``           Axial-DeepLab-L backbone
``axial_resnet_m`` / ``_xl``        (``axial_deeplab_s`` with     Axial-DeepLab-M / -XL
                                    width_multiplier 0.75 / 2)    backbone
``axial_resnet_s_conv``             ``axial_resnet_s``            Axial-ResNet-S, Conv-Stem
``axial_resnet_l_conv``             ``axial_resnet_l``            Axial-ResNet-L, Conv-Stem
``axial_deeplab_s`` (panoptic)      Panoptic-DeepLab meta-arch.   Axial-DeepLab-S
                                    on ``axial_deeplab_s``
==================================  ============================  =========================
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..layers.activation_recompute import recompute_applies, run_recomputed
from ..layers.attention2d import GlobalSelfAttention2d, LocalSelfAttention2d
from ..layers.axial_attention import PositionSensitiveAxialAttention
from .registry import register_model
from .timm_api import FeatureInfo, TimmModelMixin

__all__ = [
    "AxialResNet",
    "AxialBlock",
    "ConvBottleneck",
    "FeatureInfo",
    "DropPath",
    "Subsample",
    "make_shortcut",
    "build_stem",
    "make_activation",
    "init_conv_",
    "ARRANGEMENTS",
    "model_arrangements",
    "arrangement_mismatches",
]


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (per sample)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x):
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"rate={self.rate}"


ARRANGEMENTS = ("maxpool", "deeplab2")
ACTIVATIONS = ("relu", "gelu")
SHORTCUTS = ("projection", "subsample")
CONV_INITS = ("torch", "he_normal")


def make_activation(name: str) -> nn.Module:
    """``"relu"`` or ``"gelu"`` (exact erf form, as deeplab2's ``gelu``)."""
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")


def init_conv_(conv: nn.Conv2d, conv_init: str = "torch") -> nn.Conv2d:
    """``"torch"`` keeps PyTorch's default; ``"he_normal"`` is Keras' ``he_normal`` (deeplab2's conv
    initializer): a normal truncated at two standard deviations, std sqrt(2 / fan_in) / 0.8796."""
    if conv_init == "he_normal":
        fan_in = conv.weight.shape[1] * conv.weight[0, 0].numel()
        std = (2.0 / fan_in) ** 0.5 / 0.87962566103423978
        nn.init.trunc_normal_(conv.weight, 0.0, std, -2.0 * std, 2.0 * std)
    elif conv_init != "torch":
        raise ValueError(f"unknown conv_init {conv_init!r}; choose one of {CONV_INITS}")
    return conv


class Subsample(nn.Module):
    """Spatial subsampling ``x[..., ::s, ::s]``: deeplab2's shortcut of a strided block whose
    channels do not change (no parameters)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = int(stride)

    def forward(self, x):
        return x[:, :, :: self.stride, :: self.stride]

    def extra_repr(self):
        return f"stride={self.stride}"


def make_shortcut(in_ch, out_ch, stride, bn_kw, kind="projection", conv_init="torch"):
    """``"projection"`` (torchvision's ResNet): a strided 1x1 conv + BN whenever the shape changes.
    ``"subsample"`` (deeplab2): the 1x1 conv + BN only when the channels change, else a plain
    spatial subsample."""
    if kind not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {kind!r}; choose one of {SHORTCUTS}")
    if in_ch == out_ch and (stride == 1 or kind == "subsample"):
        return None if stride == 1 else Subsample(stride)
    conv = init_conv_(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), conv_init)
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch, **bn_kw))


class _Bottleneck(nn.Module):
    """1x1 conv-BN-act -> ``spatial`` -> 1x1 conv-BN (gamma 0) -> + shortcut -> act.

    deeplab2 applies the activation at the next block's input instead; the results are the same.
    """

    def _build_pointwise(
        self,
        in_channels,
        width,
        out_channels,
        stride,
        drop_path,
        bn_kw,
        activation="relu",
        shortcut="projection",
        conv_init="torch",
    ):
        self.conv1 = init_conv_(nn.Conv2d(in_channels, width, 1, bias=False), conv_init)
        self.bn1 = nn.BatchNorm2d(width, **bn_kw)
        self.conv2 = init_conv_(nn.Conv2d(width, out_channels, 1, bias=False), conv_init)
        self.bn2 = nn.BatchNorm2d(out_channels, **bn_kw)
        nn.init.zeros_(self.bn2.weight)
        self.downsample = make_shortcut(in_channels, out_channels, stride, bn_kw, shortcut, conv_init)
        self.drop_path = DropPath(drop_path)
        self.relu = make_activation(activation)  # named ``relu`` for any activation (no state)

    def spatial(self, x):
        raise NotImplementedError

    def residual(self, x):
        """The block's output before its final activation (MaX-DeepLab's decoder reads it)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.spatial(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.drop_path(out) + identity

    def forward(self, x):
        return self.relu(self.residual(x))


class AxialBlock(_Bottleneck):
    """Bottleneck with the 3x3 conv replaced by height- then width-axis attention."""

    def __init__(
        self,
        in_channels,
        width,
        out_channels,
        stride=1,
        num_heads=8,
        key_channels=None,
        span=None,
        stride_mode="subsample",
        max_relative_distance=None,
        drop_path=0.0,
        bn_kw=None,
        attention_kw=None,
        activation="relu",
        shortcut="projection",
        conv_init="torch",
    ):
        super().__init__()
        bn_kw = bn_kw or {}
        att = dict(
            num_heads=num_heads,
            key_channels=key_channels,
            span=span,
            max_relative_distance=max_relative_distance,
            bn_eps=bn_kw.get("eps", 1e-5),
            bn_momentum=bn_kw.get("momentum", 0.1),
        )
        att.update(attention_kw or {})
        self._build_pointwise(
            in_channels, width, out_channels, stride, drop_path, bn_kw, activation, shortcut, conv_init
        )
        if stride_mode == "avgpool2d":  # the port: 2-D pooling after the width layer only
            h_stride, w_stride = 1, stride
        else:
            h_stride = w_stride = stride
        self.attn_h = PositionSensitiveAxialAttention(
            width, width, axis="height", stride=h_stride, stride_mode=stride_mode, **att
        )
        self.attn_w = PositionSensitiveAxialAttention(
            width, width, axis="width", stride=w_stride, stride_mode=stride_mode, **att
        )

    def spatial(self, x):
        if self.attn_h.recompute_activations and self.attn_w.recompute_activations and recompute_applies(self):
            # both layers recomputed as one: the height layer's output is not kept either, and
            # each layer is still replayed once (inside a replay the layers run plain)
            return self.relu(run_recomputed(self, self._attend, x))
        return self._activate(self._attend(x))

    def _activate(self, y):
        """The activation after the width layer. Under autograd the attention's output is a view
        (a permuted or strided one of the rows it computed), and an in-place ReLU on a view makes
        the backward rebuild the whole base (``AsStridedBackward`` + ``CopySlices``), which costs
        more than writing a new tensor; without autograd the in-place ReLU saves that tensor."""
        if isinstance(self.relu, nn.ReLU) and y.requires_grad and torch.is_grad_enabled():
            return torch.relu(y)
        return self.relu(y)

    def _attend(self, x):
        return self.attn_w(self.attn_h(x))


class ConvBottleneck(_Bottleneck):
    """ResNet-50 bottleneck (1x1, 3x3, 1x1), the convolutional baseline. ``spatial`` swaps the 3x3
    conv for a 2-D attention baseline ("local": m x m stand-alone attention, "global")."""

    def __init__(
        self,
        in_channels,
        width,
        out_channels,
        stride=1,
        drop_path=0.0,
        bn_kw=None,
        spatial="conv",
        num_heads=8,
        span=None,
        position_sensitive=True,
        activation="relu",
        shortcut="projection",
        conv_init="torch",
        **_unused,
    ):
        super().__init__()
        bn_kw = bn_kw or {}
        self._build_pointwise(
            in_channels, width, out_channels, stride, drop_path, bn_kw, activation, shortcut, conv_init
        )
        if spatial == "conv":
            self.conv3x3 = init_conv_(nn.Conv2d(width, width, 3, stride, 1, bias=False), conv_init)
        elif spatial == "local":
            self.conv3x3 = LocalSelfAttention2d(
                width,
                width,
                kernel_size=span or 7,
                num_heads=num_heads,
                position_sensitive=position_sensitive,
                stride=stride,
            )
        elif spatial == "global":
            self.conv3x3 = GlobalSelfAttention2d(
                width, width, num_heads=num_heads, position_sensitive=position_sensitive, stride=stride
            )
        else:
            raise ValueError(f"unknown spatial layer {spatial!r}")
        self.bn3x3 = nn.BatchNorm2d(width, **bn_kw)

    def spatial(self, x):
        return self.relu(self.bn3x3(self.conv3x3(x)))


def _conv_bn_relu(cin, cout, k, stride, bn_kw, activation="relu", conv_init="torch"):
    conv = init_conv_(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), conv_init)
    return [conv, nn.BatchNorm2d(cout, **bn_kw), make_activation(activation)]


def build_stem(
    kind: str,
    width: float,
    bn_kw,
    stem_span=15,
    num_heads=8,
    max_pool: bool = True,
    activation: str = "relu",
    conv_init: str = "torch",
    in_chans: int = 3,
):
    """Returns (stem module, output channels). Every stem strides by 2, then a 3x3/2 max-pool
    (``max_pool=True``, torchvision's ResNet) brings it to stride 4; deeplab2 has no max-pool and
    strides the first block of the next stage instead."""
    act = dict(activation=activation, conv_init=conv_init)
    if kind == "conv":  # 7x7 stride-2 conv
        c = int(64 * width)
        layers = _conv_bn_relu(in_chans, c, 7, 2, bn_kw, **act)
    elif kind == "inception":  # three 3x3 convs (first strided): 64, 64, 128 channels x width
        c1, c3 = int(64 * width), int(128 * width)
        layers = (
            _conv_bn_relu(in_chans, c1, 3, 2, bn_kw, **act)
            + _conv_bn_relu(c1, c1, 3, 1, bn_kw, **act)
            + _conv_bn_relu(c1, c3, 3, 1, bn_kw, **act)
        )
        c = c3
    elif kind == "axial":
        # Full axial stem (our reading of the paper: no spatial conv at all): a 1x1 conv lifts
        # RGB to features, then axial blocks with local span 15; the first one strides by 2.
        c0, c = int(32 * width), int(64 * width)
        layers = _conv_bn_relu(in_chans, c0, 1, 1, bn_kw, **act) + [
            AxialBlock(c0, c0, c, stride=2, span=stem_span, num_heads=num_heads, bn_kw=bn_kw, **act),
            AxialBlock(c, c0, c, span=stem_span, num_heads=num_heads, bn_kw=bn_kw, **act),
        ]
        for blk in layers[-2:]:
            nn.init.ones_(blk.bn2.weight)  # the stem has no identity path to fall back on
    else:
        raise ValueError(f"unknown stem {kind!r}; choose conv, inception or axial")
    if max_pool:
        layers.append(nn.MaxPool2d(3, 2, 1))
    return nn.Sequential(*layers), c


class AxialResNet(TimmModelMixin, nn.Module):
    """ResNet-style backbone made of axial (or conv) bottlenecks.

    Args:
        layers: blocks per stage, e.g. (3, 4, 6, 3).
        width: channel multiplier (S 0.5, M 0.75, L 1, XL 2).
        block: ``"axial"``, ``"conv"``, or the 2-D attention baselines ``"local"`` (m x m with
            m = ``span``, default 7) and ``"global"``; ``position_sensitive`` switches the latter's
            k.r^k and r^v terms.
        stem: ``"inception"``, ``"conv"`` or ``"axial"``.
        output_stride: 32, or 16 (the last stage keeps its resolution).
        span: ``None`` (global) or local span m of every axial layer in the stages.
        width_factor / out_factor: bottleneck and output width as multiples of F
            (axial: 2F and 4F; ResNet-50: F and 4F).
        features_only: forward returns the features ``out_indices`` picks from [res2, res3, res4,
            res5] (all by default; indices 0 .. 3) instead of logits; no classification head.
        in_chans: input channels of the stem's first conv.
        global_pool / drop_rate: the head's pooling (``"avg"``, ``"max"``, ``"avgmax"``) and the
            dropout before its classifier.

    The timm model API (``forward_features`` = the last unpooled map, ``forward_head``,
    ``reset_classifier``, ``forward_intermediates`` ...) comes from :class:`.timm_api.TimmModelMixin`.
        arrangement: ``"maxpool"`` (torchvision's ResNet: stem max-pool to stride 4, the first
            stage unstrided, projection shortcuts whenever the shape changes) or ``"deeplab2"``
            (no max-pool, the first block of the first stage strides both attention layers, the
            shortcut subsamples when the channels do not change).
        activation: ``"relu"`` or ``"gelu"`` everywhere in the backbone.
        conv_init: ``"torch"`` (PyTorch's default) or ``"he_normal"`` (deeplab2's) for the
            convolutions outside the attention layers.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        width: float = 1.0,
        block: str = "axial",
        stem: str = "inception",
        output_stride: int = 32,
        span: Optional[int] = None,
        num_heads: int = 8,
        stage_filters=(64, 128, 256, 512),
        width_factor: Optional[float] = None,
        out_factor: float = 4.0,
        stem_width: Optional[float] = None,
        drop_path_rate: float = 0.0,
        stride_mode: str = "subsample",
        max_relative_distance=None,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        features_only: bool = False,
        attention_kw: Optional[dict] = None,
        in_chans: int = 3,
        position_sensitive: bool = True,
        arrangement: str = "maxpool",
        activation: str = "relu",
        conv_init: str = "torch",
        out_indices=None,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if arrangement not in ARRANGEMENTS:
            raise ValueError(f"unknown arrangement {arrangement!r}; choose one of {ARRANGEMENTS}")
        make_activation(activation)  # validate early
        init_conv_(nn.Conv2d(1, 1, 1), conv_init)
        deeplab2 = arrangement == "deeplab2"
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        bn_kw = dict(eps=bn_eps, momentum=bn_momentum)
        if block not in ("axial", "conv", "local", "global"):
            raise ValueError(f"unknown block {block!r}; choose axial, conv, local or global")
        width_factor = (1.0 if block == "conv" else 2.0) if width_factor is None else width_factor
        self.stem, in_ch = build_stem(
            stem,
            width if stem_width is None else stem_width,
            bn_kw,
            num_heads=num_heads,
            max_pool=not deeplab2,
            activation=activation,
            conv_init=conv_init,
            in_chans=in_chans,
        )
        block_cls = AxialBlock if block == "axial" else ConvBottleneck
        extra = {} if block == "axial" else dict(spatial=block, position_sensitive=position_sensitive)
        extra.update(activation=activation, conv_init=conv_init, shortcut="subsample" if deeplab2 else "projection")
        total = sum(layers)
        index = 0
        self.feature_info = FeatureInfo()
        reduction = 2 if deeplab2 else 4
        for s, (n, f) in enumerate(zip(layers, stage_filters)):
            f = int(f * width)
            stride = 1 if (s == 0 and not deeplab2) or (s == 3 and output_stride == 16) else 2
            blocks = []
            for b in range(n):
                dp = drop_path_rate * index / max(total - 1, 1)
                blocks.append(
                    block_cls(
                        in_ch,
                        int(f * width_factor),
                        int(f * out_factor),
                        stride=stride if b == 0 else 1,
                        num_heads=num_heads,
                        span=span,
                        stride_mode=stride_mode,
                        max_relative_distance=_per_block(max_relative_distance, s, b),
                        drop_path=dp,
                        bn_kw=bn_kw,
                        attention_kw=attention_kw,
                        **extra,
                    )
                )
                in_ch = int(f * out_factor)
                index += 1
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
            reduction *= stride
            self.feature_info.append(dict(num_chs=in_ch, reduction=reduction, module=f"layer{s + 1}"))
        self._stage_names = self._feature_stages = [f"layer{s + 1}" for s in range(len(layers))]
        self.num_features = in_ch
        self.arrangement = arrangement
        self.output_stride = output_stride
        self._init_head(num_classes, global_pool, drop_rate, features_only, out_indices)


def model_arrangements(model: nn.Module) -> Dict[str, str]:
    """``{module path: arrangement}`` of every :class:`AxialResNet` in ``model`` (path ``""`` for
    the model itself), the record a checkpoint keeps of how its backbones were arranged."""
    return {name: m.arrangement for name, m in model.named_modules() if isinstance(m, AxialResNet)}


def arrangement_mismatches(model: nn.Module, recorded: Dict[str, str]) -> List[Tuple[str, str, str]]:
    """``(module path, model's arrangement, recorded arrangement)`` where they differ. A record
    ``{"*": name}`` stands for every backbone (a checkpoint saved before the record existed)."""
    out = []
    for name, have in model_arrangements(model).items():
        want = recorded.get("*", recorded.get(name))
        if want is not None and want != have:
            out.append((name, have, want))
    return out


def _per_block(value, stage, block):
    """``value`` may be one number or a per-stage list of per-block numbers."""
    if isinstance(value, (list, tuple)):
        return value[stage][block]
    return value


_WIDTHS = {"s": 0.5, "m": 0.75, "l": 1.0, "xl": 2.0}


def _make_sized(size: str, stem: str):
    def builder(**kwargs):
        kwargs.setdefault("stem", stem)
        kwargs.setdefault("stem_width", 1.0)  # deeplab2 keeps the stem at full width for every size
        kwargs.setdefault("layers", (3, 4, 6, 3))
        kwargs.setdefault("width", _WIDTHS[size])
        kwargs.setdefault("block", "axial")
        # deeplab2's arrangement for its two stems; the full-axial stem is ours, kept as it was.
        kwargs.setdefault("arrangement", "maxpool" if stem == "axial" else "deeplab2")
        return AxialResNet(**kwargs)

    builder.__name__ = f"axial_resnet_{size}" + {"inception": "", "conv": "_conv", "axial": "_full"}[stem]
    builder.__doc__ = f"Axial-ResNet-{size.upper()} ({stem} stem)." + (
        "" if stem == "axial" else " deeplab2's arrangement; ``arrangement='maxpool'`` for the stem max-pool."
    )
    return builder


for _size in _WIDTHS:
    for _stem in ("inception", "conv", "axial"):
        register_model(_make_sized(_size, _stem))


@register_model
def resnet50(**kwargs):
    """ResNet-50, the convolutional baseline (7x7 stem by default). ``block="local"`` or
    ``"global"`` swaps its 3x3 convs for the 2-D attention baselines."""
    kwargs.setdefault("stem", "conv")
    kwargs.setdefault("block", "conv")
    kwargs.setdefault("width", 1.0)
    return AxialResNet(layers=(3, 4, 6, 3), **kwargs)


# The PyTorch ImageNet port (csrhddlam/axial-deeplab): 7x7 stem, bottleneck width = output/2,
# global span with tables sized for a 224x224 input, 2x2 average pooling after the width layer.
def _port(layers, s, image_size=224, **kwargs):
    kwargs.setdefault("stem", "conv")
    kwargs.setdefault("stride_mode", "avgpool2d")
    if kwargs.get("max_relative_distance") is None and kwargs.get("span") is None:
        # The port sizes each table 2K-1 for the block's input length K at 224x224
        # (56, 56, 28, 14; K halves after a stage's first, strided block); beyond, we clip.
        kwargs["max_relative_distance"] = [
            [k - 1 if b == 0 else (k if i == 0 else k // 2) - 1 for b in range(n)]
            for i, (n, k) in enumerate(
                zip(layers, (image_size // 4, image_size // 4, image_size // 8, image_size // 16))
            )
        ]
    return AxialResNet(
        layers=layers,
        width=s,
        block="axial",
        stage_filters=(128, 256, 512, 1024),
        width_factor=1.0,
        out_factor=2.0,
        stem_width=s,
        **kwargs,
    )


@register_model
def axial26s(**kwargs):
    """The port's axial26s: layers (1, 2, 4, 1), width 0.5 (5.9M params). ``image_size`` sizes the
    relative tables as the port did for its training resolution (224)."""
    return _port((1, 2, 4, 1), 0.5, **kwargs)


@register_model
def axial50s(**kwargs):
    return _port((3, 4, 6, 3), 0.5, **kwargs)


@register_model
def axial50m(**kwargs):
    return _port((3, 4, 6, 3), 0.75, **kwargs)


@register_model
def axial50l(**kwargs):
    return _port((3, 4, 6, 3), 1.0, **kwargs)


@register_model
def axial_resnet_tiny(**kwargs):
    """A tiny Axial-ResNet for small images and CPU demos: one axial block per stage, width 0.25,
    4 heads, and a stride-2 conv stem without max-pool (``stem='conv'`` with stride 4 is too coarse
    for 32x32 inputs)."""
    kwargs.setdefault("stem", "conv")
    kwargs.setdefault("num_heads", 4)
    kwargs.setdefault("stem_width", 0.25)
    return AxialResNet(
        layers=kwargs.pop("layers", (1, 1, 1, 1)), width=kwargs.pop("width", 0.25), block="axial", **kwargs
    )
