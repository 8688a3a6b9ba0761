"""The attention as registered PyTorch operators: opcheck, torch.compile and torch.export of
the default path, equal to eager and to the reference."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import axial_deeplab
from axial_deeplab.layers import PositionSensitiveAxialAttention, cpu_kernel, moment_ops, ops


def _layer(axis="height", span=None, impl="auto", **kw):
    return PositionSensitiveAxialAttention(16, 16, axis=axis, num_heads=2, span=span, impl=impl, **kw)


def _pair():
    return nn.Sequential(_layer("height"), _layer("width", span=5))


def _rows_args(dtype, span_radius, with_value_table=True, requires_grad=True):
    """Operands of ``attention_rows`` for 3 sequences of length 7, heads 2, dk 4, dv 8."""
    gen = torch.Generator().manual_seed(0)
    nseq, length, heads, dk, dv, dist = 3, 7, 2, 4, 8, 3

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_(requires_grad)

    qkv = t(nseq * length, heads * (2 * dk + dv))
    scales = (torch.rand(3, heads, generator=gen, dtype=dtype) + 0.5).requires_grad_(requires_grad)
    rows = 2 * dist + 1
    return (
        qkv,
        scales,
        t(dk, rows),
        t(dk, rows),
        t(dv, rows) if with_value_table else None,
        nseq,
        heads,
        dk,
        dv,
        span_radius,
        dist,
        True,
    )


@pytest.mark.parametrize("dtype,radius,value_table", [(torch.float32, -1, True), (torch.float64, 2, False)])
def test_opcheck_attention_rows(dtype, radius, value_table):
    # float32: the C kernel (when compiled); float64: the PyTorch path inside the operator
    torch.library.opcheck(ops.attention_rows, _rows_args(dtype, radius, value_table))


def test_opcheck_attention_rows_backward():
    args = _rows_args(torch.float32, -1, requires_grad=False)
    out, lse = ops.attention_rows(*args)
    g_out = torch.randn_like(out)
    torch.library.opcheck(ops.attention_rows_backward, (*args[:5], out, lse, g_out, *args[5:]))


@pytest.mark.parametrize("dtype,radius,value_table", [(torch.float32, -1, True), (torch.float64, 2, False)])
def test_eager_entry_equals_the_operator(dtype, radius, value_table):
    # eager calls skip the operator's dispatch: same implementations, same outputs and gradients
    args = _rows_args(dtype, radius, value_table)
    assert ops.attention_rows_entry(args[0]) is not ops.attention_rows
    results = []
    for run in (ops.attention_rows, ops.attention_rows_entry(args[0])):
        out, lse = run(*args)
        g = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        tensors = [t for t in args[:5] if t is not None]
        results.append((out, lse, torch.autograd.grad(out, tensors, g)))
    (out, lse, grads), (out2, lse2, grads2) = results
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    assert len(grads) == len(grads2) >= 4
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)
    assert not lse2.requires_grad  # an auxiliary output, as the operator's


def test_eager_training_calls_no_operator(monkeypatch):
    # the layer in eager training reaches the implementations without the operators' dispatch
    from axial_deeplab.layers import row_batch_norm

    def refuse(*args, **kwargs):
        raise AssertionError("an operator was called in eager mode")

    monkeypatch.setattr(ops, "attention_rows", refuse)
    monkeypatch.setattr(row_batch_norm, "output_bn_sum", refuse)
    layer = _layer("height").train()
    out = layer(torch.randn(2, 16, 5, 6, requires_grad=True))
    out.sum().backward()
    assert layer.qkv.weight.grad is not None and layer.bn_output.weight.grad is not None
    # and traced code does reach them (the operators are what torch.compile sees)
    with pytest.raises(AssertionError, match="an operator was called"):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        layer(torch.randn(2, 16, 5, 6))


def _grams_operands(dtype):
    """Rows y (N*L, heads*(2dk+dv)) for 3 sequences of length 7, heads 2, dk 4, dv 8, and the
    backward's weights (symmetric blocks, as the moments' objective gives)."""
    gen = torch.Generator().manual_seed(1)
    nseq, length, heads, dk, dv = 3, 7, 2, 4, 8

    def sym(*shape):
        w = torch.randn(*shape, dk, dk, generator=gen, dtype=dtype)
        return w + w.transpose(-1, -2)

    y = torch.randn(nseq * length, heads * (2 * dk + dv), generator=gen, dtype=dtype)
    ws, cs = sym(nseq, heads, 2), torch.randn(nseq, heads, 2 * dk, generator=gen, dtype=dtype)
    # bp: one scale per (head, block), as the moments' objective gives
    tp, bp = sym(length, 2), torch.randn(heads, 2, 1, generator=gen, dtype=dtype).expand(-1, -1, dk).reshape(heads, -1)
    cp = torch.randn(heads, length, 2 * dk, generator=gen, dtype=dtype)
    return y, (nseq, length, heads, dk), (ws, cs, tp, bp, cp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_similarity_gram_operators(dtype):
    # float32: the C kernel (when compiled); float64: the PyTorch code inside the operators
    y, geo, weights = _grams_operands(dtype)
    for families in [(True, True), (False, True), (True, False)]:
        torch.library.opcheck(moment_ops.row_grams, (y, *geo, *families))
    for ws_cs, tp_bp_cp in [(weights[:2], weights[2:]), (weights[:2], (None,) * 3), ((None,) * 2, weights[2:])]:
        torch.library.opcheck(moment_ops.row_grams_backward, (y, *geo, *ws_cs, *tp_bp_cp))


def test_similarity_gram_operators_equal_the_definition():
    # the kernel (float32 rows) and the PyTorch code (float64 rows) against the sums written out
    y32, (nseq, length, heads, dk), weights = _grams_operands(torch.float32)
    x = y32.double().view(nseq, length, heads, -1)[..., : 2 * dk]  # (N, L, h, 2dk)
    blocks = x.unflatten(-1, (2, dk))  # (N, L, h, 2, dk)
    outer = blocks[..., :, None] * blocks[..., None, :]  # (N, L, h, 2, dk, dk)
    want = (outer.sum(1), x.sum(1), outer.sum(0).transpose(0, 1), x.sum(0).transpose(0, 1))
    # the objective whose gradient the backward operator forms, differentiated by autograd
    ws, cs, tp, bp, cp = (w.double() for w in weights)
    xg = blocks.clone().requires_grad_()
    objective = (
        0.5 * torch.einsum("nohtc,nhtcd,nohtd->", xg, ws, xg)
        + torch.einsum("nohtc,nhtc->", xg, cs.view(nseq, heads, 2, dk))
        + 0.5 * torch.einsum("nohtc,otcd,nohtd,htd->", xg, tp, xg, bp.view(heads, 2, dk))
        + torch.einsum("nohtc,hotc->", xg, cp.view(heads, length, 2, dk))
    )
    (g_want,) = torch.autograd.grad(objective, xg)
    for y in (y32, y32.double()):
        got = moment_ops.row_grams(y, nseq, length, heads, dk, True, True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        g = moment_ops.row_grams_backward(y, nseq, length, heads, dk, *(w.to(y.dtype) for w in weights))
        g4 = g.view(nseq, length, heads, -1)
        torch.testing.assert_close(g4[..., : 2 * dk].double(), g_want.flatten(-2), rtol=1e-5, atol=1e-5)
        assert not g4[..., 2 * dk :].any()  # the value channels get no gradient


def test_compiled_training_forms_the_similarity_moments_in_the_operator():
    # traced, the global-span moments are one operator node (the C kernel's), not batched products
    graphs = []

    def capture(gm, example_inputs):  # the graph and its subgraphs (an autograd.Function's bodies)
        graphs.extend(str(m.graph) for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        return gm.forward

    torch._dynamo.reset()
    net = nn.Sequential(_layer("height"), _layer("width")).train()
    compiled = torch.compile(net, fullgraph=True, dynamic=True, backend=capture)
    compiled(torch.randn(2, 16, 6, 5)).sum().backward()
    torch._dynamo.reset()
    assert any("axial_deeplab.row_grams" in g for g in graphs)


def _band_operands(length, with_tables=(True, True), seed=2):
    """q, k (3, 2, 4, L) float32 strided views of one projection (as the training path reads
    them), local span radius 2: tables (4, 5) or None."""
    gen = torch.Generator().manual_seed(seed)
    nseq, heads, dk, r = 3, 2, 4, 2
    y = torch.randn(nseq, length, heads, 2 * dk + 8, generator=gen).permute(0, 2, 3, 1)  # (N, h, c2h, L) view
    q, k = y[:, :, :dk], y[:, :, dk : 2 * dk]
    tables = [torch.randn(dk, 2 * r + 1, generator=gen) if on else None for on in with_tables]
    return q, k, tables, r


@pytest.mark.skipif(not moment_ops.band_kernel_applies(torch.empty(1, 1, 4, 1)), reason="no C compiler")
def test_opcheck_band_moment_operators():
    q, k, (tq, tk), r = _band_operands(9)
    coef = torch.randn(2, 3, 2, dtype=torch.float64)
    for by_band in (True, False):
        for tables in ((tq, tk), (None, tk), (tq, None)):
            torch.library.opcheck(moment_ops.band_moments, (q, k, *tables, True, r, by_band))
            torch.library.opcheck(moment_ops.band_moments_backward, (q, k, *tables, True, r, by_band, coef))


@pytest.mark.skipif(not moment_ops.band_kernel_applies(torch.empty(1, 1, 4, 1)), reason="no C compiler")
@pytest.mark.parametrize("length, by_band", [(3, True), (9, True), (9, False)])
def test_band_moment_operators_equal_the_windowed_gram_form(length, by_band):
    # the compiled path's Function (the C band walk as operators) against the traced form it
    # replaces, run in float64: the sums and the gradients of q, k and both tables; length 3 has
    # every key in the span of radius 2 (a symbolic length takes the local form whatever it is);
    # by_band False: the table terms from per-position Gram matrices
    from unittest import mock

    from axial_deeplab.layers.similarity_stats import BandMomentsOp, similarity_moments

    q, k, (tq, tk), r = _band_operands(length)
    layer = _layer("width", span=2 * r + 1).train()
    with torch.no_grad():
        layer.query_table.copy_(tq), layer.key_table.copy_(tk)
    a, b = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)

    def grads(fn, q, k, module):
        q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        sums, sumsq = fn(q, k)
        ((a * sums).sum() + (b * sumsq).sum()).backward()
        tables = (module._parameters["query_table"], module._parameters["key_table"])  # the slices' parameters
        return sums.detach(), sumsq.detach(), q.grad, k.grad, *(t.grad for t in tables)

    got = grads(
        lambda q, k: BandMomentsOp.apply(q, k, layer.query_table, layer.key_table, True, r, by_band), q, k, layer
    )
    twin = _layer("width", span=2 * r + 1).double().train()
    twin.load_state_dict(layer.state_dict())
    with (
        mock.patch("torch.compiler.is_compiling", return_value=True),
        mock.patch.object(moment_ops, "band_kernel_applies", return_value=False),
    ):
        want = grads(lambda q, k: similarity_moments(twin, q, k)[:2], q.double(), k.double(), twin)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))


@pytest.mark.skipif(not moment_ops.band_kernel_applies(torch.empty(1, 1, 4, 1)), reason="no C compiler")
@pytest.mark.parametrize("length", [9, 3, 2])
def test_band_moment_rows_operators_equal_the_band_walk_on_views(length):
    # the rows operators against the band walk on q, k views: length 9 walks the band (the same
    # kernel: identical), 3 and 2 lie within the span (radius 2) and take the Gram form
    from axial_deeplab.layers.similarity_stats import band_moments_backward_rows, band_moments_rows

    gen = torch.Generator().manual_seed(5)
    nseq, heads, dk, dv, r = 3, 2, 4, 8, 2
    y = 1.0 + torch.randn(nseq * length, heads * (2 * dk + dv), generator=gen)
    tq, tk = (torch.randn(dk, 2 * r + 1, generator=gen) for _ in range(2))
    coef = torch.randn(2, 3, heads, dtype=torch.float64, generator=gen)
    q, k = moment_ops.band_views(y, nseq, length, heads, dk)
    exact = length > r + 1
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)
    for tables in ((tq, tk), (None, tk), (tq, None)):
        for by_band in (True, False):
            args = (y, *tables, nseq, length, heads, dk, True, r, by_band)
            torch.library.opcheck(band_moments_rows, args)
            torch.library.opcheck(band_moments_backward_rows, (*args, coef))
            want = moment_ops.band_moments(q, k, *tables, True, r, by_band).view(2, 3, nseq, heads).sum(2)
            torch.testing.assert_close(band_moments_rows(*args), want, **tol)
            g_y, g_tab = band_moments_backward_rows(*args, coef)
            gq, gk, want_tab = moment_ops.band_moments_backward(q, k, *tables, True, r, by_band, coef)
            got_q, got_k = moment_ops.band_views(g_y, nseq, length, heads, dk)
            torch.testing.assert_close(got_q, gq, **tol)
            torch.testing.assert_close(got_k, gk, **tol)
            for t, table in enumerate(tables):
                if table is not None:
                    torch.testing.assert_close(g_tab[t], want_tab[t], rtol=1e-5, atol=1e-5 if not exact else 0)
            assert not g_y.view(nseq, length, heads, -1)[..., 2 * dk :].any()  # the value channels


def test_compiled_training_forms_the_local_span_moments_in_the_operator():
    # traced, the local-span moments are the band walk's operator nodes, not windowed Gram products;
    # their backward writes the rows' layout, and the output BN is its operator
    if not moment_ops.band_kernel_applies(torch.empty(1, 1, 4, 1)):
        pytest.skip("no C compiler: the traced form is the windowed Gram one")
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    net = nn.Sequential(_layer("height", span=5), _layer("width", span=5)).train()
    backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)
    compiled = torch.compile(net, fullgraph=True, dynamic=True, backend=backend)
    compiled(torch.randn(2, 16, 9, 11)).sum().backward()
    torch._dynamo.reset()
    forward, backward = graphs
    assert "axial_deeplab.band_moments_rows.default" in forward
    assert "axial_deeplab.output_bn_sum.default" in forward
    assert "axial_deeplab.band_moments_backward_rows.default" in backward
    assert "axial_deeplab.output_bn_sum_backward.default" in backward
    assert "native_batch_norm_backward" in backward  # the projection's BN: still traced


def test_compiled_training_whose_trace_builds_the_kernel():
    # a fresh process whose first use of the C kernel is while torch.compile traces (fullgraph):
    # the build's lock is not traced, and the local-span moments still take the band operators
    code = textwrap.dedent(
        """
        import torch
        from torch import nn
        from axial_deeplab.layers import PositionSensitiveAxialAttention, cpu_kernel

        def layer(axis):
            return PositionSensitiveAxialAttention(16, 16, axis=axis, num_heads=2, span=5)

        graphs = []

        def capture(gm, example_inputs):
            graphs.extend(str(m.graph) for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
            return gm.forward

        net = nn.Sequential(layer("height"), layer("width")).train()
        torch.compile(net, fullgraph=True, dynamic=True, backend=capture)(torch.randn(2, 16, 9, 11)).sum().backward()
        print(cpu_kernel.available(), any("axial_deeplab.band_moments" in g for g in graphs))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    built, in_graph = out.stdout.split()[-2:]
    assert in_graph == built  # the operators exactly when the kernel is built


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_attention_eval(dtype):
    layer = _layer("width", span=3).to(dtype).eval()
    from axial_deeplab.layers.geometry import folded_projection

    w, shift, alpha_r, beta, sim = folded_projection(layer)
    x = torch.randn(2, 16, 5, 6, dtype=dtype)
    args = (
        x,
        w.detach(),
        shift.detach(),
        sim.detach(),
        layer.query_table.detach(),
        layer.key_table.detach(),
        layer.value_table.detach(),
        alpha_r.detach(),
        beta.detach(),
        2,
        4,
        8,
        1,
        1,
        True,
        False,
        2,
    )
    torch.library.opcheck(ops.attention_eval, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_operator_path_equals_reference(dtype):
    torch.manual_seed(0)
    fast = _pair().to(dtype)
    ref = _pair().to(dtype)
    ref.load_state_dict(fast.state_dict())
    for m in ref:
        m.impl = "reference"
    x = torch.randn(2, 16, 9, 11, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [net(xi) for net, xi in zip((fast, ref), xs)]
    torch.testing.assert_close(ys[0], ys[1], **tol)
    g = torch.randn_like(ys[0])
    for y in ys:
        (y * g).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, **tol)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=name)
    fast.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), **tol)


