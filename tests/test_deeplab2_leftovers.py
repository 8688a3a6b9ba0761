"""What users meet around deeplab2's layouts:

* a run saved when local-span relative tables held only their span's rows (and every Axial-ResNet
  had the stem max-pool) resumes exactly once the message's setting is given;
* images are padded with the model's own ``pixel_mean``, so padded pixels reach a deeplab2-normalised
  network (x / 127.5 - 1) as exact zeros, on the prediction, evaluation and training paths;
* offsets are rescaled per axis as deeplab2's ``resize_and_rescale_offsets`` does (a fixture written
  by deeplab2's own function, on axes with different (out - 1) / (in - 1) factors).
"""

import copy
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from engine_testing import tiny_run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from axial_deeplab.engine import checkpoint as ck
from axial_deeplab.engine.config import config_from_dict
from axial_deeplab.engine.metrics_log import read_metrics
from axial_deeplab.engine.train import train
from axial_deeplab.errors import UserError
from axial_deeplab.layers.axial_attention import PositionSensitiveAxialAttention

SPAN = 9
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "deeplab2")


# ----------------------------------------------------------------------------- resuming an old run


def _crop(table: torch.Tensor, rows: int) -> torch.Tensor:
    c, r = (table.shape[1] - 1) // 2, (rows - 1) // 2
    return table[:, c - r : c + r + 1].contiguous().clone()


def _rewrite_as_old(folder: str, rows: int) -> None:
    """Rewrite a checkpoint as the code before span-independent tables and recorded arrangements
    wrote it: tables (weights, EMA, optimizer moments, Lookahead slow weights) of ``rows`` rows, no
    arrangement in the weights' metadata nor in the saved config."""
    for name in (ck.MODEL_FILE, ck.EMA_FILE):
        path = os.path.join(folder, name)
        with safe_open(path, "pt") as f:
            step = f.metadata()["step"]
        tensors = {k: _crop(v, rows) if k.endswith("_table") else v for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"step": step})
    path = os.path.join(folder, ck.STATE_FILE)
    state = torch.load(path, weights_only=True)
    opt = state["optimizer"]
    cropped = 0
    for per_param in opt["base"]["state"].values():
        for key, v in per_param.items():
            if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == 509:
                outer = torch.cat([v[:, : (509 - rows) // 2], v[:, (509 + rows) // 2 :]], 1)
                assert not outer.any(), "rows beyond the span never get a gradient: zero moments"
                per_param[key] = _crop(v, rows)
                cropped += 1
    assert cropped
    opt["lookahead_slow"] = [_crop(v, rows) if v.dim() == 2 and v.shape[1] == 509 else v for v in opt["lookahead_slow"]]
    torch.save(state, path)
    path = os.path.join(folder, ck.CONFIG_FILE)
    with open(path) as f:
        data = yaml.safe_load(f)
    data["model"]["kwargs"].pop("arrangement")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir)) if r["kind"] == "train"}


