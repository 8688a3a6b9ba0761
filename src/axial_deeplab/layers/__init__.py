"""Attention layers: the position-sensitive axial layer, its reference math and fast paths."""
from .axial_attention import (  # noqa: F401
    PositionSensitiveAxialAttention,
    available_attention_impls,
    register_attention_impl,
)
from .reference import axial_attention_reference  # noqa: F401
from . import fast_paths  # noqa: F401,E402  (registers the fast implementations; impl="auto" picks them)
