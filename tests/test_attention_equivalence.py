"""Every fast path of the axial-attention layer equals the reference implementation:
outputs, gradients (input and every parameter) and updated BatchNorm running statistics,
in train and eval mode, for global and local spans, odd and even lengths, lengths below
and above the span / table reach, strides 1 and 2 in every stride mode, and with each
term switched off. fp32 within 1e-5; a float64 subset to 1e-10 shows the match is exact
math, not tolerance. Small chunk budgets force the chunked and blocked code paths."""

from __future__ import annotations

import copy

import pytest
import torch
from attention_testing import assert_equal_runs, forward_backward, randomize_batch_norms

from axial_deeplab.layers import PositionSensitiveAxialAttention, available_attention_impls, chunked, cpu_kernel

FAST_IMPLS = [n for n in available_attention_impls() if n != "reference" and not n.startswith("triton")]

# (id, layer kwargs, (H, W)). Global tables reach D = 3 (7 rows); local span 5.
CASES = [
    ("global-L3-below-reach", dict(axis="height"), (3, 2)),
    ("global-L4-at-reach", dict(axis="width"), (2, 4)),
    ("global-L7-above-reach", dict(axis="height"), (7, 2)),
    ("global-L8-above-reach", dict(axis="width"), (1, 8)),
    ("local-L3-below-span", dict(axis="width", span=5), (2, 3)),
    ("local-L4-below-span", dict(axis="height", span=5), (4, 2)),
    ("local-L9-above-span", dict(axis="height", span=5), (9, 2)),
    ("local-L10-above-span", dict(axis="width", span=5), (1, 10)),
    ("global-stride2-subsample-odd", dict(axis="height", stride=2), (7, 2)),
    ("local-stride2-subsample-even", dict(axis="width", stride=2, span=5), (2, 10)),
    ("global-stride2-avgpool-odd", dict(axis="width", stride=2, stride_mode="avgpool"), (2, 5)),
    ("local-stride2-avgpool-even", dict(axis="height", stride=2, stride_mode="avgpool", span=3), (8, 1)),
    ("global-stride2-avgpool2d", dict(axis="width", stride=2, stride_mode="avgpool2d"), (3, 6)),
]
for _term in ("use_qk", "use_query_rpe", "use_key_rpe", "use_value_rpe"):
    CASES.append((f"global-no-{_term[4:]}", {"axis": "height", _term: False}, (6, 2)))
    CASES.append((f"local-no-{_term[4:]}", {"axis": "width", "span": 3, _term: False}, (2, 7)))


def make_layer(kwargs, dtype, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(kwargs)
    if kwargs.get("span") is None:
        kwargs.setdefault("max_relative_distance", 3)
    layer = PositionSensitiveAxialAttention(6, 8, num_heads=2, **kwargs).to(dtype)
    randomize_batch_norms(layer)
    return layer


def run(layer, impl, x, training):
    return forward_backward(layer, impl, x, "train" if training else "eval")[:3]


@pytest.fixture(params=["c-kernel", "torch-default-chunks", "torch-tiny-chunks"])
def chunk_budget(request, monkeypatch):
    """The compiled eval kernel when it is available, and the PyTorch path with the
    default and with tiny chunk budgets (a few (sequence, head) pairs per chunk)."""
    if request.param == "c-kernel":
        if not cpu_kernel.available():
            pytest.skip("no C compiler: the C kernel is not built (the PyTorch path is tested below)")
    else:
        monkeypatch.setattr(cpu_kernel, "ENABLED", False)
        monkeypatch.setattr(cpu_kernel, "_state", {"lib": None, "tried": False, "pools": {}})
    if request.param == "torch-tiny-chunks":
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 7)
    return request.param


