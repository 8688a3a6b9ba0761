"""Panoptic-DeepLab targets against a per-instance loop written from Panoptic-DeepLab's rules."""

import math

import numpy as np
import pytest
import torch

from axial_deeplab.data.targets import PanopticTargetGenerator

THINGS = [3, 4, 5]
IGNORE = 255


def reference_targets(semantic, instance, crowd, thing_ids, sigma=8.0, small_area=4096, small_weight=3.0):
    """One instance at a time, straight from Panoptic-DeepLab's rules (Gaussian cut at radius round(3 sigma) + 1)."""
    sem, inst, crowd = semantic.numpy(), instance.numpy(), crowd.numpy()
    h, w = sem.shape
    yy, xx = np.mgrid[0:h, 0:w]
    radius = int(round(3 * sigma)) + 1
    center = np.zeros((h, w))
    offset = np.zeros((2, h, w))
    sem_w = (sem != IGNORE).astype(float)
    for i in np.unique(inst):
        mask = (inst == i) & np.isin(sem, thing_ids) & ~crowd
        if i == 0 or not mask.any():
            continue
        cy, cx = round(yy[mask].mean()), round(xx[mask].mean())
        gauss = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        gauss[(np.abs(yy - cy) > radius) | (np.abs(xx - cx) > radius)] = 0
        center = np.maximum(center, gauss)
        offset[0][mask] = cy - yy[mask]
        offset[1][mask] = cx - xx[mask]
        if mask.sum() < small_area:
            sem_w[mask] = small_weight
    center_w = ((sem != IGNORE) & ~crowd).astype(float)
    offset_w = ((inst > 0) & np.isin(sem, thing_ids) & ~crowd).astype(float)
    return center, offset, sem_w, center_w, offset_w


