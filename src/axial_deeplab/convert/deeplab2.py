"""Mappings from deeplab2's checkpoints (object paths such as
``encoder/_stage2/_block1/_attention/_height_axis/qkv_kernel``) onto our models, one per model family.

A mapping is ``mapping(variables: core.TFVariables, model) -> None``: it walks ``model``'s modules
and, for each, takes deeplab2's variables with the rules of :mod:`.core` (``conv``,
``batch_norm``, ``dense``, ``axial_attention_pair`` ...) or ``variables.put``. Register it for
the model names it serves with :func:`register_mapping`; ``axial-deeplab convert --from deeplab2
--model NAME`` looks it up with :func:`mapping_for`.

deeplab2's object graph, as its checkpoints hold it:

* the encoder under ``encoder/`` (``tf.train.Checkpoint(encoder=...)``, also in its
  Panoptic-DeepLab checkpoints): ``_stem`` (a conv + BN for the 3x3 / 7x7 stems, or
  ``_conv1_bn_act``, ``_conv2_bn_act``, ``_conv3_bn`` for the Inception stem), then
  ``_stage{N}/_block{i}`` (1-based; ``_stage1`` exists only in wide ResNets) whose children are
  ``_conv1_bn_act``, ``_conv2_bn_act`` or ``_attention`` (``_height_axis``, ``_width_axis``),
  ``_conv3_bn`` and ``_shortcut`` (a basic block: ``_conv1_bn_act``, ``_conv2_bn``), each a
  ``_conv/kernel`` and a ``_batch_norm``; MaX-DeepLab-L's stacked decoder adds
  ``_decoder_stage{k}`` and ``_decoder_stage{k}_resized_fuse`` (``_strided_conv_bn{j}`` or
  ``_resized_conv_bn{j}`` per fused input j);
* Panoptic-DeepLab's parts at the root: ``semantic_decoder`` and ``instance_decoder``
  (``_aspp/_proj_conv_bn_act``, with full ASPP also ``_aspp/_conv_bn_act``,
  ``_aspp/_aspp_conv{1,2,3}/_conv_bn_act``, ``_aspp/_aspp_pool/_conv_bn_act``;
  ``_low_level_conv{1,2}`` for res3 then res2; ``_fusion_conv{1,2}/_conv1_bn_act`` as
  ``_depthwise`` + ``_pointwise``), ``semantic_head_without_last_layer`` /
  ``semantic_last_layer``, ``instance_center_head_without_last_layer`` /
  ``instance_center_head_last_layer``, ``instance_regression_head_without_last_layer`` /
  ``instance_regression_head_last_layer``.

Only deeplab2's arrangement computes deeplab2's function: an ``AxialResNet`` built with
``arrangement="maxpool"`` has the same keys and shapes, and is refused, as is a local ``span``
(deeplab2 attends along the whole axis) and a BatchNorm epsilon other than deeplab2's 1e-3 (the
checkpoint does not record it). Relative embeddings ([509, depth], shared by the heads)
become our tables as :func:`.core.axial_attention` describes.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

from torch import nn

from .core import ConversionError, TFVariables, axial_attention_pair, batch_norm, conv

__all__ = [
    "register_mapping",
    "mapping_for",
    "mapped_models",
    "map_encoder",
    "map_panoptic_deeplab",
    "encoder_prefix",
    "require_deeplab2_numerics",
    "DEEPLAB2_BN_EPS",
]

_MAPPINGS: Dict[str, Callable] = {}


def register_mapping(*model_names: str):
    """Decorator: ``fn`` maps deeplab2 checkpoints onto the registered models ``model_names``."""

    def deco(fn: Callable) -> Callable:
        for name in model_names:
            _MAPPINGS[name] = fn
        return fn

    return deco


def mapped_models() -> List[str]:
    """The model names that have a deeplab2 mapping."""
    return sorted(_MAPPINGS)


def mapping_for(model_name: str) -> Callable:
    """The mapping for ``model_name``; KeyError when there is none."""
    return _MAPPINGS[model_name]


# ----------------------------------------------------------------------------- building blocks
def _conv_bn(v: TFVariables, tf_prefix: str, conv_key: str, bn_key: str) -> None:
    """deeplab2's ``Conv2DSame`` with BN: ``tf_prefix/_conv`` and ``tf_prefix/_batch_norm``."""
    conv(v, f"{tf_prefix}/_conv", conv_key)
    batch_norm(v, f"{tf_prefix}/_batch_norm", bn_key)


