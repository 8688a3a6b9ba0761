"""Attention layers: the position-sensitive axial layer, its reference math and fast paths.

Which path a layer runs is decided in :mod:`.dispatch`: ``explain(layer, x)`` says which and
why, ``attention_impl(name)`` (or ``AXIAL_DEEPLAB_ATTENTION_IMPL``) forces one.

Modules: :mod:`.axial_attention` (the module, parameters only), :mod:`.dispatch` (the choice),
:mod:`.builtin_paths` (what is registered), :mod:`.geometry` (spans, table rows, layouts, BN
folding shared by every path), :mod:`.reference` (the oracle and the export decomposition),
:mod:`.chunked` (the PyTorch path), :mod:`.similarity_stats` (closed-form BN statistics),
:mod:`.recompute` (the recompute backward), :mod:`.memory_efficient` (the default path),
:mod:`.ops` (the torch.library operators), :mod:`.cpu_kernel` (the C kernel, ctypes), and
:mod:`.triton_kernels` / :mod:`.triton_launch` / :mod:`.triton_self_check` (the GPU path);
:mod:`.sync` (statistics summed over processes), :mod:`.sync_batchnorm` (synchronised
BatchNorm for data-parallel training) and :mod:`.attention2d` (2-D attention layers)."""

from . import builtin_paths  # noqa: F401,E402  (registers the built-in paths)
from .axial_attention import PositionSensitiveAxialAttention  # noqa: F401
from .dispatch import (  # noqa: F401
    attention_impl,
    available_attention_impls,
    explain,
    register_attention_impl,
    select_backend,
)
from .reference import axial_attention_reference  # noqa: F401
