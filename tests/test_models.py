"""Axial-ResNet family, registry and checkpoint loading."""

import pytest
import torch
from safetensors.torch import save_file

import axial_deeplab
from axial_deeplab.cli import main as cli_main
from axial_deeplab.layers import PositionSensitiveAxialAttention
from axial_deeplab.models.complexity import attention_madds, build_on_meta, count_complexity
from axial_deeplab.models.weights import CheckpointError

# deeplab2's encoder instance parameter counts (ImageNet head excluded).
DEEPLAB2_COUNTS = {
    "axial_resnet_s_conv": 11_466_912,
    "axial_resnet_l_conv": 43_714_048,
    "axial_resnet_s": 11_565_856,  # Inception stem (deeplab2's axial_deeplab_s encoder)
    "axial_resnet_l": 43_841_920,
}


@pytest.mark.parametrize("name,expected", sorted(DEEPLAB2_COUNTS.items()))
def test_encoder_parameter_counts_match_deeplab2(name, expected):
    model = build_on_meta(name, features_only=True)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - expected) / expected < 0.01, (name, n, expected)


def test_info_prints_parameter_count(capsys):
    assert cli_main(["info", "axial_resnet_s", "--features-only", "--input", "3x64x64"]) == 0
    out = capsys.readouterr().out
    assert f"{DEEPLAB2_COUNTS['axial_resnet_s']:,}" in out
    assert "layer4" in out and "mult-adds" in out


def test_info_rejects_bad_input(capsys):
    assert cli_main(["info", "axial_resnet_s", "--input", "3x64"]) == 2
    assert "--input" in capsys.readouterr().err
    assert cli_main(["info", "no_such_model"]) == 2


def test_resnet50_multiply_adds_match_published_figure():
    # ResNet-50 at 224x224 is 4.1 G multiply-adds (He et al. 2016, "3.8 x 10^9 FLOPs" w/o the stem's
    # exact count; 4.09 G is the widely reproduced figure).
    rows = count_complexity(build_on_meta("resnet50"), (1, 3, 224, 224))
    assert abs(rows["total"]["madds"] / 4.09e9 - 1) < 0.01
    assert rows["total"]["params"] == 25_557_032  # torchvision's resnet50 parameter count


def test_attention_madds_formula_counts_each_matmul():
    layer = PositionSensitiveAxialAttention(32, 32, axis="width", num_heads=4, span=5)
    # per (query, key) pair and head: q.k, q.r^q, k.r^k over d_k=4; a.v, a.r^v over d_v=8
    B, H, W = 2, 6, 9
    expected = B * H * 4 * W * 5 * (3 * 4 + 2 * 8)
    assert attention_madds(layer, (B, 32, H, W)) == expected
    layer.use_value_rpe = False
    assert attention_madds(layer, (B, 32, H, W)) == B * H * 4 * W * 5 * (3 * 4 + 8)


@pytest.mark.parametrize("output_stride", [16, 32])
def test_features_only_contract(output_stride):
    model = axial_deeplab.create_model("axial_resnet_s", features_only=True, output_stride=output_stride, span=5)
    info = model.feature_info
    assert info.channels() == [128, 256, 512, 1024]
    assert info.reduction() == [4, 8, 16, output_stride]
    feats = model(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == info.channels()
    assert [(f.shape[2], f.shape[3]) for f in feats] == [(64 // r, 96 // r) for r in info.reduction()]


BACKBONES = sorted(set(axial_deeplab.list_models()) - set(axial_deeplab.list_models("*deeplab*")))


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_forward_backward(name, quick_init):
    """Every registered backbone (the panoptic models are covered in test_panoptic_model.py)."""
    assert len(BACKBONES) >= 18
    torch.manual_seed(0)
    model = axial_deeplab.create_model(name, num_classes=7, drop_path_rate=0.1)
    x = torch.randn(2, 3, 40, 40, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)


def test_every_registered_backbone_builds_and_counts():
    names = axial_deeplab.list_models("axial_resnet_*") + ["resnet50", "axial26s", "axial50s", "axial50m", "axial50l"]
    assert len(names) >= 17
    for name in names:
        rows = count_complexity(build_on_meta(name, num_classes=10), (1, 3, 64, 64))
        assert rows["total"]["params"] > 1e6 and rows["total"]["madds"] > 1e7


def test_widths_scale_channels():
    chans = {
        s: build_on_meta(f"axial_resnet_{s}", features_only=True).feature_info.channels()[-1]
        for s in ("s", "m", "l", "xl")
    }
    assert chans == {"s": 1024, "m": 1536, "l": 2048, "xl": 4096}


def test_list_models_pattern():
    names = axial_deeplab.list_models("axial_resnet_?")
    assert names == ["axial_resnet_l", "axial_resnet_m", "axial_resnet_s"]


def test_unknown_model_error():
    with pytest.raises(ValueError, match="unknown model"):
        axial_deeplab.create_model("axial_resnet_q")


def test_pretrained_roundtrip_safetensors(tmp_path):
    a = axial_deeplab.create_model("axial26s", num_classes=3, image_size=32).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path))
    b = axial_deeplab.create_model("axial26s", num_classes=3, image_size=32, pretrained=str(path)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_pretrained_mismatch_lists_keys(tmp_path):
    a = axial_deeplab.create_model("axial26s", num_classes=3, image_size=32)
    sd = a.state_dict()
    sd.pop("fc.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        axial_deeplab.create_model("axial26s", num_classes=3, image_size=32, pretrained=str(path))
    assert "fc.weight" in str(e.value) and "extra.weight" in str(e.value) and str(path) in str(e.value)


def test_pretrained_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        axial_deeplab.create_model("axial26s", pretrained=str(path))


def test_missing_checkpoint_file():
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        axial_deeplab.create_model("axial26s", pretrained="nope.pt")


def test_sized_models_accept_layer_and_width_overrides():
    model = build_on_meta("axial_resnet_s", layers=(1, 1, 1, 1), width=0.25, features_only=True)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert model.feature_info.channels() == [64, 128, 256, 512]
