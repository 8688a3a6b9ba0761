"""The suites, in the order the command runs and reports them."""

from __future__ import annotations

from typing import List

from . import core, deploy, layers, models, postprocess, span_scaling, whole_models
from .base import Settings, Suite

SUITES: List[Suite] = [
    layers.SUITE,
    core.SUITE,
    models.SUITE,
    whole_models.SUITE,
    span_scaling.SUITE,
    postprocess.SUITE,
    deploy.SUITE,
]

__all__ = ["SUITES", "Settings", "Suite"]
