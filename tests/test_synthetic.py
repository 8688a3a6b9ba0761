"""The synthetic panoptic dataset: determinism, advertised content, COCO-panoptic export."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from axial_deeplab.data import PanopticMetadata, SyntheticPanoptic, synthetic_metadata


def _digest(ds, indices):
    h = hashlib.sha256()
    for i in indices:
        s = ds.generate(i)
        for a in (s.image, s.semantic, s.instance, s.crowd):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _zscore(a):
    a = a - a.mean(axis=1, keepdims=True)
    return a / a.std(axis=1, keepdims=True)


def test_metadata_classes():
    md = synthetic_metadata()
    assert isinstance(md, PanopticMetadata)
    assert md.num_classes == 5
    assert len(md.thing_ids) >= 3 and len(md.stuff_ids) >= 2
    assert "digit" in [md.class_names[t] for t in md.thing_ids]
    assert md.ignore_label == 255 and md.label_divisor == 1000


def test_sample_contract():
    ds = SyntheticPanoptic("train", length=4)
    s = ds[1]
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 128, 128)
    assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
    assert s["semantic"].dtype == torch.int64 and s["semantic"].shape == (128, 128)
    assert s["instance"].dtype == torch.int64 and s["crowd"].dtype == torch.bool
    assert s["orig_size"] == (128, 128)
    assert isinstance(s["image_id"], str) and isinstance(s["file_name"], str)
    sem, inst, crowd = s["semantic"], s["instance"], s["crowd"]
    labelled = sem != 255
    assert set(torch.unique(sem[labelled]).tolist()) <= set(range(5))
    thing = torch.zeros_like(sem, dtype=torch.bool)
    for t in ds.metadata.thing_ids:
        thing |= sem == t
    # instance ids exactly on thing pixels; crowd only on things
    assert torch.equal(inst > 0, thing)
    assert not bool((crowd & ~thing).any())
    assert len(ds) == 4 and ds[-1]["image_id"] == ds[3]["image_id"]
    with pytest.raises(IndexError):
        ds.generate(4)


def test_deterministic_in_process_and_across_runs():
    a = SyntheticPanoptic("train", length=6, seed=3)
    b = SyntheticPanoptic("train", length=6, seed=3)
    d = _digest(a, range(6))
    assert d == _digest(b, range(6))
    assert _digest(a, [5, 2]) == _digest(b, [5, 2])  # access order does not matter
    code = (
        "import hashlib, numpy as np\n"
        "from axial_deeplab.data import SyntheticPanoptic\n"
        "ds = SyntheticPanoptic('train', length=6, seed=3)\n"
        "h = hashlib.sha256()\n"
        "for i in range(6):\n"
        "    s = ds.generate(i)\n"
        "    for a in (s.image, s.semantic, s.instance, s.crowd):\n"
        "        h.update(np.ascontiguousarray(a).tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == d


def test_splits_and_seeds_differ():
    train = SyntheticPanoptic("train", length=5)
    val = SyntheticPanoptic("val", length=5)
    other = SyntheticPanoptic("train", length=5, seed=1)
    t = [train.generate(i).image for i in range(5)]
    for i in range(5):
        assert not np.array_equal(t[i], val.generate(i).image)
        assert not np.array_equal(t[i], other.generate(i).image)
    assert train.image_id(0) != val.image_id(0)
    with pytest.raises(ValueError, match="split"):
        SyntheticPanoptic("test")


def test_content_over_a_batch_of_scenes():
    ds = SyntheticPanoptic("train", length=60)
    md = ds.metadata
    seen_classes = set()
    sizes = []
    touching = occluded = crowd_images = void_pixels = 0
    for i in range(len(ds)):
        sc = ds.generate(i)
        seen_classes |= set(np.unique(sc.semantic).tolist())
        inst = sc.instance
        # two different instances side by side (horizontally or vertically adjacent pixels)
        for a, b in ((inst[:, 1:], inst[:, :-1]), (inst[1:, :], inst[:-1, :])):
            if np.any((a > 0) & (b > 0) & (a != b)):
                touching += 1
                break
        counts = np.bincount(inst.ravel())
        for obj in sc.objects:
            if obj.crowd:
                continue
            sizes.append(obj.size)
            if obj.instance_id:
                visible = counts[obj.instance_id]
                assert visible == obj.visible_area
                assert visible >= ds.min_visible_fraction * obj.full_area - 1
                if visible < obj.full_area:
                    occluded += 1
                ys, xs = np.nonzero(inst == obj.instance_id)
                assert np.ptp(ys) < obj.size + 1 and np.ptp(xs) < obj.size + 1
        crowd_images += int(sc.crowd.any())
        void_pixels += int((sc.semantic == md.ignore_label).sum())
        # both stuff classes are present in every scene, sky above ground
        assert (sc.semantic[0] == 0).any() and (sc.semantic[-1] == 1).any()
    assert seen_classes >= {0, 1, 2, 3, 4}
    assert min(sizes) >= 16 and max(sizes) <= 64
    assert max(sizes) / min(sizes) >= 3.5
    assert touching >= 20
    assert occluded >= 20
    assert crowd_images >= 1


def test_digits_come_from_load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits().images
    ds = SyntheticPanoptic("val", length=40)
    corrs = []
    for i in range(len(ds)):
        sc = ds.generate(i)
        for obj in sc.objects:
            if obj.class_id != 2 or obj.void or obj.visible_area != obj.full_area:
                continue
            cy, cx = obj.center
            y0, x0 = cy - obj.size // 2, cx - obj.size // 2
            if y0 < 0 or x0 < 0 or y0 + obj.size > 128 or x0 + obj.size > 128:
                continue
            s = obj.size
            crop = (sc.instance[y0 : y0 + s, x0 : x0 + s] == obj.instance_id).astype(float)
            cell = np.floor((np.arange(s) + 0.5) * 8 / s).astype(int)  # 8x8 cell of each pixel
            key = (cell[:, None] * 8 + cell[None, :]).ravel()
            coarse = np.bincount(key, crop.ravel(), 64) / np.bincount(key, minlength=64)
            all_corr = _zscore(digits.reshape(-1, 64)) @ _zscore(coarse[None])[0] / 64
            corr = all_corr[obj.digit_index]
            corrs.append(corr)
            # the mask singles out its source digit among all 1797 (random pairs correlate ~0.5)
            assert (all_corr > corr).sum() < 10
    assert len(corrs) >= 3
    assert min(corrs) > 0.9, corrs


def test_image_size_and_options():
    ds = SyntheticPanoptic("train", length=2, image_size=(160, 192), crowd_probability=1.0, num_objects=(2, 2))
    s = ds[0]
    assert s["image"].shape == (3, 160, 192)
    assert ds.object_size == (20, 80)
    sc = ds.generate(1)
    assert any(o.crowd for o in sc.objects) and sc.crowd.any()
    with pytest.raises(ValueError, match="image_size"):
        SyntheticPanoptic(image_size=32)


def test_generation_is_fast():
    import time

    ds = SyntheticPanoptic("train", length=50)
    ds.generate(0)
    t = time.perf_counter()
    for i in range(50):
        ds[i]
    per_item = (time.perf_counter() - t) / 50
    assert per_item < 0.02  # generous: ~2 ms on one core


def test_write_coco_panoptic_round_trip(tmp_path):
    from axial_deeplab.data import CocoPanopticDataset

    ds = SyntheticPanoptic("val", length=5, crowd_probability=0.5)
    paths = ds.write_coco_panoptic(tmp_path)
    back = CocoPanopticDataset(paths["image_dir"], paths["json"], paths["png_dir"], name="synthetic")
    assert back.metadata.class_names == ds.metadata.class_names
    assert back.metadata.thing_ids == ds.metadata.thing_ids
    assert len(back) == 5
    for i in range(5):
        a, b = ds[i], back[i]
        assert a["image_id"] == b["image_id"]
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["semantic"], b["semantic"])
        assert torch.equal(a["crowd"], b["crowd"])
        # instance ids may be renumbered, but the partition into segments is the same
        ia, ib = a["instance"].numpy(), b["instance"].numpy()
        pairs = set(zip(ia.ravel().tolist(), ib.ravel().tolist()))
        assert len(pairs) == len(np.unique(ia)) == len(np.unique(ib))
        assert all((x == 0) == (y == 0) for x, y in pairs)


def test_synthetic_data_needs_no_scikit_learn(monkeypatch):
    """The digits ship in the package: a core install (no scikit-learn) makes the same scenes."""
    import sys

    from axial_deeplab.data.synthetic import _digits

    want = SyntheticPanoptic("val", length=2).generate(1)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    _digits.cache_clear()
    try:
        got = SyntheticPanoptic("val", length=2).generate(1)
    finally:
        _digits.cache_clear()
    assert np.array_equal(got.image, want.image) and np.array_equal(got.instance, want.instance)
