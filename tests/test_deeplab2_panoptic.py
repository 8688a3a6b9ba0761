"""Panoptic-DeepLab as deeplab2 builds it for its Cityscapes Axial-DeepLab models
(configs/cityscapes/axial_deeplab/*.textproto): module-by-module sizes, settings, init, and the
decoder + heads reproducing deeplab2's outputs from its own checkpoint."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from axial_deeplab.models import create_model, is_model
from axial_deeplab.models import panoptic_deeplab as pdl
from axial_deeplab.models.panoptic_deeplab import DEEPLAB2_CITYSCAPES, DEEPLAB2_PANOPTIC, PanopticDeepLab

FIXTURE = Path(__file__).parent / "fixtures" / "deeplab2" / "cityscapes_axial_swidernet_1_1_1_os16"

# From deeplab2's Panoptic-DeepLab decoder built in TensorFlow (tf-keras) with each of the five
# Cityscapes configs: every weight (Keras counts BN moving mean/variance as weights) per checkpoint item.
DEEPLAB2_DECODER_WEIGHTS = {
    "semantic_decoder": 741_984,
    "semantic_decoder.aspp": 525_312,
    "semantic_decoder.projections.0": 33_024,  # _low_level_conv1 (res3 -> 64)
    "semantic_decoder.fusions.0": 92_224,  # _fusion_conv1
    "semantic_decoder.projections.1": 8_320,  # _low_level_conv2 (res2 -> 32)
    "semantic_decoder.fusions.1": 83_104,  # _fusion_conv2
    "instance_decoder": 614_832,
    "instance_decoder.aspp": 525_312,
    "instance_decoder.projections.0": 16_512,
    "instance_decoder.fusions.0": 45_728,
    "instance_decoder.projections.1": 4_160,
    "instance_decoder.fusions.1": 23_120,
    "semantic_head.0": 73_984,  # semantic_head_without_last_layer
    "semantic_head.1": 4_883,  # semantic_last_layer
    "center_head.0": 7_936,  # instance_center_head_without_last_layer
    "center_head.1": 33,
    "offset_head.0": 7_936,  # instance_regression_head_without_last_layer
    "offset_head.1": 66,
}
DEEPLAB2_DECODER_TRAINABLE = 1_445_062  # the same decoder and heads, trainable weights only
# deeplab2's encoders of the five configs: endpoint channels res2/res3/res4/res5 and trainable weights.
DEEPLAB2_FEATURE_CHANNELS = [256, 512, 1024, 2048]
DEEPLAB2_ENCODER_TRAINABLE = {
    "axial_swidernet_1_1_1": 136_399_392,
    "axial_swidernet_1_1_3": 393_935_520,
    "axial_swidernet_1_1_4_5": 570_346_912,
    "max_deeplab_s_backbone": 41_343_424,
    "max_deeplab_l_backbone": 175_115_392,
}


class _FeatureInfo:
    def __init__(self, channels):
        self._channels = list(channels)

    def channels(self):
        return self._channels


class StandInBackbone(nn.Module):
    """Only the feature channels of a backbone; enough to build the decoder and heads."""

    def __init__(self, channels=DEEPLAB2_FEATURE_CHANNELS, **_):
        super().__init__()
        self.feature_info = _FeatureInfo(channels)


def _weights(module: nn.Module) -> int:
    """Parameters and BN statistics, as Keras counts a layer's weights."""
    return sum(p.numel() for p in module.parameters()) + sum(
        b.numel() for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var"))
    )


def _decoder_on_stand_in(**overrides):
    return PanopticDeepLab(StandInBackbone(), num_classes=19, **{**DEEPLAB2_PANOPTIC, **overrides})


def test_decoder_and_heads_equal_deeplab2_module_by_module():
    model = _decoder_on_stand_in()
    modules = dict(model.named_modules())
    got = {name: _weights(modules[name]) for name in DEEPLAB2_DECODER_WEIGHTS}
    assert got == DEEPLAB2_DECODER_WEIGHTS
    trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    assert trainable == DEEPLAB2_DECODER_TRAINABLE


