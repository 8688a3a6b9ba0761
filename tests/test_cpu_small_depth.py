"""The compiled forward at the small depths of Axial-ResNets' first stages: key depths 4 and 8
take logit loops specialised with the depth as a constant, value depth 8 (one vector of
channels) the retrieval with two sets of accumulators, and every depth the logits pass that
masks and takes the row maxima itself and the exp2 that the softmax and the backward share.
Checked against the reference (eval, and a training step whose gradients use the forward's
log-sum-exp) and, for attend_eval's outputs and log-sum-exp, against the plain equation
written out below: global and local spans, lengths that are not a multiple of the 4-row
block nor of the 8-wide vectors, query stride 2, each term switched off, NCHW and
channels_last input."""

from __future__ import annotations

import pytest
import torch
from attention_testing import close_scaled, forward_backward, kernel_eval, randomize_batch_norms, reference_eval

from axial_deeplab.layers import PositionSensitiveAxialAttention, cpu_kernel

pytestmark = pytest.mark.skipif(
    not cpu_kernel.available(), reason="no C compiler: the C kernel is not built (the PyTorch path is tested elsewhere)"
)

DEPTHS = [(4, 8), (8, 16), (4, 16), (8, 8)]  # (key depth, value depth) per head


def make_layer(dk, dv, in_ch=6, heads=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    if kwargs.get("span") is None:
        kwargs.setdefault("max_relative_distance", 9)
    layer = PositionSensitiveAxialAttention(in_ch, heads * dv, num_heads=heads, key_channels=heads * dk, **kwargs)
    randomize_batch_norms(layer)
    return layer.eval()


CASES = [  # (id, layer kwargs, input (B, H, W))
    ("global", dict(), (2, 13, 11)),
    ("global-long", dict(), (1, 41, 3)),  # several 16- and 32-wide logit chunks, clipped reach
    ("local-span5", dict(span=5), (2, 10, 13)),
    ("stride2", dict(stride=2), (2, 11, 9)),
]


@pytest.mark.parametrize("dk,dv", DEPTHS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("case_id,kwargs,bhw", CASES, ids=[c[0] for c in CASES])
def test_eval_matches_reference(dk, dv, layout, axis, case_id, kwargs, bhw):
    layer = make_layer(dk, dv, axis=axis, **kwargs)
    b, h, w = bhw
    x = torch.randn(b, 6, h, w, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    close_scaled(kernel_eval(layer, x), reference_eval(layer, x), 1e-5, f"{case_id} dk={dk} dv={dv}")


@pytest.mark.parametrize("dk,dv", [(4, 8), (8, 16)])
@pytest.mark.parametrize("term", ["use_qk", "use_query_rpe", "use_key_rpe", "use_value_rpe"])
@pytest.mark.parametrize("span", [None, 3])
def test_eval_terms_switched_off(dk, dv, term, span):
    layer = make_layer(dk, dv, axis="width", span=span, **{term: False})
    x = torch.randn(2, 6, 3, 10, generator=torch.Generator().manual_seed(2))
    close_scaled(kernel_eval(layer, x), reference_eval(layer, x), 1e-5, term)


def plain_attend(layer, qkv, scales, step):
    """sv, sve (nh, dv, Lq) and the log2-sum-exp2 (nh, Lq) of attend's contract, from the
    equation: z_op = a0 q_o.k_p + a1 q_o.r^q_{p-o} + a2 k_p.r^k_{p-o} over the span of o."""
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    q, k, v = qkv.double().split([dk, dk, dv], dim=1)
    length = qkv.shape[2]
    o = torch.arange(0, length, step)
    p = torch.arange(length)
    rel = p[None, :] - o[:, None]
    d = layer.max_relative_distance
    rows = rel.clamp(-d, d) + d
    radius = length if layer.span is None else (layer.span - 1) // 2
    inside = rel.abs() <= radius
    a = scales.double().repeat(1, qkv.shape[0] // heads).t()[:, :, None, None]  # (nh, 3, 1, 1)
    qo = q[:, :, o]
    z = torch.zeros(qkv.shape[0], len(o), length, dtype=torch.float64)
    if layer.use_qk:
        z += a[:, 0] * torch.einsum("nco,ncp->nop", qo, k)
    if layer.use_query_rpe:
        z += a[:, 1] * torch.einsum("nco,cop->nop", qo, layer.query_table.detach().double()[:, rows])
    if layer.use_key_rpe:
        z += a[:, 2] * torch.einsum("ncp,cop->nop", k, layer.key_table.detach().double()[:, rows])
    z = z.masked_fill(~inside, float("-inf"))
    lse = torch.logsumexp(z, dim=2) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    attn = torch.softmax(z, dim=2)
    sv = torch.einsum("nop,ncp->nco", attn, v)
    sve = (
        torch.einsum("nop,cop->nco", attn, layer.value_table.detach().double()[:, rows])
        if layer.use_value_rpe
        else None
    )
    return sv, sve, lse


@pytest.mark.parametrize("dk,dv", DEPTHS)
@pytest.mark.parametrize("span", [None, 5])
@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize("term", [None, "use_qk", "use_query_rpe", "use_key_rpe", "use_value_rpe"])
def test_attend_eval_outputs_and_lse_equal_the_equation(dk, dv, span, step, term):
    kwargs = {term: False} if term else {}
    layer = make_layer(dk, dv, heads=2, span=span, **kwargs)
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(3 * 2, 2 * dk + dv, 19, generator=gen)  # 3 sequences x 2 heads, L = 19
    scales = torch.rand(3, 2, generator=gen) + 0.5
    with torch.no_grad():
        out = cpu_kernel.attend_eval(layer, qkv, scales, query_step=step, return_lse=True)
    assert out is not None, "the compiled kernel did not take this input"
    sv, sve, lse = out
    want_sv, want_sve, want_lse = plain_attend(layer, qkv, scales, step)
    close_scaled(sv, want_sv, 1e-5, "sv")
    close_scaled(lse, want_lse, 1e-5, "lse")
    if layer.use_value_rpe:
        close_scaled(sve, want_sve, 1e-5, "sve")
    else:
        assert sve is None


@pytest.mark.parametrize("dk,dv", [(4, 8), (8, 16)])
@pytest.mark.parametrize("axis,span", [("height", None), ("width", 5)])
def test_training_step_matches_reference(dk, dv, axis, span):
    layer = make_layer(dk, dv, axis=axis, span=span).train()
    x = torch.randn(2, 6, 9, 10, generator=torch.Generator().manual_seed(4))
    if axis == "width":
        x = x.contiguous(memory_format=torch.channels_last)
    y, grads, _, _ = forward_backward(layer, "memory_efficient", x)
    y_ref, grads_ref, _, _ = forward_backward(layer, "reference", x.contiguous())
    close_scaled(y, y_ref, 1e-5, "output")
    for name in grads_ref:
        close_scaled(grads[name], grads_ref[name], 3e-5, f"grad {name}")


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("axis", ["height", "width"])
def test_position_major_one_head_and_all_heads_at_once(heads, axis):
    # channels_last input gives the position-major projection: one head is copied on its own,
    # several heads of a sequence in one pass over its positions
    layer = make_layer(4, 8, heads=heads, axis=axis)
    x = torch.randn(2, 6, 10, 9, generator=torch.Generator().manual_seed(5)).contiguous(
        memory_format=torch.channels_last
    )
    close_scaled(kernel_eval(layer, x), reference_eval(layer, x), 1e-5, f"{heads} heads")
