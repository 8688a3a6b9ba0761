"""The position-major CPU training path keeps the qkv projection before its BatchNorm only: the
normalised projection, which the attention operator and the similarity moments save for their
backwards, is dropped after the forward and formed again from the projection when they unpack it
(``memory_efficient._recomputed_in_backward``). Tested: gradients and running statistics are
bit-identical to keeping it, on global spans (the Gram moments) and local ones (the band moments),
both axes, a strided layer; the tensor is really freed after the forward; nothing else is
replaced; torch.compile's path does not use the hooks."""

from __future__ import annotations

import contextlib
import copy
import gc
import weakref

import pytest
import torch
from attention_testing import forward_backward, randomize_batch_norms

from axial_deeplab.layers import (
    PositionSensitiveAxialAttention,
    activation_recompute,
    cpu_kernel,
    memory_efficient,
    ops,
)

pytestmark = pytest.mark.skipif(
    not cpu_kernel.available(),
    reason="no C compiler: the compiled training path is not built (the PyTorch path is tested elsewhere)",
)


def make_layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("max_relative_distance", 6)
    layer = PositionSensitiveAxialAttention(16, 16, num_heads=2, **kwargs)
    randomize_batch_norms(layer)
    return layer


CASES = {
    "global height": dict(axis="height"),
    "global width": dict(axis="width"),
    "local span": dict(axis="width", span=5),
    "strided": dict(axis="height", stride=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recomputed_projection_gives_identical_gradients(case, monkeypatch):
    layer = make_layer(**CASES[case])
    x = torch.randn(2, 16, 11, 13)
    y, grads, buffers, _ = forward_backward(layer, "memory_efficient", x)
    monkeypatch.setattr(memory_efficient, "RECOMPUTE_NORMALIZED_PROJECTION", False)
    y_kept, grads_kept, buffers_kept, _ = forward_backward(layer, "memory_efficient", x)
    assert torch.equal(y, y_kept)
    assert grads.keys() == grads_kept.keys() and len(grads) > 3
    for name in grads:
        assert torch.equal(grads[name], grads_kept[name]), name
    for name in buffers:
        assert torch.equal(buffers[name], buffers_kept[name]), name


def _normalised_projection_alive_after_forward(layer, x, monkeypatch):
    """Whether the tensor the attention operator received is still alive once the forward has
    returned (its output and graph held)."""
    seen = []
    original = ops.attention_rows

    def recording(qkv, *args, **kwargs):
        seen.append(weakref.ref(qkv))
        return original(qkv, *args, **kwargs)

    monkeypatch.setattr(ops, "attention_rows", recording)
    layer.impl = "memory_efficient"
    out = layer.train()(x.requires_grad_())
    gc.collect()
    assert len(seen) == 1
    alive = seen[0]() is not None
    out.sum().backward()  # the graph still works
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return alive


@pytest.mark.parametrize("case", ["global width", "local span"])
def test_normalised_projection_is_freed_after_forward(case, monkeypatch):
    layer = make_layer(**CASES[case])
    x = torch.randn(2, 16, 11, 13)
    assert not _normalised_projection_alive_after_forward(layer, x.clone(), monkeypatch)
    # and the check can fail: kept when the recompute is off
    monkeypatch.setattr(memory_efficient, "RECOMPUTE_NORMALIZED_PROJECTION", False)
    assert _normalised_projection_alive_after_forward(layer, x.clone(), monkeypatch)


def test_only_views_of_the_normalised_projection_are_replaced():
    out = torch.randn(6, 4)
    y = torch.randn(6, 4)
    alpha, beta = torch.randn(4), torch.randn(4)
    out.copy_(torch.addcmul(beta, y, alpha))
    other = torch.randn(6, 4, requires_grad=True)
    with memory_efficient._recomputed_in_backward(out, y, (alpha, beta)):
        with torch.enable_grad():
            a = out.detach()[:, 1:3].requires_grad_()
            z = (a * other[:, :2]).sum()
    packed = z.grad_fn.next_functions
    assert packed  # a graph was built
    z.backward()
    # d/d other[:, :2] = a (recomputed view), d/d a = other[:, :2] (kept as it was)
    assert torch.equal(other.grad[:, :2], out[:, 1:3])
    assert torch.equal(a.grad, other[:, :2].detach())


def test_no_hooks_without_gradients_or_while_tracing(monkeypatch):
    out, y = torch.randn(3, 2), torch.randn(3, 2)
    affine = (torch.ones(2), torch.zeros(2))
    assert not isinstance(memory_efficient._recomputed_in_backward(out, y, affine), contextlib.nullcontext)
    with torch.no_grad():
        assert isinstance(memory_efficient._recomputed_in_backward(out, y, affine), contextlib.nullcontext)
    # F.batch_norm ran (no affine terms)
    assert isinstance(memory_efficient._recomputed_in_backward(out, y, None), contextlib.nullcontext)
    # another's saved-tensor hooks (offloading, torch.utils.checkpoint) are left in charge
    with torch.autograd.graph.save_on_cpu():
        assert isinstance(memory_efficient._recomputed_in_backward(out, y, affine), contextlib.nullcontext)
    # the replay of an activation-recomputed forward: its graph is differentiated at once
    monkeypatch.setattr(activation_recompute._REPLAYING, "depth", 1, raising=False)
    assert isinstance(memory_efficient._recomputed_in_backward(out, y, affine), contextlib.nullcontext)
    monkeypatch.setattr(activation_recompute._REPLAYING, "depth", 0)
    # torch.compile's partitioner decides what its graphs keep
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert isinstance(memory_efficient._recomputed_in_backward(out, y, affine), contextlib.nullcontext)


def test_inside_torch_utils_checkpoint(monkeypatch):
    """Under ``torch.utils.checkpoint`` (its own saved-tensor hooks) the layer leaves the saving to
    it, and the gradients are those of a plain step."""
    from torch.utils.checkpoint import checkpoint

    layer = make_layer(**CASES["local span"])
    x = torch.randn(2, 16, 11, 13)
    _, grads, _, _ = forward_backward(layer, "memory_efficient", x)
    ck = copy.deepcopy(layer)
    ck.impl = "memory_efficient"
    xc = x.clone().requires_grad_()
    y = checkpoint(ck.train(), xc, use_reentrant=False)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * g).sum().backward()
    torch.testing.assert_close(xc.grad, grads["input"], rtol=1e-5, atol=1e-6)
    for name, p in ck.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6)
