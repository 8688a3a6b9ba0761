"""Config loading: defaults, base files, dotted overrides, clear errors, and the shipped
recipes (numbers from the Axial-DeepLab and Panoptic-DeepLab papers)."""

import dataclasses
import glob
import os
from typing import get_args

import pytest
import yaml

from axial_deeplab.engine.config import (
    Config,
    ConfigError,
    DeviceKind,
    config_from_dict,
    describe_config,
    dump_config,
    literal_fields,
    load_config,
    parse_override,
    validate_config,
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


def test_literal_fields_are_the_enum_like_keys():
    # a key that falls back to plain ``str`` would drop out of here and lose its check
    assert set(literal_fields()) == {
        "experiment.task",
        "data.dataset",
        "solver.optimizer",
        "solver.schedule",
        "solver.amp",
    }


def test_bad_choice_names_key_value_and_allowed():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"solver": {"schedule": "cosin"}})
    assert str(e.value) == "solver.schedule: 'cosin' is not one of 'poly', 'cosine', 'constant'"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.dataset=cityscape"])
    assert "data.dataset: 'cityscape' is not one of 'synthetic', 'cityscapes', 'coco'" in str(e.value)
    with pytest.raises(ConfigError, match=r"solver.amp: False is not one of 'auto', 'bf16', 'fp16', 'none'"):
        config_from_dict({"solver": {"amp": False}})  # YAML's `off`


@pytest.mark.parametrize("key", sorted(literal_fields()))
def test_every_allowed_choice_loads_and_others_are_refused(key, tmp_path):
    sec, name = key.split(".")
    allowed = literal_fields()[key]
    for value in allowed:
        assert getattr(getattr(load_config(None, [f"{key}={value}"]), sec), name) == value
    p = tmp_path / "bad.yaml"
    p.write_text(f"{sec}:\n  {name}: {allowed[0]}x\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert f"bad.yaml: {key}: '{allowed[0]}x' is not one of " in str(e.value)
    assert all(repr(v) in str(e.value) for v in allowed)


@pytest.mark.parametrize("key", sorted(literal_fields()))
def test_choice_docs_list_every_allowed_value(key):
    sec, name = key.split(".")
    (f,) = [f for f in dataclasses.fields(type(getattr(Config(), sec))) if f.name == name]
    assert all(f"'{v}'" in f.metadata["doc"] for v in literal_fields()[key]), f.metadata["doc"]
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "USAGE.md"), encoding="utf-8").read()
    (row,) = [line for line in doc.splitlines() if line.startswith(f"| `{name}`")]
    assert all(f"`{v}`" in row for v in literal_fields()[key]), row


def test_validate_config_checks_choices_of_a_config_built_in_code():
    cfg = Config()
    cfg.solver.optimizer = "adagrad"
    with pytest.raises(ConfigError, match="solver.optimizer: 'adagrad' is not one of 'adam', 'adamw'"):
        validate_config(cfg)


def test_device_takes_the_fixed_names_and_cuda_n():
    for device in get_args(DeviceKind) + ("cuda:0", "cuda:12"):
        assert config_from_dict({"experiment": {"device": device}}).experiment.device == device
    for bad in ("gpu", "cuda:", "cuda:x", "CPU"):
        with pytest.raises(ConfigError, match=f"experiment.device: '{bad}' is not one of 'auto', 'cpu'.*'cuda:N'"):
            config_from_dict({"experiment": {"device": bad}})


def test_every_dataset_choice_has_a_builder():
    from axial_deeplab.engine.builders import DATASETS, build_dataset

    assert DATASETS == literal_fields()["data.dataset"]
    assert DATASETS[0] == "synthetic"  # the one that needs no folder
    assert len(build_dataset(config_from_dict({"data": {"options": {"length": 2}}}), "train")) == 2
    for name in DATASETS[1:]:  # those with a root folder ask for it; none is an unknown name
        with pytest.raises(ConfigError, match=r"^data\.(root|options\.train): "):
            build_dataset(config_from_dict({"data": {"dataset": name}}), "train")


def test_every_amp_choice_is_handled_on_cpu():
    import torch

    from axial_deeplab.engine.train import amp_settings

    for mode in literal_fields()["solver.amp"]:
        cfg = config_from_dict({"solver": {"amp": mode}})
        if mode == "fp16":
            with pytest.raises(ConfigError, match="solver.amp=fp16 cannot run on the cpu device"):
                amp_settings(cfg, torch.device("cpu"))
        else:
            enabled, dtype, scaler = amp_settings(cfg, torch.device("cpu"))
            assert (enabled, dtype) == ((True, torch.bfloat16) if mode == "bf16" else (False, None)) and not scaler


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
