"""Axial-SWideRNet, and the hybrid conv/axial ResNet that it and MaX-DeepLab's backbones share.

deeplab2 builds all of its ImageNet backbones from one network: a stem, then stages of residual
blocks whose kind is chosen by the stride the block runs at, with axial attention from
``use_axial_beyond_stride`` on. :class:`HybridAxialResNet` is that network:

* ``backbone_type="wider_resnet"`` (SWideRNet): a 3x3/2 conv stem (64 x stem width), five stages
  of (3, 3, 6, 3, 3) x layer multiplier blocks at strides 2, 4, 8, 16, 32 with base filters
  F = 32, 64, 128, 256, 512 (x width; the first stage uses the stem width). Conv stages use
  basic blocks (two 3x3 convs to 4F); attention blocks are axial bottlenecks 1x1 to 4F, height
  then width attention (key depth 2F, value depth 4F, 8 heads), 1x1 to 4F.
* ``backbone_type="resnet_beta"`` (ResNet-50-beta, MaX-DeepLab-S): the Inception stem (three 3x3
  convs, 64/64/128), four stages of (3, 4, 6, 3) bottlenecks at strides 4, 8, 16, 32 with
  F = 64 .. 512; attention blocks are axial bottlenecks 1x1 to 2F, attention (key depth F,
  value depth 2F), 1x1 to 4F. ``"resnet"`` is the same with a 7x7/2 conv stem.

As in deeplab2 there is no max-pool: the first block of every stage after the stem strides (at
its 3x3 conv or at both attention layers), its shortcut is a strided 1x1 conv + BN when the
channels change, else a plain subsample. A block uses attention when the stride it runs at,
counted before its own striding, is >= ``use_axial_beyond_stride``; so with the default 16 the
first (strided) block of the stride-16 stage is still convolutional. At output stride 16 the last
stage does not stride and convolutions there dilate (deeplab2's atrous rates). Attention is global
along each axis (deeplab2's query shape 129 covers every axis of a Cityscapes crop at output
stride 16), relative tables of 2 * 255 - 1 rows. Defaults follow deeplab2: BN eps 1e-3 and
momentum 0.01 (TensorFlow's 0.99), he_normal conv init, ReLU; drop path (off by default) as
deeplab2's keep probability schedule, on blocks at stride >= ``drop_path_beyond_stride``.
MaX-DeepLab-L adds a stacked hour-glass decoder after the stages (``backbone_decoder_num_stacks``).

Modules are named as deeplab2's layers (``stem``, ``stage1`` .. ``stage5`` with block ``i`` at
index ``i - 1``, ``decoder_stageN``, ``decoder_stageN_resized_fuse``); ``features_only`` returns
deeplab2's ``res2`` .. ``res5`` endpoints, the activated outputs of ``stage2`` .. ``stage5``.

Registered here (deeplab2 name, model zoo name -> ours; parameter counts of deeplab2's instances,
trainable weights without a classification head, which ours equal):

* ``axial_swidernet`` layer multiplier 1 / 3 / 4.5, "Axial-SWideRNet-(1, 1, 1)" / "(1, 1, 3)" /
  "(1, 1, 4.5)" -> ``axial_swidernet_1_1_1`` (136,399,392), ``axial_swidernet_1_1_3``
  (393,935,520), ``axial_swidernet_1_1_4_5`` (570,346,912; blocks rounded down to 13, 27, 13, 13).

The MaX-DeepLab backbones live in :mod:`.max_deeplab`.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from .axial_resnet import (
    AxialBlock,
    ConvBottleneck,
    DropPath,
    FeatureInfo,
    build_stem,
    init_conv_,
    make_activation,
    make_shortcut,
)
from .registry import register_model
from .resize import resize_bilinear
from .timm_api import TimmModelMixin, take_indices

__all__ = ["HybridAxialResNet", "BasicBlock", "ResizedFuse", "BACKBONE_TYPES", "DROP_PATH_SCHEDULES"]

BACKBONE_TYPES = ("resnet", "resnet_beta", "wider_resnet")
DROP_PATH_SCHEDULES = ("constant", "linear")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN (the second BN's gamma starts at 0) + shortcut, then the activation:
    SWideRNet's block below the attention stages. The first conv strides."""

    def __init__(
        self,
        in_channels,
        out_channels,
        stride=1,
        drop_path=0.0,
        bn_kw=None,
        activation="relu",
        shortcut="subsample",
        conv_init="he_normal",
        dilation=(1, 1),
    ):
        super().__init__()
        bn_kw = bn_kw or {}
        d1, d2 = dilation
        self.conv1 = init_conv_(nn.Conv2d(in_channels, out_channels, 3, stride, d1, d1, bias=False), conv_init)
        self.bn1 = nn.BatchNorm2d(out_channels, **bn_kw)
        self.conv2 = init_conv_(nn.Conv2d(out_channels, out_channels, 3, 1, d2, d2, bias=False), conv_init)
        self.bn2 = nn.BatchNorm2d(out_channels, **bn_kw)
        nn.init.zeros_(self.bn2.weight)
        self.downsample = make_shortcut(in_channels, out_channels, stride, bn_kw, shortcut, conv_init)
        self.drop_path = DropPath(drop_path)
        self.relu = make_activation(activation)

    def residual(self, x):
        """The block's output before its final activation."""
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.drop_path(out) + identity

    def forward(self, x):
        return self.relu(self.residual(x))


