"""Prediction files that the official tools accept against the official ground truth as is.

A COCO-format fixture with integer image ids (139, 285, 632) and sparse category ids (1, 7, 23,
42, 90, with supercategories) is made from the synthetic scenes; a tiny model is trained on it
for a few steps. ``evaluate --predictions`` must write files keyed by those ids, with the
fixture's categories and relative file names, at the ground truth's size, that our ``pq`` and an
independent PQ written from the definition here both score exactly as ``evaluate`` itself did;
``predict`` writes integer ids (from ``--image-ids`` or 1..N with a file-name map). A Cityscapes
fixture in both ``csCreatePanopticImgs`` layouts (train ids and the official label ids) is scored
by cityscapesscripts' own ``evaluatePanoptic`` against each.
"""

import copy
import json
import shutil

import numpy as np
import pytest
from engine_testing import tiny_run
from PIL import Image

from axial_deeplab.cli import main
from axial_deeplab.engine.config import config_from_dict, dump_config

IMAGE_IDS = [139, 285, 632]
# synthetic category id -> (sparse id, supercategory); synthetic: 1 sky, 2 ground, 3 digit, 4 disc, 5 rectangle
SPARSE = {1: (90, "sky"), 2: (7, "ground"), 3: (23, "glyph"), 4: (1, "shape"), 5: (42, "shape")}


def _coco_fixture(root):
    """The synthetic val split rewritten as COCO would have it: int image ids, ``000000000139.png``
    names, sparse category ids listed out of order, with supercategories and colours."""
    from axial_deeplab.data.synthetic import SyntheticPanoptic

    src = SyntheticPanoptic("val", length=len(IMAGE_IDS), image_size=64).write_coco_panoptic(root / "src")
    doc = json.loads(src["json"].read_text())
    image_dir, png_dir = root / "val2017", root / "annotations" / "panoptic_val2017"
    image_dir.mkdir(parents=True)
    png_dir.mkdir(parents=True)
    ids = {str(img["id"]): new for img, new in zip(doc["images"], IMAGE_IDS)}
    for img in doc["images"]:
        name = f"{ids[str(img['id'])]:012d}.png"
        shutil.copy(src["image_dir"] / img["file_name"], image_dir / name)
        img.update(id=ids[str(img["id"])], file_name=name)
    for ann in doc["annotations"]:
        name = f"{ids[str(ann['image_id'])]:012d}.png"
        shutil.copy(src["png_dir"] / ann["file_name"], png_dir / name)
        ann.update(image_id=ids[str(ann["image_id"])], file_name=name)
        for seg in ann["segments_info"]:
            seg["category_id"] = SPARSE[seg["category_id"]][0]
    for cat in doc["categories"]:
        new, sup = SPARSE[cat["id"]]
        cat.update(id=new, supercategory=sup)
    doc["categories"].sort(key=lambda c: c["name"])  # not in id order, as a dataset may list them
    json_path = root / "annotations" / "panoptic_val2017.json"
    json_path.write_text(json.dumps(doc))
    return {"image_dir": image_dir, "json": json_path, "png_dir": png_dir, "doc": doc}


def _config(root, gt, **changes):
    split = {"image_dir": str(gt["image_dir"]), "json_path": str(gt["json"]), "png_dir": str(gt["png_dir"])}
    cfg = tiny_run(
        experiment={"output_dir": str(root / "run")},
        data={"dataset": "coco_panoptic"},
        solver={"optimizer": "adam", "lr": 0.01, "max_steps": 60, "batch_size": 3, "warmup_steps": 0},
        train={"log_every": 60, "checkpoint_every": 60, "keep_checkpoints": 1, "eval_at_end": False},
        eval={"batch_size": 2, "threshold": 0.05},
    )
    cfg["data"]["options"] = {"train": split, "val": split}
    from engine_testing import _merge

    return _merge(cfg, changes)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from axial_deeplab.engine.train import train

    root = tmp_path_factory.mktemp("submission")
    gt = _coco_fixture(root)
    cfg = _config(root, gt)
    result = train(config_from_dict(copy.deepcopy(cfg)))
    return {"root": root, "gt": gt, "cfg": cfg, "checkpoint": result.last_checkpoint}