@pytest.mark.parametrize("case_id,kwargs,hw", CASES, ids=[c[0] for c in CASES])
def test_fast_paths_equal_reference_fp32(case_id, kwargs, hw, chunk_budget):
    layer = make_layer(kwargs, torch.float32)
    x = torch.randn(2, 6, *hw, generator=torch.Generator().manual_seed(1))
    for training in (True, False):
        want = run(layer, "reference", x, training)
        for impl in FAST_IMPLS:
            got = run(layer, impl, x, training)
            assert_equal_runs(got, want, 1e-5, f"{impl} {'train' if training else 'eval'}")
    # Inference (no autograd): the eval path proper (compiled kernel when available).
    with torch.no_grad():
        ref = copy.deepcopy(layer).eval()
        ref.impl = "reference"
        want = ref(x)
        for impl in FAST_IMPLS:
            lay = copy.deepcopy(layer).eval()
            lay.impl = impl
            torch.testing.assert_close(lay(x), want, rtol=1e-5, atol=1e-5 * max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("case_id,kwargs,hw", CASES[::3], ids=[c[0] for c in CASES[::3]])
def test_fast_paths_equal_reference_fp64(case_id, kwargs, hw):
    layer = make_layer(kwargs, torch.float64)
    x = torch.randn(3, 6, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for training in (True, False):
        want = run(layer, "reference", x, training)
        for impl in FAST_IMPLS:
            assert_equal_runs(run(layer, impl, x, training), want, 1e-10, f"{impl} {'train' if training else 'eval'}")


@pytest.mark.parametrize("span", [None, 5])
def test_peaked_rows_take_the_exact_max_path(span):
    # Logits ~ thousands: a row's maximum exceeds its diagonal logit by far more than
    # exp2's range, so the cheap diagonal shift overflows and the exact row max is used.
    layer = make_layer(dict(axis="height", span=span), torch.float64)
    with torch.no_grad():
        layer.bn_similarity.weight.fill_(300.0)
    x = torch.randn(2, 6, 9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for training in (True, False):
        want = run(layer, "reference", x, training)
        for impl in FAST_IMPLS:
            assert_equal_runs(run(layer, impl, x, training), want, 1e-9, f"{impl} peaked")


def test_running_stats_accumulate_over_steps():
    # Several training steps (momentum and the cumulative-average mode) then eval.
    layer = make_layer(dict(axis="width", span=3), torch.float64)
    for bn in (layer.bn_qkv, layer.bn_similarity, layer.bn_output):
        bn.momentum = None
    layers = {impl: copy.deepcopy(layer) for impl in ["reference"] + FAST_IMPLS}
    for step in range(3):
        x = torch.randn(2, 6, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + step))
        for impl, lay in layers.items():
            lay.impl = impl
            lay.train()(x).sum().backward()
    ref = layers.pop("reference")
    for impl, lay in layers.items():
        for (name, b), (_, b_ref) in zip(lay.named_buffers(), ref.named_buffers()):
            torch.testing.assert_close(b, b_ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{impl} {name}: {m}")
        x = torch.randn(1, 6, 4, 9, dtype=torch.float64)
        torch.testing.assert_close(lay.eval()(x), ref.eval()(x), rtol=1e-10, atol=1e-10)


def test_memory_efficient_training_keeps_no_attention_tensors():
    # Peak memory of a training step (height + width pair) against the reference's:
    # the custom backward recomputes the L x L tensors chunk by chunk.
    from axial_deeplab.benchmark import layer_pair, peak_memory_bytes, set_attention_impl

    torch.manual_seed(0)
    pair = layer_pair(32, max_relative_distance=40)
    x = torch.randn(1, 32, 24, 40)

    def step():
        xg = x.clone().requires_grad_(True)
        pair(xg).sum().backward()

    set_attention_impl(pair, "reference")
    ref = peak_memory_bytes(step, torch.device("cpu"))
    set_attention_impl(pair, "memory_efficient")
    mem = peak_memory_bytes(step, torch.device("cpu"))
    assert 0 < mem <= 0.5 * ref, (mem, ref)
