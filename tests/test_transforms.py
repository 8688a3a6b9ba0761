"""Transforms keep image and labels aligned, pad with the right values, and collate batches."""

import numpy as np
import pytest
import torch

from axial_deeplab.data import (
    build_classification_transforms,
    build_eval_transforms,
    build_train_transforms,
    collate_panoptic,
)
from axial_deeplab.data.transforms import (
    IMAGENET_MEAN,
    ColorJitter,
    PadTo,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
)


def _coord_sample(h=12, w=16):
    """Image channels and label maps all encode the pixel coordinates, so alignment is checkable."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([yy / 100.0, xx / 100.0, torch.full((h, w), 0.5)])
    return {
        "image": image,
        "semantic": yy.clone().long(),
        "instance": xx.clone().long() + 1,
        "crowd": (yy + xx) % 3 == 0,
        "image_id": "x",
        "file_name": "x.png",
        "orig_size": (h, w),
    }


def _assert_aligned(s):
    """Where labels are not padding, the image's coordinate channels agree with them."""
    valid = s["semantic"] != 255
    assert torch.equal(valid, s["instance"] > 0)
    assert torch.allclose(s["image"][0][valid] * 100, s["semantic"][valid].float(), atol=1e-4)
    assert torch.allclose(s["image"][1][valid] * 100, (s["instance"][valid] - 1).float(), atol=1e-4)
    assert torch.equal(s["crowd"][valid], (s["semantic"][valid] + s["instance"][valid] - 1) % 3 == 0)
    assert not s["crowd"][~valid].any()


def test_scale_by_two_duplicates_label_pixels():
    s = _coord_sample(5, 7)
    out = RandomScale(2.0, 2.0)(s)
    assert out["image"].shape == (3, 10, 14)
    ref = np.repeat(np.repeat(s["semantic"].numpy(), 2, 0), 2, 1)
    assert np.array_equal(out["semantic"].numpy(), ref)
    assert out["semantic"].dtype == torch.int64 and out["crowd"].dtype == torch.bool
    half = RandomScale(0.5, 0.5)(_coord_sample(12, 16))
    assert half["image"].shape == (3, 6, 8)
    assert np.array_equal(half["semantic"][:, 0].numpy(), np.arange(6) * 2 + 1)  # nearest, half-pixel centres


def test_random_scale_range_and_step():
    g = torch.Generator().manual_seed(0)
    t = RandomScale(0.5, 2.0, step=0.25, generator=g)
    sizes = {t(_coord_sample(8, 8))["image"].shape[-1] for _ in range(60)}
    assert sizes <= {4, 6, 8, 10, 12, 14, 16} and len(sizes) >= 5
    t = RandomScale(0.5, 2.0, generator=g)
    sizes = [t(_coord_sample(20, 20))["image"].shape[-1] for _ in range(100)]
    assert 10 <= min(sizes) < 14 and 36 < max(sizes) <= 40


def test_crop_with_padding():
    g = torch.Generator().manual_seed(1)
    s = _coord_sample(6, 10)
    out = RandomCrop((9, 8), ignore_label=255, generator=g)(s)
    assert out["image"].shape == (3, 9, 8) and out["semantic"].shape == (9, 8)
    pad = out["semantic"] == 255
    assert pad.sum() == 3 * 8  # 3 rows of padding, 2 columns cropped away
    assert torch.all(out["instance"][pad] == 0) and not out["crowd"][pad].any()
    for c in range(3):
        assert torch.allclose(out["image"][c][pad], torch.tensor(IMAGENET_MEAN[c]))
    _assert_aligned(out)
    # no padding needed: a pure crop of the original
    out = RandomCrop(4, generator=g)(s)
    y, x = int(out["semantic"][0, 0]), int(out["instance"][0, 0]) - 1
    assert torch.equal(out["image"], s["image"][:, y : y + 4, x : x + 4])


