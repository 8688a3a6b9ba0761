"""The backbones of deeplab2's published checkpoints: Axial-SWideRNet, the MaX-DeepLab-S backbone,
Axial-ResNet-50 (MaX-S with GeLU), ResNet-50-beta. Structure and parameter counts; numerics
against deeplab2's own outputs are the converter's tests."""

import pytest
import torch
from torch import nn

import axial_deeplab
from axial_deeplab.models import create_model
from axial_deeplab.models.axial_resnet import AxialBlock, ConvBottleneck
from axial_deeplab.models.axial_swidernet import BasicBlock, HybridAxialResNet

# Facts measured on deeplab2 (HEAD) in TensorFlow: its instances built with
# axial_resnet_instances.get_model(name, backbone_layer_multiplier=...) (kMaX's
# pixel_encoder.axial_resnet.get_model for axial_resnet50), counted as deeplab2's own tests count,
# the sum of the trainable weights (no classification head); BN moving statistics are the
# non-trainable weights.
DEEPLAB2_COUNTS = {
    # ours: (deeplab2 trainable, deeplab2 non-trainable)
    "max_deeplab_s_backbone": (41_343_424, 144_384),
    "axial_resnet50": (41_343_424, 144_384),
    "axial_swidernet_1_1_1": (136_399_392, 193_376),
    "axial_swidernet_1_1_3": (393_935_520, 593_888),
    "axial_swidernet_1_1_4_5": (570_346_912, 862_944),
    "max_deeplab_l_backbone": (175_115_392, 246_208),
    "resnet50_beta": (23_631_808, None),  # deeplab2's axial_resnet_instances_test
}
# Trainable weights per top-level layer of deeplab2's instances (same TensorFlow build);
# max_deeplab_l_backbone's stem and stages have exactly axial_swidernet's counts.
DEEPLAB2_STAGE_COUNTS = {
    "max_deeplab_s_backbone": {
        "stem": 112_832,
        "stage2": 236_288,
        "stage3": 1_219_584,
        "stage4": 12_706_528,
        "stage5": 27_068_192,
    },
    "axial_swidernet_1_1_1": {
        "stem": 1_856,
        "stage1": 820_992,
        "stage2": 3_280_384,
        "stage3": 27_276_288,
        "stage4": 27_831_488,
        "stage5": 77_188_384,
    },
    "max_deeplab_l_backbone": {
        "stem": 1_856,
        "stage1": 820_992,
        "stage2": 3_280_384,
        "stage3": 27_276_288,
        "stage4": 27_831_488,
        "stage5": 77_188_384,
        "decoder_stage1": 4_720_640,
        "decoder_stage2": 1_180_672,
        "decoder_stage3": 4_720_640,
        "decoder_stage4": 25_728_096,
        "decoder_stage1_resized_fuse": 1_049_600,
        "decoder_stage2_resized_fuse": 131_584,
        "decoder_stage3_resized_fuse": 132_096,
        "decoder_stage4_resized_fuse": 1_052_672,
    },
}

TINY = dict(width_multiplier=0.0625, stem_width_multiplier=0.0625)


def _meta(name, **kwargs):
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(DEEPLAB2_COUNTS))
def test_full_size_parameter_counts_equal_deeplab2(name):
    trainable, moving = DEEPLAB2_COUNTS[name]
    net = _meta(name, features_only=True, output_stride=16)
    assert _count(net) == trainable
    if moving is not None:  # BN running mean + variance
        assert sum(b.numel() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))) == moving
    clf = _meta(name, num_classes=1000)  # the classification head comes on top
    assert _count(clf) - _count(clf.fc) == trainable
    os32 = _count(_meta(name, features_only=True, output_stride=32))
    if name == "max_deeplab_l_backbone":  # its decoder takes one more step each way, as deeplab2's
        assert os32 > trainable
    else:
        assert os32 == trainable


