"""The axial-attention layers under test, and switching a module between implementations
(the reference equation and every registered fast path)."""

from __future__ import annotations

from typing import List

import torch
from torch import nn


def set_attention_impl(module: nn.Module, impl: str) -> int:
    """Point every axial-attention layer of ``module`` at ``impl``; returns how many."""
    from ..layers import PositionSensitiveAxialAttention

    count = 0
    for m in module.modules():
        if isinstance(m, PositionSensitiveAxialAttention):
            m.impl = impl
            count += 1
    return count


def layer_pair(channels: int, impl: str = "auto", **kwargs) -> nn.Sequential:
    """Height then width axial attention of the same width (the pair inside an axial block)."""
    from ..layers import PositionSensitiveAxialAttention

    return nn.Sequential(
        PositionSensitiveAxialAttention(channels, channels, axis="height", impl=impl, **kwargs),
        PositionSensitiveAxialAttention(channels, channels, axis="width", impl=impl, **kwargs),
    )


def attention_impls(device: torch.device) -> List[str]:
    """The reference and every registered fast path usable on ``device``."""
    from ..layers import available_attention_impls

    names = ["reference"] + [n for n in available_attention_impls() if n != "reference"]
    usable = []
    for name in names:
        if name.startswith("triton") and device.type != "cuda":
            continue
        usable.append(name)
    return usable