def _write_config(setup, tmp_path, **changes):
    path = tmp_path / "eval.yaml"
    path.write_text(dump_config(config_from_dict(_config(setup["root"], setup["gt"], **changes))))
    return str(path)


def _evaluate(setup, tmp_path, *extra, **changes):
    metrics = tmp_path / "metrics.json"
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            setup["checkpoint"],
            "--config",
            _write_config(setup, tmp_path, **changes),
            "--no-progress",
            "--json",
            str(metrics),
            *extra,
        ]
    )
    return rc, (json.loads(metrics.read_text()) if rc == 0 else None)


# -------------------------------------------------------------------------------------------------
# A second oracle: PQ straight from its definition (Kirillov et al.; panopticapi's void/crowd rules)
# -------------------------------------------------------------------------------------------------
def _ids(path):
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def oracle_pq(gt_json, gt_dir, pred_json, pred_dir):
    gt, pred = json.loads(open(gt_json).read()), json.loads(open(pred_json).read())
    isthing = {c["id"]: c["isthing"] for c in gt["categories"]}
    stats = {c: [0.0, 0, 0, 0] for c in isthing}  # iou sum, tp, fp, fn
    preds = {a["image_id"]: a for a in pred["annotations"]}
    for ga in gt["annotations"]:
        pa = preds[ga["image_id"]]  # exact id, as panopticapi pairs them
        g, p = _ids(gt_dir / ga["file_name"]), _ids(pred_dir / pa["file_name"])
        gsegs = {s["id"]: s for s in ga["segments_info"]}
        psegs = {s["id"]: s for s in pa["segments_info"]}
        matched_g, matched_p = set(), set()
        for gid, gs in gsegs.items():
            for pid, ps in psegs.items():
                if gs.get("iscrowd", 0) or gs["category_id"] != ps["category_id"]:
                    continue
                inter = np.sum((g == gid) & (p == pid))
                union = np.sum(g == gid) + np.sum(p == pid) - inter - np.sum((g == 0) & (p == pid))
                if inter and inter / union > 0.5:
                    stats[gs["category_id"]][0] += inter / union
                    stats[gs["category_id"]][1] += 1
                    matched_g.add(gid)
                    matched_p.add(pid)
        for gid, gs in gsegs.items():
            if gid not in matched_g and not gs.get("iscrowd", 0):
                stats[gs["category_id"]][3] += 1
        for pid, ps in psegs.items():
            if pid in matched_p:
                continue
            crowd = [
                gid for gid, gs in gsegs.items() if gs.get("iscrowd", 0) and gs["category_id"] == ps["category_id"]
            ]
            ignored = np.sum((p == pid) & ((g == 0) | np.isin(g, crowd)))
            if ignored / np.sum(p == pid) > 0.5:
                continue
            stats[ps["category_id"]][2] += 1
    out = {}
    for group, keep in (("All", lambda t: True), ("Things", lambda t: t == 1), ("Stuff", lambda t: t == 0)):
        pq, sq, rq = [], [], []
        for c, (iou, tp, fp, fn) in stats.items():
            if not keep(isthing[c]) or tp + fp + fn == 0:
                continue
            pq.append(iou / (tp + 0.5 * fp + 0.5 * fn))
            sq.append(iou / tp if tp else 0.0)
            rq.append(tp / (tp + 0.5 * fp + 0.5 * fn))
        out[group] = {k: float(np.mean(v)) if v else 0.0 for k, v in (("pq", pq), ("sq", sq), ("rq", rq))}
    return out, stats


def _assert_scores_equal(metrics, result):
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for k in ("pq", "sq", "rq"):
            assert 100 * result[group][k] == pytest.approx(metrics[f"{k.upper()}{suffix}"], abs=1e-9), (group, k)


