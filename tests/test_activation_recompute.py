"""Recomputing an attention layer's activations in the backward: the same step, less memory; the
replay reuses the first forward's batch statistics and refuses to replay down another path."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from axial_deeplab.layers import PositionSensitiveAxialAttention, cpu_kernel
from axial_deeplab.layers.activation_recompute import reused, run_recomputed


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


def _kept_bytes(module, x):
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: kept.append(t.untyped_storage().nbytes()) or t, lambda t: t
    ):
        module(x)
    return sum(kept)


def test_recompute_is_off_in_eval_and_without_gradients():
    layer = PositionSensitiveAxialAttention(8, 8, num_heads=2, recompute_activations=True)
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    x_bytes = x.numel() * x.element_size()
    assert _kept_bytes(layer.eval(), x) > 2 * x_bytes  # eval with gradients: the plain layer
    with torch.no_grad():
        assert _kept_bytes(layer.train(), x) == 0
    assert _kept_bytes(layer.train(), x) == x_bytes  # training: only the input
    assert "recompute_activations=True" in repr(layer)


class _StashOnCtx(torch.autograd.Function):
    """Keeps a tensor as a plain ctx attribute (outside save_for_backward), as some kernels do."""

    stashed = []

    @staticmethod
    def forward(ctx, x):
        ctx.big = torch.ones(1000) * 2
        _StashOnCtx.stashed.append(weakref.ref(ctx.big))
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * ctx.big[0]


def test_nothing_of_the_first_forward_is_kept_not_even_ctx_attributes():
    net = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    _StashOnCtx.stashed.clear()
    y = run_recomputed(net, lambda t: _StashOnCtx.apply(net(t)), x)
    gc.collect()
    assert len(_StashOnCtx.stashed) == 1 and _StashOnCtx.stashed[0]() is None  # dropped after the forward
    y.sum().backward()
    assert len(_StashOnCtx.stashed) == 2  # replayed once, in the backward
    assert torch.allclose(x.grad, 2 * net.weight.sum(0).expand(2, 3))


def test_autograd_grad_returns_parameter_gradients():
    """Gradients are returned to the caller, not accumulated into .grad behind its back."""
    torch.manual_seed(0)
    layer = PositionSensitiveAxialAttention(8, 8, num_heads=2, span=3).train()
    x = torch.randn(1, 8, 6, 5, requires_grad=True)
    want = torch.autograd.grad(layer(x).square().sum(), [x, *layer.parameters()], allow_unused=True)
    layer.recompute_activations = True
    got = torch.autograd.grad(layer(x).square().sum(), [x, *layer.parameters()], allow_unused=True)
    assert all(p.grad is None for p in layer.parameters())
    for a, b in zip(want, got):
        assert (a is None and b is None) or torch.equal(a, b)


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


@pytest.mark.parametrize("training", [True, False])
def test_blocks_and_attention_recomputed_together_equal_the_plain_step(training):
    """Whole-block recompute (timm's set_grad_checkpointing) around attention-layer recompute, in
    training and in eval mode with gradients on (where the first pass must not take the
    attention's inference path)."""
    from axial_deeplab.models import create_model

    torch.manual_seed(0)
    plain = create_model("axial_resnet_tiny", num_classes=3, drop_path_rate=0.3)
    both = create_model(
        "axial_resnet_tiny", num_classes=3, drop_path_rate=0.3, attention_kw={"recompute_activations": True}
    )
    both.load_state_dict(plain.state_dict())
    both.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (plain, both):
        model.train(training)
        torch.manual_seed(1)  # the same drop-path draws
        y = model(x)
        grads.append((y, torch.autograd.grad(y.square().sum(), list(model.parameters()), allow_unused=True)))
    assert torch.equal(grads[0][0], grads[1][0])
    for (name, _), a, b in zip(plain.named_parameters(), grads[0][1], grads[1][1]):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    for (name, a), b in zip(plain.named_buffers(), both.buffers()):
        assert torch.equal(a, b), name


def test_panoptic_grad_checkpointing_switches_the_backbone():
    from axial_deeplab.models import create_model

    model = create_model("panoptic_deeplab_r50", num_classes=3, backbone="axial_resnet_tiny")
    model.set_grad_checkpointing(True)
    assert model.backbone.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.backbone.grad_checkpointing


def test_axial_block_recomputes_its_attention_pair_as_one():
    """With both layers recomputed, the block keeps the pair's input but not the height layer's
    output, and the step is unchanged."""
    from axial_deeplab.models.axial_resnet import AxialBlock

    torch.manual_seed(0)
    plain = AxialBlock(16, 8, 16, num_heads=2, span=5).train()
    torch.nn.init.normal_(plain.bn2.weight)  # gamma 0 would hide the branch's gradients
    pair = copy.deepcopy(plain)
    for layer in (pair.attn_h, pair.attn_w):
        layer.recompute_activations = True
    x = torch.randn(2, 16, 6, 7)
    shapes = []

    def pack(t):
        shapes.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        copy.deepcopy(pair)(x.clone().requires_grad_(True))
    # conv1's output (BatchNorm's input), the pair's input and its output; layer by layer also the height layer's
    assert len({ptr for shape, ptr in shapes if shape == (2, 8, 6, 7)}) == 3
    y0, g0, _ = _step(plain, x)
    y1, g1, _ = _step(pair, x)
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    for (name, a), b in zip(plain.named_parameters(), pair.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(plain.named_buffers(), pair.buffers()):
        assert torch.equal(a, b), name


def _statistics_passes(monkeypatch, layer, x):
    """How many times one step of ``layer`` runs the batch statistics' passes (BatchNorm's and
    the band moments' kernel): (in the forward, in the backward)."""
    calls = []
    stats, band = torch.batch_norm_update_stats, cpu_kernel.band_moments
    with monkeypatch.context() as m:
        m.setattr(torch, "batch_norm_update_stats", lambda *a: calls.append(1) or stats(*a))
        m.setattr(cpu_kernel, "band_moments", lambda *a: calls.append(1) or band(*a))
        y = layer(x.clone().requires_grad_())
        forward = len(calls)
        y.sum().backward()
    return forward, len(calls) - forward


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler: the band moments' kernel is not built")
def test_replay_reuses_the_first_forwards_statistics(monkeypatch):
    torch.manual_seed(0)
    plain = PositionSensitiveAxialAttention(16, 16, axis="width", num_heads=2, span=5).train()
    x = torch.randn(2, 16, 7, 9)
    recomputed = copy.deepcopy(plain)
    recomputed.recompute_activations = True
    forward, backward = _statistics_passes(monkeypatch, recomputed, x)
    assert forward == _statistics_passes(monkeypatch, plain, x)[0] >= 3  # qkv BN, moments, output BN
    assert backward == 0
    # and the count can fail: where the sites compute every time, the replay makes them all again
    for module in ("memory_efficient", "row_batch_norm", "similarity_stats"):
        monkeypatch.setattr(f"axial_deeplab.layers.{module}.reused", lambda key, compute: compute())
    assert _statistics_passes(monkeypatch, recomputed, x) == (forward, forward)


class _Switching(torch.nn.Module):
    """A module whose replay asks for other statistics than its first forward recorded."""

    def __init__(self, keys):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.keys = list(keys)

    def forward(self, x):
        for key in self.keys.pop(0):
            x = x * reused(key, lambda: x.detach().mean())
        return x * self.scale


@pytest.mark.parametrize(
    "keys,message",
    [
        ([["a", "b"], ["a", "c"]], "asked for 'c' where the first forward recorded 'b'"),
        ([["a"], ["a", "b"]], "asked for 'b' where the first forward recorded 'nothing'"),
        ([["a", "b"], ["a"]], "used 1 of the 2 statistics"),
    ],
)
def test_a_replay_down_another_path_is_refused(keys, message):
    module = _Switching(keys).train()
    x = torch.randn(4, requires_grad=True)
    y = run_recomputed(module, module.forward, x)
    with pytest.raises(RuntimeError, match=message):
        y.sum().backward()


def test_replayed_statistics_are_the_recorded_ones():
    module = _Switching([["a"], ["a"]]).train()
    x = torch.randn(4, requires_grad=True)
    y = run_recomputed(module, module.forward, x)
    y.sum().backward()
    # y = x * mean(x) * scale with the mean a constant (recorded, not differentiated)
    torch.testing.assert_close(x.grad, torch.full_like(x, float(x.detach().mean())))
    assert reused("outside", lambda: 7) == 7  # outside a recomputed module: computed
