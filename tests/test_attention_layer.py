"""The reference axial-attention layer against an independent per-position loop
computation of the paper's equation (BatchNorm in eval and training mode, global and
local spans, clipped relative offsets, strides, switched-off terms), and the layer's
flexibility: one layer runs at any size, and under bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
from attention_testing import randomize_batch_norms

from axial_deeplab.layers import PositionSensitiveAxialAttention, available_attention_impls


# --------------------------------------------------------------------------- the loop oracle
def _batch_norm(values, bn, training):
    """values: list (one per channel) of 1-D tensors of that channel's elements.
    Returns (normalised list, batch means, unbiased batch variances)."""
    out, means, uvars = [], [], []
    for ch, v in enumerate(values):
        if training:
            mean = v.mean()
            var = ((v - mean) ** 2).mean()
            uvar = var * v.numel() / (v.numel() - 1)
        else:
            mean, var, uvar = bn.running_mean[ch], bn.running_var[ch], None
        out.append((v - mean) / torch.sqrt(var + bn.eps) * bn.weight[ch] + bn.bias[ch])
        means.append(mean)
        uvars.append(uvar)
    return out, means, uvars


def loop_oracle(layer, x):
    with torch.no_grad():
        return _loop_oracle(layer, x)


def _loop_oracle(layer, x):
    """y_o = sum_{p in span(o)} softmax_p(BN(q_o.k_p) + BN(q_o.r^q_{p-o}) + BN(k_p.r^k_{p-o}))
    * (BN(v_p) ... ) written with Python loops over o and p. Returns (y, expected running
    stats {bn name: (mean, var)} after this call in training, else None)."""
    training = layer.training
    B, C, H, W = x.shape
    heads, dk, dv = layer.num_heads, layer.key_depth, layer.value_depth
    D = layer.max_relative_distance
    r = None if layer.span is None else (layer.span - 1) // 2
    L, other = (H, W) if layer.axis == "height" else (W, H)

    # 1x1 projection, pixel by pixel, then BN over (B, H, W) per channel.
    w = layer.qkv.weight[:, :, 0, 0]
    proj = torch.zeros(B, w.shape[0], H, W, dtype=x.dtype)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                proj[b, :, i, j] = w @ x[b, :, i, j]
    flat = [proj[:, c].reshape(-1) for c in range(proj.shape[1])]
    normed, m_qkv, v_qkv = _batch_norm(flat, layer.bn_qkv, training)
    qkv = torch.stack([t.reshape(B, H, W) for t in normed], 1)

    def seq(b, t):  # channels (C2, L) of sequence t (the other axis' index) of image b
        return qkv[b, :, :, t] if layer.axis == "height" else qkv[b, :, t, :]

    def row(table, d):  # table row for offset d, clipped to the reach
        return table[:, max(-D, min(D, d)) + D]

    in_span = [[r is None or abs(p - o) <= r for p in range(L)] for o in range(L)]
    on = [layer.use_qk, layer.use_query_rpe, layer.use_key_rpe]
    # similarity terms S[t][h] -> list over (b, t, o, p) in span
    sims = {}
    seqs = [(b, t) for b in range(B) for t in range(other)]
    for b, t in seqs:
        s = seq(b, t)
        for h in range(heads):
            base = h * (2 * dk + dv)
            q, k = s[base : base + dk], s[base + dk : base + 2 * dk]
            for o in range(L):
                for p in range(L):
                    if not in_span[o][p]:
                        continue
                    terms = [
                        torch.dot(q[:, o], k[:, p]) if on[0] else x.new_zeros(()),
                        torch.dot(q[:, o], row(layer.query_table, p - o)) if on[1] else x.new_zeros(()),
                        torch.dot(k[:, p], row(layer.key_table, p - o)) if on[2] else x.new_zeros(()),
                    ]
                    for ti in range(3):
                        sims.setdefault((ti, h), []).append(terms[ti])
    keys = [(ti, h) for ti in range(3) for h in range(heads)]  # BN channel order: term-major
    normed_sims, m_sim, v_sim = _batch_norm([torch.stack(sims[kk]) for kk in keys], layer.bn_similarity, training)
    lookup = {kk: normed_sims[i] for i, kk in enumerate(keys)}

    # attention and the two retrievals, per sequence/head/query
    sv = torch.zeros(len(seqs), heads, dv, L, dtype=x.dtype)
    sve = torch.zeros_like(sv)
    counter = {kk: 0 for kk in keys}
    for si, (b, t) in enumerate(seqs):
        s = seq(b, t)
        for h in range(heads):
            base = h * (2 * dk + dv)
            v = s[base + 2 * dk : base + 2 * dk + dv]
            for o in range(L):
                logits = {}
                for p in range(L):
                    if not in_span[o][p]:
                        continue
                    total = 0.0
                    for ti in range(3):
                        val = lookup[(ti, h)][counter[(ti, h)]]
                        counter[(ti, h)] += 1
                        if on[ti]:
                            total = total + val
                    logits[p] = total
                top = max(float(val) for val in logits.values())
                weights = {p: math.exp(float(val) - top) for p, val in logits.items()}
                z = sum(weights.values())
                for p, wgt in weights.items():
                    a = wgt / z
                    sv[si, h, :, o] += a * v[:, p]
                    if layer.use_value_rpe:
                        sve[si, h, :, o] += a * row(layer.value_table, p - o)
    # bn_output: channel (h, c, retrieval), interleaved; statistics over (sequences, positions)
    chans = []
    for h in range(heads):
        for c in range(dv):
            chans.append(sv[:, h, c, :].reshape(-1))
            chans.append(sve[:, h, c, :].reshape(-1))
    out_n, m_out, v_out = _batch_norm(chans, layer.bn_output, training)
    y_seq = torch.zeros(len(seqs), heads * dv, L, dtype=x.dtype)
    for h in range(heads):
        for c in range(dv):
            i = 2 * (h * dv + c)
            val = out_n[i] + (out_n[i + 1] if layer.use_value_rpe else 0)
            y_seq[:, h * dv + c, :] = val.reshape(len(seqs), L)
    y = torch.zeros(B, heads * dv, H, W, dtype=x.dtype)
    for si, (b, t) in enumerate(seqs):
        if layer.axis == "height":
            y[b, :, :, t] = y_seq[si]
        else:
            y[b, :, t, :] = y_seq[si]
    s = layer.stride
    if s > 1:
        if layer.stride_mode == "subsample":
            y = y[:, :, ::s, :] if layer.axis == "height" else y[:, :, :, ::s]
        elif layer.stride_mode == "avgpool":
            k = (s, 1) if layer.axis == "height" else (1, s)
            y = torch.nn.functional.avg_pool2d(y, k, k, ceil_mode=True)  # ceil(L / s) positions
        else:
            y = torch.nn.functional.avg_pool2d(y, s, s, ceil_mode=True)
    stats = None
    if training:

        def upd(bn, means, uvars):
            f = bn.momentum
            rm = bn.running_mean * (1 - f) + f * torch.stack(means)
            rv = bn.running_var * (1 - f) + f * torch.stack(uvars)
            return rm, rv

        stats = {
            "bn_qkv": upd(layer.bn_qkv, m_qkv, v_qkv),
            "bn_similarity": upd(layer.bn_similarity, m_sim, v_sim),
            "bn_output": upd(layer.bn_output, m_out, v_out),
        }
    return y, stats


def make_layer(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_heads", 2)
    layer = PositionSensitiveAxialAttention(4, kw.pop("out", 8), **kw).to(dtype)
    randomize_batch_norms(layer)
    return layer


CASES = [
    # (kwargs, (H, W))
    (dict(axis="height"), (3, 4)),
    (dict(axis="width"), (3, 5)),
    (dict(axis="width", max_relative_distance=2), (2, 6)),  # offsets beyond the reach clip
    (dict(axis="height", span=3), (5, 2)),  # local span shorter than the axis
    (dict(axis="width", span=5), (2, 3)),  # local span longer than the axis
    (dict(axis="height", use_qk=False), (4, 2)),
    (dict(axis="width", use_query_rpe=False, span=3), (2, 4)),
    (dict(axis="height", use_key_rpe=False, use_value_rpe=False), (3, 3)),
    (dict(axis="height", stride=2), (5, 2)),
    (dict(axis="width", stride=2, stride_mode="avgpool"), (2, 5)),
    (dict(axis="width", stride=2, stride_mode="avgpool2d"), (3, 4)),
]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kwargs,hw", CASES, ids=[str(i) for i in range(len(CASES))])
def test_reference_matches_loop_oracle(kwargs, hw, training):
    layer = make_layer(impl="reference", **kwargs).train(training)
    x = torch.randn(2, 4, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected, stats = loop_oracle(layer, x)
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)
    if training:
        for name, (mean, var) in stats.items():
            bn = getattr(layer, name)
            torch.testing.assert_close(bn.running_mean, mean, rtol=1e-9, atol=1e-9, msg=f"{name} running_mean")
            torch.testing.assert_close(bn.running_var, var, rtol=1e-9, atol=1e-9, msg=f"{name} running_var")


def test_oracle_detects_a_wrong_table_index():
    # The oracle is strict enough to see a one-row shift of the relative tables.
    layer = make_layer(impl="reference", axis="height").eval()
    x = torch.randn(1, 4, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    good, _ = loop_oracle(layer, x)
    with torch.no_grad():
        layer.query_table.copy_(torch.roll(layer.query_table, 1, dims=1))
    assert not torch.allclose(layer(x), good, atol=1e-6)


# --------------------------------------------------------------------------- flexibility
IMPLS = [name for name in available_attention_impls() if not name.startswith("triton")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("span", [None, 5])
def test_layer_built_at_one_size_runs_at_others(impl, span):
    # Tables reach D = 3 (global) or span 5; the axis is shorter and longer than both.
    layer = make_layer(
        dtype=torch.float32, impl=impl, axis="width", span=span, max_relative_distance=3 if span is None else None
    ).eval()
    rows = layer.table_rows
    for h, w in [(8, 8), (3, 2), (5, 13), (2, 1)]:
        x = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(h * w))
        y = layer(x)
        assert y.shape == (1, 8, h, w)
        assert torch.isfinite(y).all()
        expected, _ = loop_oracle(layer.double(), x.double())
        layer.float()
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert layer.table_rows == rows  # nothing was resized


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_bf16_autocast_on_cpu(impl, training):
    layer = make_layer(dtype=torch.float32, impl=impl, axis="height", span=5).train(training)
    x = torch.randn(2, 4, 7, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.requires_grad_(training))
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y.float()).all()
    scale = expected.abs().max()
    assert (y.float() - expected).abs().max() < 0.05 * scale
    if training:
        y.float().sum().backward()
        assert torch.isfinite(x.grad).all()


def test_bad_input_shape_names_the_shape():
    layer = make_layer(dtype=torch.float32, axis="height")
    with pytest.raises(ValueError, match=r"expected input \(B, 4, H, W\), got \(2, 3, 5, 5\)"):
        layer(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="odd"):
        PositionSensitiveAxialAttention(4, 8, num_heads=2, span=4)


@pytest.mark.parametrize(
    "mode,shape", [("subsample", (1, 8, 3, 6)), ("avgpool", (1, 8, 3, 6)), ("avgpool2d", (1, 8, 3, 3))]
)
def test_stride_output_shapes(mode, shape):
    for impl in IMPLS:
        layer = make_layer(dtype=torch.float32, impl=impl, axis="height", stride=2, stride_mode=mode).eval()
        assert layer(torch.randn(1, 4, 5, 6)).shape == shape


def test_without_a_c_compiler_the_fast_path_falls_back_to_pytorch(monkeypatch, tmp_path):
    from axial_deeplab.layers import cpu_kernel

    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("AXIAL_DEEPLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_state", {"lib": None, "tried": False, "pools": {}})
    with pytest.warns(UserWarning, match="C kernel unavailable"):  # the failed build says so, once
        assert not cpu_kernel.available()
    layer = make_layer(dtype=torch.float32, impl="fast", axis="width", span=3).eval()
    x = torch.randn(1, 4, 2, 6)
    with torch.no_grad():
        y = layer(x)
    expected, _ = loop_oracle(layer.double(), x.double())
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
