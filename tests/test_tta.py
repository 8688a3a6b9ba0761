"""Test-time augmentation: identity TTA equals plain inference; flipped and rescaled views are
mapped back correctly (checked with an oracle model that reads the label hidden in its input)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from axial_deeplab.data.targets import PanopticTargetGenerator
from axial_deeplab.models.panoptic_deeplab import PanopticDeepLab
from axial_deeplab.postprocess import panoptic_inference
from axial_deeplab.tta import scaled_size, tta_raw_outputs

THINGS = [2, 3]
NUM_CLASSES = 4


class OracleModel(nn.Module):
    """Reads a panoptic label from the image (R = class / 10, G = instance / 100, rounded) and
    returns the perfect outputs for it: equivariant to flips and (up to rounding) to scaling."""

    def __init__(self):
        super().__init__()
        self.targets = PanopticTargetGenerator(THINGS, sigma=2.0)

    def predict_raw(self, images):
        out = {"semantic_logits": [], "center_heatmap": [], "offset_map": []}
        for image in images:
            sem = (image[0] * 10).round().long().clamp(0, NUM_CLASSES - 1)
            inst = (image[1] * 100).round().long()
            t = self.targets.generate(sem, inst)
            out["semantic_logits"].append(F.one_hot(sem, NUM_CLASSES).permute(2, 0, 1).float() * 8)
            out["center_heatmap"].append(t["center"])
            out["offset_map"].append(t["offset"])
        return {k: torch.stack(v) for k, v in out.items()}


class TinyBackbone(nn.Module):
    """Stand-in features_only backbone: strides 4, 8, 16, 16."""

    def __init__(self):
        super().__init__()
        self.feature_info = type("Info", (list,), {"channels": lambda self: [8, 12, 16, 20]})()
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


def label_image(h=41, w=61):
    """Class map and instance ids encoded as an image; boxes of odd size so centers are exact."""
    sem = torch.zeros(h, w, dtype=torch.long)
    inst = torch.zeros(h, w, dtype=torch.long)
    sem[: h // 3] = 1
    for i, (y, x, bh, bw, c) in enumerate(
        [(5, 3, 9, 11, 2), (14, 3, 9, 11, 3), (20, 30, 15, 21, 2), (25, 14, 11, 15, 3)], start=1
    ):
        sem[y : y + bh, x : x + bw] = c
        inst[y : y + bh, x : x + bw] = i
    image = torch.stack([sem / 10.0, inst / 100.0, torch.zeros(h, w)])
    return image[None], sem, inst


def test_identity_tta_equals_plain_inference():
    torch.manual_seed(0)
    model = PanopticDeepLab(
        TinyBackbone(), num_classes=NUM_CLASSES, thing_ids=THINGS, nms_kernel=5, top_k=30, stuff_area=1
    ).eval()
    with torch.no_grad():
        model.center_head[1].bias.fill_(0.3)
        x = torch.rand(2, 3, 33, 49)
        plain = model(x)
        tta = tta_raw_outputs(model, x, scales=[1.0], flip=False)
        raw = model.predict_raw(x)
    torch.testing.assert_close(tta["semantic_probs"], raw["semantic_logits"].softmax(1), rtol=0, atol=0)
    torch.testing.assert_close(tta["semantic_logits"].softmax(1), raw["semantic_logits"].softmax(1))
    assert torch.equal(tta["center_heatmap"], raw["center_heatmap"])
    assert torch.equal(tta["offset_map"], raw["offset_map"])
    merged = model.postprocess(tta)
    for a, b in zip(plain, merged):
        assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
        assert a["panoptic_seg"][1] == b["panoptic_seg"][1]
        assert len(a["panoptic_seg"][1]) > 2


def test_flip_view_is_mapped_back_exactly():
    image, sem, inst = label_image()
    oracle = OracleModel()
    plain = oracle.predict_raw(image)
    flipped = tta_raw_outputs(oracle, image, scales=[1.0], flip=True)  # mean of identity and mirrored view
    torch.testing.assert_close(flipped["offset_map"], plain["offset_map"])
    torch.testing.assert_close(flipped["center_heatmap"], plain["center_heatmap"])
    torch.testing.assert_close(flipped["semantic_probs"], plain["semantic_logits"].softmax(1))


def test_rescaled_views_give_offsets_in_input_pixels():
    image, sem, inst = label_image()
    oracle = OracleModel()
    plain = oracle.predict_raw(image)["offset_map"][0]
    # Interior of the largest box (15 x 21), away from boundaries where label rounding moves things.
    interior = (inst == 3) & (F.max_pool2d((inst != 3).float()[None, None], 7, 1, 3)[0, 0] == 0)
    assert plain[1][interior].abs().max() >= 7  # offsets large enough for a missing rescale to show
    for scale in (0.5, 1.5):
        view = tta_raw_outputs(oracle, image, scales=[scale], flip=False)["offset_map"][0]
        assert (view[:, interior] - plain[:, interior]).abs().max() < 1.5, scale


def test_multi_scale_flip_tta_recovers_the_panoptic_label():
    image, sem, inst = label_image()
    out = tta_raw_outputs(OracleModel(), image, scales=[0.5, 1.0, 1.5], flip=True)
    result = panoptic_inference(
        out["semantic_logits"],
        out["center_heatmap"],
        out["offset_map"],
        THINGS,
        stuff_area=1,
        nms_kernel=5,
        semantic_is_probs=False,
    )[0]
    pan = result["panoptic"]
    for i in range(1, 5):
        ids, counts = pan[inst == i].unique(return_counts=True)
        assert ids[counts.argmax()] // 1000 == sem[inst == i][0]
        assert counts.max() / (inst == i).sum() > 0.9, i
    assert len(result["instances"]["ids"]) == 4


def test_scaled_sizes_and_bad_scales():
    assert scaled_size((1025, 2049), 0.5) == (513, 1025)
    assert scaled_size((1025, 2049), 1.75) == (1793, 3585)
    with pytest.raises(ValueError, match="scales"):
        tta_raw_outputs(OracleModel(), torch.zeros(1, 3, 8, 8), scales=[0.0])
