"""timm's model API on our backbones: first without timm (the methods' meaning), then through timm's
own registry, create_model, features_only wrapper, data config and optimizer factory."""

import math
import re

import pytest
import torch
from safetensors.torch import save_file

import axial_deeplab
from axial_deeplab.models.axial_swidernet import HybridAxialResNet
from axial_deeplab.models.complexity import build_on_meta
from axial_deeplab.models.timm_api import DEEPLAB2_NORM, IMAGENET_NORM, RAW_RGB, TIMM_MODELS, pretrained_cfg_for

X64 = (2, 3, 64, 64)


def _small(**kw):
    """A 4-stage Axial-ResNet small enough for CPU tests (global attention at 64x64)."""
    torch.manual_seed(0)
    return axial_deeplab.create_model("axial_resnet_tiny", **kw)


def _hybrid_with_decoder(**kw):
    """MaX-DeepLab-L's layout (wide ResNet + stacked decoder) at a toy width."""
    torch.manual_seed(0)
    return HybridAxialResNet(
        layers=(1, 1, 1, 1),
        backbone_type="wider_resnet",
        width_multiplier=0.0625,
        stem_width_multiplier=0.0625,
        attention_bottleneck_expansion=4,
        key_expansion=2,
        value_expansion=4,
        num_heads=2,
        backbone_decoder_num_stacks=1,
        **kw,
    ).eval()


# -- without timm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_small, _hybrid_with_decoder], ids=["axial_resnet", "hybrid_decoder"])
def test_forward_is_forward_head_of_forward_features(make):
    model = make().eval()
    x = torch.rand(X64)
    feats = model.forward_features(x)
    assert feats.dim() == 4 and feats.shape[1] == model.num_features
    assert torch.allclose(model(x), model.forward_head(feats), atol=1e-6)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    final, inter = model.forward_intermediates(x)
    assert torch.allclose(final, feats, atol=1e-6)  # the final features are what the head reads
    assert [t.shape[1] for t in inter] == model.feature_info.channels()


def test_reset_classifier_semantics():
    model = _small().eval()
    x = torch.rand(X64)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features) and model.num_classes == 0
    model.reset_classifier(10)
    assert model(x).shape == (2, 10) and model.get_classifier().out_features == 10
    assert model.get_classifier(name_only=True) == "fc"
    model.reset_classifier(0, "")  # no pooling, no classifier: the unpooled map
    assert torch.allclose(model(x), model.forward_features(x))
    with pytest.raises(ValueError, match="num_classes=0"):
        model.reset_classifier(5, "")
    model.reset_classifier(3, "max")
    assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "catavgmax")


def test_forward_intermediates_indices():
    model = _small().eval()
    x = torch.rand(X64)
    final, every = model.forward_intermediates(x)
    assert len(every) == 4 and [x.shape[-1] * r for x, r in zip(every, model.feature_info.reduction())] == [64] * 4
    last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(last2, every[2:]))
    picked = model.forward_intermediates(x, indices=(0, -1), intermediates_only=True)
    assert torch.equal(picked[0], every[0]) and torch.equal(picked[1], every[3])
    early_final, early = model.forward_intermediates(x, indices=(1,), stop_early=True)
    assert torch.equal(early_final, every[1]) and torch.equal(early[0], every[1])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=(4,))
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_features_only_out_indices():
    full = _small(features_only=True).eval()
    part = _small(features_only=True, out_indices=(1, 2)).eval()
    x = torch.rand(X64)
    every, picked = full(x), part(x)
    assert len(every) == 4 and len(picked) == 2
    assert torch.equal(picked[0], every[1]) and torch.equal(picked[1], every[2])
    assert part.feature_info.channels() == full.feature_info.channels()[1:3] == [t.shape[1] for t in picked]
    assert part.feature_info.reduction() == [8, 16] and len(part.feature_info) == 4
    with pytest.raises(ValueError, match="features_only"):
        _small(out_indices=(1,))
    with pytest.raises(RuntimeError, match="features_only"):
        part.reset_classifier(10)


def test_grad_checkpointing_checkpoints_every_block_and_keeps_gradients_and_statistics(monkeypatch):
    import copy

    torch.manual_seed(0)
    plain = _small(layers=(2, 1, 1, 1)).train()
    model = copy.deepcopy(plain)
    x = torch.rand(X64)
    plain(x).sum().backward()

    from axial_deeplab.models import timm_api

    calls = []
    real = timm_api.run_recomputed

    def counting(module, fn, x):
        calls.append(fn)
        return real(module, fn, x)

    monkeypatch.setattr(timm_api, "run_recomputed", counting)
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        model.eval()(x)
    assert calls == []  # nothing to save memory for without gradients
    model.train()(x).sum().backward()
    blocks = [b for name in model._stage_names for b in getattr(model, name)]
    assert len(calls) == len(blocks)
    grads = dict(plain.named_parameters())
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n].grad, rtol=1e-5, atol=1e-7), n
    # BatchNorm saw the batch once (timm's checkpointing would count it twice)
    for (n, a), b in zip(plain.named_buffers(), model.buffers()):
        assert torch.equal(a, b), n
    model.set_grad_checkpointing(False)
    calls.clear()
    model(x).sum().backward()
    assert calls == []


