"""Ground truth and images that used to be read silently wrong: images in every Pillow mode,
categories without ``isthing``, and the one consistency check of a COCO-panoptic ground truth
(PNG ids vs JSON ids both ways, image ids listed twice, unknown categories, empty splits) that
the datasets (training and evaluation), ``evaluate`` and ``pq`` share."""

import contextlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
from engine_testing import TINY_MODEL, save_untrained_checkpoint
from PIL import Image

from axial_deeplab.cli import main
from axial_deeplab.data import CocoPanopticDataset, PanopticFormatError, SyntheticPanoptic, read_image
from axial_deeplab.data.panoptic_io import read_panoptic_png


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


# -------------------------------------------------------------------------------------------
# Images in every mode
# -------------------------------------------------------------------------------------------
RGB = np.array([[[0, 0, 0], [255, 255, 255], [200, 30, 90]], [[10, 250, 60], [128, 128, 128], [5, 6, 7]]], np.uint8)
GRAY = np.array([[0, 17, 128], [200, 254, 255]], np.uint8)
GRAY16 = np.array([[0, 255, 256], [257 * 100, 40000, 65535]], np.uint16)  # >> 8: 0 0 1 100 156 255


def _gray3(g):
    return np.repeat(np.asarray(g, np.uint8)[..., None], 3, axis=2)


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    rows = arr.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _palette_image(transparency=False):
    pal = Image.fromarray(RGB).quantize(colors=8, method=Image.Quantize.MEDIANCUT)
    idx = np.asarray(pal)
    palette = np.array(pal.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    if transparency:
        pal.info["transparency"] = int(idx[0, 0])
    return pal, palette[idx]


def _modes(tmp_path):
    """(name, path, expected RGB) for each mode, written to files by Pillow (or by hand)."""
    cases = []

    def save(name, im, fmt, expected):
        p = tmp_path / f"{name}.{fmt.lower()}"
        im.save(p, fmt)
        with Image.open(p) as check:
            assert check.mode == name.split("-")[0], (name, check.mode)
        cases.append((name, p, expected))

    save("1", Image.fromarray(GRAY >= 128), "PNG", _gray3(np.where(GRAY >= 128, 255, 0)))
    save("L", Image.fromarray(GRAY), "PNG", _gray3(GRAY))
    save("LA", Image.fromarray(np.stack([GRAY, 255 - GRAY], -1), "LA"), "PNG", _gray3(GRAY))
    pal, expected = _palette_image()
    save("P", pal, "PNG", expected)
    pal, expected = _palette_image(transparency=True)
    save("P-transparent", pal, "PNG", expected)
    save("RGB", Image.fromarray(RGB), "PNG", RGB)
    alpha = np.array([[0, 255, 128], [1, 2, 3]], np.uint8)
    save("RGBA", Image.fromarray(np.concatenate([RGB, alpha[..., None]], -1), "RGBA"), "PNG", RGB)
    cmyk = np.zeros((1, 3, 4), np.uint8)
    cmyk[0, 1, 0] = 255  # full cyan
    cmyk[0, 2, 3] = 255  # full black
    save(
        "CMYK", Image.fromarray(cmyk, "CMYK"), "TIFF", np.array([[[255, 255, 255], [0, 255, 255], [0, 0, 0]]], np.uint8)
    )
    save("I;16", Image.fromarray(GRAY16), "PNG", _gray3(GRAY16 >> 8))
    save(
        "I;16B",
        Image.frombytes("I;16B", GRAY16.shape[::-1], GRAY16.astype(">u2").tobytes()),
        "TIFF",
        _gray3(GRAY16 >> 8),
    )
    # a 16-bit PGM opens as mode I (32-bit) holding 16-bit values
    pgm = tmp_path / "I-pgm.pgm"
    pgm.write_bytes(b"P5\n3 2\n65535\n" + GRAY16.astype(">u2").tobytes())
    cases.append(("I-pgm", pgm, _gray3(GRAY16 >> 8)))
    # 16-bit RGB: Pillow opens it as RGB scaled by >> 8 (checked here, as it may change)
    rgb16 = np.minimum(RGB.astype(np.int64) * 257 + 3, 65535)
    png = tmp_path / "RGB16.png"
    png.write_bytes(_png16(rgb16, color_type=2))
    cases.append(("RGB16", png, RGB))
    return cases


def test_read_image_every_mode(tmp_path):
    for name, path, expected in _modes(tmp_path):
        got = read_image(path)
        assert got.dtype == np.uint8 and got.shape == expected.shape, name
        assert np.array_equal(got, expected), (name, got.tolist(), expected.tolist())


def test_read_image_ycbcr_and_modes_without_files():
    from axial_deeplab.data.panoptic_io import image_to_rgb8

    # YCbCr (a TIFF mode) and PA / I;16L (Pillow cannot write them to a file) through the converter
    ycc = Image.fromarray(RGB).convert("YCbCr")
    assert np.abs(image_to_rgb8(ycc).astype(int) - RGB).max() <= 3
    pa = Image.fromarray(np.stack([GRAY, GRAY], -1), "LA").convert("PA")
    assert np.array_equal(image_to_rgb8(pa), np.asarray(pa.convert("RGB")))
    i16l = Image.frombytes("I;16L", GRAY16.shape[::-1], GRAY16.astype("<u2").tobytes())
    assert np.array_equal(image_to_rgb8(i16l), _gray3(GRAY16 >> 8))


def test_16bit_gray_is_scaled_not_white(tmp_path):
    """A 16-bit grayscale PNG holding mid-grey must not come back as pure white."""
    p = tmp_path / "mid.png"
    Image.fromarray(np.full((4, 5), 32768, np.uint16)).save(p)
    got = read_image(p)
    assert np.array_equal(got, np.full((4, 5, 3), 128, np.uint8))


def test_modes_without_a_known_range_are_refused_by_name(tmp_path):
    Image.fromarray(np.array([[0, 70000]], np.int32), "I").save(tmp_path / "deep.tif")
    with pytest.raises(PanopticFormatError, match=r"deep\.tif.*mode I \(32-bit"):
        read_image(tmp_path / "deep.tif")
    Image.fromarray(np.array([[0.0, 0.5]], np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(PanopticFormatError, match=r"float\.tif.*mode F \(32-bit float"):
        read_image(tmp_path / "float.tif")


def test_16bit_panoptic_png_is_refused(tmp_path):
    """A 16-bit RGB PNG cannot hold COCO-panoptic ids; Pillow would hand back truncated ids."""
    p = tmp_path / "ids16.png"
    p.write_bytes(_png16(np.full((2, 2, 3), 513, np.uint16), color_type=2))
    with pytest.raises(PanopticFormatError, match=r"ids16\.png.*8-bit RGB.*16 bits"):
        read_panoptic_png(p)


# -------------------------------------------------------------------------------------------
# Ground-truth fixtures
# -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gt_files(tmp_path_factory):
    """A small synthetic ground truth in COCO-panoptic layout (3 images, 64x64)."""
    root = tmp_path_factory.mktemp("gt")
    ds = SyntheticPanoptic("val", length=3, image_size=64, crowd_probability=0.0)
    return ds.write_coco_panoptic(root)


def _dataset(paths, json_path=None, **kw):
    return CocoPanopticDataset(paths["image_dir"], json_path or paths["json"], paths["png_dir"], **kw)


def _edited(paths, tmp_path, edit, name="edited.json"):
    doc = json.loads(paths["json"].read_text())
    edit(doc)
    out = tmp_path / name
    out.write_text(json.dumps(doc))
    return out


def _drop_last_segment(doc):
    doc["annotations"][1]["segments_info"].pop()


def _phantom_segment(doc):
    segs = doc["annotations"][1]["segments_info"]
    segs.append(dict(segs[0], id=max(s["id"] for s in segs) + 100))


def _duplicate_annotation(doc):
    doc["annotations"].append(dict(doc["annotations"][0]))


def _no_isthing(doc):
    for c in doc["categories"][:2]:
        del c["isthing"]


# -------------------------------------------------------------------------------------------
# isthing
# -------------------------------------------------------------------------------------------
def test_categories_without_isthing_are_refused(gt_files, tmp_path):
    bad = _edited(gt_files, tmp_path, _no_isthing, "noisthing.json")
    cats = json.loads(bad.read_text())["categories"][:2]
    with pytest.raises(PanopticFormatError, match=r"noisthing\.json.*2 categories have no 'isthing'") as e:
        _dataset(gt_files, bad)
    for c in cats:
        assert f"id {c['id']} {c['name']!r}" in str(e.value)
    code, _, err = _run(
        [
            "pq",
            "--gt-json",
            str(bad),
            "--gt-folder",
            str(gt_files["png_dir"]),
            "--pred-json",
            str(gt_files["json"]),
            "--pred-folder",
            str(gt_files["png_dir"]),
        ]
    )
    assert code == 2 and "noisthing.json" in err and "isthing" in err


# -------------------------------------------------------------------------------------------
# The shared consistency check, through the dataset
# -------------------------------------------------------------------------------------------
def test_dataset_json_segment_absent_from_png(gt_files, tmp_path):
    bad = _edited(gt_files, tmp_path, _phantom_segment, "phantom.json")
    phantom = json.loads(bad.read_text())["annotations"][1]["segments_info"][-1]["id"]
    ds = _dataset(gt_files, bad)
    ds[0]  # the other images are fine
    with pytest.raises(PanopticFormatError) as e:
        ds[1]
    msg = str(e.value)
    assert "synthetic_val_0_000001.png" in msg and "phantom.json" in msg and f"[{phantom}]" in msg
    assert "absent from the PNG" in msg


def test_dataset_png_segment_absent_from_json(gt_files, tmp_path):
    bad = _edited(gt_files, tmp_path, _drop_last_segment, "dropped.json")
    with pytest.raises(PanopticFormatError, match=r"synthetic_val_0_000001\.png.*dropped\.json.*absent from the JSON"):
        _dataset(gt_files, bad)[1]


def test_dataset_duplicate_image_ids(gt_files, tmp_path):
    bad = _edited(gt_files, tmp_path, _duplicate_annotation, "dup.json")
    with pytest.raises(
        PanopticFormatError,
        match=r"dup\.json: annotations lists image_ids more than once: "
        r"\['synthetic_val_0_000000'\]",
    ):
        _dataset(gt_files, bad)

    def dup_images(doc):
        doc["images"].append(dict(doc["images"][2]))

    bad = _edited(gt_files, tmp_path, dup_images, "dupimg.json")
    with pytest.raises(PanopticFormatError, match=r"dupimg\.json: images lists ids more than once.*000002"):
        _dataset(gt_files, bad)


def test_dataset_unknown_category(gt_files, tmp_path):
    def unknown(doc):
        doc["annotations"][2]["segments_info"][0]["category_id"] = 999

    bad = _edited(gt_files, tmp_path, unknown, "unk.json")
    with pytest.raises(
        PanopticFormatError, match=r"unk\.json: image_id 'synthetic_val_0_000002'.*unknown category_id 999"
    ):
        _dataset(gt_files, bad)


def test_dataset_empty_split(gt_files, tmp_path):
    def empty(doc):
        doc["annotations"] = []
        doc["images"] = []

    bad = _edited(gt_files, tmp_path, empty, "empty.json")
    with pytest.raises(PanopticFormatError, match=r"empty\.json.*no annotations") as e:
        _dataset(gt_files, bad)
    assert str(gt_files["png_dir"]) in str(e.value) and str(gt_files["image_dir"]) in str(e.value)
    with pytest.raises(PanopticFormatError, match=r"empty\.json.*split 'val'.*no annotations"):
        _dataset(gt_files, bad, split="val")


# -------------------------------------------------------------------------------------------
# ... through `axial-deeplab pq` (ground truth and predictions)
# -------------------------------------------------------------------------------------------
def _pq(gt_json, gt_files, pred_json=None):
    return _run(
        [
            "pq",
            "--gt-json",
            str(gt_json),
            "--gt-folder",
            str(gt_files["png_dir"]),
            "--pred-json",
            str(pred_json or gt_files["json"]),
            "--pred-folder",
            str(gt_files["png_dir"]),
            "--workers",
            "1",
        ]
    )


def test_pq_ground_truth_checks(gt_files, tmp_path):
    code, out, _ = _pq(gt_files["json"], gt_files)
    assert code == 0 and "100.0" in out  # the untouched files score perfectly
    bad = _edited(gt_files, tmp_path, _phantom_segment, "gt_phantom.json")
    code, _, err = _pq(bad, gt_files)
    assert code == 2 and "gt_phantom.json" in err and "synthetic_val_0_000001.png" in err
    assert "absent from the PNG" in err
    bad = _edited(gt_files, tmp_path, _drop_last_segment, "gt_dropped.json")
    code, _, err = _pq(bad, gt_files)
    assert code == 2 and "gt_dropped.json" in err and "absent from the JSON" in err
    bad = _edited(gt_files, tmp_path, _duplicate_annotation, "gt_dup.json")
    code, _, err = _pq(bad, gt_files)
    assert code == 2 and "gt_dup.json" in err and "synthetic_val_0_000000" in err and "more than once" in err

    def empty(doc):
        doc["annotations"] = []

    bad = _edited(gt_files, tmp_path, empty, "gt_empty.json")
    code, out, err = _pq(bad, gt_files)
    assert code == 2 and "gt_empty.json" in err and "no annotations" in err and "All" not in out


def test_pq_prediction_checks(gt_files, tmp_path):
    bad = _edited(gt_files, tmp_path, _duplicate_annotation, "pred_dup.json")
    code, _, err = _pq(gt_files["json"], gt_files, bad)
    assert code == 2 and "pred_dup.json" in err and "synthetic_val_0_000000" in err

    def unknown(doc):
        doc["annotations"][0]["segments_info"][0]["category_id"] = 4242

    bad = _edited(gt_files, tmp_path, unknown, "pred_unk.json")
    code, _, err = _pq(gt_files["json"], gt_files, bad)
    assert code == 2 and "pred_unk.json" in err and "unknown category_id 4242" in err
    bad = _edited(gt_files, tmp_path, _phantom_segment, "pred_phantom.json")
    phantom = json.loads(bad.read_text())["annotations"][1]["segments_info"][-1]["id"]
    code, _, err = _pq(gt_files["json"], gt_files, bad)
    assert code == 2 and "pred_phantom.json" in err and f"[{phantom}]" in err and "synthetic_val_0_000001.png" in err


# -------------------------------------------------------------------------------------------
# ... through `axial-deeplab evaluate` with a tiny untrained checkpoint
# -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(gt_files, tmp_path_factory):
    split = {
        "image_dir": str(gt_files["image_dir"]),
        "json_path": str(gt_files["json"]),
        "png_dir": str(gt_files["png_dir"]),
    }
    config = {
        "experiment": {"name": "tiny", "seed": 0, "device": "cpu", "threads": 1},
        "model": TINY_MODEL,
        "data": {"dataset": "coco_panoptic", "options": {"train": split, "val": split}, "num_workers": 0},
        "eval": {"batch_size": 1, "stuff_area": 16, "nms_kernel": 5, "top_k": 20},
    }
    return save_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", config)


def test_evaluate_refuses_inconsistent_ground_truth(gt_files, tiny_checkpoint, tmp_path):
    code, out, err = _run(["evaluate", "--checkpoint", str(tiny_checkpoint), "--no-progress"])
    assert code == 0, err
    assert "PQ" in out or "All" in out
    bad = _edited(gt_files, tmp_path, _phantom_segment, "eval_phantom.json")
    code, out, err = _run(
        ["evaluate", "--checkpoint", str(tiny_checkpoint), "--no-progress", f"data.options.val.json_path={bad}"]
    )
    assert code == 2, (out, err)
    assert "eval_phantom.json" in err and "synthetic_val_0_000001.png" in err and "absent from the PNG" in err
    assert "All" not in out  # no table was printed

    def empty(doc):
        doc["annotations"] = []

    bad = _edited(gt_files, tmp_path, empty, "eval_empty.json")
    code, out, err = _run(
        ["evaluate", "--checkpoint", str(tiny_checkpoint), "--no-progress", f"data.options.val.json_path={bad}"]
    )
    assert code == 2 and "eval_empty.json" in err and "no annotations" in err


def test_evaluate_refuses_an_image_limit_of_zero(tiny_checkpoint):
    """``--max-images 0`` would score nothing and print an all-zero table as if it were a result."""
    code, out, err = _run(["evaluate", "--checkpoint", str(tiny_checkpoint), "--no-progress", "--max-images", "0"])
    assert code == 2, (out, err)
    assert "nothing to evaluate" in err and "--max-images" in err
    assert "All" not in out


def test_evaluate_refuses_an_empty_split(tiny_checkpoint):
    code, out, err = _run(
        [
            "evaluate",
            "--checkpoint",
            str(tiny_checkpoint),
            "--no-progress",
            "data.dataset=synthetic",
            "data.options={val: {length: 0}}",
        ]
    )
    assert code == 2, (out, err)
    assert "nothing to evaluate" in err and "no images" in err
    assert "All" not in out
