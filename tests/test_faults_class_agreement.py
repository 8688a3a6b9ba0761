"""A checkpoint and the dataset it is scored on must agree on the classes.

A tiny model is trained for 96 steps on the synthetic scenes (enough for a PQ well above 0); its checkpoint records the
classes (names, things, category ids 1..5, label divisor). The synthetic validation split is
written as a COCO-panoptic dataset and then altered: categories reordered under other ids, one
class fewer, ``isthing`` flipped, another label divisor. ``evaluate`` must refuse each with one
message naming the checkpoint, the dataset split and every difference (exit 2), and
``--map-classes-by-name`` must score the reordered dataset exactly as the original.
"""

import copy
import json
import shutil

import pytest
from engine_testing import tiny_run

from axial_deeplab.cli import main
from axial_deeplab.data.meta import MetadataMismatchError, PanopticMetadata, check_metadata_compatible
from axial_deeplab.engine.config import config_from_dict, dump_config

TINY = tiny_run(
    data={"options": {"train": {"length": 16}, "val": {"length": 3}}},
    solver={"optimizer": "adam", "lr": 0.01, "max_steps": 96, "batch_size": 4, "warmup_steps": 0},
    train={"log_every": 96, "checkpoint_every": 96, "keep_checkpoints": 1, "eval_at_end": False},
    eval={"batch_size": 3},
)

# Synthetic categories: 1 sky, 2 ground (stuff), 3 digit, 4 disc, 5 rectangle (things).
REVERSED_IDS = {1: 50, 2: 40, 3: 30, 4: 20, 5: 10}  # sorted by id: rectangle, disc, digit, ground, sky


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from axial_deeplab.data.synthetic import SyntheticPanoptic
    from axial_deeplab.engine.train import train

    root = tmp_path_factory.mktemp("classes")
    data = copy.deepcopy(TINY)
    data["experiment"]["output_dir"] = str(root / "run")
    result = train(config_from_dict(data))
    gt = SyntheticPanoptic("val", length=3, image_size=64).write_coco_panoptic(root / "gt")
    return {"root": root, "checkpoint": result.last_checkpoint, "gt": gt, "json": json.loads(gt["json"].read_text())}


def _dataset(setup, name, edit=None, label_divisor=None):
    """An eval config for a copy of the ground truth whose JSON ``edit`` altered."""
    root = setup["root"]
    doc = copy.deepcopy(setup["json"])
    if edit is not None:
        edit(doc)
    json_path = root / f"{name}.json"
    json_path.write_text(json.dumps(doc))
    data = copy.deepcopy(TINY)
    data["experiment"]["output_dir"] = str(root / "run")
    options = {
        "val": {
            "image_dir": str(setup["gt"]["image_dir"]),
            "json_path": str(json_path),
            "png_dir": str(setup["gt"]["png_dir"]),
        }
    }
    if label_divisor is not None:
        options["label_divisor"] = label_divisor
    data["data"] = dict(data["data"], dataset="coco_panoptic", options=options)
    cfg_path = root / f"{name}.yaml"
    cfg_path.write_text(dump_config(config_from_dict(data)))
    return str(cfg_path), json_path


def _evaluate(setup, cfg_path, tmp_path, *extra):
    out = tmp_path / "metrics.json"
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            setup["checkpoint"],
            "--config",
            cfg_path,
            "--no-progress",
            "--json",
            str(out),
            *extra,
        ]
    )
    return rc, (json.loads(out.read_text()) if rc == 0 else None)


def _reorder(doc):
    for cat in doc["categories"]:
        cat["id"] = REVERSED_IDS[cat["id"]]
    doc["categories"].reverse()
    for ann in doc["annotations"]:
        for seg in ann["segments_info"]:
            seg["category_id"] = REVERSED_IDS[seg["category_id"]]