def crowded_scene(h=96, w=128, seed=0):
    """Touching / overlapping boxes of several thing classes over stuff, one crowd, a void band."""
    rng = np.random.default_rng(seed)
    sem = np.zeros((h, w), np.int64)
    sem[: h // 2] = 1
    inst = np.zeros((h, w), np.int64)
    crowd = np.zeros((h, w), bool)
    for i in range(1, 13):
        bh, bw = rng.integers(6, 40), rng.integers(6, 40)
        y, x = rng.integers(0, h - bh), rng.integers(0, w - bw)
        sem[y : y + bh, x : x + bw] = THINGS[i % 3]
        inst[y : y + bh, x : x + bw] = 1000 * THINGS[i % 3] + i  # large, sparse ids
        crowd[y : y + bh, x : x + bw] = i == 7
    sem[-5:] = IGNORE
    inst[-5:] = 0
    crowd[-5:] = False
    return torch.from_numpy(sem), torch.from_numpy(inst), torch.from_numpy(crowd)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop(seed):
    sem, inst, crowd = crowded_scene(seed=seed)
    gen = PanopticTargetGenerator(THINGS, ignore_label=IGNORE, sigma=4.0, small_instance_area=300)
    out = gen({"semantic": sem, "instance": inst, "crowd": crowd, "image_id": "x"})
    center, offset, sem_w, center_w, offset_w = reference_targets(sem, inst, crowd, THINGS, 4.0, 300)
    assert out["image_id"] == "x"  # other keys pass through
    assert out["center"].shape == (1, 96, 128) and out["center"].dtype == torch.float32
    assert out["offset"].shape == (2, 96, 128) and out["offset"].dtype == torch.float32
    assert out["semantic"].dtype == torch.int64 and torch.equal(out["semantic"], sem)
    np.testing.assert_allclose(out["center"][0].numpy(), center, atol=1e-6)
    np.testing.assert_array_equal(out["offset"].numpy(), offset)
    np.testing.assert_array_equal(out["semantic_weights"].numpy(), sem_w)
    np.testing.assert_array_equal(out["center_weights"].numpy(), center_w)
    np.testing.assert_array_equal(out["offset_weights"].numpy(), offset_w)


def test_hand_checked_small_instance():
    sem = torch.zeros(40, 50, dtype=torch.long)
    inst = torch.zeros(40, 50, dtype=torch.long)
    sem[10:13, 20:25] = 3  # 3 x 5 box: mean (11, 22)
    inst[10:13, 20:25] = 7
    out = PanopticTargetGenerator([3], sigma=2.0)({"semantic": sem, "instance": inst})
    heat = out["center"][0]
    assert heat[11, 22] == 1.0 and heat.max() == 1.0
    assert heat[11, 24] == pytest.approx(math.exp(-4 / 8))  # 2 px away, sigma 2
    assert heat[11, 22 + 8] == 0.0  # beyond the window radius round(3 sigma) + 1 = 7
    assert out["offset"][:, 10, 20].tolist() == [1.0, 2.0]  # (dy, dx) = center - pixel
    assert out["offset"][:, 12, 24].tolist() == [-1.0, -2.0]
    assert out["offset"][:, 0, 0].tolist() == [0.0, 0.0]
    assert out["semantic_weights"][11, 22] == 3.0 and out["semantic_weights"][0, 0] == 1.0
    assert out["offset_weights"].sum() == 15 and out["center_weights"].sum() == 40 * 50


def test_crowd_ignore_and_large_instances():
    sem = torch.zeros(80, 90, dtype=torch.long)
    inst = torch.zeros(80, 90, dtype=torch.long)
    crowd = torch.zeros(80, 90, dtype=torch.bool)
    sem[0:70, 0:70] = 4  # 4900 px >= 4096: weight 1
    inst[0:70, 0:70] = 1
    sem[70:80, 0:30] = 4  # crowd segment: no center, no offset, center weight 0
    inst[70:80, 0:30] = 2
    crowd[70:80, 0:30] = True
    sem[:, 85:] = IGNORE
    gen = PanopticTargetGenerator([4], sigma=8.0)
    out = gen({"semantic": sem, "instance": inst, "crowd": crowd})
    assert out["semantic_weights"][5, 5] == 1.0
    assert out["semantic_weights"][75, 5] == 1.0  # crowd keeps its semantic weight by default
    assert out["semantic_weights"][5, 88] == 0.0 and out["center_weights"][5, 88] == 0.0
    assert out["center_weights"][75, 5] == 0.0 and out["offset_weights"][75, 5] == 0.0
    assert out["offset"][:, 75, 5].tolist() == [0.0, 0.0]
    peaks = torch.nonzero(out["center"][0] == 1.0).tolist()
    assert peaks == [[34, 34]]  # mean of 0..69 is 34.5; halves round to even (as tf.round in deeplab2)
    strict = PanopticTargetGenerator([4], ignore_crowd_in_semantic=True)
    assert strict({"semantic": sem, "instance": inst, "crowd": crowd})["semantic_weights"][75, 5] == 0.0


def test_no_things_and_stuff_instances():
    sem = torch.randint(0, 3, (30, 40))
    inst = torch.randint(0, 3, (30, 40))  # instance ids on stuff classes are ignored
    out = PanopticTargetGenerator([5])({"semantic": sem, "instance": inst})
    assert out["center"].abs().sum() == 0 and out["offset"].abs().sum() == 0
    assert out["offset_weights"].sum() == 0 and out["semantic_weights"].sum() == 30 * 40


def test_bad_inputs_name_the_field():
    gen = PanopticTargetGenerator([1])
    with pytest.raises(ValueError, match="instance"):
        gen({"semantic": torch.zeros(4, 5, dtype=torch.long), "instance": torch.zeros(4, 6, dtype=torch.long)})
    with pytest.raises(ValueError, match="crowd"):
        gen(
            {
                "semantic": torch.zeros(4, 5, dtype=torch.long),
                "instance": torch.zeros(4, 5, dtype=torch.long),
                "crowd": torch.zeros(5, 5, dtype=torch.bool),
            }
        )
    with pytest.raises(KeyError, match="instance"):
        gen({"semantic": torch.zeros(4, 5, dtype=torch.long)})
    with pytest.raises(ValueError, match="semantic"):
        gen({"semantic": torch.zeros(1, 4, 5, dtype=torch.long), "instance": torch.zeros(4, 5, dtype=torch.long)})