def _assert_grads_close(got, want):
    """Compiled vs eager gradients. BatchNorm bias gradients are sums over every position that
    cancel to near zero; the float32 rounding of their summands (of the size of the tensor's
    largest element), not of the result, bounds how far two summation orders differ."""
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 + 1e-5 * float(b.abs().max()))


def _grads(net, x):
    x = x.clone().requires_grad_()
    y = net(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [x.grad] + [p.grad for p in net.parameters()]


SIZES = [(2, 16, 9, 11), (3, 16, 12, 7), (2, 16, 6, 14)]


@pytest.fixture
def no_recompile():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def test_compile_layer_pair_eval_no_graph_break_no_recompile(no_recompile):
    torch.manual_seed(0)
    net = _pair().eval()
    compiled = torch.compile(net, fullgraph=True, dynamic=True)
    for shape in SIZES:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)


def _compiled_training_matches_eager(make):
    """A module from ``make`` and its AOT-compiled twin (aot_eager: the same Dynamo capture and
    autograd graphs as inductor, without C++ codegen) at every size of SIZES: outputs and
    gradients equal, running statistics advanced the same way; the outputs' sizes."""
    torch.manual_seed(0)
    net, twin = make().train(), make().train()
    twin.load_state_dict(net.state_dict())
    compiled = torch.compile(twin, fullgraph=True, dynamic=True, backend="aot_eager")
    sizes = []
    for shape in SIZES:
        x = torch.randn(shape)
        net.zero_grad(), twin.zero_grad()
        y, g = _grads(net, x)
        yc, gc = _grads(compiled, x)
        torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
        _assert_grads_close(gc, g)
        sizes.append(tuple(y.shape[-2:]))
    for a, b in zip(twin.buffers(), net.buffers()):
        torch.testing.assert_close(a, b)
    return sizes


