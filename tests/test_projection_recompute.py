"""The position-major CPU training path keeps the qkv projection before its BatchNorm only: the
attention operator and the similarity moments, which read the normalised projection, keep the
projection and the BatchNorm's affine terms for their backwards instead (``source`` / ``affine``),
and their kernels apply those as they load. Tested: outputs and running statistics equal to keeping
the normalised projection, gradients within float32 rounding of it, on global spans (the Gram
moments) and local ones (the band moments), both axes, a strided layer; the tensor is really freed
after the forward; the kernels with the affine terms equal to the kernels on the normalised input;
the operator's PyTorch backward (float64) forms the input again, bit for bit. The projection keeps
the layer's input, not the rows it reads from it (a copy for the height axis), with gradients
bit-identical to autograd's product."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from attention_testing import forward_backward, randomize_batch_norms

from axial_deeplab.layers import PositionSensitiveAxialAttention, cpu_kernel, memory_efficient, ops

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
def test_kept_source_gives_the_gradients_of_keeping_the_projection(case, monkeypatch):
    layer = make_layer(**CASES[case])
    x = torch.randn(2, 16, 11, 13)
    y, grads, buffers, _ = forward_backward(layer, "memory_efficient", x)
    monkeypatch.setattr(memory_efficient, "FREE_NORMALIZED_PROJECTION", False)
    y_kept, grads_kept, buffers_kept, _ = forward_backward(layer, "memory_efficient", x)
    assert torch.equal(y, y_kept)  # the forward is the same
    for name in buffers:
        assert torch.equal(buffers[name], buffers_kept[name]), name
    # the kernels normalise as they load (a fused multiply-add may round differently from addcmul)
    assert grads.keys() == grads_kept.keys() and len(grads) > 3
    for name in grads:
        if name.endswith("bn_similarity.bias"):  # exactly 0 up to rounding (the softmax cancels it)
            continue
        torch.testing.assert_close(grads[name], grads_kept[name], rtol=1e-5, atol=1e-6, msg=name)


def _normalised_projection_alive_after_forward(layer, x, monkeypatch):
    """Whether the tensor the attention operator received is still alive once the forward has
    returned (its output and graph held)."""
    seen = []
    original = ops.attention_rows_entry

    def recording_entry(qkv):
        run = original(qkv)  # the eager Function or the operator

        def recording(qkv, *args, **kwargs):
            seen.append(weakref.ref(qkv))
            return run(qkv, *args, **kwargs)

        return recording

    monkeypatch.setattr(ops, "attention_rows_entry", recording_entry)
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
    monkeypatch.setattr(memory_efficient, "FREE_NORMALIZED_PROJECTION", False)
    assert _normalised_projection_alive_after_forward(layer, x.clone(), monkeypatch)


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


def _affine_operands(seed=0, nseq=3, length=9, heads=2, dk=4, dv=8):
    """A projection y (N*L, C2) with a large mean, the BatchNorm's affine terms (2, C2) and its output."""
    gen = torch.Generator().manual_seed(seed)
    c2 = heads * (2 * dk + dv)
    y = torch.randn(nseq * length, c2, generator=gen) * 3 + 2
    affine = torch.stack([torch.rand(c2, generator=gen) + 0.2, torch.randn(c2, generator=gen)])
    return y, affine, torch.addcmul(affine[1], y, affine[0])


