"""MaX-DeepLab's ImageNet backbones: ResNet-50-beta (S) or a wide ResNet (L) with axial attention.

The MaX-DeepLab-S backbone is ResNet-50's layout (3, 4, 6, 3) with the Inception stem and no
max-pool ("ResNet-50-beta"); from the second block of the stride-16 stage on, every bottleneck's
3x3 conv becomes height- then width-axis attention (1x1 to 2F, key depth F, value depth 2F, 8
heads, 1x1 to 4F). It is deeplab2's MaX-DeepLab-S with its dual-path transformer, memory and
stacked decoder left out, as deeplab2's ``max_deeplab_s_backbone`` is; Axial-DeepLab's Cityscapes
models use it as a Panoptic-DeepLab backbone. The network is :class:`.axial_swidernet.HybridAxialResNet`
with ``backbone_type="resnet_beta"``; see there for strides, shortcuts and defaults.

Registered here (deeplab2 name / model zoo name -> ours; parameter counts of deeplab2's instances,
trainable weights without a classification head, which ours equal):

* ``max_deeplab_s_backbone``, "MaX-DeepLab-S-Backbone (MaX-S w/ ReLU)" -> ``max_deeplab_s_backbone``
  (41,343,424).
* kMaX-DeepLab's pixel encoder ``axial_resnet50``, "Axial-ResNet-50 (MaX-S w/ GeLU)" ->
  ``axial_resnet50``: the same network with exact (erf) GeLU everywhere (41,343,424).
* ``resnet50_beta``, "ResNet-50-Beta" -> ``resnet50_beta``: no attention (23,631,808).
* ``max_deeplab_l_backbone``, "MaX-DeepLab-L-Backbone (MaX-L w/ ReLU)" -> ``max_deeplab_l_backbone``
  (175,115,392): Axial-SWideRNet-(1, 1, 1) (same stem and stages) plus MaX-DeepLab's stacked
  hour-glass decoder (strides 16 -> 8 -> 4 -> 8 -> 16 at output stride 16; 38,716,000 parameters),
  whose output is the classification feature. Panoptic-DeepLab reads ``res2``/``res3``/``res5``,
  the stages' outputs, so there the decoder is carried but never run (deeplab2 runs it only for
  its classification output); ``features_only`` freezes it.
  Its size depends on the output stride (one more step each way at 32), so this builder defaults
  to deeplab2's output stride 16; the others default to 32 like every classification model here.
"""

from __future__ import annotations

from .axial_swidernet import HybridAxialResNet
from .registry import register_model

__all__ = ["max_deeplab_s_backbone", "max_deeplab_l_backbone", "axial_resnet50", "resnet50_beta"]


def _max_s(**kwargs) -> HybridAxialResNet:
    kwargs.setdefault("use_axial_beyond_stride", 16)
    kwargs.setdefault("drop_path_beyond_stride", 16)
    return HybridAxialResNet(
        layers=kwargs.pop("layers", (3, 4, 6, 3)),
        backbone_type="resnet_beta",
        attention_bottleneck_expansion=2,
        key_expansion=1,
        value_expansion=2,
        **kwargs,
    )


@register_model
def max_deeplab_s_backbone(**kwargs):
    """MaX-DeepLab-S backbone (deeplab2 ``max_deeplab_s_backbone``): ResNet-50-beta with axial
    attention at stride >= 16, ReLU; 41.3M parameters."""
    return _max_s(**kwargs)


@register_model
def axial_resnet50(**kwargs):
    """Axial-ResNet-50 (deeplab2 / kMaX-DeepLab ``axial_resnet50``, "MaX-S w/ GeLU"): the MaX-DeepLab-S
    backbone with GeLU activations."""
    kwargs.setdefault("activation", "gelu")
    return _max_s(**kwargs)


@register_model
def resnet50_beta(**kwargs):
    """ResNet-50-beta (deeplab2 ``resnet50_beta``): Inception stem, no max-pool, strided first
    blocks, no attention."""
    kwargs.setdefault("use_axial_beyond_stride", 0)
    return _max_s(**kwargs)


@register_model
def max_deeplab_l_backbone(**kwargs):
    """MaX-DeepLab-L backbone (deeplab2 ``max_deeplab_l_backbone``): the wide ResNet (3, 3, 6, 3, 3)
    with axial attention at stride >= 16 (key 2F, value 4F) and a stacked decoder; 175.1M
    parameters at output stride 16."""
    kwargs.setdefault("output_stride", 16)
    kwargs.setdefault("use_axial_beyond_stride", 16)
    kwargs.setdefault("drop_path_beyond_stride", 4)
    kwargs.setdefault("backbone_decoder_num_stacks", 1)
    return HybridAxialResNet(
        layers=kwargs.pop("layers", (3, 6, 3, 3)),
        backbone_type="wider_resnet",
        attention_bottleneck_expansion=4,
        key_expansion=2,
        value_expansion=4,
        **kwargs,
    )
