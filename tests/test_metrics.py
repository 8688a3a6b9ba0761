"""mIoU, top-k accuracy and mask AP against independent references."""

import numpy as np
import pytest
import torch

from axial_deeplab.data import PanopticMetadata
from axial_deeplab.evaluation import ClassificationAccuracy, InstanceAP, SemanticIoU

MD = PanopticMetadata(name="m", class_names=["bg", "car", "dog"], thing_ids=[1, 2])


def test_semantic_iou_matches_torchmetrics():
    from torchmetrics.classification import MulticlassJaccardIndex

    rng = np.random.default_rng(0)
    ours = SemanticIoU(5, ignore_label=255)
    tm = MulticlassJaccardIndex(num_classes=5, ignore_index=255, average="none")
    for _ in range(4):
        gt = rng.integers(0, 4, (2, 9, 11))  # class 4 never in gt
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, np.where(gt == 255, 0, gt), rng.integers(0, 4, gt.shape))
        ours.update(torch.from_numpy(pred), torch.from_numpy(gt))
        tm.update(torch.from_numpy(pred), torch.from_numpy(gt))
    res = ours.compute()
    ref = tm.compute().numpy()
    assert np.allclose(res["iou"][:4], ref[:4])
    assert np.isnan(res["iou"][4])  # absent from both: excluded
    assert res["miou"] == pytest.approx(ref[:4].mean())
    assert 0 < res["pixel_accuracy"] < 1


def test_semantic_iou_by_hand_and_merge():
    a = SemanticIoU(3, ignore_label=255, class_names=["x", "y", "z"])
    gt = np.array([[0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 2]])
    a.update(pred, gt)
    r = a.compute()
    # class 0: tp 1, union 2; class 1: tp 1, union 2; class 2: only predicted on ignore -> absent
    assert r["iou"][:2] == [0.5, 0.5] and np.isnan(r["iou"][2]) and r["miou"] == 0.5
    b = SemanticIoU(3)
    b.update(pred, gt)
    a.merge(b.state())
    assert a.compute()["miou"] == 0.5 and a.confusion.sum() == 6
    with pytest.raises(ValueError, match="outside"):
        a.update(np.array([[7]]), np.array([[0]]))


def test_topk_matches_torchmetrics():
    from torchmetrics.classification import MulticlassAccuracy

    torch.manual_seed(0)
    logits = torch.randn(50, 10)
    target = torch.randint(0, 10, (50,))
    acc = ClassificationAccuracy((1, 5))
    acc.update(logits[:20], target[:20])
    other = ClassificationAccuracy((1, 5))
    other.update(logits[20:], target[20:])
    acc.merge(other.state())
    r = acc.compute()
    for k in (1, 5):
        ref = MulticlassAccuracy(num_classes=10, top_k=k, average="micro")(logits, target)
        assert r[f"top{k}"] == pytest.approx(float(ref))
    assert r["count"] == 50
    few = ClassificationAccuracy((1, 5))
    few.update(torch.tensor([[0.1, 0.9, 0.0]]), torch.tensor([2]))
    assert few.compute() == {"top1": 0.0, "top5": 1.0, "count": 1}


def _gt_two_cars():
    sem = np.zeros((20, 20), np.int64)
    inst = np.zeros((20, 20), np.int64)
    sem[2:8, 2:8], inst[2:8, 2:8] = 1, 1
    sem[10:18, 10:18], inst[10:18, 10:18] = 1, 2
    return {"semantic": torch.from_numpy(sem), "instance": torch.from_numpy(inst), "crowd": None}


def test_instance_ap_perfect_and_hand_computed():
    gt = _gt_two_cars()
    inst = gt["instance"].numpy()
    perfect = {"masks": np.stack([inst == 1, inst == 2]), "classes": np.array([1, 1]), "scores": np.array([0.9, 0.8])}
    ap = InstanceAP(MD)
    ap.update(perfect, gt)
    r = ap.compute()
    assert r["ap"] == pytest.approx(1.0) and r["ap50"] == pytest.approx(1.0)
    assert r["per_class"]["car"] == pytest.approx(1.0) and np.isnan(r["per_class"]["dog"])

    # Ranked FP (higher score) before both TPs: precision 1/2 at recall 0.5 and 2/3 at recall 1;
    # interpolated precision is 2/3 at every recall level -> AP = 2/3 at every IoU threshold.
    fp = np.zeros((20, 20), bool)
    fp[0:2, 12:20] = True
    ranked = {
        "masks": np.stack([fp, inst == 1, inst == 2]),
        "classes": np.array([1, 1, 1]),
        "scores": np.array([0.99, 0.5, 0.4]),
    }
    ap = InstanceAP(MD)
    ap.update(ranked, gt)
    assert ap.compute()["ap"] == pytest.approx(2 / 3, abs=1e-6)

    # One car, predicted at IoU 30/36 = 0.83: a hit at thresholds .50 ... .80 (7 of 10) -> AP 0.7
    gt1 = {
        "semantic": torch.from_numpy(np.where(inst == 1, 1, 0)),
        "instance": torch.from_numpy(np.where(inst == 1, 1, 0)),
    }
    pred = np.zeros((20, 20), bool)
    pred[2:8, 2:7] = True  # 30 of the 36 gt pixels
    ap = InstanceAP(MD)
    ap.update({"masks": pred[None], "classes": np.array([1]), "scores": np.array([1.0])}, gt1)
    assert ap.compute()["ap"] == pytest.approx(0.7, abs=1e-6)


def test_instance_ap_merge_and_no_detections():
    gt = _gt_two_cars()
    inst = gt["instance"].numpy()
    dets = {"masks": np.stack([inst == 1]), "classes": np.array([1]), "scores": np.array([0.9])}
    whole = InstanceAP(MD)
    whole.update(dets, gt)
    whole.update(dets, gt)
    a, b = InstanceAP(MD), InstanceAP(MD)
    a.update(dets, gt)
    b.update(dets, gt)
    a.merge(b.state())
    assert a.compute()["ap"] == pytest.approx(whole.compute()["ap"])
    assert 0 < whole.compute()["ap"] < 1  # half the cars found
    empty = InstanceAP(MD)
    empty.update({"masks": np.zeros((0, 20, 20), bool), "classes": np.zeros(0), "scores": np.zeros(0)}, gt)
    assert empty.compute()["ap"] == 0.0
    assert np.isnan(InstanceAP(MD).compute()["ap"])
    with pytest.raises(ValueError, match="masks"):
        empty.update({"masks": np.zeros((1, 5, 5), bool), "classes": np.array([1]), "scores": np.array([1.0])}, gt)