@pytest.mark.parametrize("make,prefix", [(_small, "layer"), (_hybrid_with_decoder, "stage")])
def test_group_matcher_covers_stem_and_blocks(make, prefix):
    model = make()
    for coarse in (True, False):
        groups = model.group_matcher(coarse=coarse)
        names = [n for n, _ in model.named_parameters() if not n.startswith("fc.")]
        for n in names:
            in_stem = re.match(groups["stem"], n)
            in_blocks = any(re.match(p, n) for p, _ in groups["blocks"])
            assert bool(in_stem) != bool(in_blocks), n
        assert any(n.startswith(prefix) for n in names)


def test_pretrained_cfgs_name_real_modules_and_preprocessing():
    # our ImageNet recipe feeds [0, 1] RGB unnormalised; the port's weights expect ImageNet's
    # normalisation, deeplab2's x / 127.5 - 1
    assert {k: pretrained_cfg_for("axial_resnet_s")[k] for k in ("mean", "std")} == RAW_RGB
    assert {k: pretrained_cfg_for("axial26s")[k] for k in ("mean", "std")} == IMAGENET_NORM
    assert {k: pretrained_cfg_for("axial_swidernet_1_1_1")[k] for k in ("mean", "std")} == DEEPLAB2_NORM
    assert pretrained_cfg_for("axial_deeplab_s") is None  # panoptic models are not classifiers
    assert set(TIMM_MODELS) <= set(axial_deeplab.list_models())
    for name in (
        "axial_resnet_s",
        "axial_resnet_l_conv",
        "axial_resnet_s_full",
        "resnet50",
        "axial26s",
        "axial_swidernet_1_1_1",
        "max_deeplab_l_backbone",
        "resnet50_beta",
    ):
        model = build_on_meta(name)
        keys = model.state_dict().keys()
        cfg = model.pretrained_cfg
        assert cfg["first_conv"] + ".weight" in keys and cfg["classifier"] + ".weight" in keys, name
        assert model.stem[0].in_channels == cfg["input_size"][0]


def test_in_chans_and_drop_rate():
    model = _small(in_chans=1, drop_rate=0.5)
    assert model.stem[0].in_channels == 1
    model.train()
    x = torch.rand(2, 1, 64, 64)
    feats = model.forward_features(x)
    assert not torch.equal(model.forward_head(feats, pre_logits=True), model.forward_head(feats, pre_logits=True))
    model.eval()
    assert torch.equal(model.forward_head(feats, pre_logits=True), model.forward_head(feats, pre_logits=True))


def test_hybrid_prune_drops_decoder():
    model = _hybrid_with_decoder()
    x = torch.rand(X64)
    _, every = model.forward_intermediates(x)
    kept = model.prune_intermediate_layers((0, 1))
    assert kept == [0, 1] and model.decoder_plan == []
    assert not any(n.startswith("decoder_") for n, _ in model.named_parameters())
    assert len(model.stage4) == 0 and len(model.stage5) == 0
    out = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(out, every[:2]))
    assert model(x).shape[1] == model.num_features == model.feature_info[1]["num_chs"]


# -- through timm ---------------------------------------------------------------------------------


@pytest.fixture
def timm():
    timm = pytest.importorskip("timm")
    axial_deeplab.models.register_timm_models()
    return timm


def test_acceptance_features_only_out_indices(timm, quick_init):
    torch.manual_seed(0)
    feats = timm.create_model("axial_deeplab.axial_resnet_s", features_only=True, out_indices=(1, 2)).eval()
    torch.manual_seed(0)
    full = timm.create_model("axial_deeplab.axial_resnet_s").eval()
    x = torch.rand(X64)
    out = feats(x)
    assert len(out) == 2
    assert feats.feature_info.channels() == [t.shape[1] for t in out] == [256, 512]
    assert feats.feature_info.reduction() == [8, 16]
    for o, r in zip(out, feats.feature_info.reduction()):
        assert o.shape[-1] <= math.ceil(64 / r) + 1
    # timm's FeatureGetterNet over our forward_intermediates, later stages and head pruned
    from timm.models._features import FeatureGetterNet

    assert isinstance(feats, FeatureGetterNet)
    assert len(feats.model.layer3) > 0 and len(feats.model.layer4) == 0  # res4 is layer3
    ref = full.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out, ref))


