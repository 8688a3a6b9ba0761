"""Config loading: defaults, base files, dotted overrides, clear errors, and the shipped
recipes (numbers from the Axial-DeepLab and Panoptic-DeepLab papers)."""

import glob
import os

import pytest
import yaml

from axial_deeplab.engine.config import (
    Config,
    ConfigError,
    config_from_dict,
    describe_config,
    dump_config,
    load_config,
    parse_override,
)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "src", "axial_deeplab", "configs")  # shipped in the package


def _cfg(name, *overrides):
    return load_config(os.path.join(CONFIGS, name), overrides)


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("solver: {lr: 0.01, max_steps: 10}\nmodel: {kwargs: {span: 9}}\n")
    cfg = load_config(
        str(p), ["solver.lr=2e-3", "data.crop_size=[65, 129]", "model.kwargs.width=0.5", "train.tensorboard=false"]
    )
    assert cfg.solver.lr == 2e-3 and cfg.solver.max_steps == 10
    assert cfg.data.crop_size == [65, 129]
    assert cfg.model.kwargs == {"span": 9, "width": 0.5}
    assert cfg.train.tensorboard is False
    assert cfg.solver.poly_power == 0.9 and cfg.solver.batch_size == 32  # documented defaults
    assert cfg.output_dir == os.path.join("runs", "experiment")


def test_base_inheritance_merges_sections(tmp_path):
    (tmp_path / "base.yaml").write_text("solver: {lr: 0.5, batch_size: 16}\nmodel: {kwargs: {span: 65, a: 1}}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nsolver: {lr: 0.25}\nmodel: {kwargs: {a: 2}}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.solver.lr == 0.25 and cfg.solver.batch_size == 16
    assert cfg.model.kwargs == {"span": 65, "a": 2}


@pytest.mark.parametrize(
    "data, match",
    [
        ({"solver": {"learning_rate": 1}}, "solver.learning_rate"),
        ({"solvr": {}}, "solvr"),
        ({"solver": {"max_steps": "many"}}, "solver.max_steps"),
        ({"data": {"crop_size": [10]}}, "data.crop_size"),
        ({"solver": {"optimizer": "adagrad"}}, "solver.optimizer"),
        ({"train": {"tensorboard": "maybe"}}, "train.tensorboard"),
    ],
)
def test_bad_values_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_bad_files_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("solver: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(p))
    p.write_text("solver: {lr: 1}\nsurprise: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*surprise"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("no_equals_sign")


def test_dump_round_trip():
    cfg = config_from_dict({"solver": {"lr": 3e-4}, "model": {"kwargs": {"layers": [1, 1, 1, 1]}}})
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    text = describe_config()
    assert "poly_power: 0.9" in text and "GLOBAL batch size" in text


def test_every_shipped_config_loads():
    files = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))
    assert len(files) >= 15
    for f in files:
        load_config(f)


@pytest.mark.parametrize("size", ["s", "m", "l", "xl"])
def test_cityscapes_recipe(size):
    cfg = _cfg(f"cityscapes_axial_deeplab_{size}.yaml")
    assert cfg.model.name == f"axial_deeplab_{size}"
    assert cfg.data.dataset == "cityscapes" and cfg.data.crop_size == [1025, 2049]
    assert cfg.solver.batch_size == 32 and cfg.solver.max_steps == 60000
    assert (cfg.data.min_scale, cfg.data.max_scale) == (0.5, 2.0)
    assert cfg.solver.schedule == "poly" and cfg.solver.poly_power == 0.9
    assert cfg.solver.optimizer == "radam_lookahead" and cfg.solver.lr == 1e-3 and cfg.solver.warmup_steps > 0
    assert cfg.model.kwargs["span"] == 65 and cfg.model.kwargs["drop_path_rate"] == 0.0
    assert (cfg.model.kwargs["bn_eps"], cfg.model.kwargs["bn_momentum"]) == (1e-3, 0.01)
    assert cfg.loss.semantic_top_k == 0.2 and cfg.loss.center_weight == 200 and cfg.loss.offset_weight == 0.01
    assert cfg.eval.stuff_area == 2048 and cfg.model.sync_bn


@pytest.mark.parametrize("size", ["s", "m", "l"])
def test_coco_recipe(size):
    cfg = _cfg(f"coco_axial_deeplab_{size}.yaml")
    assert cfg.model.name == f"axial_deeplab_{size}" and cfg.data.dataset == "coco"
    assert cfg.data.crop_size == [1025, 1025] and cfg.solver.batch_size == 64 and cfg.solver.max_steps == 200000
    assert cfg.solver.optimizer == "radam_lookahead" and cfg.solver.lr == 1e-3 and cfg.solver.warmup_steps == 2000
    assert (cfg.data.min_scale, cfg.data.max_scale) == (0.5, 1.5)
    assert cfg.loss.semantic_top_k == 1.0 and cfg.eval.nms_kernel == 41 and cfg.eval.stuff_area == 4096


def test_mapillary_and_imagenet_recipes():
    cfg = _cfg("mapillary_axial_deeplab_l.yaml")
    assert cfg.model.name == "axial_deeplab_l" and cfg.data.dataset == "mapillary"
    for name, model in (
        ("imagenet_axial_resnet_s.yaml", "axial_resnet_s"),
        ("imagenet_axial_resnet_m.yaml", "axial_resnet_m"),
        ("imagenet_axial_resnet_l.yaml", "axial_resnet_l"),
        ("imagenet_axial_resnet_s_full.yaml", "axial_resnet_s_full"),
    ):
        cfg = _cfg(name)
        assert cfg.experiment.task == "classification" and cfg.model.name == model
        assert cfg.solver.optimizer == "sgd" and cfg.solver.nesterov and cfg.data.crop_size == [224, 224]


def test_config_models_are_registered():
    from axial_deeplab.models import is_model

    for f in glob.glob(os.path.join(CONFIGS, "*.yaml")):
        assert is_model(load_config(f).model.name), f


def test_synthetic_yaml_is_the_demo_recipe():
    from axial_deeplab.commands.demo import DEMO_RECIPE

    assert _cfg("synthetic.yaml") == config_from_dict(DEMO_RECIPE)


def test_usage_doc_names_every_config_key():
    import dataclasses

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "USAGE.md"), encoding="utf-8").read()
    missing = []
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(sec.type if isinstance(sec.type, type) else type(getattr(Config(), sec.name))):
            if f"`{f.name}`" not in doc and f"{f.name}`" not in doc and f"`{f.name}" not in doc:
                missing.append(f"{sec.name}.{f.name}")
    assert not missing, f"docs/USAGE.md does not document {missing}"
