"""Panoptic-DeepLab meta-architecture with any registry backbone.

Backbone features [res2, res3, res4, res5] (strides 4, 8, 16, 16 at output
stride 16) feed two decoders of the same shape: a 1x1 projection of res5
(real ASPP on request), then two fusions, each a 1x1 conv-BN-ReLU projection
of the low-level feature (res3, then res2), bilinear upsampling of the running
feature, concatenation and a 5x5 depthwise-separable conv. Semantic decoder:
256 channels, projections 64 / 32; instance decoder: 128 channels, projections
32 / 16 (both projections of res5 have 256 channels). Heads: a 5x5
depthwise-separable conv and a 1x1 conv with bias; semantic 256 -> C, center
32 -> 1, offset 32 -> 2 in (dy, dx) order. Outputs are upsampled to the input
size (align_corners, as deeplab2) and offsets are multiplied by the resize
factor, so they are in input pixels.

Train mode returns the raw outputs; eval mode returns the merged panoptic
result per image (see :meth:`PanopticDeepLab.forward`). Class metadata are
constructor arguments (or a ``PanopticMetadata``), never dataset constants.

The module tree holds deeplab2's Panoptic-DeepLab weights one to one (its
``semantic_decoder``/``instance_decoder`` with ``_aspp._proj_conv_bn_act``,
``_low_level_conv{1,2}``, ``_fusion_conv{1,2}`` as depthwise + pointwise, and
the heads' ``conv_block`` + ``final_conv``); the centre heatmap is raw (no
sigmoid: deeplab2 trains it with MSE and thresholds it as is). With
``DEEPLAB2_PANOPTIC`` settings (BN eps 1e-3 / momentum 0.99 in Keras terms,
inputs scaled to [-1, 1] as deeplab2's ``x / 127.5 - 1``, he_normal init,
400 centres kept) the model computes what deeplab2 computes. Registered
here besides ``axial_deeplab_{s,m,l,xl}``: the five Cityscapes models of
deeplab2's ``configs/cityscapes/axial_deeplab/`` (see ``DEEPLAB2_CITYSCAPES``).
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..postprocess import PostprocessSettings
from .registry import create_model, register_model
from .resize import resize_bilinear

__all__ = [
    "PanopticDeepLab",
    "ASPP",
    "SingleDecoder",
    "PanopticHead",
    "DepthwiseSeparableConv",
    "resize_outputs",
    "DEEPLAB2_PANOPTIC",
    "DEEPLAB2_CITYSCAPES",
    "CONV_INITS",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONV_INITS = ("torch", "he_normal")


def _init_decoder_convs_(module: nn.Module, conv_init: str) -> None:
    """deeplab2's initializers for decoder and head convs (not the heads' last 1x1): Keras'
    ``he_normal`` (normal truncated at 2 std, std sqrt(2 / fan_in) / 0.8796) for regular convs,
    and its DepthwiseConv2D default ``glorot_uniform`` with Keras' fans of a (k, k, C, 1) kernel
    (fan_in k*k*C, fan_out k*k) for depthwise ones. ``"torch"`` keeps PyTorch's default."""
    if conv_init not in CONV_INITS:
        raise ValueError(f"unknown conv_init {conv_init!r}; choose one of {CONV_INITS}")
    if conv_init == "torch":
        return
    for m in module.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        k = m.kernel_size[0] * m.kernel_size[1]
        if m.groups > 1 and m.groups == m.in_channels and m.out_channels == m.in_channels:
            limit = (6.0 / (k * m.in_channels + k)) ** 0.5
            nn.init.uniform_(m.weight, -limit, limit)
        else:
            std = (2.0 / (k * m.in_channels // m.groups)) ** 0.5 / 0.87962566103423978
            nn.init.trunc_normal_(m.weight, 0.0, std, -2.0 * std, 2.0 * std)


def _bn(channels: int, eps: float, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


class ChannelsLastConv2d(nn.Conv2d):
    """A conv that reads its input channels_last on CPU. Why: oneDNN's 5x5 depthwise backward
    runs ~2x faster on channels_last tensors (28 against 53 ms at 2x288x65x65, one thread; forward
    and backward from an NCHW input, conversion included, 43 against 52 ms). A channels_last input
    (the axial backbones' features are) passes through as it is. (Compiled training gets the same
    layout from :data:`axial_deeplab.engine.builders.TRAINING_COMPILE_OPTIONS`.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class ConvBNReLU(nn.Sequential):
    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ):
        padding = dilation * (kernel - 1) // 2
        conv = ChannelsLastConv2d if groups > 1 else nn.Conv2d  # depthwise: see ChannelsLastConv2d
        super().__init__(
            conv(cin, cout, kernel, padding=padding, dilation=dilation, groups=groups, bias=False),
            _bn(cout, bn_eps, bn_momentum),
            nn.ReLU(inplace=True),
        )


class DepthwiseSeparableConv(nn.Sequential):
    """k x k depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 5, bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__(
            ConvBNReLU(cin, cin, kernel, groups=cin, bn_eps=bn_eps, bn_momentum=bn_momentum),
            ConvBNReLU(cin, cout, 1, bn_eps=bn_eps, bn_momentum=bn_momentum),
        )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (1x1, three 3x3 atrous, image pooling -> 1x1 projection).

    With ``only_1x1=True`` it degenerates to one 1x1 conv-BN-ReLU projection, the paper's choice
    (deeplab2's ``aspp_use_only_1x1_proj_conv``).
    """

    def __init__(
        self,
        cin: int,
        cout: int = 256,
        atrous_rates: Sequence[int] = (6, 12, 18),
        only_1x1: bool = True,
        dropout: float = 0.1,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ):
        super().__init__()
        bn = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        self.only_1x1 = only_1x1
        if only_1x1:
            self.project = ConvBNReLU(cin, cout, 1, **bn)
            return
        if len(atrous_rates) != 3:
            raise ValueError(f"ASPP needs three atrous rates, got {list(atrous_rates)}")
        self.branches = nn.ModuleList(
            [ConvBNReLU(cin, cout, 1, **bn)] + [ConvBNReLU(cin, cout, 3, dilation=r, **bn) for r in atrous_rates]
        )
        self.pool_branch = ConvBNReLU(cin, cout, 1, **bn)
        self.project = nn.Sequential(ConvBNReLU(5 * cout, cout, 1, **bn), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.only_1x1:
            return self.project(x)
        pooled = self.pool_branch(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, x.shape[-2], x.shape[-1])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class SingleDecoder(nn.Module):
    """res5 projection, then fusion with res3 and res2 (1x1 projection, upsample, concat, 5x5 dw-sep)."""

    def __init__(
        self,
        high_channels: int,
        low_channels: Sequence[int],
        low_projections: Sequence[int],
        decoder_channels: int,
        aspp_channels: int = 256,
        use_aspp: bool = False,
        atrous_rates: Sequence[int] = (6, 12, 18),
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ):
        super().__init__()
        if len(low_channels) != len(low_projections):
            raise ValueError(f"{len(low_channels)} low-level features but {len(low_projections)} projections")
        bn = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        self.aspp = ASPP(high_channels, aspp_channels, atrous_rates, only_1x1=not use_aspp, **bn)
        self.projections = nn.ModuleList(ConvBNReLU(c, p, 1, **bn) for c, p in zip(low_channels, low_projections))
        fuse_in = [aspp_channels] + [decoder_channels] * (len(low_channels) - 1)
        self.fusions = nn.ModuleList(
            DepthwiseSeparableConv(f + p, decoder_channels, 5, **bn) for f, p in zip(fuse_in, low_projections)
        )

    def forward(self, high: torch.Tensor, lows: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.aspp(high)
        for low, project, fuse in zip(lows, self.projections, self.fusions):
            low = project(low)
            x = fuse(torch.cat([resize_bilinear(x, low.shape[-2:]), low], dim=1))
        return x


class PanopticHead(nn.Sequential):
    """5x5 depthwise-separable conv, then a 1x1 conv with bias."""

    def __init__(self, cin: int, head_channels: int, cout: int, bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        final = nn.Conv2d(head_channels, cout, 1, bias=True)
        nn.init.trunc_normal_(final.weight, std=0.01)  # deeplab2's initializer for the last conv
        nn.init.zeros_(final.bias)
        super().__init__(DepthwiseSeparableConv(cin, head_channels, 5, bn_eps, bn_momentum), final)


def resize_outputs(outputs: Dict[str, torch.Tensor], size) -> Dict[str, torch.Tensor]:
    """Bilinear (align_corners) resize of raw outputs; offsets scaled by (out - 1) / (in - 1) per axis."""
    out = dict(outputs)
    for key in ("semantic_logits", "center_heatmap"):
        if key in out:
            out[key] = resize_bilinear(out[key], size)
    if "offset_map" in out:
        offsets = out["offset_map"]
        h_in, w_in = offsets.shape[-2:]
        h_out, w_out = size
        scale_y = (h_out - 1) / (h_in - 1) if h_in > 1 else h_out / h_in
        scale_x = (w_out - 1) / (w_in - 1) if w_in > 1 else w_out / w_in
        offsets = resize_bilinear(offsets, size)
        # per channel with the scalars themselves: a traced export keeps them symbolic in H and W
        out["offset_map"] = torch.cat([offsets[:, :1] * scale_y, offsets[:, 1:] * scale_x], dim=1)
    return out


class PanopticDeepLab(nn.Module):
    """Panoptic-DeepLab on a ``features_only`` backbone.

    Args:
        backbone: module returning [res2, res3, res4, res5] with ``feature_info.channels()``.
        num_classes, thing_ids, label_divisor, ignore_label: dataset metadata.
        use_aspp: real ASPP (rates ``atrous_rates``) instead of the 1x1 projection.
        Channel arguments default to Panoptic-DeepLab's (above); ``instance_aspp_channels``
            (default: ``aspp_channels``) is deeplab2's ``instance_decoder_override.aspp_channels``.
        stuff_area, center_threshold, nms_kernel, top_k: the post-processing settings
            (:class:`~axial_deeplab.postprocess.PostprocessSettings`, held as
            ``postprocess_settings``) that eval ``forward`` and :meth:`postprocess` use; the
            engine sets them from the config's ``eval`` section when it builds a model.
        bn_eps, bn_momentum: BatchNorm of the decoders and heads (PyTorch momentum; Keras'
            0.99 is 0.01).
        pixel_mean, pixel_std: input normalisation of [0, 1] RGB images (ImageNet's by default;
            deeplab2's models were trained on ``x / 127.5 - 1``, i.e. mean = std = 0.5).
        conv_init: ``"torch"`` (PyTorch's default) or ``"he_normal"`` (deeplab2's initializers)
            for the decoder and head convs.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 19,
        thing_ids: Sequence[int] = (),
        label_divisor: int = 1000,
        ignore_label: int = 255,
        class_names: Optional[Sequence[str]] = None,
        use_aspp: bool = False,
        atrous_rates: Sequence[int] = (6, 12, 18),
        aspp_channels: int = 256,
        semantic_decoder_channels: int = 256,
        semantic_low_level_channels: Sequence[int] = (64, 32),
        semantic_head_channels: int = 256,
        instance_decoder_channels: int = 128,
        instance_low_level_channels: Sequence[int] = (32, 16),
        instance_head_channels: int = 32,
        instance_aspp_channels: Optional[int] = None,
        stuff_area: int = PostprocessSettings.stuff_area,
        center_threshold: float = PostprocessSettings.threshold,
        nms_kernel: int = PostprocessSettings.nms_kernel,
        top_k: Optional[int] = PostprocessSettings.top_k,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        conv_init: str = "torch",
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        thing_ids = sorted(int(t) for t in thing_ids)
        if thing_ids and (thing_ids[0] < 0 or thing_ids[-1] >= num_classes):
            raise ValueError(f"thing_ids {thing_ids} outside 0..{num_classes - 1}")
        info = getattr(backbone, "feature_info", None)
        if info is None or not hasattr(info, "channels"):
            raise ValueError(
                f"backbone {type(backbone).__name__} has no feature_info.channels(); build it with features_only=True"
            )
        pixel_mean, pixel_std = [float(v) for v in pixel_mean], [float(v) for v in pixel_std]
        if len(pixel_mean) != 3 or len(pixel_std) != 3 or min(pixel_std) <= 0:
            raise ValueError(
                f"pixel_mean and pixel_std must be 3 values each (std > 0), got {pixel_mean} and {pixel_std}"
            )
        channels = list(info.channels())
        if len(channels) < 3:
            raise ValueError(f"backbone must return [res2, res3, ..., res5] features, got {len(channels)} levels")
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.thing_ids = thing_ids
        self.label_divisor = int(label_divisor)
        self.ignore_label = int(ignore_label)
        self.class_names = list(class_names) if class_names is not None else None
        self.postprocess_settings = PostprocessSettings(
            threshold=float(center_threshold),
            nms_kernel=int(nms_kernel),
            top_k=None if top_k is None else int(top_k),
            stuff_area=int(stuff_area),
        )
        bn = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        high, lows = channels[-1], [channels[1], channels[0]]  # res5; res3 then res2
        self.semantic_decoder = SingleDecoder(
            high,
            lows,
            semantic_low_level_channels,
            semantic_decoder_channels,
            aspp_channels,
            use_aspp,
            atrous_rates,
            **bn,
        )
        self.instance_decoder = SingleDecoder(
            high,
            lows,
            instance_low_level_channels,
            instance_decoder_channels,
            aspp_channels if instance_aspp_channels is None else instance_aspp_channels,
            use_aspp,
            atrous_rates,
            **bn,
        )
        self.semantic_head = PanopticHead(semantic_decoder_channels, semantic_head_channels, num_classes, **bn)
        self.center_head = PanopticHead(instance_decoder_channels, instance_head_channels, 1, **bn)
        self.offset_head = PanopticHead(instance_decoder_channels, instance_head_channels, 2, **bn)
        for part in (
            self.semantic_decoder,
            self.instance_decoder,
            self.semantic_head[0],
            self.center_head[0],
            self.offset_head[0],
        ):
            _init_decoder_convs_(part, conv_init)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)

    # The settings under their constructor names (views of ``postprocess_settings``).
    stuff_area = property(
        lambda self: self.postprocess_settings.stuff_area,
        lambda self, v: self._set_postprocess(stuff_area=int(v)),
    )
    center_threshold = property(
        lambda self: self.postprocess_settings.threshold,
        lambda self, v: self._set_postprocess(threshold=float(v)),
    )
    nms_kernel = property(
        lambda self: self.postprocess_settings.nms_kernel,
        lambda self, v: self._set_postprocess(nms_kernel=int(v)),
    )
    top_k = property(
        lambda self: self.postprocess_settings.top_k,
        lambda self, v: self._set_postprocess(top_k=None if v is None else int(v)),
    )

    def _set_postprocess(self, **changes) -> None:
        self.postprocess_settings = self.postprocess_settings.replace(**changes)

    @property
    def pad_value(self) -> Tuple[float, float, float]:
        """The [0, 1] RGB value that the input normalisation maps to 0 (``pixel_mean``): what the
        data pipeline pads images with, so padded pixels reach the network as zeros, as in
        deeplab2 (which pads with 127.5 for its x / 127.5 - 1)."""
        return tuple(float(v) for v in self.pixel_mean.flatten().tolist())

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch, for the backbone: each of its blocks keeps only its input and is
        recomputed in the backward (less activation memory for about one more backbone forward;
        the step is unchanged, see ``layers.activation_recompute``). The decoders and heads keep
        their activations."""
        set_checkpointing = getattr(self.backbone, "set_grad_checkpointing", None)
        if set_checkpointing is None:
            raise ValueError(f"backbone {type(self.backbone).__name__} has no set_grad_checkpointing")
        set_checkpointing(enable)

    def predict_raw(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Raw outputs at input resolution, in any mode: ``semantic_logits`` (B, C, H, W),
        ``center_heatmap`` (B, 1, H, W), ``offset_map`` (B, 2, H, W) as (dy, dx) in input pixels."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
        x = (images - self.pixel_mean) / self.pixel_std
        features = self.backbone(x)
        high, lows = features[-1], [features[1], features[0]]
        semantic = self.semantic_decoder(high, lows)
        instance = self.instance_decoder(high, lows)
        outputs = {
            "semantic_logits": self.semantic_head(semantic),
            "center_heatmap": self.center_head(instance),
            "offset_map": self.offset_head(instance),
        }
        return resize_outputs(outputs, images.shape[-2:])

    def forward(self, images: torch.Tensor, return_instance_masks: bool = False):
        """Train mode: :meth:`predict_raw`. Eval mode: a list with, per image, ``sem_seg`` (C, H, W)
        probabilities, ``panoptic_seg`` = (H x W int64 map, id = class * label_divisor + instance,
        void -1; segments_info) and ``instances`` (``ids``, ``classes``, ``scores`` = mean class
        probability x center score, ``areas``, ``centers``; ``masks`` (N, H, W) bool on request)."""
        raw = self.predict_raw(images)
        if self.training:
            return raw
        return self.postprocess(raw, return_instance_masks=return_instance_masks)

    @torch.no_grad()
    def postprocess(self, raw: Dict[str, torch.Tensor], return_instance_masks: bool = False, **overrides) -> List[Dict]:
        """Merge raw outputs (``predict_raw`` or ``tta.tta_raw_outputs``; ``semantic_probs`` is used
        when present) into per-image results as :meth:`forward` returns them in eval mode, with
        ``postprocess_settings`` through :func:`~axial_deeplab.postprocess.merge_raw_outputs`
        (what evaluation and ``predict`` call). ``overrides`` replace settings for this call
        (``stuff_area``, ``threshold``, ``nms_kernel``, ``top_k``); others go to
        :func:`~axial_deeplab.postprocess.panoptic_inference` (e.g. ``max_elements``)."""
        from ..postprocess import instance_masks, merge_raw_outputs

        probs = raw.get("semantic_probs")  # test-time augmentation averages probabilities
        if probs is None:
            probs = raw["semantic_logits"].float().softmax(dim=1)
        names = set(self.postprocess_settings.as_kwargs())
        settings = self.postprocess_settings.replace(**{k: v for k, v in overrides.items() if k in names})
        extra = {k: v for k, v in overrides.items() if k not in names}
        results = merge_raw_outputs(
            dict(raw, semantic_probs=probs), self.thing_ids, self.label_divisor, settings, **extra
        )
        outputs = []
        for b, r in enumerate(results):
            instances = dict(r["instances"])
            if return_instance_masks:
                instances["masks"] = instance_masks(r)
            outputs.append(
                {
                    "sem_seg": probs[b],
                    "panoptic_seg": (r["panoptic"], r["segments_info"]),
                    "instances": instances,
                    "semantic": r["semantic"],
                }
            )
        return outputs


# --------------------------------------------------------------------------- registry
_MODEL_ARGS = set(inspect.signature(PanopticDeepLab.__init__).parameters) - {"self", "backbone"}


def _build(
    default_backbone: str,
    backbone: Optional[str] = None,
    metadata=None,
    output_stride: int = 16,
    pretrained_backbone: Optional[str] = None,
    backbone_kwargs: Optional[dict] = None,
    default_backbone_kwargs: Optional[dict] = None,
    **kwargs,
) -> PanopticDeepLab:
    """Split ``kwargs`` between the meta-architecture (its constructor's arguments) and the backbone
    (everything else, e.g. ``span``, ``drop_path_rate``), build both."""
    if metadata is not None:
        kwargs.setdefault("num_classes", metadata.num_classes)
        kwargs.setdefault("thing_ids", list(metadata.thing_ids))
        kwargs.setdefault("label_divisor", metadata.label_divisor)
        kwargs.setdefault("ignore_label", metadata.ignore_label)
        kwargs.setdefault("class_names", list(metadata.class_names))
    model_kwargs = {k: v for k, v in kwargs.items() if k in _MODEL_ARGS}
    bb_kwargs = dict(default_backbone_kwargs or {}) if backbone is None else {}
    bb_kwargs.update({k: v for k, v in kwargs.items() if k not in _MODEL_ARGS})
    bb_kwargs.update(backbone_kwargs or {})
    for key in ("bn_eps", "bn_momentum", "conv_init"):  # one setting for the whole network when given
        if key in model_kwargs:
            bb_kwargs.setdefault(key, model_kwargs[key])
    bb_kwargs.pop("features_only", None)
    net = create_model(backbone or default_backbone, features_only=True, output_stride=output_stride, **bb_kwargs)
    if pretrained_backbone:
        _load_backbone(net, pretrained_backbone)
    return PanopticDeepLab(net, **model_kwargs)


def _load_backbone(net: nn.Module, path: str) -> None:
    """Backbone weights from a classification (ImageNet) checkpoint: the classifier is dropped."""
    from .weights import (
        convert_port_state_dict,
        is_port_state_dict,
        load_state_dict_strict,
        read_state_dict,
        resolve_weights_file,
    )

    # a file, checkpoint folder or run folder; tables of any span or reach fit (load_state_dict_strict)
    path = resolve_weights_file(path)
    sd = read_state_dict(path)
    if is_port_state_dict(sd):
        sd = convert_port_state_dict(sd)
    panoptic = any(k.startswith("backbone.") for k in sd)
    if panoptic:  # a whole panoptic checkpoint: take its backbone
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    from ..engine.checkpoint import check_arrangement  # an initialisation: warn on another arrangement

    check_arrangement(net, path, prefix="backbone" if panoptic else "", warn=True)
    load_state_dict_strict(net, sd, source=path)


def _axial_deeplab(size: str):
    def builder(**kwargs):
        # The paper's Cityscapes models use local span 65 in every axial layer (span=None: global).
        return _build(f"axial_resnet_{size}", default_backbone_kwargs={"span": 65}, **kwargs)

    builder.__name__ = f"axial_deeplab_{size}"
    builder.__doc__ = (
        f"Axial-DeepLab-{size.upper()}: Panoptic-DeepLab on Axial-ResNet-{size.upper()} "
        "(Inception stem, output stride 16, span 65, 1x1 projection instead of ASPP)."
    )
    return builder


for _size in ("s", "m", "l", "xl"):
    register_model(_axial_deeplab(_size))


# deeplab2's Panoptic-DeepLab as its Cityscapes configs build it: Keras BN (epsilon 1e-3, momentum
# 0.99), inputs x / 127.5 - 1 on 0..255 pixels, he_normal convs, evaluator keep_k_centers 400
# (stuff area 2048, threshold 0.1, NMS 13 are already PostprocessSettings' defaults). A model the
# engine builds takes its post-processing from the config's eval section instead (eval.top_k=400).
DEEPLAB2_PANOPTIC = dict(
    bn_eps=1e-3,
    bn_momentum=0.01,
    pixel_mean=(0.5, 0.5, 0.5),
    pixel_std=(0.5, 0.5, 0.5),
    conv_init="he_normal",
    top_k=400,
)

# Our name -> (deeplab2 config in configs/cityscapes/axial_deeplab/ and model zoo checkpoint
# "<config>_axial_deeplab_cityscapes_trainfine", our backbone, model zoo name). All five share
# one decoder setting: res5 1x1 projection (no ASPP) to 256; semantic decoder 256 with res3/res2
# projections 64/32, head 256 -> 19; instance decoder 128 with projections 32/16, heads 32 -> 1
# (centre) and 32 -> 2 (offsets); drop path keep probability 0.8, linear schedule.
DEEPLAB2_CITYSCAPES = {
    "axial_deeplab_swidernet_1_1_1_cityscapes": (
        "axial_swidernet_1_1_1_os16",
        "axial_swidernet_1_1_1",
        "Axial-SWideRNet-(1, 1, 1)",
    ),
    "axial_deeplab_swidernet_1_1_3_cityscapes": (
        "axial_swidernet_1_1_3_os16",
        "axial_swidernet_1_1_3",
        "Axial-SWideRNet-(1, 1, 3)",
    ),
    "axial_deeplab_swidernet_1_1_4_5_cityscapes": (
        "axial_swidernet_1_1_4.5_os16",
        "axial_swidernet_1_1_4_5",
        "Axial-SWideRNet-(1, 1, 4.5)",
    ),
    "axial_deeplab_max_s_backbone_cityscapes": (
        "max_deeplab_s_backbone_os16",
        "max_deeplab_s_backbone",
        "MaX-DeepLab-S-Backbone",
    ),
    "axial_deeplab_max_l_backbone_cityscapes": (
        "max_deeplab_l_backbone_os16",
        "max_deeplab_l_backbone",
        "MaX-DeepLab-L-Backbone",
    ),
}


def _deeplab2_cityscapes(name: str):
    config, backbone_name, zoo_name = DEEPLAB2_CITYSCAPES[name]

    def builder(**kwargs):
        if kwargs.get("metadata") is None and "num_classes" not in kwargs:
            from ..data.meta import cityscapes_metadata

            kwargs["metadata"] = cityscapes_metadata()
        for key, value in DEEPLAB2_PANOPTIC.items():
            kwargs.setdefault(key, value)
        return _build(
            backbone_name, default_backbone_kwargs={"drop_path_rate": 0.2, "drop_path_schedule": "linear"}, **kwargs
        )

    builder.__name__ = name
    builder.__doc__ = (
        f"Axial-DeepLab with the {zoo_name} backbone on Cityscapes (19 classes), deeplab2's "
        f"configs/cityscapes/axial_deeplab/{config}.textproto: Panoptic-DeepLab at output "
        "stride 16 with deeplab2's BN, input scaling and init."
    )
    return builder


for _name in DEEPLAB2_CITYSCAPES:
    register_model(_deeplab2_cityscapes(_name))


@register_model
def panoptic_deeplab_r50(**kwargs):
    """Panoptic-DeepLab on ResNet-50 (output stride 16), the paper's convolutional baseline."""
    return _build("resnet50", **kwargs)