def _conv_bn_seq(v: TFVariables, tf_prefix: str, key: str) -> None:
    """A conv-BN(-act) ``nn.Sequential`` (index 0 conv, 1 BN) at ``key``."""
    _conv_bn(v, tf_prefix, f"{key}.0", f"{key}.1")


def _separable(v: TFVariables, tf_prefix: str, key: str) -> None:
    """deeplab2's ``DepthwiseConv2DSame`` + pointwise ``Conv2DSame`` (``_depthwise``, ``_pointwise``)
    -> our ``DepthwiseSeparableConv`` (two conv-BN-ReLU sequences)."""
    conv(v, f"{tf_prefix}/_depthwise/_depthwise_conv", f"{key}.0.0")
    batch_norm(v, f"{tf_prefix}/_depthwise/_batch_norm", f"{key}.0.1")
    _conv_bn_seq(v, f"{tf_prefix}/_pointwise", f"{key}.1")


def _block(v: TFVariables, tf_prefix: str, key: str, block: nn.Module) -> None:
    """One residual block of deeplab2's ``BlockGroup`` -> ours (axial, bottleneck or basic)."""
    from ..models.axial_resnet import AxialBlock, ConvBottleneck
    from ..models.axial_swidernet import BasicBlock

    _conv_bn(v, f"{tf_prefix}/_conv1_bn_act", f"{key}.conv1", f"{key}.bn1")
    if isinstance(block, AxialBlock):
        axial_attention_pair(v, f"{tf_prefix}/_attention", f"{key}.attn_h", f"{key}.attn_w", block.attn_h, block.attn_w)
        _conv_bn(v, f"{tf_prefix}/_conv3_bn", f"{key}.conv2", f"{key}.bn2")
    elif isinstance(block, ConvBottleneck):
        if not isinstance(block.conv3x3, nn.Conv2d):
            raise ConversionError(f"{key}: a {type(block.conv3x3).__name__} block has no deeplab2 counterpart")
        _conv_bn(v, f"{tf_prefix}/_conv2_bn_act", f"{key}.conv3x3", f"{key}.bn3x3")
        _conv_bn(v, f"{tf_prefix}/_conv3_bn", f"{key}.conv2", f"{key}.bn2")
    elif isinstance(block, BasicBlock):
        _conv_bn(v, f"{tf_prefix}/_conv2_bn", f"{key}.conv2", f"{key}.bn2")
    else:
        raise ConversionError(f"{key}: no deeplab2 counterpart for a {type(block).__name__}")
    if isinstance(block.downsample, nn.Sequential):  # strided 1x1 conv + BN; else none or a subsample
        _conv_bn_seq(v, f"{tf_prefix}/_shortcut", f"{key}.downsample")
    elif f"{tf_prefix}/_shortcut/_conv/kernel" in v:
        raise ConversionError(
            f"{v.source}: {tf_prefix} has a 1x1 shortcut conv where {key} has none "
            f"({type(block.downsample).__name__}): the arrangements differ"
        )


def _inception_stem(v: TFVariables, tf_prefix: str, key: str) -> None:
    """Three conv-BN-act triples (indices 0/1, 3/4, 6/7) <- ``_conv1_bn_act``, ``_conv2_bn_act``, ``_conv3_bn``."""
    for i, name in enumerate(("_conv1_bn_act", "_conv2_bn_act", "_conv3_bn")):
        _conv_bn(v, f"{tf_prefix}/{name}", f"{key}.{3 * i}", f"{key}.{3 * i + 1}")


def encoder_prefix(v: TFVariables) -> str:
    """Where the encoder sits: ``encoder/`` in deeplab2's checkpoints (its Panoptic-DeepLab ones and
    ``tf.train.Checkpoint(encoder=...)``), else the root."""
    return "encoder/" if v.names("encoder/") else ""


def _classifier_free(model: nn.Module, v: TFVariables, name: str) -> None:
    if not getattr(model, "features_only", True):
        raise ConversionError(
            f"{v.source}: deeplab2's checkpoints hold no ImageNet classifier; convert into the backbone "
            f"with features_only=True (e.g. --set model.kwargs.features_only=true), not {name} with its 'fc'"
        )


DEEPLAB2_BN_EPS = 1e-3  # Keras' BatchNormalization epsilon, deeplab2's solver_options.batchnorm_epsilon default