def _refusal(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line, no traceback
    assert err.startswith("axial-deeplab evaluate: error:")
    return err


def test_reordered_categories_refused_without_option(setup, tmp_path, capsys):
    cfg_path, json_path = _dataset(setup, "reordered", _reorder)
    rc, _ = _evaluate(setup, cfg_path, tmp_path)
    assert rc == 2
    err = _refusal(capsys)
    assert setup["checkpoint"] in err and "split 'val'" in err and str(json_path) in err
    assert "class 0: checkpoint 'sky' (stuff, id 1) vs dataset 'rectangle' (thing, id 10)" in err
    assert "class 4: checkpoint 'rectangle' (thing, id 5) vs dataset 'sky' (stuff, id 50)" in err
    assert "--map-classes-by-name" in err
    assert not (tmp_path / "metrics.json").exists()


def test_map_classes_by_name_scores_reordered_dataset_like_the_original(setup, tmp_path, capsys):
    cfg_orig, _ = _dataset(setup, "original")
    rc, original = _evaluate(setup, cfg_orig, tmp_path)
    assert rc == 0
    assert original["PQ_st"] > 0 and original["mIoU"] > 0  # a model that gets something right
    cfg_re, _ = _dataset(setup, "reordered", _reorder)
    rc, mapped = _evaluate(setup, cfg_re, tmp_path, "--map-classes-by-name")
    assert rc == 0, capsys.readouterr().err
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "pixel_accuracy"):
        assert mapped[key] == pytest.approx(original[key], abs=1e-9), key
    # the per-class results follow the names, whatever their position
    per_orig, per_mapped = original["panoptic"]["per_class"], mapped["panoptic"]["per_class"]
    assert sorted(per_orig) == sorted(per_mapped)
    for name in per_orig:
        assert per_mapped[name] == pytest.approx(per_orig[name]), name
    # scored by position (what evaluate did before it compared classes) the same outputs differ
    import torch

    from axial_deeplab.engine.builders import build_dataset
    from axial_deeplab.engine.config import load_config
    from axial_deeplab.engine.evaluate import evaluate_panoptic
    from axial_deeplab.engine.predict import load_checkpoint_model

    model, _, _ = load_checkpoint_model(setup["checkpoint"], torch.device("cpu"))
    cfg = load_config(cfg_re)
    reordered = build_dataset(cfg, "val")
    by_position = evaluate_panoptic(
        model, reordered, cfg, torch.device("cpu"), metadata=reordered.metadata, progress=False
    )
    assert (by_position["PQ"], by_position["mIoU"]) != pytest.approx((original["PQ"], original["mIoU"]))


def test_one_class_fewer_refused_with_or_without_option(setup, tmp_path, capsys):
    def drop_rectangle(doc):  # rectangles become discs; the category goes
        doc["categories"] = [c for c in doc["categories"] if c["name"] != "rectangle"]
        for ann in doc["annotations"]:
            for seg in ann["segments_info"]:
                if seg["category_id"] == 5:
                    seg["category_id"] = 4

    cfg_path, _ = _dataset(setup, "fewer", drop_rectangle)
    rc, _ = _evaluate(setup, cfg_path, tmp_path)
    assert rc == 2
    err = _refusal(capsys)
    assert "dataset has 4 classes, checkpoint 5" in err and "only in the checkpoint: ['rectangle']" in err
    assert setup["checkpoint"] in err
    rc, _ = _evaluate(setup, cfg_path, tmp_path, "--map-classes-by-name")
    assert rc == 2
    err = _refusal(capsys)
    assert "checkpoint classes missing from the dataset: ['rectangle']" in err


def test_isthing_flipped_refused_with_or_without_option(setup, tmp_path, capsys):
    def disc_is_stuff(doc):
        for cat in doc["categories"]:
            if cat["name"] == "disc":
                cat["isthing"] = 0

    cfg_path, _ = _dataset(setup, "flipped", disc_is_stuff)
    rc, _ = _evaluate(setup, cfg_path, tmp_path)
    assert rc == 2
    err = _refusal(capsys)
    assert "class 3: checkpoint 'disc' (thing, id 4) vs dataset 'disc' (stuff, id 4)" in err
    assert "class 0" not in err  # only the class that differs
    rc, _ = _evaluate(setup, cfg_path, tmp_path, "--map-classes-by-name")
    assert rc == 2
    assert "class 'disc': thing in the checkpoint, stuff in the dataset" in _refusal(capsys)


