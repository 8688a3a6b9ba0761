"""Mappings from deeplab2's checkpoints (object paths such as
``encoder/_stage2/_block1/_attention/_height_axis/qkv_kernel``) onto our models, one per model family.

A mapping is ``mapping(variables: core.TFVariables, model) -> None``: it walks ``model``'s modules
and, for each, takes deeplab2's variables with the rules of :mod:`.core` (``conv``,
``batch_norm``, ``dense``, ``axial_attention_pair`` ...) or ``variables.put``. Register it for
the model names it serves with :func:`register_mapping`; ``axial-deeplab convert --from deeplab2
--model NAME`` looks it up with :func:`mapping_for`.
"""
from __future__ import annotations

from typing import Callable, Dict, List

__all__ = ["register_mapping", "mapping_for", "mapped_models"]

_MAPPINGS: Dict[str, Callable] = {}


def register_mapping(*model_names: str):
    """Decorator: ``fn`` maps deeplab2 checkpoints onto the registered models ``model_names``."""
    def deco(fn: Callable) -> Callable:
        for name in model_names:
            _MAPPINGS[name] = fn
        return fn

    return deco


def mapped_models() -> List[str]:
    """The model names that have a deeplab2 mapping."""
    return sorted(_MAPPINGS)


def mapping_for(model_name: str) -> Callable:
    """The mapping for ``model_name``; KeyError when there is none."""
    return _MAPPINGS[model_name]
