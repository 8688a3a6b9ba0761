"""Shared test fixtures."""

import glob
import importlib.util
import os

import pytest
import torch


def _let_cuda_torchvision_import_on_cpu_torch():
    """PyPI's torchvision for the pinned torch 2.13 (pulled in by timm, dev extra) is a CUDA build;
    on the CPU wheel its C extension cannot load, and its import then dies on an unguarded
    ``register_fake("torchvision::nms")`` (also through torchmetrics.detection). Declaring the two
    op schemas lets the pure-Python parts import; calling the ops still fails, as it would."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or torch.version.cuda is not None or not spec.submodule_search_locations:
        return None
    root = os.path.dirname(list(spec.submodule_search_locations)[0])
    if not glob.glob(os.path.join(root, "torchvision.libs", "libcudart*")):
        return None
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


_TORCHVISION_SCHEMAS = _let_cuda_torchvision_import_on_cpu_torch()  # kept alive: dropping it undefines them


@pytest.fixture
def quick_init(monkeypatch):
    """erfinv-based truncated-normal init takes seconds on the XL models; a clamped normal has the
    same shapes and scale, which is all a forward/backward check needs."""

    def trunc_normal(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        with torch.no_grad():
            return tensor.normal_(mean, std).clamp_(a, b)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", trunc_normal)