def test_acceptance_model_api_as_timm_checks_it(timm, quick_init):
    """timm's test_model_default_cfgs / forward_intermediates expectations, at 64x64."""
    model = timm.create_model("axial_deeplab.axial_resnet_s").eval()
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    x = torch.rand(X64)
    feats = model.forward_features(x)  # unpooled; the pool size at 224 is cfg["pool_size"]
    assert feats.shape == (2, model.num_features, 2, 2) and cfg["pool_size"] == (224 // 32, 224 // 32)
    logits = model(x)
    assert logits.shape == (2, 1000)
    assert torch.allclose(model.forward_head(feats), logits, atol=1e-6)
    final, inter = model.forward_intermediates(x)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert info.channels() == [t.shape[1] for t in inter]
    assert torch.allclose(model.forward_head(final), logits, atol=1e-6)
    model.reset_classifier(0)
    out = model(x)
    assert out.shape == (2, model.num_features)
    model.reset_classifier(0, "")
    assert model(x).dim() == 4
    model.reset_classifier(10, "avg")
    assert model(x).shape == (2, 10)


def test_timm_backward_reaches_every_parameter(timm, quick_init):
    model = timm.create_model("axial_deeplab.axial_resnet_tiny", num_classes=42)
    out = model(torch.rand(X64))
    out.mean().backward()
    assert out.shape[-1] == 42
    assert all(p.grad is not None for p in model.parameters())


def test_timm_registry_listing_and_data_config(timm):
    assert "axial_deeplab.axial_resnet_s" in timm.list_models("axial*", include_tags=True)
    axial_deeplab.models.register_timm_models()  # idempotent
    assert timm.list_models("axial*") == ["axial_deeplab"]
    model = timm.create_model("axial_deeplab.axial_resnet_tiny")
    data = timm.data.resolve_data_config({}, model=model)
    assert data["mean"] == (0.0, 0.0, 0.0) and data["std"] == (1.0, 1.0, 1.0)
    assert data["interpolation"] == "bilinear" and data["crop_pct"] == 0.875
    # our own create_model carries the same cfg
    assert timm.data.resolve_data_config({}, model=axial_deeplab.create_model("axial_resnet_tiny")) == data


def test_timm_refuses_what_it_cannot_honour(timm):
    with pytest.raises(TypeError, match="act_layer, img_size"):
        timm.create_model("axial_deeplab.axial_resnet_tiny", act_layer="gelu", img_size=64)
    with pytest.raises(ValueError, match="no published weights"):
        timm.create_model("axial_deeplab.axial_resnet_tiny", pretrained=True)
    with pytest.raises(ValueError, match="axial_deeplab.axial_resnet_s"):
        timm.create_model("axial_deeplab")
    with pytest.raises(ValueError, match="unknown model"):
        timm.create_model("axial_deeplab.axial_deeplab_s")


def test_timm_kwargs_and_local_weights(timm, tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("axial_deeplab.axial_resnet_tiny", drop_path_rate=0.1, drop_rate=0.2, global_pool="avgmax")
    path = tmp_path / "model.safetensors"
    save_file(src.state_dict(), str(path))
    same = timm.create_model(
        "axial_deeplab.axial_resnet_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), same.state_dict().values()))
    # a new head: timm drops the checkpoint's classifier (cfg 'classifier') for num_classes != 1000
    new_head = timm.create_model(
        "axial_deeplab.axial_resnet_tiny", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path))
    )
    assert new_head.fc.out_features == 10
    assert torch.equal(new_head.stem[0].weight, src.stem[0].weight)
    via_path = timm.create_model("axial_deeplab.axial_resnet_tiny", checkpoint_path=str(path))
    assert torch.equal(via_path.fc.weight, src.fc.weight)
    # in_chans=1 from 3-channel weights: timm sums the first conv over its input channels
    gray = timm.create_model(
        "axial_deeplab.axial_resnet_tiny", pretrained=True, in_chans=1, pretrained_cfg_overlay=dict(file=str(path))
    )
    assert torch.allclose(gray.stem[0].weight, src.stem[0].weight.sum(1, keepdim=True))


def test_timm_layer_decay_uses_group_matcher(timm):
    model = timm.create_model("axial_deeplab.axial_resnet_tiny")
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    # stem + 4 one-block stages + the head: six layer-wise scales
    assert len(scales) == 6 and scales[-1] == 1.0
