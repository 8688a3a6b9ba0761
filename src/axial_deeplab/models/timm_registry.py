"""Our classification backbones in timm's model registry, as ``axial_deeplab.<name>``.

timm reads ``a.b`` as architecture ``a`` with pretrained tag ``b`` (``resnet50.a1_in1k``) and has
no plugin entry points, so the namespace is one timm architecture, ``axial_deeplab``, whose tags
are our model names: ``timm.create_model("axial_deeplab.axial_resnet_s", ...)`` builds
``axial_resnet_s`` through timm's ``build_model_with_cfg`` (its ``pretrained_cfg``,
``features_only`` / ``out_indices`` through ``forward_intermediates``, ``pretrained=True`` with
``pretrained_cfg_overlay=dict(file=...)``, ``checkpoint_path``). ``timm.list_models("axial*",
include_tags=True)`` lists them. Nothing here is imported unless asked: timm stays optional.

Registration: :func:`register_timm_models` (imports timm); importing ``axial_deeplab.models``
after timm does it too.
"""

from __future__ import annotations

import inspect
import sys
from typing import Optional

from .timm_api import PRETRAINED_CFGS, TIMM_MODELS

__all__ = ["register_timm_models", "NAMESPACE", "timm_name"]

NAMESPACE = "axial_deeplab"
# the kwargs timm's build_model_with_cfg takes for itself (features_only wrapping)
_TIMM_OWN = {"features_only", "out_indices", "feature_cls"}
_PORT = ("axial26s", "axial50s", "axial50m", "axial50l")

default_cfgs: dict = {}  # timm's register_model reads the registering module's default_cfgs


def timm_name(name: str) -> str:
    """The timm registry name of our model ``name``."""
    return f"{NAMESPACE}.{name}"


def _model_class(name: str):
    from .axial_resnet import AxialResNet
    from .axial_swidernet import HybridAxialResNet

    hybrid = name.startswith(("axial_swidernet", "max_deeplab")) or name in ("axial_resnet50", "resnet50_beta")
    return HybridAxialResNet if hybrid else AxialResNet


def _accepted_kwargs(name: str) -> set:
    params = set(inspect.signature(_model_class(name).__init__).parameters) - {"self"}
    if name in _PORT:
        params.add("image_size")
    return params | _TIMM_OWN


def _resolve_name(pretrained_cfg) -> str:
    """Our model name from what timm hands the entrypoint: the tag of ``axial_deeplab.<tag>``,
    or a pretrained_cfg (dict or PretrainedCfg) naming the tag or our architecture."""
    tag: Optional[str] = None
    if isinstance(pretrained_cfg, str):
        tag = pretrained_cfg
    elif pretrained_cfg is not None:
        get = pretrained_cfg.get if isinstance(pretrained_cfg, dict) else lambda k: getattr(pretrained_cfg, k, None)
        arch, cfg_tag = get("architecture"), get("tag")
        tag = cfg_tag if arch in (None, NAMESPACE) else arch
    if tag not in TIMM_MODELS:
        choices = ", ".join(timm_name(n) for n in TIMM_MODELS)
        what = "no model" if tag is None else f"unknown model {tag!r}"
        raise ValueError(f"{NAMESPACE}: {what}; name one as '{NAMESPACE}.<model>': {choices}")
    return tag


def axial_deeplab(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
    """timm entrypoint of the ``axial_deeplab`` namespace (see the module docstring)."""
    from timm.models import build_model_with_cfg

    from .registry import model_builder

    name = _resolve_name(pretrained_cfg)
    unsupported = sorted(set(kwargs) - _accepted_kwargs(name))
    if unsupported:
        raise TypeError(
            f"{timm_name(name)} does not support the argument(s) {', '.join(unsupported)}; "
            f"it takes: {', '.join(sorted(_accepted_kwargs(name)))}"
        )
    if pretrained:
        overlay = pretrained_cfg_overlay or {}
        given = pretrained_cfg if isinstance(pretrained_cfg, dict) else {}
        if not any(overlay.get(k) or given.get(k) for k in ("url", "file", "hf_hub_id", "state_dict")):
            raise ValueError(
                f"{timm_name(name)}: no published weights to download; load yours with "
                f"pretrained_cfg_overlay=dict(file='.../model.safetensors') or checkpoint_path=..."
            )
    if isinstance(pretrained_cfg, str) or pretrained_cfg is None:
        pretrained_cfg = name
    return build_model_with_cfg(
        model_builder(name),
        NAMESPACE,
        pretrained,
        pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=pretrained_cfg_overlay,
        cache_dir=cache_dir,
        # timm's features_only goes through our forward_intermediates / prune_intermediate_layers
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


def register_timm_models() -> None:
    """Register the ``axial_deeplab.*`` models into timm's registry (imports timm; idempotent)."""
    try:
        from timm.models import generate_default_cfgs, is_model, model_entrypoint, register_model
    except ImportError as e:
        raise ImportError("timm is not installed (pip install timm); axial_deeplab does not need it otherwise") from e
    if is_model(NAMESPACE) and model_entrypoint(NAMESPACE) is axial_deeplab:
        return
    global default_cfgs
    default_cfgs = generate_default_cfgs(
        {
            timm_name(n): dict(PRETRAINED_CFGS[n], paper_name="Axial-DeepLab", paper_ids="arXiv:2003.07853")
            for n in TIMM_MODELS
        }
    )
    register_model(axial_deeplab)


def register_if_timm_imported() -> None:
    """What ``import axial_deeplab.models`` runs: register when timm is already imported (it costs
    nothing then), never import it."""
    if "timm.models" in sys.modules:
        register_timm_models()