def require_deeplab2_numerics(model: nn.Module, key: str = "") -> None:
    """Refuse a model that would compute other outputs than deeplab2's with the same weights: a
    local attention span (deeplab2 attends along the whole axis, so outputs differ wherever an axis
    is longer than the span: Cityscapes at output stride 16 is 65 x 129), or a BatchNorm epsilon
    other than deeplab2's 1e-3 (a checkpoint does not record it)."""
    from ..layers.axial_attention import PositionSensitiveAxialAttention

    spans = [
        (n, m.span)
        for n, m in model.named_modules()
        if isinstance(m, PositionSensitiveAxialAttention) and m.span is not None
    ]
    eps = [
        (n, m.eps)
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and abs(m.eps - DEEPLAB2_BN_EPS) > 1e-12
    ]
    problems = []
    if spans:
        problems.append(
            f"{key}{spans[0][0]} (and {len(spans) - 1} more attention layers): local span "
            f"{spans[0][1]}, while deeplab2's axial attention is global along each axis; build the "
            "model with span=None (--set model.kwargs.span=null)"
        )
    if eps:
        problems.append(
            f"{key}{eps[0][0]} (and {len(eps) - 1} more BatchNorm layers): epsilon {eps[0][1]:g}, "
            f"while deeplab2's is {DEEPLAB2_BN_EPS:g}; build the model with bn_eps={DEEPLAB2_BN_EPS:g} "
            f"(--set model.kwargs.bn_eps={DEEPLAB2_BN_EPS:g})"
        )
    if problems:
        raise ConversionError(
            "the model would compute other outputs than deeplab2's with these weights:\n  " + "\n  ".join(problems)
        )


def map_encoder(v: TFVariables, model: nn.Module, key: str = "", tf_prefix: Optional[str] = None) -> None:
    """deeplab2's encoder -> our ``AxialResNet`` (deeplab2 arrangement) or ``HybridAxialResNet``
    (SWideRNet, MaX-DeepLab backbones) at ``key`` (``""``: the model itself, ``"backbone."``)."""
    from ..models.axial_resnet import AxialResNet
    from ..models.axial_swidernet import HybridAxialResNet

    tf = encoder_prefix(v) if tf_prefix is None else tf_prefix
    require_deeplab2_numerics(model, key)
    if isinstance(model, AxialResNet):
        if model.arrangement != "deeplab2":
            raise ConversionError(
                f"{key or type(model).__name__}: arrangement {model.arrangement!r} computes another function "
                "than deeplab2's network (stem max-pool, unstrided first stage); build the model with "
                "arrangement='deeplab2'"
            )
        stem = list(model.stem)
        if len(stem) == 9:  # Inception stem: three (conv, BN, act)
            _inception_stem(v, f"{tf}_stem", f"{key}stem")
        elif len(stem) == 3 and isinstance(stem[0], nn.Conv2d):  # 7x7 conv stem
            _conv_bn_seq(v, f"{tf}_stem", f"{key}stem")
        else:
            raise ConversionError(
                f"{key}stem: deeplab2 has no counterpart for this stem ({len(stem)} modules; "
                "the full-axial stem is ours)"
            )
        for s in range(1, 5):  # our layer1..4 are deeplab2's stages 2..5
            for b, block in enumerate(getattr(model, f"layer{s}")):
                _block(v, f"{tf}_stage{s + 1}/_block{b + 1}", f"{key}layer{s}.{b}", block)
    elif isinstance(model, HybridAxialResNet):
        if model.backbone_type == "resnet_beta":
            _inception_stem(v, f"{tf}_stem", f"{key}stem")
        else:
            _conv_bn_seq(v, f"{tf}_stem", f"{key}stem")
        for name in model.stages:
            for b, block in enumerate(getattr(model, name)):
                _block(v, f"{tf}_{name}/_block{b + 1}", f"{key}{name}.{b}", block)
        for name, _stride, _fused in model.decoder_plan:  # MaX-DeepLab-L's stacked decoder
            for b, block in enumerate(getattr(model, name)):
                _block(v, f"{tf}_{name}/_block{b + 1}", f"{key}{name}.{b}", block)
            fuse = getattr(model, f"{name}_resized_fuse")
            for j, proj in enumerate(fuse.projections):
                if isinstance(proj, nn.Identity):
                    continue
                tf_fuse = f"{tf}_{name}_resized_fuse"
                kind = (
                    "_strided_conv_bn" if f"{tf_fuse}/_strided_conv_bn{j + 1}/_conv/kernel" in v else "_resized_conv_bn"
                )
                _conv_bn_seq(v, f"{tf_fuse}/{kind}{j + 1}", f"{key}{name}_resized_fuse.projections.{j}")
    else:
        raise ConversionError(f"no deeplab2 encoder mapping for a {type(model).__name__}")


