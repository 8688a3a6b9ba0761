"""timm-style model registry: ``@register_model`` builders, ``create_model``, ``list_models``."""
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
    _import_builtin_models()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, pretrained: Optional[str] = None, **kwargs):
    """Build a registered model; ``pretrained`` is a local checkpoint path (never a download).

    Overrides (``num_classes=...``, ``span=...``, ``features_only=True`` ...) go to the builder.
    """
    _import_builtin_models()
    if name not in _MODELS:
        close = fnmatch.filter(_MODELS, f"*{name}*")
        hint = f" Similar: {close}." if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} See axial_deeplab.list_models().")
    model = _MODELS[name](**kwargs)
    if pretrained:
        from .weights import load_pretrained

        load_pretrained(model, pretrained)
    return model


def _import_builtin_models():
    # Importing the model modules runs their @register_model decorators.
    from . import axial_resnet  # noqa: F401
    try:
        from . import panoptic_deeplab  # noqa: F401
    except ImportError as e:  # pragma: no cover - only while the module is being written
        if "panoptic_deeplab" not in str(e):
            raise