def test_flip_and_jitter():
    s = _coord_sample()
    out = RandomHorizontalFlip(p=1.0)(s)
    assert torch.equal(out["semantic"], s["semantic"].flip(-1)) and torch.equal(out["image"], s["image"].flip(-1))
    _assert_aligned(out)
    assert RandomHorizontalFlip(p=0.0)(s) is s
    g = torch.Generator().manual_seed(2)
    j = ColorJitter(0.4, 0.4, 0.4, noise_std=0.05, generator=g)(s)
    assert not torch.equal(j["image"], s["image"])
    assert float(j["image"].min()) >= 0 and float(j["image"].max()) <= 1
    assert j["semantic"] is s["semantic"] and j["instance"] is s["instance"]


def test_train_pipeline_keeps_alignment_and_contract():
    g = torch.Generator().manual_seed(3)
    tf = build_train_transforms((10, 14), min_scale=0.5, max_scale=2.0, jitter=False, generator=g)
    for _ in range(30):
        out = tf(_coord_sample())
        assert out["image"].shape == (3, 10, 14) and out["image"].dtype == torch.float32
        assert out["semantic"].dtype == torch.int64 and out["crowd"].dtype == torch.bool
        assert out["orig_size"] == (12, 16) and out["image_id"] == "x"
        # bilinear image vs nearest labels differ by at most a pixel after scaling
        valid = out["semantic"] != 255
        assert (out["image"][0][valid] * 100 - out["semantic"][valid]).abs().max() <= 1.0
    with_jitter = build_train_transforms(8, generator=g)
    assert with_jitter(_coord_sample())["image"].shape == (3, 8, 8)


def test_eval_resize_and_pad():
    s = _coord_sample(12, 16)
    out = build_eval_transforms(long_side=8, divisor=5)(s)
    assert out["valid_size"] == (6, 8)
    assert out["image"].shape == (3, 10, 10)
    assert torch.all(out["semantic"][6:] == 255) and torch.all(out["semantic"][:, 8:] == 255)
    _assert_aligned(PadTo(size=(13, 17))(s))
    keep = Resize(size=(6, 8), resize_labels=False)(s)
    assert keep["image"].shape == (3, 6, 8) and keep["semantic"].shape == (12, 16)
    with pytest.raises(ValueError, match="larger"):
        PadTo(size=(4, 4))(s)


def test_collate():
    a, b = _coord_sample(), _coord_sample()
    b = dict(b, image_id="y")
    batch = collate_panoptic([a, b])
    assert batch["image"].shape == (2, 3, 12, 16) and batch["crowd"].dtype == torch.bool
    assert batch["image_id"] == ["x", "y"] and batch["orig_size"] == [(12, 16), (12, 16)]
    c = _coord_sample(8, 8)
    mixed = collate_panoptic([a, c])
    assert isinstance(mixed["image"], list) and mixed["image"][1].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="keys"):
        collate_panoptic([a, {"image": a["image"]}])


def test_classification_transforms():
    img = torch.rand(3, 40, 60)
    g = torch.Generator().manual_seed(0)
    assert build_classification_transforms(32, train=True, generator=g)(img).shape == (3, 32, 32)
    out = build_classification_transforms(32, train=False)(img)
    assert out.shape == (3, 32, 32)


def test_jitter_leaves_the_crop_padding_at_the_pad_value():
    # a 6x5 image cropped to 10x9: padding on every side of some draws; the jittered pixels
    # are exactly the image's, the rest exactly the pad value, labels aligned with them
    pad = (0.25, 0.5, 0.75)
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        s = {"image": torch.rand(3, 6, 5), "semantic": torch.zeros(6, 5, dtype=torch.long)}
        crop = RandomCrop((10, 9), pad_value=pad, generator=g, photometric=ColorJitter(0.4, 0.4, 0.4, generator=g))
        out = crop(s)
        real = out["semantic"] != 255
        assert int(real.sum()) == 30 and out["image"].shape == (3, 10, 9)
        for c in range(3):
            assert torch.all(out["image"][c][~real] == pad[c])
        inside = out["image"][:, real].reshape(3, 6, 5)
        assert not torch.equal(inside, s["image"])  # jittered
        plain = RandomCrop((10, 9), pad_value=pad, generator=torch.Generator().manual_seed(seed))(s)
        assert torch.equal(plain["semantic"], out["semantic"])  # same place with and without jitter
