"""The Python inference API: ``load_model`` (checkpoint folder, run folder, weights file +
config), ``Predictor`` on a path, a PIL image and an array (the same map ``axial-deeplab
predict`` writes), and ``create_model(pretrained=<folder>)``. A tiny untrained checkpoint keeps
it fast."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from engine_testing import save_untrained_checkpoint, tiny_run

import axial_deeplab
from axial_deeplab.cli import main
from axial_deeplab.data.panoptic_io import read_panoptic_png

TINY = tiny_run(data={"options": {"val": {"length": 2}}}, eval={"batch_size": 1})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder holding one checkpoint, checkpoints/step-000000/."""
    run = tmp_path_factory.mktemp("run")
    save_untrained_checkpoint(run / "checkpoints" / "step-000000", TINY)
    return run


@pytest.fixture(scope="module")
def checkpoint(run_dir):
    return run_dir / "checkpoints" / "step-000000"


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A synthetic RGB picture (88 x 72, so it is resized for the network and back) saved as PNG."""
    from PIL import Image

    from axial_deeplab.data.synthetic import SyntheticPanoptic
    from axial_deeplab.engine.visualize import to_uint8_image

    rgb = to_uint8_image(SyntheticPanoptic("val", length=1, image_size=(72, 88))[0]["image"])
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(rgb).save(path)
    return path


def _state(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _same_weights(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_load_model_from_checkpoint_folder_run_folder_and_weights_file(run_dir, checkpoint):
    a = axial_deeplab.load_model(checkpoint)
    b = axial_deeplab.load_model(run_dir)  # no best/: the newest step-*/
    with warnings.catch_warnings():  # its classes come from the info.json beside it, not a guess
        warnings.simplefilter("error", UserWarning)
        c = axial_deeplab.load_model(checkpoint / "model.safetensors", config=str(checkpoint / "config.yaml"))
    for m in (a, b, c):
        assert not m.training
        assert m.metadata.class_names == a.metadata.class_names and m.config.model.name == "axial_deeplab_s"
    assert _same_weights(_state(a), _state(b)) and _same_weights(_state(a), _state(c))
    # a best/ checkpoint is preferred over the newest step
    best_run = run_dir.parent / "run_with_best"
    shutil.copytree(run_dir, best_run)
    best_dir = save_untrained_checkpoint(best_run / "checkpoints" / "best", TINY)
    from safetensors.torch import load_file, save_file

    tensors = load_file(f"{best_dir}/model.safetensors")
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] += 1.0  # other weights than the step's
    save_file(tensors, f"{best_dir}/model.safetensors")
    best = axial_deeplab.load_model(best_run)
    assert torch.equal(best.state_dict()[key], tensors[key])
    assert not _same_weights(_state(best), _state(a))


def test_predictor_path_pil_and_array_agree_with_predict_command(checkpoint, picture, tmp_path, capsys):
    from PIL import Image

    predictor = axial_deeplab.Predictor(checkpoint, device="cpu")
    rgb = np.asarray(Image.open(picture).convert("RGB"))
    by_path = predictor(picture)
    by_str = predictor(str(picture))
    by_pil = predictor(Image.open(picture))
    by_array = predictor(rgb)
    assert by_path.panoptic.shape == (72, 88) and by_path.panoptic.dtype == np.int64
    for r in (by_str, by_pil, by_array):
        np.testing.assert_array_equal(r.panoptic, by_path.panoptic)
    pan = by_path.panoptic
    md = predictor.metadata
    assert pan.min() >= -1

    # the command's output for the same image: the same segments, of the same classes
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--no-progress", str(picture), "--output", str(out)]) == 0
    ids = read_panoptic_png(out / "panoptic" / "scene.png")
    ann = json.loads((out / "predictions.json").read_text())["annotations"][0]
    cat_of = {s["id"]: s["category_id"] for s in ann["segments_info"]}
    assert ids.shape == pan.shape
    assert ((ids == 0) == (pan < 0)).all()  # void in the same places
    pairs = set(zip(ids.ravel().tolist(), pan.ravel().tolist()))
    assert len(pairs) == len(np.unique(ids)) == len(np.unique(pan))  # one-to-one: the same partition
    cmd_cat = np.vectorize(lambda i: cat_of.get(i, -1))(ids)
    our_cat = np.where(pan >= 0, np.vectorize(md.category_id)(np.maximum(pan, 0) // md.label_divisor), -1)
    np.testing.assert_array_equal(cmd_cat, our_cat)

    # segments: one per value, with class names, areas summing to the labelled pixels
    segs = by_path.segments
    assert sorted(s["id"] for s in segs) == sorted(np.unique(pan[pan >= 0]).tolist())
    for s in segs:
        assert s["class_name"] == md.class_names[s["class_id"]] and s["area"] == int((pan == s["id"]).sum())
        assert s["isthing"] == md.is_thing(s["class_id"])
    ov = by_path.overlay()
    assert ov.shape == (72, 88, 3) and ov.dtype == np.uint8


def test_predictor_takes_a_loaded_model(checkpoint, picture):
    model = axial_deeplab.load_model(checkpoint)
    a = axial_deeplab.Predictor(model)(picture)
    b = axial_deeplab.Predictor(checkpoint)(picture)
    np.testing.assert_array_equal(a.panoptic, b.panoptic)
    bare = axial_deeplab.create_model("axial_deeplab_s", num_classes=3)
    with pytest.raises(ValueError, match="load_model"):
        axial_deeplab.Predictor(bare)


def test_predictor_refuses_a_bad_image_by_name(checkpoint, tmp_path):
    predictor = axial_deeplab.Predictor(checkpoint)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8.*\(4, 4\)"):
        predictor(np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        predictor(tmp_path / "nothing.png")


def test_create_model_pretrained_folder_loads_the_checkpoint(run_dir, checkpoint):
    ref = axial_deeplab.load_model(checkpoint)
    from axial_deeplab.engine.builders import model_kwargs_for

    kwargs = model_kwargs_for(ref.config, ref.metadata, None)
    for source in (checkpoint, str(run_dir)):
        model = axial_deeplab.create_model("axial_deeplab_s", pretrained=str(source), **kwargs)
        assert _same_weights(_state(model), _state(ref))


@pytest.mark.parametrize("use", ["load_model", "Predictor", "create_model"])
def test_a_bad_path_is_one_clear_error(tmp_path, use):
    missing = tmp_path / "no_such_run"
    empty = tmp_path / "empty"
    empty.mkdir()
    for path in (missing, empty):
        with pytest.raises(FileNotFoundError, match=str(path.name)):
            if use == "load_model":
                axial_deeplab.load_model(path)
            elif use == "Predictor":
                axial_deeplab.Predictor(path)
            else:
                axial_deeplab.create_model("axial_resnet_tiny", pretrained=str(path))