def _used_rows(key, v):
    if key.endswith("_table"):
        c = (v.shape[1] - 1) // 2
        return v[:, c - SPAN // 2 : c + SPAN // 2 + 1]
    return v


def test_run_saved_with_span_sized_tables_and_maxpool_resumes_exactly(tmp_path):
    """axial_deeplab_s now defaults to deeplab2's arrangement: the old run's config does not say
    maxpool. Resuming it names the setting; given that setting, the run continues exactly."""
    run_dir = tmp_path / "run"
    data = tiny_run(
        model={"kwargs": {"span": SPAN, "arrangement": "maxpool", "attention_kw": {"impl": "reference"}}},
        data={"options": {"train": {"length": 8}, "val": {"length": 2}}},
        solver={
            "optimizer": "radam_lookahead",
            "lr": 0.001,
            "max_steps": 4,
            "batch_size": 2,
            "warmup_steps": 1,
            "lookahead_steps": 3,
            "ema_decay": 0.9,
        },
        train={"log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 5, "eval_at_end": False},
    )
    del data["model"]["kwargs"]["backbone"]  # axial_deeplab_s's own backbone (deeplab2 arrangement by default)
    data["experiment"]["output_dir"] = str(run_dir)
    reference = train(config_from_dict(copy.deepcopy(data)))
    ref_losses = _losses(run_dir)
    ref_state = {k: v.clone() for k, v in reference.model.state_dict().items()}
    root = run_dir / "checkpoints"
    for path in ck.list_checkpoints(str(root))[1:]:
        shutil.rmtree(path)
    _rewrite_as_old(str(root / "step-000002"), SPAN)

    old_config = copy.deepcopy(data)
    del old_config["model"]["kwargs"]["arrangement"]  # as the old run's config file reads
    with pytest.raises(ValueError) as err:
        train(config_from_dict(old_config), resume=True)
    assert "model.kwargs.arrangement=maxpool" in str(err.value)

    resumed = train(config_from_dict(copy.deepcopy(data)), resume=True)  # with the setting the message names
    assert resumed.step == 4
    losses = _losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step
    for k, v in resumed.model.state_dict().items():
        assert torch.allclose(_used_rows(k, v).float(), _used_rows(k, ref_state[k]).float(), rtol=1e-6, atol=1e-7), k
    # the new checkpoint records the arrangement and stores full tables
    record, legacy = ck.weights_arrangement(ck.latest_checkpoint(str(root)))
    assert record == {"backbone": "maxpool"} and not legacy
    assert (
        load_file(os.path.join(ck.latest_checkpoint(str(root)), ck.MODEL_FILE))[
            "backbone.layer1.0.attn_h.key_table"
        ].shape[1]
        == 509
    )


def _step_once(layer, optimizer):
    x = torch.randn(2, layer.in_channels, 12, 3, generator=torch.Generator().manual_seed(0))
    optimizer.zero_grad()
    layer(x).square().mean().backward()
    optimizer.step()


@pytest.mark.parametrize(
    "make",
    [lambda p: torch.optim.Adam(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)],
    ids=["adam", "sgd"],
)
def test_optimizer_state_of_span_sized_tables_fits_exactly(make):
    torch.manual_seed(0)
    layer = PositionSensitiveAxialAttention(8, 8, num_heads=2, span=5, impl="reference")
    optimizer = make(layer.parameters())
    _step_once(layer, optimizer)
    full = optimizer.state_dict()
    old = copy.deepcopy(full)
    n_tables = 0
    for per_param in old["state"].values():
        for key, v in per_param.items():
            if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == 509:
                per_param[key] = _crop(v, 5)
                n_tables += 1
    assert n_tables and n_tables % 3 == 0  # every moment of the three tables
    fitted = ck.fit_optimizer_state(layer, optimizer, old)
    for i, per_param in full["state"].items():
        for key, v in per_param.items():
            assert torch.equal(fitted["state"][i][key], v), (i, key)
    optimizer.load_state_dict(fitted)
    _step_once(layer, optimizer)  # and it steps


def test_optimizer_state_that_cannot_continue_exactly_is_refused():
    """A global-span layer whose saved state covered fewer offsets than the layer uses: the old
    layer shared its edge rows between the clipped offsets, the new one does not."""
    layer = PositionSensitiveAxialAttention(8, 8, num_heads=2, span=None, impl="reference")
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    _step_once(layer, optimizer)
    state = optimizer.state_dict()
    for per_param in state["state"].values():
        for key, v in per_param.items():
            if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == 509:
                per_param[key] = _crop(v, 5)
    with pytest.raises(UserError, match=r"query_table has 5 rows.*cannot continue exactly.*model\.pretrained"):
        ck.fit_optimizer_state(layer, optimizer, state, source="x/training_state.pt")


# ----------------------------------------------------------------------------- padding


@pytest.fixture(scope="module")
def deeplab2_normalised():
    from axial_deeplab.engine.builders import build_dataset, build_model, dataset_metadata

    cfg = config_from_dict(
        tiny_run(
            model={"kwargs": {"pixel_mean": [0.5, 0.5, 0.5], "pixel_std": [0.5, 0.5, 0.5]}},
            data={"crop_size": [96, 80], "min_scale": 1.0, "max_scale": 1.0},
        )
    )
    metadata = dataset_metadata(build_dataset(cfg, cfg.data.eval_split))
    torch.manual_seed(0)
    model = build_model(cfg, metadata).eval()
    return cfg, metadata, model


def test_model_pad_value_is_its_pixel_mean(deeplab2_normalised):
    from axial_deeplab.data.transforms import IMAGENET_MEAN, model_pad_value

    _, _, model = deeplab2_normalised
    assert model_pad_value(model) == (0.5, 0.5, 0.5)

    class Wrapper(torch.nn.Module):  # as DDP holds it
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert model_pad_value(Wrapper(model)) == (0.5, 0.5, 0.5)
    assert model_pad_value(None) == IMAGENET_MEAN
    assert model_pad_value(torch.nn.Conv2d(3, 3, 1)) == IMAGENET_MEAN


def test_prediction_pads_with_zeros_after_deeplab2_normalisation(deeplab2_normalised):
    """The prediction path (also Predictor's): a 50x45 image is padded to 64x64 for the network."""
    from axial_deeplab.engine.predict import predict_panoptic

    cfg, metadata, model = deeplab2_normalised
    seen = []
    handle = model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        rgb = np.random.default_rng(0).integers(0, 256, (50, 45, 3), dtype=np.uint8)
        _, panoptic, _ = predict_panoptic(model, cfg, metadata, rgb, torch.device("cpu"))
    finally:
        handle.remove()
    assert tuple(panoptic.shape) == (50, 45)
    (x,) = seen
    assert tuple(x.shape) == (1, 3, 64, 64)
    assert torch.count_nonzero(x[:, :, 50:, :]) == 0 and torch.count_nonzero(x[:, :, :, 45:]) == 0
    assert torch.count_nonzero(x[:, :, :50, :45]) > 0.9 * 3 * 50 * 45


def test_evaluation_and_training_pipelines_pad_with_the_models_mean(deeplab2_normalised):
    from axial_deeplab.engine.builders import build_eval_transform, build_train_transform

    cfg, metadata, model = deeplab2_normalised
    image = torch.rand(3, 40, 50)
    sample = build_eval_transform(cfg, metadata, model=model)({"image": image.clone(), "file_name": "a"})
    x = (sample["image"][None] - model.pixel_mean) / model.pixel_std  # the model's own normalisation
    assert tuple(x.shape[-2:]) == (64, 64) and tuple(sample["valid_size"]) == (40, 50)
    assert torch.count_nonzero(x[..., 40:, :]) == 0 and torch.count_nonzero(x[..., :, 50:]) == 0

    # training crops larger than the image (96x80 from 64x64 scenes) pad with the same value
    from axial_deeplab.engine.builders import build_dataset

    item = build_dataset(cfg, cfg.data.train_split)[0]
    torch.manual_seed(1)
    out = build_train_transform(cfg, metadata, model=model)(item)
    img = out["image"]
    assert tuple(img.shape[-2:]) == (96, 80)
    padded = (img == 0.5).all(0)
    assert int(padded.sum()) >= 96 * 80 - 64 * 64
    assert torch.count_nonzero(((img - model.pixel_mean[0]) / model.pixel_std[0])[:, padded]) == 0


# ----------------------------------------------------------------------------- offsets


def test_offsets_rescale_per_axis_as_deeplab2():
    from axial_deeplab.models.panoptic_deeplab import resize_outputs

    # by hand: a constant (dy, dx) = (1, 1) map from 5x9 to 17x21 becomes (16/4, 20/8) = (4, 2.5)
    out = resize_outputs({"offset_map": torch.ones(1, 2, 5, 9)}, (17, 21))["offset_map"]
    assert torch.allclose(out[0, 0], torch.full((17, 21), 4.0)) and torch.allclose(out[0, 1], torch.full((17, 21), 2.5))
    # deeplab2's resize_and_rescale_offsets (NHWC, (dy, dx)) on random maps, both factor orders
    with np.load(os.path.join(FIXTURES, "offsets_resize.npz")) as f:
        arrays = dict(f)
    for case in ("a", "b"):
        inp, want = arrays[f"{case}_input"], arrays[f"{case}_output"]
        assert inp.shape[1:3] == (5, 9)
        fy, fx = (want.shape[1] - 1) / 4, (want.shape[2] - 1) / 8
        assert fy != fx
        got = resize_outputs({"offset_map": torch.from_numpy(inp).permute(0, 3, 1, 2)}, want.shape[1:3])["offset_map"]
        got = got.permute(0, 2, 3, 1).numpy()
        assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
        swapped = got * np.array([fx / fy, fy / fx], dtype=np.float32)
        assert np.abs(swapped - want).max() > 0.1  # a y/x swap would show