def _conv_stem(out_channels, kernel_size, bn_kw, activation, conv_init, in_chans=3):
    conv = init_conv_(nn.Conv2d(in_chans, out_channels, kernel_size, 2, kernel_size // 2, bias=False), conv_init)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels, **bn_kw), make_activation(activation))


class HybridAxialResNet(TimmModelMixin, nn.Module):
    """deeplab2's Axial-ResNet family in classification (backbone) form.

    Args:
        layers: blocks of the four stages at strides 4..32 (deeplab2's ``num_blocks``); wider
            ResNets add a first stage of 3 blocks at stride 2.
        backbone_type: ``"wider_resnet"``, ``"resnet_beta"`` (Inception stem) or ``"resnet"``.
        backbone_layer_multiplier: scales ``layers`` (rounded down), not the first stage.
        width_multiplier / stem_width_multiplier: channels of the stages / of the stem (and of
            the first stage of a wider ResNet).
        use_axial_beyond_stride: attention in blocks running at this stride or more (0: none).
        attention_bottleneck_expansion, key_expansion, value_expansion: an attention block is
            1x1 to ``F * attention_bottleneck_expansion``, attention with key depth
            ``F * key_expansion`` and value depth ``F * value_expansion``, 1x1 to 4F.
        output_stride: 32, or 16 (the last stage keeps its resolution).
        span: ``None`` (global, as deeplab2) or a local span for every axial layer.
        drop_path_rate: 1 - deeplab2's ``drop_path_keep_prob`` (the last stage's drop rate).
        drop_path_schedule: ``"linear"`` (rate x stage / 4, the published recipes) or ``"constant"``.
        drop_path_beyond_stride: drop path only in blocks running at this stride or more.
        backbone_decoder_num_stacks / backbone_decoder_blocks_per_stage: MaX-DeepLab-L's stacked
            hour-glass decoder (output stride -> 4 -> output stride) whose output feeds the
            classifier; the [res2 .. res5] features come from the stages before it, as in deeplab2.
        features_only: forward returns the features ``out_indices`` picks from [res2, res3, res4,
            res5] (all by default; indices 0 .. 3) instead of logits (the decoder, if any, is
            kept, so checkpoints load, but frozen and not run).
        in_chans / global_pool / drop_rate: input channels; the head's pooling and dropout.

    The timm model API comes from :class:`.timm_api.TimmModelMixin`; with a decoder,
    ``forward_features`` is the decoder's output (what the classifier reads).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        backbone_type: str = "resnet_beta",
        num_classes: int = 1000,
        backbone_layer_multiplier: float = 1.0,
        width_multiplier: float = 1.0,
        stem_width_multiplier: float = 1.0,
        use_axial_beyond_stride: int = 16,
        attention_bottleneck_expansion: float = 2,
        key_expansion: float = 1,
        value_expansion: float = 2,
        num_heads: int = 8,
        output_stride: int = 32,
        span: Optional[int] = None,
        max_relative_distance: Optional[int] = None,
        activation: str = "relu",
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        conv_init: str = "he_normal",
        drop_path_rate: float = 0.0,
        drop_path_schedule: str = "linear",
        drop_path_beyond_stride: int = 16,
        backbone_decoder_num_stacks: int = 0,
        backbone_decoder_blocks_per_stage: int = 1,
        features_only: bool = False,
        attention_kw: Optional[dict] = None,
        in_chans: int = 3,
        out_indices=None,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if backbone_type not in BACKBONE_TYPES:
            raise ValueError(f"unknown backbone_type {backbone_type!r}; choose one of {BACKBONE_TYPES}")
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if len(layers) != 4:
            raise ValueError(f"layers must give the blocks of 4 stages, got {tuple(layers)}")
        if drop_path_schedule not in DROP_PATH_SCHEDULES:
            raise ValueError(f"unknown drop_path_schedule {drop_path_schedule!r}; choose one of {DROP_PATH_SCHEDULES}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if value_expansion != attention_bottleneck_expansion:
            # the attention pair maps its input width to the value depth and back
            raise ValueError(
                f"value_expansion ({value_expansion}) must equal attention_bottleneck_expansion "
                f"({attention_bottleneck_expansion})"
            )
        make_activation(activation)
        init_conv_(nn.Conv2d(1, 1, 1), conv_init)
        bn_kw = dict(eps=bn_eps, momentum=bn_momentum)
        conv_kw = dict(bn_kw=bn_kw, activation=activation, shortcut="subsample", conv_init=conv_init)
        wide = backbone_type == "wider_resnet"

        stem_channels = int(round(64 * stem_width_multiplier))
        if wide:
            self.stem = _conv_stem(stem_channels, 3, bn_kw, activation, conv_init, in_chans)
        elif backbone_type == "resnet":
            self.stem = _conv_stem(stem_channels, 7, bn_kw, activation, conv_init, in_chans)
        else:
            self.stem, stem_channels = build_stem(
                "inception",
                stem_width_multiplier,
                bn_kw,
                max_pool=False,
                activation=activation,
                conv_init=conv_init,
                in_chans=in_chans,
            )

        def make_block(in_ch, f, stride, nominal, stage_out):
            """deeplab2's block for one running at stride ``nominal`` (before its own striding) in a
            stage whose output stride, were nothing atrous, is ``stage_out``."""
            if nominal >= drop_path_beyond_stride:
                stage = round(math.log2(nominal)) - 1
                dp = drop_path_rate * (stage / 4 if drop_path_schedule == "linear" else 1.0)
            else:
                dp = 0.0
            if nominal >= use_axial_beyond_stride > 0:
                return AxialBlock(
                    in_ch,
                    int(round(f * attention_bottleneck_expansion)),
                    4 * f,
                    stride=stride,
                    num_heads=num_heads,
                    key_channels=int(round(f * key_expansion)),
                    span=span,
                    max_relative_distance=max_relative_distance,
                    drop_path=dp,
                    attention_kw=attention_kw,
                    **conv_kw,
                )
            # beyond the output stride, convolutions dilate instead (deeplab2's atrous rates)
            rate = max(nominal // output_stride, 1)
            if not wide:
                blk = ConvBottleneck(in_ch, f, 4 * f, stride=stride, drop_path=dp, **conv_kw)
                blk.conv3x3.dilation = blk.conv3x3.padding = (rate, rate)
                return blk
            if stage_out < 32:
                second = max(stage_out // output_stride, 1) if nominal * 2 == stage_out else rate
                return BasicBlock(in_ch, 4 * f, stride=stride, drop_path=dp, dilation=(rate, second), **conv_kw)
            raise ValueError(
                "a wider ResNet's block at stride 32 without attention (deeplab2's expanded "
                "bottleneck) is not implemented; use use_axial_beyond_stride <= 16"
            )

        # deeplab2's five stages: (input stride, stride) = (1, 2), (2, 2), (4, 2), (8, 2), (16, 2);
        # a wider ResNet's stem takes the first stride, so its first stage runs at stride 2, unstrided.
        blocks_per_stage = [3] + [int(n * backbone_layer_multiplier) for n in layers]
        in_strides, strides = [1, 2, 4, 8, 16], [2, 2, 2, 2, 2]
        if wide:
            in_strides[0], strides[0] = 2, 1
        first = 0 if wide else 1
        in_ch = stem_channels
        actual_stride = 2  # the stem's
        stage_channels = {}
        self.feature_info = FeatureInfo()
        for s in range(first, 5):
            mult = stem_width_multiplier if (wide and s == 0) else width_multiplier
            f = int(round(2**s * 32 * mult))  # from the stride before the stem's change: 32 * 1, 2, 4, 8, 16
            nominal = in_strides[s]  # the stride the block runs at, were no stage atrous
            blocks = []
            for b in range(blocks_per_stage[s]):
                stride = strides[s] if (b == 0 and in_strides[s] < output_stride) else 1
                blocks.append(make_block(in_ch, f, stride, nominal, in_strides[s] * strides[s]))
                in_ch = 4 * f
                if b == 0:
                    nominal *= strides[s]
                    actual_stride *= stride
            self.add_module(f"stage{s + 1}", nn.Sequential(*blocks))
            stage_channels[s + 1] = in_ch
            if s >= 1:
                self.feature_info.append(dict(num_chs=in_ch, reduction=actual_stride, module=f"stage{s + 1}"))
        self.stages = [f"stage{s + 1}" for s in range(first, 5)]
        self._stage_names = self.stages
        self._feature_stages = [f"stage{s + 1}" for s in range(1, 5)]

        # MaX-DeepLab's stacked hour-glass decoder inside the backbone (classification output only):
        # from the output stride down to stride 4 and back, each step fusing the current feature with
        # the last two at its stride, then residual blocks at that stride.
        self.decoder_plan = []  # (stage name, stride, [which earlier features to fuse])
        if backbone_decoder_num_stacks:
            # pre-activation features by stride, as (name, channels), in deeplab2's order
            by_stride = {
                min(2, output_stride): [("stage1" if wide else "stem", stage_channels.get(1, stem_channels))],
                min(4, output_stride): [("stage2", stage_channels[2])],
                min(8, output_stride): [("stage3", stage_channels[3])],
                min(16, output_stride): [("stage4", stage_channels[4])],
            }
            by_stride[min(32, output_stride)] = [("stage5", stage_channels[5])]
            stack, stride, going_down, index = 0, output_stride, True, 0
            while True:
                index += 1
                stride = stride // 2 if going_down else stride * 2
                if stride == output_stride:
                    stack += 1
                    going_down = True
                    stride_original = 32  # the last stage's blocks at the output stride
                else:
                    stride_original = stride
                channels = int(round(stride_original * 64 * width_multiplier))
                inputs = [("current", in_ch)] + by_stride[stride][-2:]
                name = f"decoder_stage{index}"
                self.add_module(
                    f"{name}_resized_fuse", ResizedFuse([c for _, c in inputs], channels, bn_kw, activation, conv_init)
                )
                f = channels // 4
                blocks, in_ch = [], channels
                for _ in range(backbone_decoder_blocks_per_stage):
                    blocks.append(make_block(in_ch, f, 1, stride_original, stride_original))
                    in_ch = 4 * f
                self.add_module(name, nn.Sequential(*blocks))
                self.decoder_plan.append((name, stride, [n for n, _ in inputs[1:]]))
                by_stride[stride].append((name, in_ch))
                if stride == output_stride and stack == backbone_decoder_num_stacks:
                    break
                if stride == 4:  # deeplab2's high-resolution output stride: turn back up
                    going_down = False
            if features_only:  # carried for checkpoints, never run: frozen, so DDP finds no unused parameter
                for name, _stride, _fused in self.decoder_plan:
                    for module in (getattr(self, name), getattr(self, f"{name}_resized_fuse")):
                        module.requires_grad_(False)
        # not in place: the decoder keeps the pre-activation features
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.backbone_type = backbone_type
        self.num_features = in_ch
        self.output_stride = output_stride
        self._init_head(num_classes, global_pool, drop_rate, features_only, out_indices)

    def _stage(self, name: str, x):
        """(pre-activation, activated) output of a stage; deeplab2 fuses pre-activation features."""
        blocks = list(getattr(self, name))
        for block in blocks[:-1]:
            x = block(x)
        raw = blocks[-1].residual(x)  # the decoder reads the pre-activation features
        return raw, self.act(raw)

    _group_prefix = "stage"

    def _extra_block_groups(self) -> list:
        return [(r"^decoder_", (99999,))] if self.decoder_plan else []

    def forward_features(self, x) -> torch.Tensor:
        """The classifier's input, unpooled: the last stage's output, or the decoder's."""
        if self.decoder_plan:
            return self.forward_decoder(x)
        return super().forward_features(x)

    def forward_intermediates(
        self,
        x,
        indices=None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """As :meth:`.TimmModelMixin.forward_intermediates`; with a decoder (and neither
        ``intermediates_only`` nor ``stop_early``) the final features are the decoder's."""
        if not self.decoder_plan or intermediates_only or stop_early:
            return super().forward_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; only 'NCHW'")
        take, _ = take_indices(len(self.feature_info), indices)
        feats: List[torch.Tensor] = []
        final = self.forward_decoder(x, feats)
        return final, [feats[i] for i in take]

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """As :meth:`.TimmModelMixin.prune_intermediate_layers`; the decoder goes too (features
        come from the stages before it), and with it the head sized for its output."""
        if self.decoder_plan:
            for name, _stride, _fused in self.decoder_plan:
                delattr(self, name)
                delattr(self, f"{name}_resized_fuse")
            self.decoder_plan = []
            self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
            prune_head = True
        return super().prune_intermediate_layers(indices, prune_norm, prune_head)

    def forward_decoder(self, x, features: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """The activated output of the stacked decoder (the classification feature); the res2 ..
        res5 stage outputs are appended to ``features`` when given."""
        raw = {}
        x = self.stem[:-1](x)  # the stem without its final activation
        raw["stem"], x = x, self.act(x)
        for name in self.stages:
            raw[name], x = self._stage(name, x)
            if features is not None and name in self._feature_stages:
                features.append(x)
        current = raw[self.stages[-1]]
        for name, _stride, fused in self.decoder_plan:
            size = raw[fused[0]].shape[-2:]
            y = getattr(self, f"{name}_resized_fuse")([current] + [raw[n] for n in fused], size)
            current, _ = self._stage(name, self.act(y))
            raw[name] = current
        return self.act(current)


class ResizedFuse(nn.Module):
    """Sum of features brought to one shape (MaX-DeepLab's decoder): a feature with the target
    channels is only resized (bilinear, corners aligned); otherwise activation, 1x1 conv + BN,
    at stride 2 when that halves it to the target size, else followed by the resize."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, bn_kw, activation, conv_init):
        super().__init__()
        self.out_channels = out_channels
        self.projections = nn.ModuleList(
            nn.Identity()
            if c == out_channels
            else nn.Sequential(
                init_conv_(nn.Conv2d(c, out_channels, 1, bias=False), conv_init), nn.BatchNorm2d(out_channels, **bn_kw)
            )
            for c in in_channels
        )
        # not in place: the decoder keeps the pre-activation features
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()

    def forward(self, features: Sequence[torch.Tensor], size) -> torch.Tensor:
        if len(features) != len(self.projections):
            raise ValueError(f"ResizedFuse: expected {len(self.projections)} features, got {len(features)}")
        size = tuple(size)
        total = 0
        for x, proj in zip(features, self.projections):
            h, w = x.shape[-2:]
            if isinstance(proj, nn.Identity):
                y = resize_bilinear(x, size)
            elif ((h + 1) // 2, (w + 1) // 2) == size:
                y = proj(self.act(x)[:, :, ::2, ::2])
            else:
                y = resize_bilinear(proj(self.act(x)), size)
            total = total + y
        return total


def _axial_swidernet(default_layer_multiplier: float, **kwargs) -> HybridAxialResNet:
    kwargs.setdefault("stem_width_multiplier", 1.0)
    kwargs.setdefault("width_multiplier", 1.0)
    kwargs.setdefault("backbone_layer_multiplier", default_layer_multiplier)
    kwargs.setdefault("drop_path_beyond_stride", 4)
    return HybridAxialResNet(
        layers=kwargs.pop("layers", (3, 6, 3, 3)),
        backbone_type="wider_resnet",
        use_axial_beyond_stride=kwargs.pop("use_axial_beyond_stride", 16),
        attention_bottleneck_expansion=4,
        key_expansion=2,
        value_expansion=4,
        **kwargs,
    )


@register_model
def axial_swidernet_1_1_1(**kwargs):
    """Axial-SWideRNet-(1, 1, 1) (deeplab2 ``axial_swidernet``): SWideRNet with axial attention in
    the blocks at stride >= 16; 136.4M parameters."""
    return _axial_swidernet(1.0, **kwargs)


@register_model
def axial_swidernet_1_1_3(**kwargs):
    """Axial-SWideRNet-(1, 1, 3): three times the blocks (9, 18, 9, 9 after the first stage)."""
    return _axial_swidernet(3.0, **kwargs)


@register_model
def axial_swidernet_1_1_4_5(**kwargs):
    """Axial-SWideRNet-(1, 1, 4.5): blocks x 4.5 rounded down (13, 27, 13, 13)."""
    return _axial_swidernet(4.5, **kwargs)
