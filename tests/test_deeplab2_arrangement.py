"""The Axial-DeepLab backbones arranged as deeplab2's (no stem max-pool, the first block of the
first stage strided, a subsample shortcut where the channels do not change), the block options
(GeLU, he_normal, shortcut kinds), and checkpoints that record the arrangement: an old
checkpoint of ours (stem max-pool, no record) is rebuilt as trained, or refused with the fix.

The DEEPLAB2_* numbers below come from deeplab2's own models (google-research/deeplab2,
``axial_resnet_instances.get_model(name, output_stride=16)``) built in TensorFlow 2 with
tf-keras and called on a 1x65x65x3 input: endpoint shapes, trainable variable counts, and the
kernel shapes of the stem and shortcut convolutions. deeplab2's relative-position tables have
509 rows whatever the span, so ours are built global (``span=None``: 2 * 254 + 1 rows).
"""

import json
import warnings

import pytest
import torch
from engine_testing import save_untrained_checkpoint, tiny_run
from torch import nn

from axial_deeplab.engine import checkpoint as ck
from axial_deeplab.models import create_model
from axial_deeplab.models.axial_resnet import AxialBlock, Subsample, model_arrangements

# deeplab2 endpoints res2..res5 for a 65x65 input, output stride 16 (NHWC -> our C, H, W).
DEEPLAB2_RES_S = [(128, 17, 17), (256, 9, 9), (512, 5, 5), (1024, 5, 5)]
DEEPLAB2_STEM_S = (128, 33, 33)  # deeplab2's stage1/res1: stride 2, no max-pool
# Trainable parameters of the whole encoder (classification_mode, no classifier).
DEEPLAB2_TOTAL = {
    "axial_resnet_s": 11_565_856,  # deeplab2 axial_deeplab_s
    "axial_resnet_m": 25_113_296,  # deeplab2 axial_deeplab_s with width_multiplier 0.75
    "axial_resnet_l": 43_841_920,  # deeplab2 axial_deeplab_l
    "axial_resnet_xl": 170_734_656,  # deeplab2 axial_deeplab_s with width_multiplier 2
    "axial_resnet_s_conv": 11_466_912,  # deeplab2 axial_resnet_s (7x7 conv stem)
}
# Per block (deeplab2 stageK/blockJ = our layer{K-1}.{J-1}) trainable counts, axial_deeplab_s.
DEEPLAB2_BLOCKS_S = {
    "stem": 112_832,
    "stage2": [50_560, 50_560, 50_560],
    "stage3": [183_456, 166_560, 166_560, 166_560],
    "stage4": [661_728] + [595_168] * 5,
    "stage5": [2_503_008, 2_238_816, 2_238_816],
}
DEEPLAB2_BLOCKS_L = {
    "stem": 112_832,
    "stage2": [183_456, 166_560, 166_560],
    "stage3": [661_728] + [595_168] * 3,
    "stage4": [2_503_008] + [2_238_816] * 5,
    "stage5": [9_724_512, 8_671_840, 8_671_840],
}
# Shortcut conv kernels (HWIO) in first blocks; a stage missing here has none (S stage2: subsample).
DEEPLAB2_SHORTCUTS_S = {"stage3": (1, 1, 128, 256), "stage4": (1, 1, 256, 512), "stage5": (1, 1, 512, 1024)}
DEEPLAB2_SHORTCUTS_L = {
    "stage2": (1, 1, 128, 256),
    "stage3": (1, 1, 256, 512),
    "stage4": (1, 1, 512, 1024),
    "stage5": (1, 1, 1024, 2048),
}
DEEPLAB2_STEM_KERNELS = [(3, 3, 3, 64), (3, 3, 64, 64), (3, 3, 64, 128)]


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _hwio(w):
    return tuple(w.permute(2, 3, 1, 0).shape)


def _check_blocks(net, blocks, shortcuts):
    assert _count(net.stem) == blocks["stem"]
    for k in range(2, 6):
        layer = getattr(net, f"layer{k - 1}")
        assert [_count(b) for b in layer] == blocks[f"stage{k}"], f"stage{k}"
        first = layer[0]
        if f"stage{k}" in shortcuts:
            assert isinstance(first.downsample, nn.Sequential)
            assert _hwio(first.downsample[0].weight) == shortcuts[f"stage{k}"]
            assert first.downsample[0].stride == ((1, 1) if k == 5 else (2, 2))
        else:
            assert isinstance(first.downsample, Subsample) and first.downsample.stride == 2
        assert all(b.downsample is None for b in layer[1:])


