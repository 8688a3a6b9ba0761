"""timm-style model registry: ``@register_model`` builders, ``create_model``, ``list_models``.

A leaf module: the model modules import it to register their builders, and
``axial_deeplab.models`` (which Python runs before this module) imports them, so the built-in
models are registered by the time any of these functions can be called.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List, Optional

_MODELS: Dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Register a builder ``fn(**kwargs) -> nn.Module`` under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> List[str]:
    """Registered names matching the shell-style ``pattern``, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _MODELS


def model_builder(name: str) -> Callable:
    """The registered builder of ``name`` (for wrappers such as the timm entrypoint)."""
    if name not in _MODELS:
        close = fnmatch.filter(_MODELS, f"*{name}*")
        hint = f" Similar: {close}." if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} See axial_deeplab.list_models().")
    return _MODELS[name]


def create_model(name: str, pretrained: Optional[str] = None, **kwargs):
    """Build a registered model; ``pretrained`` is a local weights file, checkpoint folder or run
    folder (its best/, else newest checkpoint), never a download.

    Overrides (``num_classes=...``, ``span=...``, ``features_only=True`` ...) go to the builder.
    """
    model = model_builder(name)(**kwargs)
    from .timm_api import pretrained_cfg_for

    cfg = pretrained_cfg_for(name)
    if cfg is not None:  # timm's data config (timm.data.resolve_data_config) reads it
        model.pretrained_cfg = model.default_cfg = dict(cfg, architecture=name)
    if pretrained:
        from .weights import load_pretrained

        load_pretrained(model, pretrained)
    return model
