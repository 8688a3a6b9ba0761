"""The position-major CPU training path of ``impl="memory_efficient"`` (projection as rows of
channels, BatchNorms on rows, compiled forward and backward kernels reading the projection
and the incoming gradients where they lie, closed-form similarity-BN moments with their own
backward) equals the reference implementation: outputs, gradients of the input and of every
parameter, and BatchNorm running statistics, for NCHW, channels_last and non-contiguous
inputs on both axes, global and local spans, every term switched off in turn, strides,
several steps with the cumulative-average BN mode, and depths where the kernel's vector
reads would leave the rows (the general path then takes over)."""

from __future__ import annotations

import copy

import pytest
import torch
from attention_testing import close_scaled, forward_backward, randomize_batch_norms

from axial_deeplab.layers import PositionSensitiveAxialAttention, cpu_kernel, memory_efficient, ops, similarity_stats

pytestmark = pytest.mark.skipif(
    not cpu_kernel.available(),
    reason="no C compiler: the compiled training path is not built (the PyTorch path is tested elsewhere)",
)


def make_layer(seed=0, in_ch=6, out_ch=8, heads=2, key_ch=None, **kwargs):
    torch.manual_seed(seed)
    if kwargs.get("span") is None:
        kwargs.setdefault("max_relative_distance", 3)
    layer = PositionSensitiveAxialAttention(in_ch, out_ch, num_heads=heads, key_channels=key_ch, **kwargs)
    randomize_batch_norms(layer)
    return layer


def assert_matches_reference(layer, x, tol=1e-5):
    y, grads, buffers, _ = forward_backward(layer, "memory_efficient", x)
    y_ref, grads_ref, buffers_ref, _ = forward_backward(layer, "reference", x.contiguous())

    close_scaled(y, y_ref, tol, "output")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        close_scaled(grads[name], grads_ref[name], tol, f"grad {name}")
    for name in buffers_ref:
        close_scaled(buffers[name], buffers_ref[name], tol, f"buffer {name}")


def count_position_major_runs(monkeypatch):
    calls = []
    original = memory_efficient.run_layer_position_major

    def counting(layer, x):
        calls.append(layer.axis)
        return original(layer, x)

    monkeypatch.setattr(memory_efficient, "run_layer_position_major", counting)
    return calls


