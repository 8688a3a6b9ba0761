"""Recomputing an attention layer's activations in the backward: the same step, less memory."""

from __future__ import annotations

import copy

import pytest
import torch

from axial_deeplab.layers import PositionSensitiveAxialAttention
from axial_deeplab.layers.activation_recompute import run_recomputed


def _step(module, x):
    """Output, input gradient, and bytes the autograd graph keeps, of one weighted-sum backward."""
    kept = []

    def pack(t):
        kept.append(t.untyped_storage().nbytes())
        return t

    xg = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(xg)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), xg.grad, sum(kept)


@pytest.mark.parametrize("span,stride", [(5, 1), (None, 2)])
def test_recomputed_layer_equals_the_plain_layer_and_keeps_only_its_input(span, stride):
    torch.manual_seed(0)
    plain = PositionSensitiveAxialAttention(16, 16, axis="width", num_heads=2, span=span, stride=stride).train()
    recomputed = copy.deepcopy(plain)
    recomputed.recompute_activations = True
    x = torch.randn(2, 16, 7, 9)
    y0, g0, kept0 = _step(plain, x)
    y1, g1, kept1 = _step(recomputed, x)
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.equal(a.grad, b.grad), name
    # running statistics updated once, as without recompute (the replay's update is undone)
    for (name, a), b in zip(plain.named_buffers(), recomputed.buffers()):
        assert torch.equal(a, b), name
    assert int(recomputed.bn_qkv.num_batches_tracked) == 1
    assert kept1 == x.numel() * x.element_size() < kept0 / 5


def test_recompute_is_off_in_eval_and_without_gradients(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = PositionSensitiveAxialAttention(8, 8, num_heads=2, recompute_activations=True)
    x = torch.randn(1, 8, 5, 5)
    layer.eval()(x.requires_grad_(True)).sum().backward()
    with torch.no_grad():
        layer.train()(x)
    assert calls == []
    layer(x).sum().backward()
    assert calls == [1]
    assert "recompute_activations=True" in repr(layer)


def test_run_recomputed_replays_random_ops_alike():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(6)).train()
    x = torch.randn(4, 6, requires_grad=True)
    torch.manual_seed(1)
    net(x).pow(2).sum().backward()
    want = x.grad.clone()
    x.grad = None
    torch.manual_seed(1)
    run_recomputed(net, net, x).pow(2).sum().backward()
    assert torch.allclose(x.grad, want, rtol=1e-6, atol=1e-7)


def test_recompute_through_a_model_kwarg():
    from axial_deeplab.models import create_model

    torch.manual_seed(0)
    model = create_model("axial_resnet_tiny", num_classes=4)
    on = create_model("axial_resnet_tiny", num_classes=4, attention_kw={"recompute_activations": True})
    on.load_state_dict(model.state_dict())
    layers = [m for m in on.modules() if isinstance(m, PositionSensitiveAxialAttention)]
    assert layers and all(m.recompute_activations for m in layers)
    x = torch.randn(2, 3, 32, 32)
    model.train()(x).sum().backward()
    on.train()(x).sum().backward()
    for (name, a), b in zip(model.named_parameters(), on.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6), name
