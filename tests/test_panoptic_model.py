"""Panoptic-DeepLab meta-architecture: every registered model trains a step on the CPU, the
decoder/head layout follows Panoptic-DeepLab's, outputs are at input size with rescaled offsets,
and eval mode returns the merged panoptic result."""

import pytest
import torch
from torch import nn

from axial_deeplab.data.meta import PanopticMetadata
from axial_deeplab.models import create_model, list_models
from axial_deeplab.models.panoptic_deeplab import PanopticDeepLab, resize_outputs

PANOPTIC_MODELS = ["axial_deeplab_s", "axial_deeplab_m", "axial_deeplab_l", "axial_deeplab_xl", "panoptic_deeplab_r50"]
# Axial-DeepLab paper, Cityscapes table (millions of parameters).
PAPER_PARAMS_M = {"axial_deeplab_s": 12.1, "axial_deeplab_m": 25.9, "axial_deeplab_l": 44.9, "axial_deeplab_xl": 173.0}


def test_all_panoptic_models_are_registered():
    assert set(PANOPTIC_MODELS) <= set(list_models())


@pytest.mark.parametrize("name", PANOPTIC_MODELS)
def test_forward_backward_every_registered_model(name, quick_init):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, thing_ids=[2, 3], span=9)
    x = torch.rand(1, 3, 65, 65)
    out = model(x)
    assert set(out) == {"semantic_logits", "center_heatmap", "offset_map"}
    assert out["semantic_logits"].shape == (1, 4, 65, 65)
    assert out["center_heatmap"].shape == (1, 1, 65, 65)
    assert out["offset_map"].shape == (1, 2, 65, 65)
    loss = sum(v.square().mean() for v in out.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "some parameters get no gradient"
    for part in ("backbone", "semantic_head", "center_head", "offset_head"):
        assert any(p.grad.abs().sum() > 0 for p in getattr(model, part).parameters()), part


def test_parameter_counts_near_the_paper():
    for name, paper in PAPER_PARAMS_M.items():
        with torch.device("meta"):
            model = create_model(name, num_classes=19, thing_ids=list(range(11, 19)))
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(count - paper) / paper < 0.05, (name, count, paper)


def test_decoder_and_head_layout_follow_the_spec():
    with torch.device("meta"):
        model = create_model("axial_deeplab_l", num_classes=19, thing_ids=list(range(11, 19)))
    res = model.backbone.feature_info.channels()  # [res2, res3, res4, res5]
    for decoder, (p3, p2), width in ((model.semantic_decoder, (64, 32), 256), (model.instance_decoder, (32, 16), 128)):
        proj = decoder.aspp.project[0]
        assert (
            decoder.aspp.only_1x1
            and proj.kernel_size == (1, 1)
            and (proj.in_channels, proj.out_channels) == (res[3], 256)
        )
        assert [(p[0].in_channels, p[0].out_channels, p[0].kernel_size) for p in decoder.projections] == [
            (res[1], p3, (1, 1)),
            (res[0], p2, (1, 1)),
        ]
        for fusion, cin in zip(decoder.fusions, (256 + p3, width + p2)):
            dw, pw = fusion[0][0], fusion[1][0]
            assert dw.kernel_size == (5, 5) and dw.groups == cin == dw.in_channels
            assert (pw.in_channels, pw.out_channels, pw.kernel_size) == (cin, width, (1, 1))
            assert isinstance(fusion[0][1], nn.BatchNorm2d) and isinstance(fusion[1][2], nn.ReLU)
    for head, cin, mid, cout in (
        (model.semantic_head, 256, 256, 19),
        (model.center_head, 128, 32, 1),
        (model.offset_head, 128, 32, 2),
    ):
        dw, pw, final = head[0][0][0], head[0][1][0], head[1]
        assert dw.kernel_size == (5, 5) and dw.groups == cin
        assert (pw.in_channels, pw.out_channels) == (cin, mid)
        assert final.kernel_size == (1, 1) and (final.in_channels, final.out_channels) == (mid, cout)
        assert final.bias is not None


class TinyBackbone(nn.Module):
    """Stand-in features_only backbone: strides 4, 8, 16, 16."""

    class _Info(list):
        def channels(self):
            return [8, 12, 16, 20]

        def reduction(self):
            return [4, 8, 16, 16]

    def __init__(self):
        super().__init__()
        self.feature_info = self._Info()
        self.stages = nn.ModuleList(
            [
                nn.Conv2d(3, 8, 3, 4, 1),
                nn.Conv2d(8, 12, 3, 2, 1),
                nn.Conv2d(12, 16, 3, 2, 1),
                nn.Conv2d(16, 20, 3, 1, 1),
            ]
        )

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def test_offsets_are_rescaled_to_input_pixels():
    raw = {
        "semantic_logits": torch.randn(1, 3, 17, 9),
        "center_heatmap": torch.rand(1, 1, 17, 9),
        "offset_map": torch.ones(1, 2, 17, 9),
    }
    out = resize_outputs(raw, (65, 33))
    assert out["semantic_logits"].shape == (1, 3, 65, 33)
    torch.testing.assert_close(out["offset_map"][0, 0], torch.full((65, 33), 4.0))  # (65 - 1) / (17 - 1)
    torch.testing.assert_close(out["offset_map"][0, 1], torch.full((65, 33), 4.0))  # (33 - 1) / (9 - 1)
    torch.testing.assert_close(out["semantic_logits"][..., ::4, ::4], raw["semantic_logits"])  # aligned grid


@pytest.mark.parametrize("size", [(65, 65), (64, 96)])
def test_stand_in_backbone_output_sizes_and_eval_contract(size):
    torch.manual_seed(0)
    meta = PanopticMetadata("toy", ["a", "b", "c", "d"], [2, 3], label_divisor=100, ignore_label=255)
    model = PanopticDeepLab(
        TinyBackbone(), num_classes=4, thing_ids=meta.thing_ids, label_divisor=100, nms_kernel=7, top_k=20, stuff_area=1
    )
    x = torch.rand(2, 3, *size)
    train_out = model(x)
    assert train_out["semantic_logits"].shape == (2, 4, *size)
    model.eval()
    with torch.no_grad():
        model.center_head[1].bias.fill_(0.5)  # heat above threshold everywhere -> some centers
        results = model(x, return_instance_masks=True)
        raw = model.predict_raw(x)
    assert isinstance(results, list) and len(results) == 2
    for b, r in enumerate(results):
        assert r["sem_seg"].shape == (4, *size)
        torch.testing.assert_close(r["sem_seg"].sum(0), torch.ones(size))
        torch.testing.assert_close(r["sem_seg"], raw["semantic_logits"][b].softmax(0))
        pan, segments = r["panoptic_seg"]
        assert pan.shape == size and pan.dtype == torch.int64
        assert {s["id"] for s in segments} == set(pan.unique().tolist()) - {-1}
        for s in segments:
            assert set(s) == {"id", "category_id", "isthing", "score", "area"}
            assert s["isthing"] == (s["category_id"] in (2, 3)) and s["id"] // 100 == s["category_id"]
        inst = r["instances"]
        assert inst["masks"].shape == (len(inst["ids"]), *size) and inst["masks"].dtype == torch.bool
        assert ((inst["scores"] >= 0) & (inst["scores"] <= 1)).all()


def test_metadata_backbone_override_and_aspp(quick_init):
    meta = PanopticMetadata("toy", ["a", "b", "c"], [1], label_divisor=256, ignore_label=200)
    model = create_model("axial_deeplab_s", metadata=meta, backbone="resnet50", use_aspp=True)
    assert model.num_classes == 3 and model.thing_ids == [1] and model.label_divisor == 256
    assert model.ignore_label == 200 and model.class_names == ["a", "b", "c"]
    assert type(model.backbone).__name__ == "AxialResNet" and not hasattr(model.backbone.layer1[0], "attn_h")
    assert not model.semantic_decoder.aspp.only_1x1 and len(model.semantic_decoder.aspp.branches) == 4
    out = model(torch.rand(2, 3, 33, 33))  # ASPP's image-pooling BN needs a batch of 2 in training
    assert out["semantic_logits"].shape == (2, 3, 33, 33)
    with pytest.raises(ValueError, match="thing_ids"):
        PanopticDeepLab(TinyBackbone(), num_classes=3, thing_ids=[3])
    with pytest.raises(ValueError, match="feature_info"):
        PanopticDeepLab(nn.Conv2d(3, 3, 1), num_classes=3)