@pytest.fixture
def stand_in_backbones(monkeypatch):
    """Every backbone replaced by a stand-in (the real ones are hundreds of MB to initialise)."""
    monkeypatch.setattr(pdl, "create_model", lambda name, **kwargs: StandInBackbone())


def test_the_five_deeplab2_configs_are_registered():
    configs = {config for config, _, _ in DEEPLAB2_CITYSCAPES.values()}
    assert configs == {
        "axial_swidernet_1_1_1_os16",
        "axial_swidernet_1_1_3_os16",
        "axial_swidernet_1_1_4.5_os16",
        "max_deeplab_s_backbone_os16",
        "max_deeplab_l_backbone_os16",
    }
    assert all(is_model(name) for name in DEEPLAB2_CITYSCAPES)
    assert {b for _, b, _ in DEEPLAB2_CITYSCAPES.values()} == set(DEEPLAB2_ENCODER_TRAINABLE)


@pytest.mark.parametrize("name", sorted(DEEPLAB2_CITYSCAPES))
def test_registered_cityscapes_models_are_deeplab2s(name):
    _, backbone, _ = DEEPLAB2_CITYSCAPES[name]
    assert is_model(backbone)
    with torch.device("meta"):  # sizes only: nothing is allocated
        model = create_model(name)
    assert isinstance(model, PanopticDeepLab)
    assert model.backbone.feature_info.channels() == DEEPLAB2_FEATURE_CHANNELS
    # Cityscapes by default; deeplab2's evaluator settings of these configs
    assert model.num_classes == 19 and model.thing_ids == list(range(11, 19))
    assert model.class_names[0] == "road" and model.label_divisor == 1000
    assert (model.stuff_area, model.center_threshold, model.nms_kernel, model.top_k) == (2048, 0.1, 13, 400)
    modules = dict(model.named_modules())
    assert {n: _weights(modules[n]) for n in DEEPLAB2_DECODER_WEIGHTS} == DEEPLAB2_DECODER_WEIGHTS
    total = sum(p.numel() for p in model.parameters())
    assert total == DEEPLAB2_ENCODER_TRAINABLE[backbone] + DEEPLAB2_DECODER_TRAINABLE
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all((m.eps, m.momentum) == (1e-3, 0.01) for m in bns)


