"""What an installed package (not a checkout) needs: the shipped configs and digits travel in the
wheel and are found by name; ``config list|show``; and every command that needs an optional
package says which extra to install, in one line, instead of a traceback."""

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import resources

import numpy as np
import pytest
import yaml

from axial_deeplab.cli import main
from axial_deeplab.engine.config import (
    ConfigError,
    config_to_dict,
    load_config,
    read_config_data,
    resolve_config_path,
    shipped_configs,
)
from axial_deeplab.errors import MissingExtraError

ROOT = os.path.join(os.path.dirname(__file__), "..")
NAMES = {"synthetic", "coco_axial_deeplab_s", "coco_base", "cityscapes_axial_deeplab_l", "imagenet_axial_resnet_s"}


def _block(monkeypatch, *modules):
    """Make ``import m`` raise ImportError for each module, as on an install without it."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def test_configs_and_digits_are_package_resources():
    root = resources.files("axial_deeplab")
    yamls = {p.name[:-5] for p in root.joinpath("configs").iterdir() if p.name.endswith(".yaml")}
    assert NAMES <= yamls and len(yamls) >= 15
    assert set(shipped_configs()) == yamls
    assert root.joinpath("data", "digits.npz").is_file() and root.joinpath("py.typed").is_file()


@pytest.mark.slow  # builds a wheel (setuptools from this environment, no network): ~10 s
def test_wheel_contains_configs_and_digits(tmp_path):
    src = tmp_path / "project"
    src.mkdir()
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, f), src / f)
    shutil.copytree(
        os.path.join(ROOT, "src"), src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so")
    )
    out = tmp_path / "dist"
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = out / proc.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in NAMES:
        assert f"axial_deeplab/configs/{name}.yaml" in names
    assert {
        "axial_deeplab/data/digits.npz",
        "axial_deeplab/py.typed",
        "axial_deeplab/csrc/axial_attention_cpu.c",
        "axial_deeplab/commands/config.py",
    } <= names


def test_shipped_digits_are_scikit_learns():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from axial_deeplab.data.digits import load_digits

    images, labels = load_digits()
    want = sklearn_datasets.load_digits()
    assert images.dtype == np.uint8 and np.array_equal(images, want.images)
    assert np.array_equal(labels, want.target)


def test_names_and_paths_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: no configs/ folder here
    shipped = shipped_configs()
    assert resolve_config_path("synthetic") == shipped["synthetic"]
    assert resolve_config_path("synthetic.yaml") == shipped["synthetic"]
    # the path the docs used before the configs moved into the package
    assert resolve_config_path("configs/coco_axial_deeplab_s.yaml") == shipped["coco_axial_deeplab_s"]
    assert resolve_config_path(os.path.join("..", "configs", "synthetic.yaml")) == shipped["synthetic"]
    # a file that exists wins, even in a folder named configs
    (tmp_path / "configs").mkdir()
    own = tmp_path / "configs" / "synthetic.yaml"
    own.write_text("base: coco_axial_deeplab_s.yaml\nsolver: {lr: 0.5}\n")
    assert resolve_config_path("configs/synthetic.yaml") == "configs/synthetic.yaml"
    with pytest.raises(ConfigError, match="not found"):  # its base is not beside it
        load_config("configs/synthetic.yaml")
    with pytest.raises(ConfigError, match=r"unknown config name: nope; shipped configs: .*coco_axial_deeplab_s"):
        resolve_config_path("nope")
    with pytest.raises(ConfigError, match=r"config file not found: elsewhere/x.yaml; shipped configs: .*synthetic"):
        resolve_config_path("elsewhere/x.yaml")
    # by name, inheritance included: coco_axial_deeplab_s -> coco_base.yaml
    cfg = load_config("coco_axial_deeplab_s", ["solver.max_steps=5"])
    assert cfg.data.dataset == "coco" and cfg.model.name == "axial_deeplab_s" and cfg.solver.max_steps == 5
    assert load_config("configs/coco_axial_deeplab_s.yaml") == load_config(shipped["coco_axial_deeplab_s"])


def test_train_takes_a_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "synthetic", "--print-config", "solver.max_steps=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["solver"]["max_steps"] == 2 and printed["data"]["dataset"] == "synthetic"
    assert main(["train", "--config", "no_such_recipe"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown config name" in err and "synthetic" in err


def test_config_list_and_show(capsys):
    assert main(["config", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    listed = dict(line.split(None, 1) for line in lines)
    assert set(listed) == set(shipped_configs())
    assert listed["coco_axial_deeplab_s"].startswith("Axial-DeepLab-S on COCO panoptic")
    assert all(listed.values())  # every shipped file starts with a describing comment

    assert main(["config", "show", "coco_axial_deeplab_s"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == config_to_dict(load_config("coco_axial_deeplab_s"))
    assert shown["solver"]["batch_size"] == 64 and shown["experiment"]["name"] == "coco_axial_deeplab_s"

    assert main(["config", "show", "--raw", "coco_axial_deeplab_s", "solver.lr=0.5"]) == 0
    raw = yaml.safe_load(capsys.readouterr().out)
    assert "base" not in raw and raw["solver"]["lr"] == 0.5
    assert raw["experiment"]["name"] == "coco_axial_deeplab_s"  # the file's own key
    assert raw["data"]["dataset"] == "coco"  # from coco_base.yaml
    assert "compute_ap" not in raw.get("eval", {})  # no defaults added
    assert {k: v for k, v in raw.items() if k != "solver"} == {
        k: v for k, v in read_config_data("coco_axial_deeplab_s").items() if k != "solver"
    }

    assert main(["config", "show", "nope"]) == 2
    assert "unknown config name" in capsys.readouterr().err


def _one_line_error(capsys, command, extra):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"axial-deeplab {command}: error:"), err
    assert f"pip install 'axial-deeplab[{extra}]'" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_demo_names_its_extra_before_training(tmp_path, monkeypatch, capsys):
    _block(monkeypatch, "matplotlib", "matplotlib.pyplot")
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--no-progress", "solver.max_steps=1"]) == 2
    _one_line_error(capsys, "demo", "demo")
    assert not out.exists()  # refused before any training


def test_plot_and_instance_ap_and_onnx_name_their_extras(tmp_path, monkeypatch, capsys):
    from axial_deeplab.data import synthetic_metadata
    from axial_deeplab.engine.visualize import plot_training_curves
    from axial_deeplab.evaluation import InstanceAP

    _block(monkeypatch, "matplotlib", "matplotlib.pyplot", "pycocotools", "pycocotools.mask", "onnx")
    with pytest.raises(MissingExtraError, match=r"needs matplotlib: pip install 'axial-deeplab\[demo\]'"):
        plot_training_curves([{"kind": "train", "step": 1, "loss": 1.0}], str(tmp_path / "c.png"))
    with pytest.raises(MissingExtraError, match=r"needs pycocotools: pip install 'axial-deeplab\[coco\]'"):
        InstanceAP(synthetic_metadata())
    assert (
        main(
            [
                "export",
                "--model",
                "axial_resnet_tiny",
                "--num-classes",
                "10",
                "--format",
                "onnx",
                "--input",
                "3x64x64",
                "--output",
                str(tmp_path / "m.onnx"),
            ]
        )
        == 2
    )
    _one_line_error(capsys, "export", "onnx")


def test_digits_demo_data_needs_no_scikit_learn(monkeypatch):
    from axial_deeplab.commands.classify_demo import load_digits_split

    _block(monkeypatch, "sklearn", "sklearn.datasets")
    x_tr, y_tr, _, y_te = load_digits_split(size=16)
    assert len(y_tr) + len(y_te) == 1797 and x_tr.shape[1:] == (3, 16, 16)
    assert set(y_tr.tolist()) == set(range(10))