# -------------------------------------------------------------------------------------------------
# evaluate --predictions
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resized", [False, True], ids=["full-size", "resize_long_side"])
def test_evaluate_predictions_scored_by_pq_and_oracle_equal_evaluate(setup, tmp_path, capsys, monkeypatch, resized):
    from axial_deeplab.evaluation.pq_files import pq_compute_files

    gt = setup["gt"]
    out = tmp_path / "preds"
    changes = {"data": {"resize_long_side": 48}} if resized else {}
    rc, metrics = _evaluate(setup, tmp_path, "--predictions", str(out), **changes)
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "predictions.json").read_text())
    # keyed by the dataset's own ids (ints), with its categories unchanged and relative file names
    assert [a["image_id"] for a in doc["annotations"]] == IMAGE_IDS
    assert [i["id"] for i in doc["images"]] == IMAGE_IDS
    assert doc["categories"] == gt["doc"]["categories"]
    assert [i["file_name"] for i in doc["images"]] == [i["file_name"] for i in gt["doc"]["images"]]
    used = {s["category_id"] for a in doc["annotations"] for s in a["segments_info"]}
    assert used <= {c["id"] for c in gt["doc"]["categories"]}
    for ann in doc["annotations"]:  # at the ground truth's size, whatever the network saw
        assert "/" not in ann["file_name"]
        assert Image.open(out / "panoptic" / ann["file_name"]).size == (64, 64)

    ours = pq_compute_files(gt["json"], gt["png_dir"], out / "predictions.json", out / "panoptic", workers=1)
    _assert_scores_equal(metrics, ours)
    oracle, stats = oracle_pq(gt["json"], gt["png_dir"], out / "predictions.json", out / "panoptic")
    _assert_scores_equal(metrics, oracle)
    # not a trivial agreement: true and false positives and misses, in things and stuff
    tp_th = sum(stats[c][1] for c in (1, 23, 42))
    tp_st = sum(stats[c][1] for c in (7, 90))
    fp_th = sum(stats[c][2] for c in (1, 23, 42))
    assert tp_st > 0 and (tp_th > 0 or resized) and fp_th > 0 and sum(s[3] for s in stats.values()) > 0, stats
    # panopticapi's algorithm itself, as cityscapesscripts ships it, where installed (dev extra)
    try:
        from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as cs_eval
    except ImportError:
        cs_eval = None
    if cs_eval is not None:
        monkeypatch.setattr(cs_eval.multiprocessing, "cpu_count", lambda: 1)
        _assert_scores_equal(
            metrics,
            cs_eval.evaluatePanoptic(
                str(gt["json"]),
                str(gt["png_dir"]),
                str(out / "predictions.json"),
                str(out / "panoptic"),
                str(tmp_path / "cs.json"),
            ),
        )
    # and the pq command reads the files as they are
    rc = main(
        [
            "pq",
            "--gt-json",
            str(gt["json"]),
            "--gt-folder",
            str(gt["png_dir"]),
            "--pred-json",
            str(out / "predictions.json"),
            "--pred-folder",
            str(out / "panoptic"),
            "--workers",
            "1",
            "--json",
            str(tmp_path / "pq.json"),
        ]
    )
    assert rc == 0
    pq_json = json.loads((tmp_path / "pq.json").read_text())
    assert 100 * pq_json["All"]["pq"] == pytest.approx(metrics["PQ"], abs=1e-9)