def test_shrunk_swidernet_model_trains_and_predicts():
    """The registered model end to end on its real (shrunk) backbone: features, decoder, heads, post-processing."""
    torch.manual_seed(0)
    model = create_model(
        "axial_deeplab_swidernet_1_1_1_cityscapes",
        width_multiplier=0.0625,
        stem_width_multiplier=0.0625,
        layers=(1, 1, 1, 1),
    )
    assert model.backbone.feature_info.reduction() == [4, 8, 16, 16]
    out = model(torch.rand(1, 3, 49, 65))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "semantic_logits": (1, 19, 49, 65),
        "center_heatmap": (1, 1, 49, 65),
        "offset_map": (1, 2, 49, 65),
    }
    sum(v.mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        (result,) = model(torch.rand(1, 3, 49, 65))
    assert result["panoptic_seg"][0].shape == (49, 65)


def test_deeplab2_settings_and_overrides(stand_in_backbones):
    model = create_model("axial_deeplab_swidernet_1_1_1_cityscapes", num_classes=7, thing_ids=[5, 6])
    assert model.num_classes == 7 and model.thing_ids == [5, 6]  # metadata is only the default
    assert model.semantic_head[1].out_channels == 7
    heads = [model.semantic_decoder, model.instance_decoder, model.semantic_head, model.center_head, model.offset_head]
    bns = [m for h in heads for m in h.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * (1 + 2 + 2 * 2) + 3 * 2  # per decoder: projection, 2 low-level, 2 dw-sep; heads: dw-sep
    assert all((m.eps, m.momentum) == (1e-3, 0.01) for m in bns)  # Keras epsilon 1e-3, momentum 0.99
    # deeplab2 feeds x / 127.5 - 1 of 0..255 pixels: [0, 1] images map onto [-1, 1]
    x = torch.tensor([0.0, 0.25, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose((x - model.pixel_mean) / model.pixel_std, x * 255 / 127.5 - 1, atol=1e-6)
    # today's defaults stay for the paper's models
    plain = PanopticDeepLab(StandInBackbone(), num_classes=19)
    assert torch.allclose(plain.pixel_mean.flatten(), torch.tensor(pdl.IMAGENET_MEAN))
    assert plain.semantic_decoder.aspp.project[1].eps == 1e-5


def test_he_normal_init_is_deeplab2s():
    torch.manual_seed(0)
    model = _decoder_on_stand_in()
    fusion = model.semantic_decoder.fusions[0]  # 5x5 depthwise on 256 + 64, then 1x1 to 256
    depthwise, pointwise = fusion[0][0].weight, fusion[1][0].weight
    std = math.sqrt(2.0 / 320)  # he_normal: sqrt(2 / fan_in), truncated at 2 std
    assert abs(pointwise.std().item() - std) < 0.03 * std
    assert pointwise.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-7
    limit = math.sqrt(6.0 / (25 * 320 + 25))  # Keras glorot_uniform of a (5, 5, 320, 1) kernel
    assert depthwise.abs().max().item() <= limit
    assert abs(depthwise.std().item() - limit / math.sqrt(3)) < 0.03 * limit
    final = model.semantic_head[1]
    assert abs(final.weight.std().item() - 0.01) < 0.002 and final.bias.abs().max().item() == 0
    torch_default = PanopticDeepLab(StandInBackbone(), num_classes=19).semantic_decoder.fusions[0][1][0].weight
    assert abs(torch_default.std().item() - std) > 0.3 * std  # PyTorch's own init is different


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="conv_init"):
        _decoder_on_stand_in(conv_init="xavier")
    with pytest.raises(ValueError, match="pixel_std"):
        _decoder_on_stand_in(pixel_std=(0.5, 0.0, 0.5))


# ----------------------------------------------------------------- deeplab2's own outputs
def _take_deeplab2_decoder(variables: dict, model: PanopticDeepLab) -> set:
    """Copy deeplab2's decoder and head variables (checkpoint object paths) into ``model``;
    returns the paths used."""
    used = set()

    def var(path):
        key = path + "/.ATTRIBUTES/VARIABLE_VALUE"
        used.add(key)
        return torch.from_numpy(np.ascontiguousarray(variables[key]))

    def bn(path, m: nn.BatchNorm2d):
        m.weight.data, m.bias.data = var(path + "/gamma"), var(path + "/beta")
        m.running_mean.data, m.running_var.data = var(path + "/moving_mean"), var(path + "/moving_variance")

    def conv_bn(path, block):  # Conv2DSame(use_bn) = our ConvBNReLU
        block[0].weight.data = var(path + "/_conv/kernel").permute(3, 2, 0, 1).contiguous()
        bn(path + "/_batch_norm", block[1])

    def dw_sep(path, block):  # StackedConv2DSame(1 layer, depthwise_separable_conv) = our DepthwiseSeparableConv
        p = path + "/_conv1_bn_act"
        block[0][0].weight.data = (
            var(p + "/_depthwise/_depthwise_conv/depthwise_kernel").permute(2, 3, 0, 1).contiguous()
        )
        bn(p + "/_depthwise/_batch_norm", block[0][1])
        conv_bn(p + "/_pointwise", block[1])

    for name in ("semantic_decoder", "instance_decoder"):
        dec = getattr(model, name)
        conv_bn(f"{name}/_aspp/_proj_conv_bn_act", dec.aspp.project)
        for i in range(2):
            conv_bn(f"{name}/_low_level_conv{i + 1}", dec.projections[i])
            dw_sep(f"{name}/_fusion_conv{i + 1}", dec.fusions[i])
    for ours, conv_block, last in (
        ("semantic_head", "semantic_head_without_last_layer", "semantic_last_layer"),
        ("center_head", "instance_center_head_without_last_layer", "instance_center_head_last_layer"),
        ("offset_head", "instance_regression_head_without_last_layer", "instance_regression_head_last_layer"),
    ):
        head = getattr(model, ours)
        dw_sep(conv_block, head[0])
        head[1].weight.data = var(last + "/kernel").permute(3, 2, 0, 1).contiguous()
        head[1].bias.data = var(last + "/bias")
    return used


class RecordedBackbone(StandInBackbone):
    """Returns deeplab2's recorded encoder endpoints and keeps the (normalised) image it was given."""

    def __init__(self, endpoints):
        super().__init__([endpoints[k].shape[1] for k in ("res2", "res3", "res4", "res5")])
        self.endpoints, self.seen = endpoints, None

    def forward(self, x):
        self.seen = x
        return [self.endpoints[k] for k in ("res2", "res3", "res4", "res5")]


def test_meta_architecture_reproduces_deeplab2():
    """deeplab2's Panoptic-DeepLab (shrunk widths, weights from its checkpoint) on its own encoder
    endpoints: the image normalisation, the raw outputs at stride 4 and the outputs resized to the
    input size (offsets rescaled) equal deeplab2's to float32 precision."""
    from axial_deeplab.convert.tf_checkpoint import read_tf_checkpoint

    meta = json.loads((FIXTURE / "meta.json").read_text())
    ref = np.load(FIXTURE / "outputs.npz")
    endpoints = {k: torch.from_numpy(ref["encoder_" + k]).permute(0, 3, 1, 2) for k in ("res2", "res3", "res5")}
    endpoints["res4"] = torch.zeros(1, 32, 1, 1)  # not used by the decoders
    o, pd_ = meta["overrides"], "model_options.panoptic_deeplab."
    model = PanopticDeepLab(
        RecordedBackbone(endpoints),
        num_classes=meta["num_classes"],
        **DEEPLAB2_PANOPTIC,
        aspp_channels=o["model_options.decoder.aspp_channels"],
        semantic_decoder_channels=o["model_options.decoder.decoder_channels"],
        semantic_low_level_channels=(
            o[pd_ + "low_level[0].channels_project"],
            o[pd_ + "low_level[1].channels_project"],
        ),
        semantic_head_channels=o[pd_ + "semantic_head.head_channels"],
        instance_decoder_channels=o[pd_ + "instance.instance_decoder_override.decoder_channels"],
        instance_aspp_channels=o[pd_ + "instance.instance_decoder_override.aspp_channels"],
        instance_low_level_channels=(
            o[pd_ + "instance.low_level_override[0].channels_project"],
            o[pd_ + "instance.low_level_override[1].channels_project"],
        ),
        instance_head_channels=o[pd_ + "instance.center_head.head_channels"],
    ).eval()
    variables = read_tf_checkpoint(str(FIXTURE / meta["checkpoint_prefix"]))
    used = _take_deeplab2_decoder(variables, model)
    bookkeeping = ("encoder/", "optimizer/", "global_step/", "save_counter/", "_CHECKPOINTABLE")
    theirs = {k for k in variables if not k.startswith(bookkeeping) and "OPTIMIZER_SLOT" not in k}
    assert used == theirs  # every decoder/head variable has exactly one place, and nothing is left over

    pixels = np.load(FIXTURE / meta["input"]["file"])  # NHWC, 0..255 as deeplab2 takes it
    with torch.no_grad():
        out = model.predict_raw(torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255.0)
    torch.testing.assert_close(
        model.backbone.seen, torch.from_numpy(pixels / 127.5 - 1.0).permute(0, 3, 1, 2).float(), rtol=0, atol=1e-6
    )
    for key, value in out.items():
        want = torch.from_numpy(ref[key])
        want = want.unsqueeze(1) if want.dim() == 3 else want.permute(0, 3, 1, 2)  # center_heatmap is squeezed
        assert want.abs().max() > 0.5  # the reference is not trivially small
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-5, msg=key)
