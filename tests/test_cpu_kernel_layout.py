"""The compiled eval kernel reads the projection in the input's own memory layout and writes
channels_last: NCHW and channels_last inputs on both axes, batches > 1 (two sequence
strides), position-major loading of every head of a sequence, key and value
depths that are not multiples of 8, local spans, strides, non-contiguous input, rows split
over threads, and the cache of folded constants following parameter changes. Every case is
compared with the reference implementation (the plain equation)."""

from __future__ import annotations

import pytest
import torch
from attention_testing import eval_layer, kernel_eval, reference_eval

from axial_deeplab.layers import cpu_kernel

pytestmark = pytest.mark.skipif(
    not cpu_kernel.available(), reason="no C compiler: the C kernel is not built (the PyTorch path is tested elsewhere)"
)


def make_layer(in_ch=10, out_ch=12, heads=2, key_ch=None, seed=0, **kwargs):
    return eval_layer(in_ch, out_ch, heads, key_ch, seed=seed, reach=6, **kwargs)


def assert_close(y, want):
    assert y.shape == want.shape
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * max(1.0, float(want.abs().max())))


# (id, layer kwargs, input (B, H, W)). Layer widths: (in, out, heads, key channels) below.
CASES = [
    ("global-batch3", dict(), (3, 11, 13)),
    ("global-21-columns", dict(), (2, 9, 21)),
    ("local-span5", dict(span=5), (2, 12, 10)),
    ("stride2-subsample", dict(stride=2), (2, 9, 10)),
    ("stride2-avgpool", dict(stride=2, stride_mode="avgpool"), (2, 7, 9)),
    ("length-1", dict(), (2, 1, 9)),
]
WIDTHS = [  # (in, out, heads, key channels): value depth 6 / 40 / 2, key depth 3 / 12 / 12
    (10, 12, 2, None),
    (16, 80, 2, 24),
    (8, 4, 2, 24),
]


@pytest.mark.parametrize("widths", WIDTHS, ids=["dv6-dk3", "dv40-dk12", "dv2-dk12"])
@pytest.mark.parametrize("case_id,kwargs,bhw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_both_layouts_equal_reference(layout, axis, case_id, kwargs, bhw, widths):
    in_ch, out_ch, heads, key_ch = widths
    layer = make_layer(in_ch, out_ch, heads, key_ch, axis=axis, **kwargs)
    b, h, w = bhw
    x = torch.randn(b, in_ch, h, w, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = kernel_eval(layer, x)
    assert_close(y, reference_eval(layer, x))
    if layer.stride == 1 or layer.stride_mode == "subsample":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_pair_reads_the_channels_last_output_in_place():
    # height then width, as inside an axial block: the second layer gets the first's
    # channels_last output and must equal the reference pair
    height = make_layer(10, 12, 2, axis="height", seed=1)
    width = make_layer(12, 12, 2, axis="width", seed=2)
    x = torch.randn(2, 10, 9, 11, generator=torch.Generator().manual_seed(3))
    y1 = kernel_eval(height, x)
    assert y1.is_contiguous(memory_format=torch.channels_last) and not y1.is_contiguous()
    y2 = kernel_eval(width, y1)
    assert_close(y2, reference_eval(width, reference_eval(height, x)))


def test_non_contiguous_input():
    layer = make_layer(axis="height")
    x = torch.randn(2, 7, 10, 9, generator=torch.Generator().manual_seed(4)).permute(0, 2, 1, 3)  # (2, 10, 7, 9)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert_close(kernel_eval(layer, x), reference_eval(layer, x))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_rows_split_over_threads(layout):
    # 2 x 22 sequences x 2 heads x 20 rows over three threads: the splits fall inside a
    # sequence
    layer = make_layer(axis="height")
    x = torch.randn(2, 10, 20, 22, generator=torch.Generator().manual_seed(5))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel_eval(layer, x)
        torch.set_num_threads(3)
        three = kernel_eval(layer, x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(three, one, rtol=1e-6, atol=1e-6)
    assert_close(three, reference_eval(layer, x))


def test_folded_constants_follow_parameter_changes():
    layer = make_layer(axis="width", use_value_rpe=True)
    x = torch.randn(2, 10, 5, 9, generator=torch.Generator().manual_seed(6))
    assert_close(kernel_eval(layer, x), reference_eval(layer, x))
    with torch.no_grad():
        layer.qkv.weight.mul_(1.5)  # in place
    assert_close(kernel_eval(layer, x), reference_eval(layer, x))
    layer.bn_similarity.running_var.data = torch.full_like(layer.bn_similarity.running_var, 0.25)  # new data
    assert_close(kernel_eval(layer, x), reference_eval(layer, x))
    layer.value_table = torch.nn.Parameter(torch.randn_like(layer.value_table))  # replaced
    assert_close(kernel_eval(layer, x), reference_eval(layer, x))
    layer.bn_output.eps = 0.5
    assert_close(kernel_eval(layer, x), reference_eval(layer, x))
    # and a training step in between (running statistics move)
    layer.train()
    layer(x).sum().backward()
    layer.eval()
    assert_close(kernel_eval(layer, x), reference_eval(layer, x))


def test_inference_mode():
    # parameters made inside inference_mode have no version counters: nothing is cached
    x = torch.randn(2, 10, 6, 7, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        made_inside = make_layer(axis="height")
        y_inside = made_inside(x)
    made_outside = make_layer(axis="height")
    with torch.inference_mode():
        y_outside = [made_outside(x) for _ in range(2)]
    want = reference_eval(made_outside, x)
    for y in [y_inside] + y_outside:
        assert_close(y.clone(), want)
