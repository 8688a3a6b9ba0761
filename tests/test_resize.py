"""The decoders' bilinear resize: eager, exported and compiled for inference it is
F.interpolate; compiled for training it is the operator pair
axial_deeplab::resize_bilinear(_backward), equal to it in values, gradients and layout."""

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from axial_deeplab.models.resize import resize_bilinear


def _inputs():
    gen = torch.Generator().manual_seed(0)
    plain = torch.randn(2, 3, 5, 7, generator=gen)
    return {
        "contiguous": plain,
        "channels_last": plain.contiguous(memory_format=torch.channels_last),
        "one channel": torch.randn(2, 1, 4, 6, generator=gen),
        "one channel, channels_last": torch.randn(2, 1, 4, 6, generator=gen).contiguous(
            memory_format=torch.channels_last
        ),
        "channel slice": torch.randn(2, 4, 5, 5, generator=gen)[:, 1:3],
    }


@pytest.mark.parametrize("name", list(_inputs()))
def test_operators_pass_opcheck(name):
    x = _inputs()[name]
    torch.library.opcheck(torch.ops.axial_deeplab.resize_bilinear, (x.clone().requires_grad_(), 9, 13))
    grad = torch.randn(x.shape[0], x.shape[1], 9, 13)
    if name.endswith("channels_last"):
        grad = grad.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.axial_deeplab.resize_bilinear_backward, (grad, x.shape[-2], x.shape[-1]))


@pytest.mark.parametrize("name", list(_inputs()))
def test_operator_equals_interpolate_with_gradients_and_layout(name):
    x = _inputs()[name]
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    want = F.interpolate(a, size=(9, 13), mode="bilinear", align_corners=True)
    got = torch.ops.axial_deeplab.resize_bilinear(b, 9, 13)
    assert torch.equal(got, want)
    assert got.stride() == want.stride()
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    want.backward(g)
    got.backward(g)
    assert torch.equal(b.grad, a.grad)
    assert b.grad.stride() == a.grad.stride()


def test_resize_returns_the_input_at_its_own_size_and_interpolates_eagerly():
    x = torch.randn(1, 2, 5, 5)
    assert resize_bilinear(x, (5, 5)) is x
    want = F.interpolate(x, size=(8, 3), mode="bilinear", align_corners=True)
    assert torch.equal(resize_bilinear(x, (8, 3)), want)


def _graphs(fn, x):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)
    out = torch.compile(fn, fullgraph=True, dynamic=True, backend=backend)(x)
    out.sum().backward()
    torch._dynamo.reset()
    return out, graphs


def test_compiled_resize_is_the_operator_and_equals_eager():
    def fn(x):
        return resize_bilinear(x * 2, (x.shape[-2] * 2 - 1, x.shape[-1] * 2 - 1))

    x = torch.randn(2, 3, 6, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    out, (forward, backward) = _graphs(fn, x)
    assert "axial_deeplab.resize_bilinear.default" in forward
    assert "axial_deeplab.resize_bilinear_backward.default" in backward
    assert "index_put" not in backward
    ref = x.detach().clone().requires_grad_()
    want = fn(ref)
    want.sum().backward()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-6, atol=1e-6)


def test_compiled_inference_keeps_the_decomposition():
    # without a gradient Inductor gets the gathers it can fuse with the neighbouring operations
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        out = torch.compile(lambda t: resize_bilinear(t, (9, 9)), fullgraph=True, backend=capture)(x)
    torch._dynamo.reset()
    assert "axial_deeplab" not in graphs[0]
    torch.testing.assert_close(out, F.interpolate(x, size=(9, 9), mode="bilinear", align_corners=True))


def test_exported_resize_is_the_standard_operator():
    class Up(torch.nn.Module):
        def forward(self, x):
            return resize_bilinear(x, (9, 9))

    program = torch.export.export(Up(), (torch.randn(1, 2, 5, 5),))
    text = str(program.graph)
    assert "axial_deeplab" not in text
    assert "upsample_bilinear2d" in text
