"""Post-processing settings have one home: ``PostprocessSettings`` defines the defaults, the
engine sets a built model's from the config's ``eval`` section, and the model's eval forward,
evaluation and ``predict`` merge with them through the same function."""

import dataclasses
import inspect

import pytest
import torch
from engine_testing import tiny_run

from axial_deeplab.engine.builders import build_dataset, build_model, dataset_metadata
from axial_deeplab.engine.config import Config, config_from_dict
from axial_deeplab.engine.evaluate import _reorder_classes, postprocess_outputs, postprocess_settings, raw_outputs
from axial_deeplab.engine.predict import predict_panoptic
from axial_deeplab.models.panoptic_deeplab import PanopticDeepLab
from axial_deeplab.postprocess import (
    PostprocessSettings,
    find_instance_centers,
    panoptic_inference,
    panoptic_inference_reference,
)

CHANGED = {"threshold": 0.05, "nms_kernel": 3, "top_k": 7, "stuff_area": 40}


def _tiny(eval_section):
    cfg = config_from_dict(tiny_run(eval=eval_section))
    metadata = dataset_metadata(build_dataset(cfg, cfg.data.eval_split))
    torch.manual_seed(0)
    model = build_model(cfg, metadata).eval()
    with torch.no_grad():
        model.center_head[1].bias.fill_(0.3)  # peaks everywhere above the threshold: top_k and NMS decide
    return cfg, metadata, model


def test_defaults_have_one_source():
    defaults = PostprocessSettings()
    # the config's eval section and every function's keyword defaults agree with the one definition
    assert PostprocessSettings.from_config(Config()) == defaults
    for fn in (panoptic_inference, panoptic_inference_reference, find_instance_centers):
        params = inspect.signature(fn).parameters
        for name, value in defaults.as_kwargs().items():
            if name in params:
                assert params[name].default == value, (fn.__name__, name)
    params = inspect.signature(PanopticDeepLab.__init__).parameters
    renamed = {"threshold": "center_threshold"}
    for name, value in defaults.as_kwargs().items():
        assert params[renamed.get(name, name)].default == value, name
    # Panoptic-DeepLab's Cityscapes settings (threshold 0.1, NMS 13, stuff area 2048), 200 centres
    assert (defaults.threshold, defaults.nms_kernel, defaults.top_k, defaults.stuff_area) == (0.1, 13, 200, 2048)


def test_cfg_eval_reaches_model_postprocess_evaluation_and_predict_identically():
    cfg, metadata, model = _tiny(CHANGED)
    assert model.postprocess_settings == PostprocessSettings(**CHANGED)
    assert (model.center_threshold, model.nms_kernel, model.top_k, model.stuff_area) == (0.05, 3, 7, 40)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        forward = model(x)
        engine = postprocess_outputs(raw_outputs(model, x, cfg), metadata, postprocess_settings(model, cfg), True)
        defaults = model.postprocess(model.predict_raw(x), **PostprocessSettings().as_kwargs())
    for a, b in zip(forward, engine):
        assert torch.equal(a["panoptic_seg"][0], b["panoptic"])
        assert a["panoptic_seg"][1] == b["segments_info"]
        assert b["centers"].shape[0] == CHANGED["top_k"]  # top_k reached the merge
    # the settings decide the result: the defaults give another one
    assert any(not torch.equal(a["panoptic_seg"][0], d["panoptic_seg"][0]) for a, d in zip(forward, defaults))
    # predict: one image as uint8 pixels through the eval transform, the same panoptic map
    rgb = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image, pan, _ = predict_panoptic(model, cfg, metadata, rgb, torch.device("cpu"))
    with torch.no_grad():
        expected = model(image[None])[0]["panoptic_seg"][0]
    assert torch.equal(pan, expected)


def test_python_override_wins_with_a_warning_and_per_call_overrides():
    cfg, metadata, model = _tiny(CHANGED)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model.top_k = 2  # a view of postprocess_settings
    assert model.postprocess_settings == PostprocessSettings(**dict(CHANGED, top_k=2))
    with pytest.warns(UserWarning, match="differ from the config's eval section"):
        settings = postprocess_settings(model, cfg)
    assert settings is model.postprocess_settings
    with torch.no_grad():
        raw = model.predict_raw(x)
        engine = postprocess_outputs(raw, metadata, settings, full=True)[0]
        once = model.postprocess(raw, top_k=5)[0]
    assert engine["centers"].shape[0] == 2
    assert once["instances"]["centers"].shape[0] <= 5 and model.top_k == 2  # a per-call override is not kept
    with pytest.raises(TypeError, match="unknown post-processing settings"):
        model.postprocess_settings.replace(nms=3)


def test_bad_eval_value_refused_naming_the_key():
    cfg = Config()
    cfg.eval.nms_kernel = 4
    with pytest.raises(ValueError, match=r"eval\.nms_kernel"):
        PostprocessSettings.from_config(cfg)
    with pytest.raises(ValueError, match="stuff_area"):
        PostprocessSettings(stuff_area=-1)


def test_model_kwargs_replaced_by_eval_section_warns():
    cfg = config_from_dict(tiny_run(eval={"top_k": 20}))
    cfg.model.kwargs["top_k"] = 400
    metadata = dataset_metadata(build_dataset(cfg, cfg.data.eval_split))
    with pytest.warns(UserWarning, match=r"model.kwargs.top_k=400 is replaced by eval.top_k=20"):
        model = build_model(cfg, metadata)
    assert model.top_k == 20


def test_class_reordering_covers_averaged_probabilities():
    raw = {
        "semantic_logits": torch.arange(6.0).view(1, 3, 1, 2),
        "semantic_probs": torch.arange(6.0).view(1, 3, 1, 2) / 10,
        "center_heatmap": torch.zeros(1, 1, 1, 2),
    }
    out = _reorder_classes(raw, [2, 0, 1])
    for key in ("semantic_logits", "semantic_probs"):
        assert torch.equal(out[key][0, :, 0, 0], raw[key][0, [2, 0, 1], 0, 0])
    assert out["center_heatmap"] is raw["center_heatmap"]


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PostprocessSettings().top_k = 3
