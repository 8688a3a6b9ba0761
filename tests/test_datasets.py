"""Loaders on small fixtures written in each dataset's official on-disk layout, and their errors."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from axial_deeplab.data import (
    CityscapesPanoptic,
    CocoPanoptic,
    CocoPanopticDataset,
    ImageFolderDataset,
    MapillaryVistasPanoptic,
    PanopticFormatError,
    collate_panoptic,
)

# A few COCO categories with their real (non-contiguous) ids.
COCO_CATS = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60], "supercategory": "person"},
    {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142], "supercategory": "vehicle"},
    {"id": 184, "name": "tree-merged", "isthing": 0, "color": [107, 142, 35], "supercategory": "plant"},
    {"id": 187, "name": "sky-other-merged", "isthing": 0, "color": [70, 130, 180], "supercategory": "sky"},
]


def _rgb(ids):
    ids = np.asarray(ids, np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def _scene(h=20, w=24):
    """Segment-id map with ids that use all three PNG channels, and its segments_info."""
    ids = np.zeros((h, w), np.int64)  # 0: void
    ids[: h // 2] = 70000  # sky (stuff)
    ids[h // 2 :, : w - 4] = 300  # tree (stuff)
    ids[2:6, 3:9] = 5  # person instance
    ids[10:16, 4:12] = 1_000_001  # car instance
    ids[12:18, 14:20] = 1_000_002  # car instance
    ids[3:7, 15:22] = 42  # crowd of persons
    segments = [
        {"id": 70000, "category_id": 187, "iscrowd": 0},
        {"id": 300, "category_id": 184, "iscrowd": 0},
        {"id": 5, "category_id": 1, "iscrowd": 0},
        {"id": 1_000_001, "category_id": 3, "iscrowd": 0},
        {"id": 1_000_002, "category_id": 3, "iscrowd": 0},
        {"id": 42, "category_id": 1, "iscrowd": 1},
    ]
    for s in segments:
        m = ids == s["id"]
        ys, xs = np.nonzero(m)
        s["area"] = int(m.sum())
        s["bbox"] = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
    image = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    return ids, segments, image


def _write_coco(root, split="val", n=2):
    img_dir = root / f"{split}2017"
    png_dir = root / "annotations" / f"panoptic_{split}2017"
    img_dir.mkdir(parents=True)
    png_dir.mkdir(parents=True)
    images, anns = [], []
    for k in range(n):
        ids, segs, image = _scene()
        name = f"{k:012d}"
        Image.fromarray(image).save(img_dir / f"{name}.jpg", quality=95)
        Image.fromarray(_rgb(ids)).save(png_dir / f"{name}.png")
        images.append({"id": k + 1, "file_name": f"{name}.jpg", "height": ids.shape[0], "width": ids.shape[1]})
        anns.append({"image_id": k + 1, "file_name": f"{name}.png", "segments_info": segs})
    jpath = root / "annotations" / f"panoptic_{split}2017.json"
    jpath.write_text(json.dumps({"images": images, "annotations": anns, "categories": COCO_CATS}))
    return jpath


def _check_scene(sample, md, coco_id=lambda i: i):
    ids, _, _ = _scene()
    sem, inst, crowd = sample["semantic"].numpy(), sample["instance"].numpy(), sample["crowd"].numpy()
    by_id = {md.category_id(c): c for c in range(md.num_classes)}
    cls = {i: by_id[coco_id(i)] for i in (1, 3, 184, 187)}
    assert np.all(sem[ids == 0] == 255) and np.all(inst[ids == 0] == 0)
    assert np.all(sem[ids == 70000] == cls[187]) and np.all(inst[ids == 70000] == 0)
    assert np.all(sem[ids == 300] == cls[184])
    assert np.all(sem[ids == 5] == cls[1]) and np.all(sem[ids == 42] == cls[1])
    assert np.all(sem[ids == 1_000_001] == cls[3])
    things = [1_000_001, 1_000_002, 5, 42]
    inst_ids = [np.unique(inst[ids == t]) for t in things]
    assert all(len(u) == 1 and u[0] > 0 for u in inst_ids)
    assert len({int(u[0]) for u in inst_ids}) == 4  # distinct instances
    assert np.array_equal(crowd, ids == 42)


def test_coco_layout(tmp_path):
    _write_coco(tmp_path)
    ds = CocoPanoptic(tmp_path, "val")
    md = ds.metadata
    assert md.class_names == ["person", "car", "tree-merged", "sky-other-merged"]
    assert md.category_ids == [1, 3, 184, 187] and md.thing_ids == [0, 1]
    assert len(ds) == 2
    s = ds[1]
    assert s["image"].shape == (3, 20, 24) and s["image"].dtype == torch.float32
    assert s["orig_size"] == (20, 24) and s["image_id"] == "2" and ds.json_image_id("2") == 2
    assert s["file_name"].endswith("000000000001.jpg")
    _check_scene(s, md)
    batch = collate_panoptic([ds[0], ds[1]])
    assert batch["semantic"].shape == (2, 20, 24) and batch["image_id"] == ["1", "2"]


def test_generic_custom_dataset_and_transform(tmp_path):
    root = tmp_path / "custom"
    (root / "imgs").mkdir(parents=True)
    (root / "pan").mkdir()
    ids, segs, image = _scene()
    Image.fromarray(image).save(root / "imgs" / "a.png")
    Image.fromarray(_rgb(ids)).save(root / "pan" / "a.png")
    cats = [dict(c, id=c["id"] + 1000) for c in COCO_CATS[::-1]]  # own ids, listed out of order
    segs = [dict(s, category_id=s["category_id"] + 1000) for s in segs]
    # no "images" list: the image is found next to the PNG's name
    (root / "pan.json").write_text(
        json.dumps(
            {"annotations": [{"image_id": "a", "file_name": "a.png", "segments_info": segs}], "categories": cats}
        )
    )
    seen = []
    ds = CocoPanopticDataset(
        root / "imgs",
        root / "pan.json",
        root / "pan",
        name="mine",
        label_divisor=256,
        transform=lambda s: seen.append(s["image_id"]) or s,
    )
    assert ds.metadata.name == "mine" and ds.metadata.label_divisor == 256
    assert ds.metadata.category_ids == [1001, 1003, 1184, 1187]
    s = ds[0]
    assert seen == ["a"]
    assert torch.equal(s["image"], torch.from_numpy(image).permute(2, 0, 1).float() / 255)  # PNG: lossless
    _check_scene(s, ds.metadata, lambda i: i + 1000)


def test_cityscapes_layout_made_by_cityscapesscripts(tmp_path):
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    gt = tmp_path / "gtFine"
    for city, frames in (("aachen", 2), ("bremen", 1)):
        (gt / "val" / city).mkdir(parents=True)
        (tmp_path / "leftImg8bit" / "val" / city).mkdir(parents=True)
        for f in range(frames):
            stem = f"{city}_00000{f}_000019"
            lab = np.full((16, 32), 7, np.uint16)  # road
            lab[:4] = 23  # sky
            lab[4:6, :] = 0  # unlabeled -> void
            lab[8:12, 2:8] = 26001  # car #1
            lab[8:12, 8:14] = 26002  # car #2, touching #1
            lab[10:14, 20:26] = 24  # person without instance id -> crowd
            lab[12:16, 28:31] = 24000 + f  # person instance
            Image.fromarray(lab).save(gt / "val" / city / f"{stem}_gtFine_instanceIds.png")
            rgb = np.random.default_rng(f).integers(0, 255, (16, 32, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
    with contextlib.redirect_stdout(io.StringIO()):
        convert2panoptic(str(gt), str(gt), useTrainId=True, setNames=["val"])
    ds = CityscapesPanoptic(tmp_path, "val")
    md = ds.metadata
    assert md.num_classes == 19 and md.thing_ids == list(range(11, 19)) and md.label_divisor == 1000
    assert len(ds) == 3
    s = ds[0]
    assert s["image_id"] == "aachen_000000_000019"
    assert s["file_name"].endswith("leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png")
    sem, inst, crowd = s["semantic"].numpy(), s["instance"].numpy(), s["crowd"].numpy()
    assert np.all(sem[14:16, 0:20] == 0)  # road -> train id 0
    assert np.all(sem[:4] == 10)  # sky -> 10
    assert np.all(sem[4:6] == 255)  # unlabeled -> void
    assert np.all(sem[8:12, 2:14] == 13)  # car -> 13
    a, b = np.unique(inst[8:12, 2:8]), np.unique(inst[8:12, 8:14])
    assert len(a) == len(b) == 1 and a[0] > 0 and b[0] > 0 and a[0] != b[0]
    assert np.all(sem[10:14, 20:26] == 11) and crowd[10:14, 20:26].all() and crowd.sum() == 24
    assert np.all(inst[10:14, 20:26] > 0)  # crowd segments get ids too
    assert torch.equal(
        ds[2]["image"][:, 0, 0] * 255,
        torch.tensor(np.random.default_rng(0).integers(0, 255, (16, 32, 3), dtype=np.uint8)[0, 0], dtype=torch.float32),
    )

    # the official label-id ground truth (without --use-train-id): the same classes and samples,
    # category ids 7..33; "auto" takes the train-id JSON while it is there, else this one
    with contextlib.redirect_stdout(io.StringIO()):
        convert2panoptic(str(gt), str(gt), useTrainId=False, setNames=["val"])
    lab = CityscapesPanoptic(tmp_path, "val", ids="label")
    assert lab.json_path == gt / "cityscapes_panoptic_val.json" and lab.png_dir == gt / "cityscapes_panoptic_val"
    assert lab.metadata.class_names == md.class_names and lab.metadata.thing_ids == md.thing_ids
    assert [lab.metadata.category_id(c) for c in (0, 10, 11, 13, 18)] == [7, 23, 24, 26, 33]  # labels.py ids
    for i in range(len(ds)):
        a, b = ds[i], lab[i]
        assert a["image_id"] == b["image_id"]
        for key in ("image", "semantic", "instance", "crowd"):
            assert torch.equal(a[key], b[key]), key
    assert CityscapesPanoptic(tmp_path, "val").ids == "train"
    (gt / "cityscapes_panoptic_val_trainId.json").rename(tmp_path / "trainId.json")
    assert CityscapesPanoptic(tmp_path, "val").ids == "label"
    with pytest.raises(FileNotFoundError, match="cityscapes_panoptic_val_trainId.json.*--use-train-id"):
        CityscapesPanoptic(tmp_path, "val", ids="train")
    with pytest.raises(ValueError, match="'labels' is not one of auto, train, label"):
        CityscapesPanoptic(tmp_path, "val", ids="labels")
    (tmp_path / "trainId.json").rename(gt / "cityscapes_panoptic_val_trainId.json")

    # the label-id JSON (without --use-train-id) is refused with a hint
    (tmp_path / "labelids").mkdir()
    with contextlib.redirect_stdout(io.StringIO()):
        convert2panoptic(str(gt), str(tmp_path / "labelids"), useTrainId=False, setNames=["val"])
    (tmp_path / "labelids" / "cityscapes_panoptic_val.json").replace(gt / "cityscapes_panoptic_val_trainId.json")
    with pytest.raises(PanopticFormatError, match="use-train-id"):
        CityscapesPanoptic(tmp_path, "val")
    # and the train-id JSON in the label-id one's place is refused naming it
    with contextlib.redirect_stdout(io.StringIO()):
        convert2panoptic(str(gt), str(tmp_path / "labelids"), useTrainId=True, setNames=["val"])
    (tmp_path / "labelids" / "cityscapes_panoptic_val_trainId.json").replace(gt / "cityscapes_panoptic_val.json")
    with pytest.raises(PanopticFormatError, match=r"cityscapes_panoptic_val\.json: categories are not .* label ids 7"):
        CityscapesPanoptic(tmp_path, "val", ids="label")


def test_mapillary_layout(tmp_path):
    base = tmp_path / "validation"
    (base / "images").mkdir(parents=True)
    (base / "panoptic").mkdir()
    ids, segs, image = _scene()
    Image.fromarray(image).save(base / "images" / "abc.jpg")
    Image.fromarray(_rgb(ids)).save(base / "panoptic" / "abc.png")
    cats = [dict(c, id=i + 1) for i, c in enumerate(COCO_CATS)]
    remap = {c["id"]: i + 1 for i, c in enumerate(COCO_CATS)}
    segs = [dict(s, category_id=remap[s["category_id"]]) for s in segs]
    doc = {
        "images": [{"id": "abc", "file_name": "abc.jpg", "height": 20, "width": 24}],
        "annotations": [{"image_id": "abc", "file_name": "abc.png", "segments_info": segs}],
        "categories": cats,
    }
    (base / "panoptic" / "panoptic_2018.json").write_text(json.dumps(doc))
    ds = MapillaryVistasPanoptic(tmp_path, "val")
    assert ds.metadata.name == "mapillary_vistas" and ds.metadata.category_ids == [1, 2, 3, 4]
    _check_scene(ds[0], ds.metadata, remap.get)
    with pytest.raises(FileNotFoundError, match="v2.0"):
        MapillaryVistasPanoptic(tmp_path, "val", version="v2.0")
    with pytest.raises(FileNotFoundError, match="training"):
        MapillaryVistasPanoptic(tmp_path, "train")


def test_image_folder(tmp_path):
    for cls, n in (("dog", 2), ("cat", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 10, 3), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, transform=lambda x: x * 2)
    assert ds.classes == ["cat", "dog"] and len(ds) == 5
    img, label = ds[4]
    assert label == 1 and img.shape == (3, 8, 10) and float(img.max()) == pytest.approx(2 * 40 / 255)
    (tmp_path / "dog" / "9.jpg").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(ValueError, match=r"9\.jpg.*cannot read image"):
        ds[len(ds) - 1]
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderDataset(tmp_path / "dog")


# ------------------------------------------------------------------------------------------
# Malformed inputs
# ------------------------------------------------------------------------------------------
def test_missing_files(tmp_path):
    jpath = _write_coco(tmp_path)
    (tmp_path / "val2017" / "000000000001.jpg").unlink()
    (tmp_path / "annotations" / "panoptic_val2017" / "000000000000.png").unlink()
    ds = CocoPanoptic(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match=r"000000000000\.png.*panoptic PNG.*not found"):
        ds[0]
    with pytest.raises(FileNotFoundError, match=r"000000000001\.jpg.*not found"):
        ds[1]
    with pytest.raises(FileNotFoundError, match="train2017"):
        CocoPanoptic(tmp_path, "train")
    jpath.write_text("{not json")
    with pytest.raises(PanopticFormatError, match="panoptic_val2017.json.*not valid JSON"):
        CocoPanoptic(tmp_path, "val")


def test_png_id_absent_from_json(tmp_path):
    jpath = _write_coco(tmp_path)
    doc = json.loads(jpath.read_text())
    doc["annotations"][0]["segments_info"] = [s for s in doc["annotations"][0]["segments_info"] if s["id"] != 1_000_002]
    jpath.write_text(json.dumps(doc))
    ds = CocoPanoptic(tmp_path, "val")
    with pytest.raises(PanopticFormatError, match=r"000000000000\.png.*\[1000002\].*absent from the JSON"):
        ds[0]
    ds[1]  # the other image is fine


def test_unknown_category(tmp_path):
    jpath = _write_coco(tmp_path)
    doc = json.loads(jpath.read_text())
    doc["annotations"][1]["segments_info"][2]["category_id"] = 999
    jpath.write_text(json.dumps(doc))
    with pytest.raises(PanopticFormatError, match="panoptic_val2017.json.*image_id 2.*unknown category_id 999"):
        CocoPanoptic(tmp_path, "val")


def test_mismatched_sizes(tmp_path):
    _write_coco(tmp_path)
    png = tmp_path / "annotations" / "panoptic_val2017" / "000000000001.png"
    Image.fromarray(np.zeros((20, 23, 3), np.uint8)).save(png)
    ds = CocoPanoptic(tmp_path, "val")
    with pytest.raises(PanopticFormatError, match=r"000000000001\.png.*label size 23x20.*000000000001\.jpg.*24x20"):
        ds[1]
    doc = json.loads((tmp_path / "annotations" / "panoptic_val2017.json").read_text())
    doc["images"][0]["height"] = 21
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(json.dumps(doc))
    with pytest.raises(PanopticFormatError, match=r"000000000000\.jpg.*differs from .*json"):
        CocoPanoptic(tmp_path, "val")[0]


def test_unreadable_image_and_png(tmp_path):
    _write_coco(tmp_path)
    (tmp_path / "val2017" / "000000000000.jpg").write_bytes(b"\x00\x01 not an image")
    (tmp_path / "annotations" / "panoptic_val2017" / "000000000001.png").write_bytes(b"broken")
    ds = CocoPanoptic(tmp_path, "val")
    with pytest.raises(PanopticFormatError, match=r"000000000000\.jpg: cannot read image"):
        ds[0]
    with pytest.raises(PanopticFormatError, match=r"000000000001\.png: cannot read panoptic PNG"):
        ds[1]


def test_rgb_id_conversions():
    from axial_deeplab.data import id_to_rgb, rgb_to_id

    ids = np.array([[0, 1, 255, 256], [65535, 65536, 1_000_001, 256**3 - 1]])
    assert np.array_equal(id_to_rgb(ids), _rgb(ids))
    assert np.array_equal(rgb_to_id(_rgb(ids)), ids)
    with pytest.raises(ValueError, match="ids must lie"):
        id_to_rgb(np.array([[256**3]]))