@pytest.mark.parametrize("radius", [-1, 3])
def test_backward_kernel_applies_the_affine_terms(radius):
    # the attention's backward on (projection, affine) against the same kernel on the BatchNorm's output
    y, affine, normalised = _affine_operands()
    nseq, heads, dk, dv, dist = 3, 2, 4, 8, 6
    gen = torch.Generator().manual_seed(1)
    tables = [torch.randn(d, 2 * dist + 1, generator=gen) for d in (dk, dk, dv)]
    scales = torch.rand(3, heads, generator=gen) + 0.5
    args = (nseq, heads, dk, dv, radius, dist, True)
    out, lse = ops.attention_rows(normalised, scales, *tables, *args)
    g_out = torch.randn(out.shape, generator=gen)
    want = ops.attention_rows_backward(normalised, scales, *tables, out, lse, g_out, *args)
    got = ops.attention_rows_backward(y, scales, *tables, out, lse, g_out, *args, affine)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the terms are used: without them the gradients are those of another input
    plain = ops.attention_rows_backward(y, scales, *tables, out, lse, g_out, *args)
    assert not torch.allclose(plain[0], want[0], rtol=1e-3, atol=1e-3)


def test_backward_forms_the_input_again_where_the_kernel_cannot():
    # float64: the PyTorch backward, on the input formed from the projection by the forward's own call
    y, affine, _ = (t.double() for t in _affine_operands(2))
    normalised = torch.addcmul(affine[1], y, affine[0])
    nseq, heads, dk, dv, dist = 3, 2, 4, 8, 6
    gen = torch.Generator().manual_seed(3)
    tables = [torch.randn(d, 2 * dist + 1, generator=gen, dtype=torch.float64) for d in (dk, dk, dv)]
    scales = torch.rand(3, heads, generator=gen, dtype=torch.float64) + 0.5
    args = (nseq, heads, dk, dv, -1, dist, True)
    out, lse = ops.attention_rows(normalised, scales, *tables, *args)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    want = ops.attention_rows_backward(normalised, scales, *tables, out, lse, g_out, *args)
    got = ops.attention_rows_backward(y, scales, *tables, out, lse, g_out, *args, affine)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_moments_backward_kernel_applies_the_affine_terms():
    y, affine, normalised = _affine_operands(4, nseq=3, length=7, heads=2, dk=8, dv=8)
    nseq, length, heads, dk = 3, 7, 2, 8
    gen = torch.Generator().manual_seed(5)

    def sym(*shape):
        w = torch.randn(*shape, dk, dk, generator=gen)
        return w + w.transpose(-1, -2)

    ws, cs = sym(nseq, heads, 2), torch.randn(nseq, heads, 2 * dk, generator=gen)
    tp, bp = sym(length, 2), torch.randn(heads, 2 * dk, generator=gen)
    cp = torch.randn(heads, length, 2 * dk, generator=gen)
    want = cpu_kernel.row_moments_backward(normalised, nseq, length, heads, dk, ws, cs, tp, bp, cp)
    got = cpu_kernel.row_moments_backward(y, nseq, length, heads, dk, ws, cs, tp, bp, cp, affine)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    plain = cpu_kernel.row_moments_backward(y, nseq, length, heads, dk, ws, cs, tp, bp, cp)
    assert not torch.allclose(plain, want, rtol=1e-3, atol=1e-3)


def _plain_projection(layer, x):
    return memory_efficient._rows_of(x, layer.axis) @ layer.qkv.weight.flatten(1).t()


def _copies_of_input_kept(layer, x) -> int:
    """How many tensors the forward keeps for the backward that hold x's values in storage of
    their own (the rows of x copied), x itself aside."""
    x = x.detach().clone().requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = layer.train()(x)
    base = x.untyped_storage().data_ptr()
    rows = memory_efficient._rows_of(x.detach(), layer.axis)
    copies = sum(
        1 for t in kept if t.untyped_storage().data_ptr() != base and t.shape == rows.shape and torch.equal(t, rows)
    )
    out.sum().backward()
    return copies


INPUT_LAYOUTS = {
    "height": ("height", torch.contiguous_format),
    "height channels_last": ("height", torch.channels_last),
    "width": ("width", torch.contiguous_format),
    "width channels_last": ("width", torch.channels_last),
}