@pytest.mark.parametrize(
    "name,kwargs,trainable",
    [
        # deeplab2 (TensorFlow) at shrunk widths: rounding of channels and block counts
        (
            "axial_swidernet_1_1_1",
            dict(width_multiplier=0.03125, stem_width_multiplier=0.03125, backbone_layer_multiplier=0.5),
            71_778,
        ),
        ("max_deeplab_s_backbone", dict(width_multiplier=0.03125, stem_width_multiplier=0.03125), 88_934),
        (
            "max_deeplab_l_backbone",
            dict(width_multiplier=0.0625, stem_width_multiplier=0.0625, backbone_layer_multiplier=0.34),
            416_676,
        ),
    ],
)
def test_shrunk_counts_equal_deeplab2(name, kwargs, trainable):
    assert _count(_meta(name, features_only=True, output_stride=16, **kwargs)) == trainable


def test_plain_resnet_type_count_equals_deeplab2_resnet50():
    with torch.device("meta"):  # deeplab2 'resnet50': 7x7 stem without max-pool, 23,508,032
        net = HybridAxialResNet(backbone_type="resnet", use_axial_beyond_stride=0, features_only=True)
    assert _count(net) == 23_508_032 and net.stem[0].kernel_size == (7, 7)


@pytest.mark.parametrize("name", sorted(DEEPLAB2_STAGE_COUNTS))
def test_per_stage_counts_equal_deeplab2(name):
    net = _meta(name, features_only=True, output_stride=16)
    assert {k: _count(getattr(net, k)) for k in DEEPLAB2_STAGE_COUNTS[name]} == DEEPLAB2_STAGE_COUNTS[name]


def test_max_deeplab_s_backbone_structure():
    net = _meta("max_deeplab_s_backbone", features_only=True, output_stride=16)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert [len(getattr(net, f"stage{i}")) for i in (2, 3, 4, 5)] == [3, 4, 6, 3]
    assert not hasattr(net, "stage1")
    kinds = [[type(b) for b in getattr(net, f"stage{i}")] for i in (2, 3, 4, 5)]
    assert kinds[0] == kinds[1][:3] == [ConvBottleneck] * 3
    assert kinds[2] == [ConvBottleneck] + [AxialBlock] * 5  # attention from stride 16 on
    assert kinds[3] == [AxialBlock] * 3
    b = net.stage5[0]  # F = 512: 1024 in, 1x1 to 2F, attention key F value 2F, 1x1 to 4F
    assert (b.conv1.in_channels, b.conv1.out_channels) == (1024, 1024)
    assert (b.attn_h.in_channels, b.attn_h.key_channels, b.attn_h.out_channels) == (1024, 512, 1024)
    assert b.conv2.out_channels == 2048 and b.attn_h.stride == 1  # output stride 16: no striding
    assert net.stage4[0].conv3x3.stride == (2, 2)
    assert b.attn_h.table_rows == 509 and b.attn_h.span is None
    bn = net.stem[1]
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)  # TensorFlow's BN defaults in deeplab2
    assert not any(isinstance(m, nn.GELU) for m in net.modules())
    gelu = _meta("axial_resnet50", features_only=True)
    assert not any(isinstance(m, nn.ReLU) for m in gelu.modules())
    assert any(isinstance(m, nn.GELU) for m in gelu.modules())


def test_axial_swidernet_structure():
    net = _meta("axial_swidernet_1_1_4_5", features_only=True, output_stride=16)
    assert [len(getattr(net, f"stage{i}")) for i in range(1, 6)] == [3, 13, 27, 13, 13]
    assert isinstance(net.stem[0], nn.Conv2d) and net.stem[0].kernel_size == (3, 3) and net.stem[0].stride == (2, 2)
    for i in (1, 2, 3):
        assert all(isinstance(b, BasicBlock) for b in getattr(net, f"stage{i}"))
    assert isinstance(net.stage4[0], BasicBlock) and net.stage4[0].conv1.stride == (2, 2)
    assert all(isinstance(b, AxialBlock) for b in list(net.stage4[1:]) + list(net.stage5))
    b = net.stage5[0]  # F = 512: 1x1 to 4F, attention key 2F value 4F, 1x1 to 4F
    assert (b.conv1.in_channels, b.conv1.out_channels, b.conv2.out_channels) == (1024, 2048, 2048)
    assert (b.attn_h.key_channels, b.attn_h.out_channels, b.attn_w.out_channels) == (1024, 2048, 2048)
    a = net.stage4[1]
    assert (a.attn_h.in_channels, a.attn_h.key_channels, a.attn_h.out_channels) == (1024, 512, 1024)
    assert net.stage1[0].conv1.out_channels == 128  # F = 32 x stem width at stride 2