def test_compile_layer_pair_training_step_no_recompile(no_recompile):
    # (an inductor compile of the backward takes minutes on a small CPU)
    assert _compiled_training_matches_eager(_pair) == [s[-2:] for s in SIZES]


def test_compile_strided_pair_training_step_no_recompile(no_recompile):
    # the first block of a stage: both layers subsample (inside the output BN operator, whose
    # backward gets the kept rows' gradient), lengths of both parities, an in-place ReLU after
    def strided():
        return nn.Sequential(_layer("height", stride=2), _layer("width", span=5, stride=2), nn.ReLU(inplace=True))

    sizes = _compiled_training_matches_eager(strided)
    assert sizes == [((h + 1) // 2, (w + 1) // 2) for _, _, h, w in SIZES]


def test_inductor_training_step_with_a_convolution_no_recompile(no_recompile):
    # Inductor itself (C++ codegen, ~1 min here): the operators' outputs and gradients in its
    # graphs, and a convolution behind the attention, whose backward guards on its symbolic
    # strides (one compile per size) unless the backward graph keeps the channels_last layout
    # that the training options force
    from axial_deeplab.engine.builders import TRAINING_COMPILE_OPTIONS

    def net():
        torch.manual_seed(0)
        return nn.Sequential(_layer("height"), _layer("width", span=5), nn.Conv2d(16, 8, 3, padding=1)).train()

    eager, twin = net(), net()
    compiled = torch.compile(twin, fullgraph=True, dynamic=True, options=TRAINING_COMPILE_OPTIONS)
    for shape in SIZES:
        x = torch.randn(shape)
        eager.zero_grad(), twin.zero_grad()
        y, g = _grads(eager, x)
        yc, gc = _grads(compiled, x)
        torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
        _assert_grads_close(gc, g)
    for a, b in zip(twin.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)


def test_compile_training_across_the_span_no_recompile(no_recompile):
    # span 5 (radius 2): widths 3 (every key in span), 11 and 7 (banded); the similarity
    # statistics must not branch on L vs the span, or crossing it recompiles
    torch.manual_seed(0)
    net = nn.Sequential(_layer("height", span=5), _layer("width", span=5)).train()
    twin = nn.Sequential(_layer("height", span=5), _layer("width", span=5)).train()
    twin.load_state_dict(net.state_dict())
    compiled = torch.compile(twin, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(2, 16, 9, 3), (3, 16, 4, 11), (2, 16, 13, 7)]:
        x = torch.randn(shape)
        net.zero_grad(), twin.zero_grad()
        y, g = _grads(net, x)
        yc, gc = _grads(compiled, x)
        torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-5)
        _assert_grads_close(gc, g)


def test_similarity_pair_count_and_span_radius_are_symbolic_safe():
    from axial_deeplab.layers.geometry import in_span_pairs, span_radius

    for length in range(1, 9):
        for r in range(0, 6):
            want = sum(abs(p - o) <= r for o in range(length) for p in range(length))
            assert in_span_pairs(length, r) == want
    layer = _layer("width", span=5)
    assert span_radius(layer, 3) is None and span_radius(layer, 4) == 2
    assert span_radius(_layer("width"), 100) is None


def _narrow(name, **kw):
    torch.manual_seed(0)
    return axial_deeplab.create_model(name, width=0.125, layers=(1, 1, 1, 1), **kw)


class _Raw(nn.Module):
    """The panoptic model's tensor outputs (its eval forward also groups instances)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model.predict_raw(x)
        return out["semantic_logits"], out["center_heatmap"], out["offset_map"]


def test_compile_narrow_model_training_step():
    # backend "eager": Dynamo's whole-model capture (fullgraph: no graph break) run as captured;
    # the operators' autograd under AOT is covered by the layer-pair test above
    torch._dynamo.reset()
    net = _narrow("axial_resnet_s", num_classes=5).train()
    twin = _narrow("axial_resnet_s", num_classes=5).train()
    twin.load_state_dict(net.state_dict())
    compiled = torch.compile(twin, fullgraph=True, dynamic=True, backend="eager")
    x = torch.randn(2, 3, 64, 64)
    y, g = _grads(net, x)
    yc, gc = _grads(compiled, x)
    torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-4)
    for a, b in zip(gc, g):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["axial_resnet_s", "axial_deeplab_s"])
def test_compile_narrow_model_training_step_three_sizes_no_recompile(name, no_recompile):
    # AOT autograd (the graphs Inductor gets) of a whole training step at sizes whose strided
    # layers see lengths of both parities: no recompile, outputs and gradients equal eager (a
    # strided slice in the graph had guarded on the parity; the output BN operator subsamples)
    kw = dict(num_classes=5) if name == "axial_resnet_s" else dict(num_classes=4, thing_ids=[2, 3])
    net, twin = _narrow(name, **kw).train(), _narrow(name, **kw).train()
    twin.load_state_dict(net.state_dict())
    compiled = torch.compile(twin, fullgraph=True, dynamic=True, backend="aot_eager")

    def step(model, x):
        out = model(x)
        outs = [out] if torch.is_tensor(out) else [out[k] for k in ("semantic_logits", "center_heatmap", "offset_map")]
        sum(t.square().mean() for t in outs).backward()
        return [t.detach() for t in outs]

    for shape in [(2, 3, 64, 96), (2, 3, 72, 112), (2, 3, 65, 97)]:
        x = torch.randn(shape)
        net.zero_grad(), twin.zero_grad()
        want, got = step(net, x), step(compiled, x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        _assert_grads_close([p.grad for p in twin.parameters()], [p.grad for p in net.parameters()])


@pytest.mark.parametrize("name", ["axial_resnet_s", "axial_deeplab_s"])
def test_export_narrow_model_dynamic_hw(name):
    from torch.export import Dim

    if name == "axial_resnet_s":
        model = _narrow(name, num_classes=5).eval()
    else:
        model = _Raw(_narrow(name, num_classes=4, thing_ids=[2, 3]).eval())
    # multiples of 32 (the output stride): the decoder's resize guards hold for every size
    h, w = 32 * Dim("kh", min=2, max=32), 32 * Dim("kw", min=2, max=32)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({2: h, 3: w},))
    targets = {str(n.target) for n in program.graph.nodes}
    assert "axial_deeplab.attention_eval.default" in targets
    exported = program.module()
    for shape in [(2, 3, 64, 64), (2, 3, 96, 128)]:
        x = torch.randn(shape)
        with torch.no_grad():
            got, want = exported(x), model(x)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the export decomposition
def _eval_twins(span, stride, mode, terms, axis):
    """(reference, banded) twins in eval with equal weights and BN statistics that are not the identity."""
    on = dict(zip(("use_qk", "use_query_rpe", "use_key_rpe", "use_value_rpe"), map(bool, terms)))
    torch.manual_seed(0)
    ref = _layer(axis, span=span, impl="reference", stride=stride, stride_mode=mode, **on)
    gen = torch.Generator().manual_seed(1)
    for bn in (ref.bn_qkv, ref.bn_similarity, ref.bn_output):
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
        bn.weight.data.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
    banded = _layer(axis, span=span, impl="banded", stride=stride, stride_mode=mode, **on)
    banded.load_state_dict(ref.state_dict())
    return ref.eval(), banded.eval()


@pytest.mark.parametrize(
    "span,length,stride,mode,terms",
    [
        (9, 5, 1, "subsample", (1, 1, 1, 1)),  # every key in span: the exact L x L form
        (9, 9, 1, "subsample", (1, 1, 1, 1)),  # L <= m: the L x L form with the span's mask
        (9, 17, 2, "subsample", (0, 1, 1, 1)),  # 9 strided queries <= m: masked, subsampled queries
        (9, 9, 1, "subsample", (1, 1, 0, 1)),  # mask without k . r^k
        (5, 11, 2, "subsample", (1, 1, 1, 0)),  # 6 strided queries > m: the query blocks
        (None, 13, 2, "subsample", (1, 1, 1, 1)),  # global span, subsampled queries
        (None, 12, 3, "subsample", (1, 0, 1, 1)),
        (9, 12, 2, "avgpool", (1, 1, 1, 1)),  # pooled stride: every query computed
    ],
)
@pytest.mark.parametrize("axis", ["height", "width"])
def test_static_size_eval_decomposition_equals_reference(span, length, stride, mode, terms, axis):
    ref, banded = _eval_twins(span, stride, mode, terms, axis)
    x = torch.randn((2, 16, length, 5) if axis == "height" else (2, 16, 5, length)) * 3  # peaked softmax rows
    with torch.no_grad():  # the inference forms (what export traces)
        want, got = ref(x), banded(x)
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_static_short_axis_exports_without_query_blocks():
    """A static axis no longer than the span exports the plain L x L form (no padding, windows
    or skews of the query blocks); the same layer exported with a dynamic axis keeps the blocks,
    so the graph still runs at sizes beyond the span."""
    _, layer = _eval_twins(9, 1, "subsample", (1, 1, 1, 1), "width")

    def pads(program):
        return sum("pad" in str(n.target) for n in program.graph.nodes)

    with torch.no_grad():
        static = torch.export.export(layer, (torch.randn(1, 16, 3, 4),))  # L = 4 <= r + 1
        # widths 8, 12, ..., 64 (a multiple keeps the blocks' reshapes free of guards)
        width = 4 * torch.export.Dim("w", min=2, max=16)
        dynamic = torch.export.export(layer, (torch.randn(1, 16, 3, 8),), dynamic_shapes={"x": {3: width}})
    assert pads(static) == 0 and pads(dynamic) > 0
    # within the span and beyond it, and a width the query blocks fill exactly (40 = 8 blocks of 5)
    for w in (8, 12, 40, 44):
        xi = torch.randn(1, 16, 3, w)
        with torch.no_grad():
            torch.testing.assert_close(dynamic.module()(xi), layer(xi), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler: the kernel is not built")
def test_large_logits_flush_tiny_weights_and_leave_the_thread_as_it_was():
    # logits up to ~180 (log2 units) give weights far below float32's normal range; the kernels
    # flush them (denormals cost a microcode assist per multiply-add) and stay equal to float64
    gen = torch.Generator().manual_seed(7)
    nseq, length, heads, dk, dv, dist = 4, 24, 2, 4, 8, 30
    qkv = torch.randn(nseq * length, heads * (2 * dk + dv), generator=gen)
    tables = [torch.randn(d, 2 * dist + 1, generator=gen) for d in (dk, dk, dv)]
    scales = torch.full((3, heads), 6.0)
    args = (nseq, heads, dk, dv, -1, dist, True)
    out, lse = ops.attention_rows(qkv, scales, *tables, *args)
    assert float(lse.max() - lse.min()) > 100  # rows whose smallest weights are denormal in float32
    out64, lse64 = ops.attention_rows(qkv.double(), scales.double(), *(t.double() for t in tables), *args)
    torch.testing.assert_close(out.double(), out64, rtol=1e-4, atol=1e-5)
    g = torch.randn(out.shape, generator=gen)
    got = ops.attention_rows_backward(qkv, scales, *tables, out, lse, g, *args)
    want = ops.attention_rows_backward(
        qkv.double(), scales.double(), *(t.double() for t in tables), out64, lse64, g.double(), *args
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)
    # the thread's floating-point mode is restored: float32 denormals still come out of torch
    assert float(torch.tensor([1e-38]) * 0.01) != 0.0
