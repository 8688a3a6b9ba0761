"""The model registry is complete on a fresh interpreter whichever module is imported first
(it used to miss every model until a model module happened to be imported)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

import axial_deeplab

SRC = os.path.dirname(os.path.dirname(os.path.abspath(axial_deeplab.__file__)))

PROBE = """
import json
{imports}
print(json.dumps({{"axial_resnet_s": m.is_model("axial_resnet_s"),
                   "axial_deeplab_s": m.is_model("axial_deeplab_s"),
                   "not_a_model": m.is_model("not_a_model"),
                   "names": m.list_models(),
                   "built": type(m.create_model("axial_resnet_s", num_classes=3)).__name__}}))
"""


def _fresh(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize(
    "imports",
    [
        "import axial_deeplab as m",
        "import axial_deeplab.models as m",
        "import axial_deeplab.models.registry as m",
        "import axial_deeplab.layers\nimport axial_deeplab.models.registry as m",  # layers first
    ],
)
def test_registry_is_complete_on_a_fresh_import(imports):
    got = json.loads(_fresh(PROBE.format(imports=imports)))
    assert got["axial_resnet_s"] and got["axial_deeplab_s"] and not got["not_a_model"]
    assert got["names"] == axial_deeplab.list_models()  # this process's full registry
    assert {"axial_resnet_s", "axial_resnet_l", "axial_deeplab_l"} <= set(got["names"])
    assert got["built"] == "AxialResNet"


def test_the_registry_imports_no_model_module():
    from axial_deeplab.models import registry

    with open(registry.__file__) as f:
        tree = ast.parse(f.read())
    relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    absolute = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    # checkpoint loading and the pretrained_cfg table (no model module), imported when asked for
    assert relative <= {"weights", "timm_api"}, relative
    assert not any(name.startswith("axial_deeplab") for name in absolute)


def test_importing_the_package_does_not_import_torch():
    """The registry functions are loaded on first use, so light submodules stay light."""
    out = _fresh("import sys, axial_deeplab, axial_deeplab.errors\nprint('torch' in sys.modules)")
    assert out.strip() == "False"