def test_other_label_divisor_refused(setup, tmp_path, capsys):
    cfg_path, _ = _dataset(setup, "divisor", label_divisor=256)
    rc, _ = _evaluate(setup, cfg_path, tmp_path)
    assert rc == 2
    err = _refusal(capsys)
    assert "label divisor 1000 vs 256" in err and setup["checkpoint"] in err
    assert "data.options.label_divisor=1000" in err and "--map-classes-by-name" not in err


def test_checkpoint_without_metadata_warns_once_and_uses_the_datasets(setup, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(setup["checkpoint"], bare)
    info = json.loads((bare / "info.json").read_text())
    del info["metadata"]
    (bare / "info.json").write_text(json.dumps(info))
    cfg_path, _ = _dataset(setup, "original")
    out = tmp_path / "m.json"
    with pytest.warns(UserWarning, match="does not record its classes") as caught:
        rc = main(["evaluate", "--checkpoint", str(bare), "--config", cfg_path, "--no-progress", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert sum("does not record its classes" in str(w.message) for w in caught) == 1
    assert str(bare) in str(caught[0].message)
    assert json.loads(out.read_text())["num_images"] == 3


def test_message_lists_every_difference():
    """The comparison itself: names, ids, things and divisor in one message."""
    ckpt = PanopticMetadata(
        "ckpt",
        ["road", "person", "car", "truck"],
        thing_ids=[1, 2, 3],
        label_divisor=1000,
        category_ids=[7, 24, 26, 27],
    )
    data = PanopticMetadata(
        "data", ["road", "person", "truck", "car"], thing_ids=[1, 2, 3], label_divisor=256, category_ids=[7, 24, 26, 27]
    )
    with pytest.raises(MetadataMismatchError) as e:
        check_metadata_compatible(ckpt, data, what="checkpoint X vs dataset Y")
    msg = str(e.value)
    assert msg.startswith("checkpoint X vs dataset Y")
    assert "class 2: checkpoint 'car' (thing, id 26) vs dataset 'truck' (thing, id 26)" in msg
    assert "class 3: checkpoint 'truck' (thing, id 27) vs dataset 'car' (thing, id 27)" in msg
    assert "label divisor 1000 vs 256" in msg
    assert "class 0" not in msg and "class 1" not in msg
    assert isinstance(e.value, ValueError)  # callers that caught ValueError still do
    data.label_divisor = 1000
    assert check_metadata_compatible(ckpt, data, map_by_name=True) == [0, 1, 3, 2]
    assert check_metadata_compatible(ckpt, ckpt, map_by_name=True) is None
    assert check_metadata_compatible(ckpt, copy.deepcopy(ckpt)) is None


def test_training_eval_refuses_a_val_split_with_other_classes(setup):
    """The same check guards any evaluation, e.g. a training run's periodic one on a val JSON
    whose categories differ from the train split's."""
    import torch

    from axial_deeplab.data.coco import CocoPanopticDataset
    from axial_deeplab.engine.evaluate import evaluate_panoptic
    from axial_deeplab.engine.predict import load_checkpoint_model

    cfg_path, json_path = _dataset(setup, "reordered", _reorder)
    model, cfg, metadata = load_checkpoint_model(setup["checkpoint"], torch.device("cpu"))
    val = CocoPanopticDataset(setup["gt"]["image_dir"], json_path, setup["gt"]["png_dir"])
    with pytest.raises(MetadataMismatchError, match=r"the model vs dataset 'coco_panoptic' \(.*reordered.json\)"):
        evaluate_panoptic(model, val, cfg, torch.device("cpu"), metadata=metadata, progress=False)
