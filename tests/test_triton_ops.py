"""The Triton kernels as operators (``torch.library.triton_op``), checked without a GPU: the
operators are registered with an autograd formula; their fake runs (which trace the kernel
launches through ``wrap_triton``) give the kernels' output shapes; ``torch.compile`` decomposes
the forward into the Triton kernel itself rather than an opaque call; importing the package
compiles and launches nothing. That the kernels compute right through the operators is checked
by the interpreter runs of test_triton_kernels.py (``impl="triton"`` runs them) and on a GPU
by benchmarks/gpu_check.sh."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the optional package triton is not installed (pip install triton)")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from axial_deeplab.layers import triton_ops  # noqa: E402

HEADS, DK, DV, SEQ, ROWS = 2, 4, 8, 3, 41  # tables of 41 rows: reach 20


def _operands(length, value_table=True):
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(SEQ * HEADS, 2 * DK + DV, length, generator=gen)
    scales = torch.rand(3, HEADS, generator=gen) + 0.5
    rq, rk = torch.randn(DK, ROWS, generator=gen), torch.randn(DK, ROWS, generator=gen)
    rv = torch.randn(DV, ROWS, generator=gen) if value_table else None
    return qkv, scales, rq, rk, rv


def test_operators_are_registered_with_autograd():
    assert set(triton_ops.OPERATORS) == {"triton_attention", "triton_attention_backward"}
    for name in triton_ops.OPERATORS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"axial_deeplab::{name}", "CompositeExplicitAutograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("axial_deeplab::triton_attention", "Autograd")


@pytest.mark.parametrize("radius,step,value_table", [(-1, 1, True), (3, 2, False)])
def test_fake_runs_trace_the_launches_and_give_the_shapes(radius, step, value_table):
    length = 37
    lq = len(range(0, length, step))
    with FakeTensorMode():
        qkv, scales, rq, rk, rv = _operands(length, value_table)
        geometry = (HEADS, DK, DV, radius, ROWS // 2, True, step)
        sv, sve, lse = torch.ops.axial_deeplab.triton_attention(qkv, scales, rq, rk, rv, *geometry)
        grads = torch.ops.axial_deeplab.triton_attention_backward(
            qkv, scales, rq, rk, rv, sv, sve, lse, torch.ones_like(sv), torch.ones_like(sve), *geometry
        )
    assert tuple(sv.shape) == (SEQ * HEADS, DV, lq) and tuple(lse.shape) == (SEQ * HEADS, lq)
    assert tuple(sve.shape) == ((SEQ * HEADS, DV, lq) if value_table else (0,))
    want = [qkv.shape, scales.shape, rq.shape, rk.shape, rv.shape if value_table else (0,)]
    assert [tuple(g.shape) for g in grads] == [tuple(s) for s in want]


def test_compile_sees_the_triton_kernel():
    """AOTAutograd (what torch.compile runs before Inductor) decomposes the operator into its
    kernel launch: the graph holds the Triton kernel, not an opaque operator call. The graph is
    captured and never run (no GPU)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    from axial_deeplab.layers.triton_kernels import axial_forward_kernel

    graphs = []

    class Captured(Exception):
        pass

    def capture(gm, example_inputs):
        graphs.append(gm)
        raise Captured

    def f(qkv, scales, rq, rk, rv):
        sv, sve, _ = torch.ops.axial_deeplab.triton_attention(qkv, scales, rq, rk, rv, HEADS, DK, DV, -1, 20, True, 1)
        return sv + sve

    torch._dynamo.reset()
    with pytest.raises(Exception) as caught:
        torch.compile(f, backend=aot_autograd(fw_compiler=capture), fullgraph=True)(*_operands(37))
    assert graphs, f"no graph captured: {caught.value!r}"
    nodes = [n for n in graphs[0].graph.nodes if n.op == "call_function"]
    launches = [n for n in nodes if "triton_kernel_wrapper" in str(n.target)]
    assert launches and not any("triton_attention" in str(n.target) for n in nodes)
    assert kernel_side_table.get_kernel(launches[0].kwargs["kernel_idx"]) is axial_forward_kernel
    torch._dynamo.reset()


def test_import_compiles_and_launches_nothing():
    code = (
        "import torch, axial_deeplab\n"
        "from axial_deeplab.layers import triton_kernels as K\n"
        "assert not any(k.device_caches for k in (K.axial_forward_kernel, K.axial_backward_kernel))\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert hasattr(torch.ops.axial_deeplab, 'triton_attention')\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


# --------------------------------------------------------------------------- GPU
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the fake and interpreter checks run on CPU)"
)
@pytest.mark.parametrize("radius,step", [(-1, 1), (3, 2)])
def test_opcheck_triton_attention_on_gpu(radius, step):
    qkv, scales, rq, rk, rv = (t.cuda().requires_grad_(True) for t in _operands(37))
    torch.library.opcheck(
        torch.ops.axial_deeplab.triton_attention.default,
        (qkv, scales, rq, rk, rv, HEADS, DK, DV, radius, ROWS // 2, True, step),
    )


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the fake and interpreter checks run on CPU)"
)
def test_compiled_triton_layer_equals_eager_on_gpu(monkeypatch):
    """torch.compile(fullgraph=True) of an ``impl="triton"`` layer (the kernels inside the
    graph): eval output, training output and every gradient equal the eager layer's."""
    import copy

    from axial_deeplab.layers import PositionSensitiveAxialAttention

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # 3xTF32 dots: float32 accuracy
    torch.manual_seed(0)
    layer = PositionSensitiveAxialAttention(16, 16, axis="width", num_heads=2, span=7, stride=2, impl="triton").cuda()
    x = torch.randn(2, 16, 5, 23, device="cuda")
    g = torch.randn_like(layer(x))  # also runs the self-check outside the compiled graph

    def run(module, train):
        module.train(train)
        xi = x.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            y = module(xi)
            if train:
                (y * g).sum().backward()
        grads = [xi.grad] + [p.grad for p in module.parameters()] if train else []
        return [y.detach()] + grads

    for train in (False, True):
        eager, compiled = copy.deepcopy(layer), copy.deepcopy(layer)
        want = run(eager, train)
        got = run(torch.compile(compiled, fullgraph=True), train)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if b is not None:
                assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))