def test_axial_resnet_s_structure_matches_deeplab2():
    torch.manual_seed(0)
    net = create_model("axial_resnet_s", features_only=True, output_stride=16).eval()
    assert net.arrangement == "deeplab2"
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert _count(net) == DEEPLAB2_TOTAL["axial_resnet_s"]
    _check_blocks(net, DEEPLAB2_BLOCKS_S, DEEPLAB2_SHORTCUTS_S)
    convs = [m for m in net.stem if isinstance(m, nn.Conv2d)]
    assert [_hwio(c.weight) for c in convs] == DEEPLAB2_STEM_KERNELS
    # both attention layers of the first stage's first block stride, the others do not
    assert (net.layer1[0].attn_h.stride, net.layer1[0].attn_w.stride) == (2, 2)
    assert all(b.attn_h.stride == b.attn_w.stride == 1 for b in list(net.layer1[1:]) + list(net.layer4))
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        stem = net.stem(x)
        feats = net(x)
    assert tuple(stem.shape[1:]) == DEEPLAB2_STEM_S
    assert [tuple(f.shape[1:]) for f in feats] == DEEPLAB2_RES_S
    assert net.feature_info.reduction() == [4, 8, 16, 16]


def test_other_sizes_count_and_shortcuts_match_deeplab2():
    with torch.device("meta"):
        nets = {n: create_model(n, features_only=True, output_stride=16) for n in DEEPLAB2_TOTAL}
    for name, total in DEEPLAB2_TOTAL.items():
        assert _count(nets[name]) == total, name
        assert nets[name].feature_info.reduction() == [4, 8, 16, 16]
    _check_blocks(nets["axial_resnet_l"], DEEPLAB2_BLOCKS_L, DEEPLAB2_SHORTCUTS_L)
    conv = nets["axial_resnet_s_conv"]
    assert _hwio(conv.stem[0].weight) == (7, 7, 3, 64) and len(conv.stem) == 3  # conv-BN-ReLU, no max-pool
    assert _hwio(conv.layer1[0].downsample[0].weight) == (1, 1, 64, 128)


def test_maxpool_arrangement_same_keys_other_function():
    torch.manual_seed(0)
    new = create_model("axial_resnet_s", features_only=True, output_stride=16, span=9).eval()
    old = create_model("axial_resnet_s", features_only=True, output_stride=16, span=9, arrangement="maxpool").eval()
    assert isinstance(old.stem[-1], nn.MaxPool2d) and old.layer1[0].downsample is None
    assert old.layer1[0].attn_h.stride == 1 and old.feature_info.reduction() == [4, 8, 16, 16]
    sd = new.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in old.state_dict().items()}
    for v in sd.values():  # break the zero-gamma identity so the two functions can differ
        if v.is_floating_point():
            v.copy_(torch.randn_like(v) * 0.1 + (1.0 if v.dim() == 1 else 0.0))
    old.load_state_dict(sd)
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        a, b = new(x)[-1], old(x)[-1]
    assert a.shape == b.shape and (a - b).abs().max() > 1e-3
    # the port's layouts, ResNet-50 and the tiny model keep the stem max-pool
    for name in ("axial26s", "resnet50", "axial_resnet_tiny", "axial_resnet_s_full"):
        with torch.device("meta"):
            m = create_model(name)
        assert m.arrangement == "maxpool" and isinstance(m.stem[-1], nn.MaxPool2d), name


def test_subsample_and_projection_shortcuts():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 9)
    sub = AxialBlock(16, 8, 16, stride=2, num_heads=2, shortcut="subsample").eval()
    proj = AxialBlock(16, 8, 16, stride=2, num_heads=2, shortcut="projection").eval()
    assert isinstance(sub.downsample, Subsample) and isinstance(proj.downsample, nn.Sequential)
    with torch.no_grad():  # the last BN's gamma starts at 0: the block is act(shortcut(x))
        torch.testing.assert_close(sub(x), torch.relu(x[:, :, ::2, ::2]), rtol=0, atol=0)
    assert proj(x).shape == (2, 16, 5, 5)
    widen = AxialBlock(16, 8, 32, stride=2, num_heads=2, shortcut="subsample")
    assert widen.downsample[0].stride == (2, 2)  # channels change: a strided 1x1 conv either way
    with pytest.raises(ValueError, match="shortcut"):
        AxialBlock(16, 8, 16, stride=2, num_heads=2, shortcut="pool")


