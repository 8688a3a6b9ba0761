"""PQ against the official tools: cityscapesscripts' evaluatePanoptic (a port of panopticapi's
pq_compute) on files written by our writer, and torchmetrics' PanopticQuality on crowd-free data."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from axial_deeplab.data import PanopticMetadata, PanopticWriter, encode_panoptic, encode_prediction
from axial_deeplab.evaluation import PanopticQuality, pq_compute_files

# Three stuff, three thing classes, with non-contiguous dataset category ids.
MD = PanopticMetadata(
    name="fixture",
    class_names=["road", "grass", "wall", "car", "person", "dog"],
    thing_ids=[3, 4, 5],
    label_divisor=1000,
    ignore_label=255,
    category_ids=[7, 3, 21, 40, 11, 5],
)
STUFF, THINGS = [0, 1, 2], [3, 4, 5]


def _random_case(rng, h, w, crowd=True, multi_crowd=False, pred_void=True):
    """Ground truth (semantic, instance, crowd) and a perturbed predicted panoptic map."""
    sem = np.zeros((h, w), np.int64)
    cuts = np.sort(rng.choice(np.arange(1, w), 2, replace=False))
    for k, (a, b) in enumerate(zip([0, *cuts], [*cuts, w])):
        sem[:, a:b] = STUFF[rng.integers(3)] if k else STUFF[0]
    inst = np.zeros((h, w), np.int64)
    crowd_map = np.zeros((h, w), bool)
    boxes = []
    n_things = int(rng.integers(2, 8))
    crowd_classes = []
    for i in range(1, n_things + 1):
        c = THINGS[rng.integers(3)]
        bh, bw = int(rng.integers(1, h // 2)), int(rng.integers(1, w // 2))  # includes tiny boxes
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        is_crowd = crowd and rng.random() < (0.8 if multi_crowd else 0.3) and (multi_crowd or c not in crowd_classes)
        if is_crowd:
            crowd_classes.append(c)
        sem[y : y + bh, x : x + bw] = c
        inst[y : y + bh, x : x + bw] = i
        crowd_map[y : y + bh, x : x + bw] = is_crowd
        boxes.append((c, y, x, bh, bw))
    # void: a block and scattered pixels
    vy, vx = int(rng.integers(0, h - 3)), int(rng.integers(0, w - 3))
    void = np.zeros((h, w), bool)
    void[vy : vy + int(rng.integers(1, 5)), vx : vx + int(rng.integers(1, 6))] = True
    void |= rng.random((h, w)) < 0.03
    sem[void] = MD.ignore_label
    inst[void] = 0
    crowd_map[void] = False
    is_thing = np.isin(sem, THINGS)
    inst[~is_thing] = 0
    crowd_map &= is_thing

    # prediction: stuff from gt (with a wrong band), things shifted / relabelled / dropped, extras
    pred_sem = np.where(sem == MD.ignore_label, STUFF[rng.integers(3)], sem)
    pred_sem = np.where(np.isin(pred_sem, THINGS), 0, pred_sem)
    a = int(rng.integers(0, w - 2))
    pred_sem[:, a : a + int(rng.integers(1, 4))] = STUFF[rng.integers(3)]
    pan = pred_sem * MD.label_divisor
    next_inst = 1
    for c, y, x, bh, bw in boxes:
        r = rng.random()
        if r < 0.15:
            continue  # missed
        if r < 0.3:
            c = THINGS[rng.integers(3)]  # maybe wrong class
        dy, dx = (0, 0) if rng.random() < 0.4 else (int(rng.integers(-2, 3)), int(rng.integers(-2, 3)))
        y0, x0 = max(0, y + dy), max(0, x + dx)
        pan[y0 : y + dy + bh, x0 : x + dx + bw] = c * MD.label_divisor + next_inst
        next_inst += 1
    for _ in range(int(rng.integers(0, 4))):  # unmatched extras, sometimes on void
        c = THINGS[rng.integers(3)]
        bh, bw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        pan[y : y + bh, x : x + bw] = c * MD.label_divisor + next_inst
        next_inst += 1
    if pred_void:
        y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        pan[y : y + int(rng.integers(1, 5)), x : x + int(rng.integers(1, 5))] = -1
    return (sem, inst, crowd_map), pan


def _iou_half_cases():
    """One image with pairs at IoU exactly 0.5 (no match), just above (match), and predictions
    exactly half / more than half on void."""
    h, w = 12, 16
    sem = np.zeros((h, w), np.int64)
    inst = np.zeros((h, w), np.int64)
    pan = np.zeros((h, w), np.int64)  # stuff class 0 everywhere
    # A: gt 2x4 (8 px), pred 2x2 inside -> 4/8 = 0.5 exactly: FN + FP
    sem[0:2, 0:4], inst[0:2, 0:4] = 3, 1
    pan[0:2, 0:2] = 3000 + 1
    # B: gt 2x2 (4 px), pred 2x4 covering it -> 4/8 = 0.5 exactly
    sem[3:5, 0:2], inst[3:5, 0:2] = 4, 2
    pan[3:5, 0:4] = 4000 + 2
    # C: gt 2x3 (6 px), pred 2x7 = gt + 2 void + 6 stuff -> 6 / (14 + 6 - 6 - 2) = 0.5 exactly
    sem[6:8, 0:3], inst[6:8, 0:3] = 5, 3
    sem[6:8, 3:4] = 255
    pan[6:8, 0:7] = 5000 + 3
    # D: gt 1x5, pred 1x3 inside -> 3/5 = 0.6: match
    sem[9, 0:5], inst[9, 0:5] = 3, 4
    pan[9, 0:3] = 3000 + 4
    # E: pred 1x4 with exactly 2 px on void -> not > 0.5: FP;  F: 3 of 4 on void -> ignored
    sem[0, 10:12] = 255
    pan[0, 10:14] = 4000 + 5
    sem[2, 10:13] = 255
    pan[2, 10:14] = 4000 + 6
    crowd = np.zeros((h, w), bool)
    return (sem, inst, crowd), pan


def _write_fixture(tmp_path, cases):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    with (
        PanopticWriter(tmp_path / "gt.json", gt_dir, MD) as gw,
        PanopticWriter(tmp_path / "pred.json", pred_dir, MD) as pw,
    ):
        for k, ((sem, inst, crowd), pan) in enumerate(cases):
            gw.add_ground_truth(f"img{k}", sem, inst, crowd)
            pw.add_prediction(f"img{k}", pan)
    return str(tmp_path / "gt.json"), str(gt_dir), str(tmp_path / "pred.json"), str(pred_dir)


def _cityscapes_pq(gt_json, gt_dir, pred_json, pred_dir, out):
    from cityscapesscripts.evaluation.evalPanopticSemanticLabeling import evaluatePanoptic

    with contextlib.redirect_stdout(io.StringIO()):
        return evaluatePanoptic(gt_json, gt_dir, pred_json, pred_dir, str(out))


def _assert_close(ours, theirs, tol=1e-9):
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == theirs[group]["n"]
        for k in ("pq", "sq", "rq"):
            assert abs(ours[group][k] - theirs[group][k]) <= tol, (group, k, ours[group][k], theirs[group][k])
    for cat, r in theirs["per_class"].items():
        for k in ("pq", "sq", "rq"):
            assert abs(ours["per_class"][cat][k] - r[k]) <= tol, (cat, k)


@pytest.fixture(scope="module")
def fixture_cases():
    rng = np.random.default_rng(1234)
    cases = [_random_case(rng, int(rng.integers(14, 30)), int(rng.integers(14, 30))) for _ in range(24)]
    # two crowd segments of one class in one image (panopticapi keeps the last one listed)
    cases += [_random_case(rng, 20, 24, multi_crowd=True) for _ in range(4)]
    cases.append(_iou_half_cases())
    return cases


def test_files_match_cityscapesscripts(tmp_path, fixture_cases):
    paths = _write_fixture(tmp_path, fixture_cases)
    gt = json.load(open(paths[0]))
    crowd_cats = [[s["category_id"] for s in a["segments_info"] if s["iscrowd"]] for a in gt["annotations"]]
    assert any(len(c) > len(set(c)) for c in crowd_cats)  # two crowd segments of one class somewhere
    assert sum(len(c) for c in crowd_cats) >= 5
    assert any(s["area"] <= 2 for a in gt["annotations"] for s in a["segments_info"])  # tiny segments
    assert all((sem == 255).any() for (sem, _, _), _ in fixture_cases)  # void everywhere
    theirs = _cityscapes_pq(*paths, tmp_path / "cs.json")
    assert theirs["All"]["n"] == 6 and 0 < theirs["All"]["pq"] < 1
    ours = pq_compute_files(*paths, workers=2)
    _assert_close(ours, theirs)
    assert ours == pq_compute_files(*paths, workers=1)


def test_iou_exactly_half_is_not_a_match(tmp_path):
    paths = _write_fixture(tmp_path, [_iou_half_cases()])
    ours = pq_compute_files(*paths, workers=1)
    theirs = _cityscapes_pq(*paths, tmp_path / "cs.json")
    _assert_close(ours, theirs)
    pc = ours["per_class"]
    # car (cat 40): A is FN+FP, D is a TP at 0.6
    assert (pc[40]["tp"], pc[40]["fp"], pc[40]["fn"]) == (1, 1, 1)
    assert pc[40]["sq"] == pytest.approx(0.6)
    # person (cat 11): B is FN+FP, E is FP (exactly half on void), F ignored
    assert (pc[11]["tp"], pc[11]["fp"], pc[11]["fn"]) == (0, 2, 1)
    # dog (cat 5): C is FN+FP with IoU exactly 0.5 after removing void from the union
    assert (pc[5]["tp"], pc[5]["fp"], pc[5]["fn"]) == (0, 1, 1)


def test_streaming_evaluator_matches_files(tmp_path, fixture_cases):
    single_crowd = fixture_cases[:24] + fixture_cases[-1:]
    paths = _write_fixture(tmp_path, single_crowd)
    files = pq_compute_files(*paths, workers=1)
    ev = PanopticQuality(MD)
    for (sem, inst, crowd), pan in single_crowd:
        ev.update(torch.from_numpy(pan), torch.from_numpy(sem), torch.from_numpy(inst), torch.from_numpy(crowd))
    mem = ev.compute()
    for group in ("All", "Things", "Stuff"):
        for k in ("pq", "sq", "rq", "n"):
            assert mem[group][k] == pytest.approx(files[group][k], abs=1e-12)
    for c, name in enumerate(MD.class_names):
        a, b = mem["per_class"][name], files["per_class"][MD.category_ids[c]]
        assert (a["tp"], a["fp"], a["fn"]) == (b["tp"], b["fp"], b["fn"])


def test_merge_equals_single_pass(fixture_cases):
    whole, a, b = PanopticQuality(MD), PanopticQuality(MD), PanopticQuality(MD)
    for k, ((sem, inst, crowd), pan) in enumerate(fixture_cases):
        whole.update(pan, sem, inst, crowd)
        (a if k % 2 else b).update(pan, sem, inst, crowd)
    a.merge(b.state())
    for key in ("tp", "fp", "fn"):
        assert np.array_equal(getattr(a, key), getattr(whole, key))
    assert np.allclose(a.iou, whole.iou, rtol=0, atol=1e-12)
    assert a.compute()["All"]["pq"] == pytest.approx(whole.compute()["All"]["pq"], abs=1e-12)
    a.reset()
    assert a.tp.sum() == 0 and a.compute()["All"]["n"] == 0


def test_batched_update_equals_per_image():
    rng = np.random.default_rng(5)
    cases = [_random_case(rng, 16, 20) for _ in range(3)]
    one, batched = PanopticQuality(MD), PanopticQuality(MD)
    for (sem, inst, crowd), pan in cases:
        one.update(pan, sem, inst, crowd)
    stack = lambda i: np.stack([c[0][i] for c in cases])  # noqa: E731
    batched.update(np.stack([c[1] for c in cases]), stack(0), stack(1), stack(2))
    assert np.array_equal(one.tp, batched.tp) and np.array_equal(one.fp, batched.fp)
    assert np.allclose(one.iou, batched.iou)


def test_matches_torchmetrics_without_crowd():
    from torchmetrics.detection import PanopticQuality as TMPanopticQuality

    rng = np.random.default_rng(99)
    ours = PanopticQuality(MD)
    tm = TMPanopticQuality(things=set(THINGS), stuffs=set(STUFF))
    for _ in range(12):
        (sem, inst, crowd), pan = _random_case(rng, 20, 24, crowd=False, pred_void=False)
        assert not crowd.any() and (pan >= 0).all()
        ours.update(pan, sem, inst, crowd)
        target = np.stack([np.where(sem == 255, 255, sem), inst], -1)  # 255: not a class -> void
        preds = np.stack([pan // MD.label_divisor, pan % MD.label_divisor], -1)
        tm.update(torch.from_numpy(preds)[None], torch.from_numpy(target)[None])
    expected = float(tm.compute())
    got = ours.compute()["All"]["pq"]
    assert 0.0 < got < 1.0
    assert got == pytest.approx(expected, abs=1e-6)


def test_bad_inputs_raise():
    ev = PanopticQuality(MD)
    sem = np.zeros((4, 4), np.int64)
    with pytest.raises(ValueError, match="shapes differ"):
        ev.update(np.zeros((4, 5), np.int64), sem, sem, None)
    with pytest.raises(ValueError, match="classes outside"):
        ev.update(np.full((4, 4), 9000), sem, sem, None)
    with pytest.raises(ValueError, match="gt_semantic"):
        ev.update(np.zeros((4, 4), np.int64), sem + 7, sem, None)


def test_file_errors_name_the_file(tmp_path):
    (gt_s, gt_i, gt_c), pan = _iou_half_cases()
    paths = _write_fixture(tmp_path, [((gt_s, gt_i, gt_c), pan)])
    gt_json, gt_dir, pred_json, pred_dir = paths
    pred = json.load(open(pred_json))
    # a PNG segment missing from the JSON
    bad = json.loads(json.dumps(pred))
    dropped = bad["annotations"][0]["segments_info"].pop()
    json.dump(bad, open(tmp_path / "bad1.json", "w"))
    with pytest.raises(ValueError, match=rf"img0\.png.*segment id {dropped['id']}"):
        pq_compute_files(gt_json, gt_dir, str(tmp_path / "bad1.json"), pred_dir, workers=1)
    # unknown category
    bad = json.loads(json.dumps(pred))
    bad["annotations"][0]["segments_info"][0]["category_id"] = 999
    json.dump(bad, open(tmp_path / "bad2.json", "w"))
    with pytest.raises(ValueError, match="bad2.json.*unknown category_id 999"):
        pq_compute_files(gt_json, gt_dir, str(tmp_path / "bad2.json"), pred_dir, workers=2)
    # missing prediction for an image
    bad = dict(pred, annotations=[])
    json.dump(bad, open(tmp_path / "bad3.json", "w"))
    with pytest.raises(ValueError, match="no prediction for image_id 'img0'"):
        pq_compute_files(gt_json, gt_dir, str(tmp_path / "bad3.json"), pred_dir)
    # missing PNG
    with pytest.raises(FileNotFoundError, match="img0.png"):
        pq_compute_files(gt_json, gt_dir, pred_json, str(tmp_path), workers=1)


def test_encode_prediction_round_trip():
    from axial_deeplab.data import decode_panoptic

    rng = np.random.default_rng(0)
    (sem, inst, crowd), pan = _random_case(rng, 18, 22)
    ids, segs = encode_panoptic(sem, inst, crowd, MD)
    s2, i2, c2 = decode_panoptic(ids, segs, MD)
    assert np.array_equal(s2, sem) and np.array_equal(c2, crowd)
    assert np.array_equal(i2 > 0, inst > 0)
    assert all(seg["area"] == int((ids == seg["id"]).sum()) for seg in segs)
    ids, segs = encode_prediction(pan, MD)
    assert (ids == 0).sum() == (pan < 0).sum()
    for seg in segs:
        vals = np.unique(pan[ids == seg["id"]])
        assert vals.size == 1 and MD.category_id(vals[0] // 1000) == seg["category_id"]


def test_image_ids_pair_up_by_text(tmp_path):
    """COCO writes int image ids; our datasets hand out str ids: files still pair up."""
    (sem, inst, crowd), pan = _iou_half_cases()
    with PanopticWriter(tmp_path / "gt.json", tmp_path / "gt", MD) as gw:
        gw.add_ground_truth(139, sem, inst, crowd)
    with PanopticWriter(tmp_path / "pred.json", tmp_path / "pred", MD) as pw:
        pw.add_prediction("139", pan)
    res = pq_compute_files(tmp_path / "gt.json", tmp_path / "gt", tmp_path / "pred.json", tmp_path / "pred", workers=1)
    assert res["per_class"][40]["tp"] == 1