LAYOUTS = {
    "nchw": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "strided": lambda x: torch.cat([x, x], dim=3)[:, :, :, ::2],  # same values, non-contiguous
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("span", [None, 5])
def test_layouts_and_spans_match_reference(layout, axis, span, monkeypatch):
    calls = count_position_major_runs(monkeypatch)
    layer = make_layer(axis=axis, span=span)
    x = LAYOUTS[layout](torch.randn(2, 6, 7, 9, generator=torch.Generator().manual_seed(1)))
    assert_matches_reference(layer, x)
    assert calls == [axis], "the position-major path did not run"


@pytest.mark.parametrize("term", ["use_qk", "use_query_rpe", "use_key_rpe", "use_value_rpe"])
@pytest.mark.parametrize("span", [None, 3])
def test_terms_switched_off_match_reference(term, span, monkeypatch):
    calls = count_position_major_runs(monkeypatch)
    layer = make_layer(axis="width", span=span, **{term: False})
    x = torch.randn(2, 6, 3, 8, generator=torch.Generator().manual_seed(2))
    assert_matches_reference(layer, x)
    assert calls == ["width"]


@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("mode", ["subsample", "avgpool", "avgpool2d"])
def test_strides_match_reference(mode, axis):
    # the subsample's gradient comes back laid out as the layer's channels_last output
    layer = make_layer(axis=axis, stride=2, stride_mode=mode)
    assert_matches_reference(layer, torch.randn(2, 6, 7, 5, generator=torch.Generator().manual_seed(3)))


def test_wider_heads_and_lengths_past_the_table_reach(monkeypatch):
    # dk = 12, dv = 10 (not multiples of 8), 3 heads, L = 21 > reach 2*3+1
    calls = count_position_major_runs(monkeypatch)
    layer = make_layer(in_ch=5, out_ch=30, heads=3, key_ch=36, axis="height")
    # the similarity BN bias gradient is exactly 0; the reference's float32 rounding leaves ~1e-5
    assert_matches_reference(layer, torch.randn(3, 5, 21, 2, generator=torch.Generator().manual_seed(4)), tol=3e-5)
    assert calls == ["height"]


def test_depths_the_vector_reads_cannot_take_use_the_general_path(monkeypatch):
    # dk = 1, dv = 4: the kernel's 8-wide reads of q and k would run past a row's end, so the
    # operator's position-major kernel refuses them (the operator runs the sequence layout)
    decisions = []
    original = ops._rows_kernel_applies

    def recording(geo, qkv):
        decisions.append(original(geo, qkv))
        return decisions[-1]

    monkeypatch.setattr(ops, "_rows_kernel_applies", recording)
    layer = make_layer(in_ch=4, out_ch=4, heads=1, key_ch=1, axis="width")
    assert_matches_reference(layer, torch.randn(2, 4, 2, 6, generator=torch.Generator().manual_seed(5)))
    assert decisions and not any(decisions)


def test_layer_pair_and_cumulative_running_stats_over_steps():
    pair = torch.nn.Sequential(make_layer(axis="height", seed=1), make_layer(in_ch=8, axis="width", seed=2))
    for layer in pair:
        for bn in (layer.bn_qkv, layer.bn_similarity, layer.bn_output):
            bn.momentum = None
    runs = {impl: copy.deepcopy(pair) for impl in ("reference", "memory_efficient")}
    for step in range(3):
        x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(20 + step))
        grads = {}
        for impl, model in runs.items():
            for layer in model:
                layer.impl = impl
            xg = x.clone().requires_grad_(True)
            model.train()(xg).square().sum().backward()
            grads[impl] = xg.grad
        scale = max(1.0, float(grads["reference"].abs().max()))  # two float32 layers in a row
        torch.testing.assert_close(grads["memory_efficient"], grads["reference"], rtol=5e-5, atol=5e-5 * scale)
    for (name, b), (_, b_ref) in zip(runs["memory_efficient"].named_buffers(), runs["reference"].named_buffers()):
        torch.testing.assert_close(b.double(), b_ref.double(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, p), (_, p_ref) in zip(runs["memory_efficient"].named_parameters(), runs["reference"].named_parameters()):
        scale = max(1.0, float(p_ref.grad.abs().max()))
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")


def _grad(table):
    return None if table is None else table.grad


@pytest.mark.parametrize("off", [None, "use_query_rpe", "use_key_rpe"])
def test_row_moments_and_their_gradients_equal_the_general_closed_form(off):
    # the two tables' terms run batched, a switched-off one as a table of zeros
    kwargs = {} if off is None else {off: False}
    layer = make_layer(in_ch=6, out_ch=12, heads=3, key_ch=15, axis="width", **kwargs)  # dk = 5
    nseq, length = 4, 6
    c2 = layer.qkv.weight.shape[0]
    y = torch.randn(nseq * length, c2, generator=torch.Generator().manual_seed(6), requires_grad=True)
    w_sums, w_sq = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    sums, sumsq, count = similarity_stats.similarity_moments_rows(layer, y, nseq, length)
    ((sums * w_sums).sum() + (sumsq * w_sq).sum()).backward()
    got = (sums.detach(), sumsq.detach(), y.grad, _grad(layer.query_table), _grad(layer.key_table))

    ref_layer = copy.deepcopy(layer)
    ref_layer.zero_grad(set_to_none=True)
    y_ref = y.detach().clone().requires_grad_(True)
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    qkv4 = y_ref.view(nseq, length, heads, 2 * dk + dv).permute(0, 2, 3, 1)
    sums_r, sumsq_r, count_r = similarity_stats.similarity_moments(ref_layer, qkv4[:, :, :dk], qkv4[:, :, dk : 2 * dk])
    ((sums_r * w_sums).sum() + (sumsq_r * w_sq).sum()).backward()
    want = (sums_r.detach(), sumsq_r.detach(), y_ref.grad, _grad(ref_layer.query_table), _grad(ref_layer.key_table))

    assert count == count_r == nseq * length * length
    for name, a, b in zip(("sums", "sumsq", "grad y", "grad query table", "grad key table"), got, want):
        if b is None:  # a switched-off table
            assert a is None, name
            continue
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    if off is not None:  # its term's statistics are exact zeros
        term = 1 if off == "use_query_rpe" else 2
        assert not sums[term].any() and not sumsq[term].any()