def test_evaluate_predictions_refuses_a_folder_with_predictions_unless_replace(setup, tmp_path, capsys):
    out = tmp_path / "preds"
    (out / "panoptic").mkdir(parents=True)
    (out / "predictions.json").write_text('{"annotations": []}')
    (out / "panoptic" / "old.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    rc, _ = _evaluate(setup, tmp_path, "--predictions", str(out))
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("axial-deeplab evaluate: error:"), err
    assert f"--predictions {out}" in err and "already holds predictions" in err and "--replace" in err
    assert "--add" not in err
    assert (out / "predictions.json").read_text() == '{"annotations": []}' and (out / "panoptic" / "old.png").exists()

    rc, _ = _evaluate(setup, tmp_path, "--predictions", str(out), "--replace")
    assert rc == 0
    assert not (out / "panoptic" / "old.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert [a["image_id"] for a in json.loads((out / "predictions.json").read_text())["annotations"]] == IMAGE_IDS


def test_evaluate_predictions_refused_under_several_processes(setup, tmp_path, monkeypatch):
    import torch

    from axial_deeplab.engine import evaluate as ev
    from axial_deeplab.engine.builders import build_dataset
    from axial_deeplab.engine.predict import load_checkpoint_model
    from axial_deeplab.errors import UserError

    model, cfg, metadata = load_checkpoint_model(
        setup["checkpoint"], torch.device("cpu"), _write_config(setup, tmp_path)
    )
    monkeypatch.setattr(ev, "get_world_size", lambda: 2)
    with pytest.raises(UserError, match="one process only.*without torchrun"):
        ev.evaluate_model(
            model,
            build_dataset(cfg, "val"),
            cfg,
            torch.device("cpu"),
            metadata=metadata,
            progress=False,
            predictions=str(tmp_path / "p"),
        )
    assert not (tmp_path / "p").exists()


# -------------------------------------------------------------------------------------------------
# predict: integer ids
# -------------------------------------------------------------------------------------------------
def _predict(setup, *args):
    return main(["predict", "--checkpoint", setup["checkpoint"], "--no-progress", "--no-overlays", *map(str, args)])


def test_predict_with_image_ids_writes_the_ground_truth_ids(setup, tmp_path, capsys):
    from axial_deeplab.evaluation.pq_files import pq_compute_files

    gt = setup["gt"]
    out = tmp_path / "out"
    assert _predict(setup, gt["image_dir"], "--output", out, "--image-ids", gt["json"]) == 0, capsys.readouterr().err
    doc = json.loads((out / "predictions.json").read_text())
    by_file = {i["file_name"]: i["id"] for i in gt["doc"]["images"]}
    assert {i["file_name"]: i["id"] for i in doc["images"]} == by_file
    assert sorted(a["image_id"] for a in doc["annotations"]) == IMAGE_IDS
    assert all(isinstance(a["image_id"], int) for a in doc["annotations"])
    assert doc["categories"] == gt["doc"]["categories"]  # the checkpoint keeps the dataset's categories
    res = pq_compute_files(gt["json"], gt["png_dir"], out / "predictions.json", out / "panoptic", workers=1)
    assert res["All"]["n"] > 0


def test_predict_without_image_ids_writes_ints_with_a_file_name_map(setup, tmp_path, capsys):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    names = sorted(p.name for p in setup["gt"]["image_dir"].iterdir())
    shutil.copy(setup["gt"]["image_dir"] / names[0], src / "a.png")
    shutil.copy(setup["gt"]["image_dir"] / names[1], src / "sub" / "b.png")
    out = tmp_path / "out"
    assert _predict(setup, src, "--output", out) == 0, capsys.readouterr().err
    doc = json.loads((out / "predictions.json").read_text())
    assert [(i["id"], i["file_name"]) for i in doc["images"]] == [(1, "a.png"), (2, "sub/b.png")]
    assert [(a["image_id"], a["file_name"]) for a in doc["annotations"]] == [(1, "a.png"), (2, "sub__b.png")]
    # --add continues the numbering
    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(setup["gt"]["image_dir"] / names[2], more / "c.png")
    assert _predict(setup, more, "--output", out, "--add") == 0, capsys.readouterr().err
    doc = json.loads((out / "predictions.json").read_text())
    assert [(i["id"], i["file_name"]) for i in doc["images"]] == [(1, "a.png"), (2, "sub/b.png"), (3, "c.png")]


def test_predict_image_ids_refuses_an_unlisted_image(setup, tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    first = sorted(setup["gt"]["image_dir"].iterdir())[0]
    shutil.copy(first, src / first.name)
    shutil.copy(first, src / "stranger.png")
    out = tmp_path / "out"
    assert _predict(setup, src, "--output", out, "--image-ids", setup["gt"]["json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stranger.png" in err and str(setup["gt"]["json"]) in err, err
    assert not (out / "predictions.json").exists()


def test_metadata_keeps_the_dataset_categories():
    from axial_deeplab.data.meta import PanopticMetadata, cityscapes_metadata

    cats = [
        {"id": 90, "name": "sky", "isthing": 0, "color": [1, 2, 3], "supercategory": "sky"},
        {"id": 1, "name": "person", "isthing": 1, "color": [4, 5, 6], "supercategory": "human", "extra": 7},
    ]
    md = PanopticMetadata.from_coco_categories(cats, name="x")
    assert md.coco_categories() == cats
    assert PanopticMetadata.from_dict(json.loads(json.dumps(md.to_dict()))).coco_categories() == cats
    city = {c["name"]: c["supercategory"] for c in cityscapes_metadata().coco_categories()}
    assert city["car"] == "vehicle" and city["road"] == "flat" and city["person"] == "human"


# -------------------------------------------------------------------------------------------------
# Cityscapes: cityscapesscripts' evaluatePanoptic on the written files
# -------------------------------------------------------------------------------------------------
CITY_IDS = ["frankfurt_000000_000294", "frankfurt_000000_000576", "lindau_000001_000019"]
# synthetic class -> Cityscapes train id: sky -> sky, ground -> road, digit -> person, disc -> car, rectangle -> bicycle
TRAIN_ID = {1: 10, 2: 0, 3: 11, 4: 13, 5: 18}


def _cs_categories(use_train_id):
    """The categories list as cityscapesscripts' createPanopticImgs writes it."""
    from cityscapesscripts.helpers.labels import labels

    return [
        {
            "id": int(lb.trainId) if use_train_id else int(lb.id),
            "name": lb.name,
            "color": list(lb.color),
            "supercategory": lb.category,
            "isthing": 1 if lb.hasInstances else 0,
        }
        for lb in labels
        if not lb.ignoreInEval
    ]


def _cityscapes_fixture(root):
    """The synthetic val split in the layout ``csCreatePanopticImgs`` writes, both with
    ``--use-train-id`` (``"train"``) and without (``"label"``: the official label ids): the same
    PNGs, the category ids and categories made the way that script makes them."""
    from cityscapesscripts.helpers.labels import trainId2label

    from axial_deeplab.data.synthetic import SyntheticPanoptic

    src = SyntheticPanoptic("val", length=len(CITY_IDS), image_size=64).write_coco_panoptic(root / "src")
    doc = json.loads(src["json"].read_text())
    png_dir = root / "gtFine" / "cityscapes_panoptic_val_trainId"
    png_dir.mkdir(parents=True)
    ids = {str(img["id"]): new for img, new in zip(doc["images"], CITY_IDS)}
    for img in doc["images"]:
        new = ids[str(img["id"])]
        (root / "leftImg8bit" / "val" / new.split("_")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(
            src["image_dir"] / img["file_name"],
            root / "leftImg8bit" / "val" / new.split("_")[0] / f"{new}_leftImg8bit.png",
        )
        img.update(id=new, file_name=f"{new}_gtFine_leftImg8bit.png")
    for ann in doc["annotations"]:
        new = ids[str(ann["image_id"])]
        shutil.copy(src["png_dir"] / ann["file_name"], png_dir / f"{new}_gtFine_panoptic.png")
        ann.update(image_id=new, file_name=f"{new}_gtFine_panoptic.png")
        for seg in ann["segments_info"]:
            seg["category_id"] = TRAIN_ID[seg["category_id"]]
    doc["categories"] = _cs_categories(use_train_id=True)
    json_path = root / "gtFine" / "cityscapes_panoptic_val_trainId.json"
    json_path.write_text(json.dumps(doc))
    out = {"train": {"json": json_path, "png_dir": png_dir, "doc": doc}}

    label_doc = copy.deepcopy(doc)
    for ann in label_doc["annotations"]:
        for seg in ann["segments_info"]:
            seg["category_id"] = int(trainId2label[seg["category_id"]].id)
    label_doc["categories"] = _cs_categories(use_train_id=False)
    label_json, label_png = (
        root / "gtFine" / "cityscapes_panoptic_val.json",
        root / "gtFine" / "cityscapes_panoptic_val",
    )
    shutil.copytree(png_dir, label_png)
    label_json.write_text(json.dumps(label_doc))
    out["label"] = {"json": label_json, "png_dir": label_png, "doc": label_doc}
    return out


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    """Both Cityscapes ground truths and a tiny model trained on the train-id one ("auto" picks it)."""
    pytest.importorskip("cityscapesscripts")
    from axial_deeplab.engine.train import train

    root = tmp_path_factory.mktemp("cityscapes")
    gt = _cityscapes_fixture(root)
    cfg = tiny_run(
        experiment={"output_dir": str(root / "run")},
        data={"dataset": "cityscapes", "root": str(root), "train_split": "val"},
        solver={"optimizer": "adam", "lr": 0.01, "max_steps": 60, "batch_size": 3, "warmup_steps": 0},
        train={"log_every": 60, "checkpoint_every": 60, "keep_checkpoints": 1, "eval_at_end": False},
        eval={"batch_size": 2, "threshold": 0.05},
    )
    cfg["data"]["options"] = {}
    return dict(gt, root=root, checkpoint=train(config_from_dict(copy.deepcopy(cfg))).last_checkpoint)


def _city_evaluate(city, tmp_path, ids, *extra):
    metrics = tmp_path / f"metrics_{ids}.json"
    args = ["evaluate", "--checkpoint", city["checkpoint"], "--no-progress", "--json", str(metrics), *extra]
    rc = main(args + [f"data.options.ids={ids}"])
    return rc, (json.loads(metrics.read_text()) if rc == 0 else None)


def _evaluate_panoptic(monkeypatch, tmp_path, gt, out):
    """cityscapesscripts' own scorer, with its defaults otherwise."""
    from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as cs_eval

    monkeypatch.setattr(cs_eval.multiprocessing, "cpu_count", lambda: 1)
    return cs_eval.evaluatePanoptic(
        str(gt["json"]),
        str(gt["png_dir"]),
        str(out / "predictions.json"),
        str(out / "panoptic"),
        str(tmp_path / "cs.json"),
    )


def test_cityscapes_predictions_scored_by_evaluate_panoptic_equal_evaluate(city, tmp_path, capsys, monkeypatch):
    """Train-id and official label-id ground truth: the same scores, each one's ids in the files,
    and cityscapesscripts' ``evaluatePanoptic`` scores each against its ground truth as ``evaluate`` did."""
    metrics, docs = {}, {}
    for ids in ("train", "label"):
        gt, out = city[ids], tmp_path / ids
        rc, metrics[ids] = _city_evaluate(city, tmp_path, ids, "--predictions", str(out))
        assert rc == 0, capsys.readouterr().err
        doc = docs[ids] = json.loads((out / "predictions.json").read_text())
        assert [a["image_id"] for a in doc["annotations"]] == CITY_IDS
        assert doc["categories"] == gt["doc"]["categories"]
        assert [i["file_name"] for i in doc["images"]] == [i["file_name"] for i in gt["doc"]["images"]]
        _assert_scores_equal(metrics[ids], _evaluate_panoptic(monkeypatch, tmp_path, gt, out))
    assert metrics["train"]["PQ_st"] > 0 and metrics["train"]["PQ"] < 100
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU"):  # a train-id model scores alike on label ids
        assert metrics["label"][k] == metrics["train"][k], k
    # the same segments, under the label ids that labels.py gives each train id
    from cityscapesscripts.helpers.labels import trainId2label

    used = {ids: [[s["category_id"] for s in a["segments_info"]] for a in docs[ids]["annotations"]] for ids in docs}
    assert used["label"] == [[trainId2label[c].id for c in segs] for segs in used["train"]]
    assert {c for segs in used["label"] for c in segs} & {24, 26, 33} and not {
        c for segs in used["label"] for c in segs
    } & set(range(7))


def test_cityscapes_label_ids_with_wrong_categories_refused(city, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(city["root"] / "leftImg8bit", bad / "leftImg8bit")
    (bad / "gtFine").mkdir()
    shutil.copytree(city["label"]["png_dir"], bad / "gtFine" / "cityscapes_panoptic_val")
    doc = copy.deepcopy(city["label"]["doc"])
    doc["categories"] = _cs_categories(use_train_id=True)  # the train-id list under the label-id name
    (bad / "gtFine" / "cityscapes_panoptic_val.json").write_text(json.dumps(doc))
    rc, _ = _city_evaluate(city, tmp_path, "label", f"data.root={bad}")
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad / "gtFine" / "cityscapes_panoptic_val.json") in err, err
    assert "label ids 7..33" in err and "csCreatePanopticImgs" in err, err


def test_cityscapes_predict_writes_the_label_ids_of_a_label_id_ground_truth(city, tmp_path, capsys, monkeypatch):
    """A train-id model's ``predict --image-ids`` with the official JSON writes its label ids and
    categories (cityscapesscripts scores them); without it, the checkpoint's train ids."""
    images = city["root"] / "leftImg8bit" / "val"
    for ids in ("label", "train"):
        gt, out = city[ids], tmp_path / ids
        rc = main(
            ["predict", "--checkpoint", city["checkpoint"], str(images), "--output", str(out), "--no-progress"]
            + ["--no-overlays", "--image-ids", str(gt["json"])]
        )
        assert rc == 0, capsys.readouterr().err
        doc = json.loads((out / "predictions.json").read_text())
        assert doc["categories"] == gt["doc"]["categories"]
        cats = {c["id"] for c in gt["doc"]["categories"]}
        assert {s["category_id"] for a in doc["annotations"] for s in a["segments_info"]} <= cats
        assert sorted(a["image_id"] for a in doc["annotations"]) == CITY_IDS
        res = _evaluate_panoptic(monkeypatch, tmp_path, gt, out)
        assert res["All"]["n"] > 0 and res["All"]["pq"] > 0
    rc = main(
        ["predict", "--checkpoint", city["checkpoint"], str(images), "-o", str(tmp_path / "plain")]
        + ["--no-progress", "--no-overlays"]
    )
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "plain" / "predictions.json").read_text())
    assert sorted(c["id"] for c in doc["categories"]) == list(range(19))


def test_cityscapes_id_schemes_are_one_class_list_and_nothing_else():
    from axial_deeplab.data.meta import (
        MetadataMismatchError,
        PanopticMetadata,
        check_metadata_compatible,
        cityscapes_metadata,
        same_classes_other_ids,
        with_category_ids_of,
    )

    train, label = cityscapes_metadata(), cityscapes_metadata("label")
    assert check_metadata_compatible(train, label) is None and check_metadata_compatible(label, train) is None
    assert with_category_ids_of(train, _cs_categories(use_train_id=False)).coco_categories() == _cs_categories(False)
    # other ids for the same names are still other classes
    shuffled = PanopticMetadata.from_dict(dict(label.to_dict(), category_ids=[c + 100 for c in label.category_ids]))
    assert not same_classes_other_ids(train, shuffled)
    with pytest.raises(MetadataMismatchError, match="id 0.*id 107"):
        check_metadata_compatible(train, shuffled)
    assert with_category_ids_of(train, shuffled.coco_categories()) is train