def test_max_deeplab_l_decoder_follows_deeplab2():
    net = _meta("max_deeplab_l_backbone", output_stride=16)
    # deeplab2 at output stride 16: strides 8, 4, 8, 16, each fusing the current feature with the
    # last two at that stride (decoder_stage4 runs the stride-32 stage's attention block)
    assert net.decoder_plan == [
        ("decoder_stage1", 8, ["stage3"]),
        ("decoder_stage2", 4, ["stage2"]),
        ("decoder_stage3", 8, ["stage3", "decoder_stage1"]),
        ("decoder_stage4", 16, ["stage5"]),
    ]
    # deeplab2 projects only the current feature (channels differ); same-channel features are resized
    for i in range(1, 5):
        kinds = [type(p) for p in getattr(net, f"decoder_stage{i}_resized_fuse").projections]
        assert kinds == [nn.Sequential] + [nn.Identity] * (len(kinds) - 1)
    assert [type(getattr(net, f"decoder_stage{i}")[0]) for i in range(1, 5)] == [BasicBlock] * 3 + [AxialBlock]
    assert net.num_features == 2048


def test_max_deeplab_l_features_are_the_axial_swidernet_stages():
    torch.manual_seed(0)
    swr = create_model("axial_swidernet_1_1_1", features_only=True, output_stride=16, **TINY).eval()
    big = create_model("max_deeplab_l_backbone", num_classes=4, **TINY).eval()
    missing, unexpected = big.load_state_dict(swr.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("decoder_stage", "fc.")) for k in missing)
    big.features_only = True
    x = torch.randn(1, 3, 49, 33)
    with torch.no_grad():
        for a, b in zip(swr(x), big(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    big.features_only = False
    with torch.no_grad():
        assert big.forward_decoder(x).shape == (1, 128, 4, 3)  # the decoder returns to stride 16


def test_max_deeplab_l_classification_trains_through_the_decoder():
    torch.manual_seed(0)
    net = create_model("max_deeplab_l_backbone", num_classes=3, **TINY).train()
    logits = net(torch.randn(2, 3, 33, 41))
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert net.decoder_stage4_resized_fuse.projections[0][0].weight.grad.abs().sum() > 0
    assert net.stage2[0].downsample[0].weight.grad.abs().sum() > 0  # (residual branches start at 0)


def test_convolutions_beyond_the_output_stride_dilate():
    net = _meta("resnet50_beta", features_only=True, output_stride=16)  # deeplab2: atrous rate 2 in stage 5
    assert [b.conv3x3.dilation for b in net.stage5] == [(1, 1), (2, 2), (2, 2)]
    assert net.stage5[0].conv3x3.stride == (1, 1)
    net = create_model("resnet50_beta", features_only=True, output_stride=16, **TINY).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 33, 33))[-1].shape[-2:] == (3, 3)


@pytest.mark.parametrize(
    "name,expected",
    [
        # deeplab2: keep = 1 - (1 - 0.8) * stage / 4 with stage = log2(stride the block runs at) - 1,
        # only at stride >= drop_path_beyond_stride (16 for MaX-S, 4 for SWideRNet)
        (
            "max_deeplab_s_backbone",
            {"stage2": [0] * 3, "stage3": [0] * 4, "stage4": [0] + [0.15] * 5, "stage5": [0.15, 0.2, 0.2]},
        ),
        (
            "axial_swidernet_1_1_1",
            {
                "stage1": [0] * 3,
                "stage2": [0, 0.05, 0.05],
                "stage3": [0.05] + [0.1] * 5,
                "stage4": [0.1, 0.15, 0.15],
                "stage5": [0.15, 0.2, 0.2],
            },
        ),
    ],
)
def test_drop_path_follows_deeplab2_linear_schedule(name, expected):
    net = _meta(name, features_only=True, output_stride=16, drop_path_rate=0.2)
    got = {k: [round(b.drop_path.rate, 6) for b in getattr(net, k)] for k in expected}
    assert got == expected