# ----------------------------------------------------------------------------- Panoptic-DeepLab
def _decoder(v: TFVariables, tf_prefix: str, key: str, decoder: nn.Module) -> None:
    """``PanopticDeepLabSingleDecoder`` -> our ``SingleDecoder``."""
    if decoder.aspp.only_1x1:
        _conv_bn_seq(v, f"{tf_prefix}/_aspp/_proj_conv_bn_act", f"{key}.aspp.project")
    else:
        _conv_bn_seq(v, f"{tf_prefix}/_aspp/_conv_bn_act", f"{key}.aspp.branches.0")
        for i in range(1, 4):
            _conv_bn_seq(v, f"{tf_prefix}/_aspp/_aspp_conv{i}/_conv_bn_act", f"{key}.aspp.branches.{i}")
        _conv_bn_seq(v, f"{tf_prefix}/_aspp/_aspp_pool/_conv_bn_act", f"{key}.aspp.pool_branch")
        _conv_bn_seq(v, f"{tf_prefix}/_aspp/_proj_conv_bn_act", f"{key}.aspp.project.0")
    for i in range(len(decoder.projections)):
        _conv_bn_seq(v, f"{tf_prefix}/_low_level_conv{i + 1}", f"{key}.projections.{i}")
        _separable(v, f"{tf_prefix}/_fusion_conv{i + 1}/_conv1_bn_act", f"{key}.fusions.{i}")


def _head(v: TFVariables, tf_body: str, tf_last: str, key: str) -> None:
    """``PanopticDeepLabSingleHead``: ``tf_body`` (its separable conv block) and ``tf_last``
    (the 1x1 conv with bias) -> our ``PanopticHead`` (indices 0, 1)."""
    _separable(v, f"{tf_body}/_conv1_bn_act", f"{key}.0")
    conv(v, tf_last, f"{key}.1", bias=True)


def map_panoptic_deeplab(v: TFVariables, model: nn.Module) -> None:
    """A deeplab2 Panoptic-DeepLab checkpoint (encoder, both decoders, the three heads)."""
    if not v.names("encoder/"):
        raise ConversionError(f"{v.source}: no encoder/ variables; not a deeplab2 model checkpoint")
    if not v.names("semantic_decoder/"):
        raise ConversionError(
            f"{v.source}: no semantic_decoder/ variables; a backbone checkpoint converts "
            "into a backbone model (or use it as model.kwargs.pretrained_backbone once converted)"
        )
    require_deeplab2_numerics(model)
    map_encoder(v, model.backbone, "backbone.", "encoder/")
    _decoder(v, "semantic_decoder", "semantic_decoder", model.semantic_decoder)
    _decoder(v, "instance_decoder", "instance_decoder", model.instance_decoder)
    _head(v, "semantic_head_without_last_layer", "semantic_last_layer", "semantic_head")
    _head(v, "instance_center_head_without_last_layer", "instance_center_head_last_layer", "center_head")
    _head(v, "instance_regression_head_without_last_layer", "instance_regression_head_last_layer", "offset_head")


# ----------------------------------------------------------------------------- registrations
_AXIAL_RESNETS = [f"axial_resnet_{s}{t}" for s in ("s", "m", "l", "xl") for t in ("", "_conv")] + ["resnet50"]
_HYBRIDS = [
    "axial_swidernet_1_1_1",
    "axial_swidernet_1_1_3",
    "axial_swidernet_1_1_4_5",
    "max_deeplab_s_backbone",
    "axial_resnet50",
    "resnet50_beta",
    "max_deeplab_l_backbone",
]


@register_mapping(*_AXIAL_RESNETS, *_HYBRIDS)
def deeplab2_backbone(v: TFVariables, model: nn.Module) -> None:
    """A deeplab2 encoder (ImageNet backbone, or the encoder of a panoptic checkpoint) -> our backbone
    built with ``features_only=True``."""
    _classifier_free(model, v, type(model).__name__)
    map_encoder(v, model)


_PANOPTIC = [f"axial_deeplab_{s}" for s in ("s", "m", "l", "xl")] + [
    "axial_deeplab_swidernet_1_1_1_cityscapes",
    "axial_deeplab_swidernet_1_1_3_cityscapes",
    "axial_deeplab_swidernet_1_1_4_5_cityscapes",
    "axial_deeplab_max_s_backbone_cityscapes",
    "axial_deeplab_max_l_backbone_cityscapes",
    "panoptic_deeplab_r50",
]


@register_mapping(*_PANOPTIC)
def deeplab2_panoptic_deeplab(v: TFVariables, model: nn.Module) -> None:
    map_panoptic_deeplab(v, model)