@pytest.mark.parametrize("case", sorted(INPUT_LAYOUTS))
def test_projection_keeps_the_input_not_a_copy_of_its_rows(case, monkeypatch):
    axis, layout = INPUT_LAYOUTS[case]
    layer = make_layer(axis=axis)
    layer.impl = "memory_efficient"
    x = torch.randn(2, 16, 11, 13).contiguous(memory_format=layout)
    assert _copies_of_input_kept(layer, x) == 0
    # and the check can fail: autograd's product keeps the rows, a copy unless they are a view
    monkeypatch.setattr(memory_efficient, "_projection", _plain_projection)
    view = axis == "width" and layout == torch.channels_last
    assert _copies_of_input_kept(layer, x) == (0 if view else 1)


@pytest.mark.parametrize("case", sorted(INPUT_LAYOUTS))
def test_projection_gradients_are_autograds(case, monkeypatch):
    axis, layout = INPUT_LAYOUTS[case]
    layer = make_layer(axis=axis, span=5 if axis == "width" else None)
    x = torch.randn(2, 16, 11, 13).contiguous(memory_format=layout)
    y, grads, buffers, _ = forward_backward(layer, "memory_efficient", x)
    monkeypatch.setattr(memory_efficient, "_projection", _plain_projection)
    y_ref, grads_ref, buffers_ref, _ = forward_backward(layer, "memory_efficient", x)
    assert torch.equal(y, y_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ref[name]), name
    for name in buffers:
        assert torch.equal(buffers[name], buffers_ref[name]), name


def _pair(stride=1, seed=0):
    torch.manual_seed(seed)
    pair = torch.nn.Sequential(
        PositionSensitiveAxialAttention(16, 16, axis="height", num_heads=2, stride=stride, max_relative_distance=6),
        PositionSensitiveAxialAttention(16, 16, axis="width", num_heads=2, stride=stride, max_relative_distance=6),
    )
    for layer in pair:
        randomize_batch_norms(layer)
        layer.impl = "memory_efficient"
    return pair.train()


def _pair_step(pair, x, between=None):
    """Output, gradients and the number of saved tensors holding the height layer's output."""
    pair = copy.deepcopy(pair)
    x = x.detach().clone().requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        h = pair[0](x)
        if between is not None:
            h = between(h)
        y = pair[1](h)
    holding = sum(1 for t in kept if t.untyped_storage().data_ptr() == h.untyped_storage().data_ptr())
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * g).sum().backward()
    grads = {"input": x.grad, **{n: p.grad for n, p in pair.named_parameters()}}
    return y.detach(), grads, holding


@pytest.mark.parametrize("stride", [1, 2])
def test_width_layer_forms_the_height_output_again(stride, monkeypatch):
    """The width layer keeps not its input, the height layer's output, but forms it again from what
    that layer's output BatchNorm keeps: the same gradients, bit for bit."""
    pair, x = _pair(stride), torch.randn(2, 16, 9, 11)
    y, grads, holding = _pair_step(pair, x)
    assert holding == 0
    monkeypatch.setattr(memory_efficient, "FORM_INPUT_AGAIN", False)
    y_ref, grads_ref, holding_ref = _pair_step(pair, x)
    assert holding_ref == 1  # the check can fail: kept when not formed again
    assert torch.equal(y, y_ref) and grads.keys() == grads_ref.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ref[name]), name


def test_height_output_changed_in_place_is_kept_as_it_is(monkeypatch):
    """An in-place change between the layers: the output cannot be formed again from the BatchNorm's
    input, so it is kept, and the gradients are those of the changed input."""
    pair, x = _pair(), torch.randn(2, 16, 9, 11)

    def between(h):
        return h.mul_(2.0)

    y, grads, holding = _pair_step(pair, x, between)
    assert holding == 1
    monkeypatch.setattr(memory_efficient, "FORM_INPUT_AGAIN", False)
    y_ref, grads_ref, _ = _pair_step(pair, x, between)
    for name in grads:
        assert torch.equal(grads[name], grads_ref[name]), name