@pytest.mark.parametrize("name", ["max_deeplab_s_backbone", "axial_swidernet_1_1_1", "axial_resnet50"])
@pytest.mark.parametrize("output_stride", [16, 32])
def test_features_strides_and_channels(name, output_stride):
    torch.manual_seed(0)
    net = create_model(name, features_only=True, output_stride=output_stride, **TINY).eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        feats = net(x)
    last = 16 if output_stride == 16 else 32
    assert net.feature_info.reduction() == [4, 8, 16, last]
    assert net.feature_info.module_name() == ["stage2", "stage3", "stage4", "stage5"]
    assert [f.shape[1] for f in feats] == net.feature_info.channels() == [16, 32, 64, 128]
    sizes = [(-(-65 // r), -(-49 // r)) for r in (4, 8, 16, last)]  # "same" padding: ceil(H / stride)
    assert [tuple(f.shape[-2:]) for f in feats] == sizes
    assert all(torch.isfinite(f).all() for f in feats)


def test_tiny_forward_backward_classification():
    torch.manual_seed(0)
    net = create_model("axial_swidernet_1_1_1", num_classes=7, drop_path_rate=0.2, **TINY).train()
    for m in net.modules():  # zero-initialised residual gammas would hide the branches' gradients
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    logits = net(torch.randn(2, 3, 33, 33))
    assert logits.shape == (2, 7)
    logits.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert net.stage5[-1].attn_w.value_table.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone", ["max_deeplab_s_backbone", "axial_swidernet_1_1_1", "max_deeplab_l_backbone"])
def test_as_panoptic_deeplab_backbones(backbone):
    torch.manual_seed(0)
    model = create_model("panoptic_deeplab_r50", backbone=backbone, num_classes=5, thing_ids=[3, 4], **TINY)
    assert isinstance(model.backbone, HybridAxialResNet) and model.backbone.output_stride == 16
    model.train()
    out = model.predict_raw(torch.rand(2, 3, 49, 65))
    assert out["semantic_logits"].shape == (2, 5, 49, 65)
    assert out["offset_map"].shape == (2, 2, 49, 65) and out["center_heatmap"].shape == (2, 1, 49, 65)
    sum(v.float().mean() for v in out.values()).backward()
    assert model.backbone.stage2[0].conv1.weight.grad is not None
    # every trainable parameter is used (DistributedDataParallel's requirement); MaX-L's decoder,
    # which Panoptic-DeepLab does not read, is carried frozen
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval()
    with torch.no_grad():
        (result,) = model(torch.rand(1, 3, 33, 33))
    assert result["panoptic_seg"][0].shape == (33, 33)


@pytest.mark.parametrize("name", ["max_deeplab_l_backbone", "axial_swidernet_1_1_1"])
def test_imagenet_weights_load_as_panoptic_backbone(tmp_path, name):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    clf = create_model(name, num_classes=10, output_stride=16, **TINY).eval()
    path = str(tmp_path / "imagenet.safetensors")
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, path)
    model = create_model("panoptic_deeplab_r50", backbone=name, pretrained_backbone=path, num_classes=3, **TINY)
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in clf.state_dict().items() if not k.startswith("fc."))
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        model.backbone.eval()
        for a, b in zip(clf.forward_intermediates(x, intermediates_only=True), model.backbone(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_registered_and_listed():
    names = set(axial_deeplab.list_models())
    assert {
        "axial_swidernet_1_1_1",
        "axial_swidernet_1_1_3",
        "axial_swidernet_1_1_4_5",
        "max_deeplab_s_backbone",
        "max_deeplab_l_backbone",
        "axial_resnet50",
        "resnet50_beta",
    } <= names


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="output_stride"):
        _meta("max_deeplab_s_backbone", output_stride=8)
    with pytest.raises(ValueError, match="expanded bottleneck"):
        _meta("axial_swidernet_1_1_1", use_axial_beyond_stride=0)
    with pytest.raises(ValueError, match="backbone_type"):
        HybridAxialResNet(backbone_type="mobilenet")
    with pytest.raises(ValueError, match="drop_path_schedule"):
        _meta("max_deeplab_s_backbone", drop_path_schedule="cosine")