def test_gelu_and_he_normal_options():
    torch.manual_seed(0)
    kw = dict(features_only=True, output_stride=16, layers=(1, 1, 1, 1), span=9)
    g = create_model("axial_resnet_s", activation="gelu", **kw)
    assert not any(isinstance(m, nn.ReLU) for m in g.modules())
    assert sum(isinstance(m, nn.GELU) for m in g.modules()) == 3 + 4  # stem convs + one per block
    assert g(torch.randn(1, 3, 33, 33))[-1].shape == (1, 1024, 3, 3)
    he = create_model("axial_resnet_l", conv_init="he_normal", **kw)
    w = he.layer4[0].conv1.weight  # 2048 x 1024: fan_in 1024
    std = (2.0 / 1024) ** 0.5
    assert abs(w.std().item() - std) < 0.02 * std  # truncated at 2 std, rescaled to keep the std
    assert w.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-6
    assert w.abs().max().item() > 1.9 * std
    # the attention layers keep their own initializer (std in_channels ** -0.5, truncated), not he_normal
    qkv = he.layer4[0].attn_h.qkv.weight
    assert qkv.shape[1] == 1024 and qkv.abs().max().item() <= 2 * 1024**-0.5 + 1e-6
    assert qkv.std().item() < 0.9 * std
    with pytest.raises(ValueError, match="activation"):
        create_model("axial_resnet_s", activation="tanh", **kw)
    with pytest.raises(ValueError, match="arrangement"):
        create_model("axial_resnet_s", arrangement="torchvision", **kw)


# ---------------------------------------------------------------- checkpoints record the arrangement
SMALL = {
    "backbone": "axial_resnet_s",
    "layers": [1, 1, 1, 1],
    "width": 0.125,
    "stem": "conv",
    "stem_width": 0.125,
    "num_heads": 2,
    "span": None,
}


def _small_run(**kwargs):
    return tiny_run(model={"kwargs": dict(SMALL, **kwargs)})


def _small_model(num_classes, pretrained=None, **kwargs):
    return create_model(
        "axial_deeplab_s", pretrained=pretrained, num_classes=num_classes, **_small_run(**kwargs)["model"]["kwargs"]
    )


def test_new_checkpoint_records_arrangement(tmp_path):
    from safetensors import safe_open

    path = save_untrained_checkpoint(tmp_path / "new", _small_run())
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["arrangement"]) == {"backbone": "deeplab2"}
    assert ck.weights_arrangement(path) == ({"backbone": "deeplab2"}, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        import axial_deeplab

        model = axial_deeplab.load_model(path)
    assert model_arrangements(model) == {"backbone": "deeplab2"}
    maxpool = _small_model(model.num_classes, arrangement="maxpool")
    with pytest.raises(ValueError, match=r"trained with arrangement='deeplab2'.*model.kwargs.arrangement=deeplab2"):
        ck.load_model_weights(maxpool, path)


def test_old_checkpoint_is_rebuilt_with_the_maxpool_arrangement(tmp_path):
    """A checkpoint written before the record (model.safetensors metadata {"step"} only, config
    without ``arrangement``) was trained with the stem max-pool: it loads as such, with a notice."""
    import yaml
    from safetensors.torch import load_file, save_file

    import axial_deeplab

    path = save_untrained_checkpoint(tmp_path / "old", _small_run(arrangement="maxpool"))
    tensors = load_file(f"{path}/model.safetensors")
    save_file(tensors, f"{path}/model.safetensors", metadata={"step": "0"})  # as saved before the record
    cfg_file = tmp_path / "old" / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    del cfg["model"]["kwargs"]["arrangement"]
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert ck.weights_arrangement(path) == ({"*": "maxpool"}, True)

    with pytest.warns(UserWarning, match=r"arrangement='maxpool'"):
        model = axial_deeplab.load_model(path)
    assert model_arrangements(model) == {"backbone": "maxpool"}
    assert isinstance(model.backbone.stem[-1], nn.MaxPool2d)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tensors.items())
    reference = _small_model(model.num_classes, arrangement="maxpool")
    ck.load_model_weights(reference, path)  # an explicit maxpool model takes it as it is
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.predict_raw(x), reference.eval().predict_raw(x), rtol=0, atol=0)
    # loaded into the deeplab2 arrangement it is refused, with the fix
    new = _small_model(model.num_classes)
    with pytest.raises(ValueError, match=r"saved before checkpoints recorded it.*model.kwargs.arrangement=maxpool"):
        ck.load_model_weights(new, path)
    with pytest.raises(ValueError, match=r"trained with arrangement='maxpool'"):
        _small_model(model.num_classes, pretrained=path)  # whole-model weights: refused too
    # as an initialisation (ImageNet or panoptic backbone weights) it loads, with a warning
    with pytest.warns(UserWarning, match=r"'deeplab2'; build the model with arrangement='maxpool'"):
        _small_model(model.num_classes, pretrained_backbone=f"{path}/model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _small_model(model.num_classes, arrangement="maxpool", pretrained_backbone=f"{path}/model.safetensors")
