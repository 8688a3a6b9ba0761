"""Attention layers: the position-sensitive axial layer, its reference math and fast paths.

Which path a layer runs is decided in :mod:`.dispatch`: ``explain(layer, x)`` says which and
why, ``attention_impl(name)`` (or ``AXIAL_DEEPLAB_ATTENTION_IMPL``) forces one."""
from .axial_attention import PositionSensitiveAxialAttention  # noqa: F401
from .dispatch import (  # noqa: F401
    attention_impl,
    available_attention_impls,
    explain,
    register_attention_impl,
    select_backend,
)
from .reference import axial_attention_reference  # noqa: F401
from . import fast_paths  # noqa: F401,E402  (registers the built-in paths)
