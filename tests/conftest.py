"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture
def quick_init(monkeypatch):
    """erfinv-based truncated-normal init takes seconds on the XL models; a clamped normal has the
    same shapes and scale, which is all a forward/backward check needs."""
    def trunc_normal(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        with torch.no_grad():
            return tensor.normal_(mean, std).clamp_(a, b)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", trunc_normal)
