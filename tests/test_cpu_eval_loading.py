"""The compiled eval kernel's loading of sequences: the projection writes position-major qkv
for NCHW and channels_last input alike, and the kernel copies either every head of a
sequence in one pass (while fetching the next sequence's lines ahead, a few per block of
rows) or, when the heads' copies would not fit its budget (heads x slot > 96K floats), one
head at a time. The shapes below force each way, with sequences that cross from one image
to the next, lengths that are not multiples of the 4-row block, query stride 2, local spans,
each similarity term switched off, and rows split over threads inside a sequence; every
output is compared with the reference (the plain equation)."""

from __future__ import annotations

import pytest
import torch
from attention_testing import close_scaled, eval_layer, kernel_eval, reference_eval

from axial_deeplab.layers import cpu_kernel

pytestmark = pytest.mark.skipif(
    not cpu_kernel.available(), reason="no C compiler: the C kernel is not built (the PyTorch path is tested elsewhere)"
)


make_layer = eval_layer  # (in, out, heads, key channels, seed, **layer kwargs)


def check(layer, x, layout):
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = kernel_eval(layer, x)
    close_scaled(y, reference_eval(layer, x), 1e-5, f"{layer.axis} {layout}")
    return y


# Every head together: 3 heads of key depth 4 and value depth 4 at length <= 14 take a few
# hundred floats each. (id, layer kwargs, input (B, H, W)): 3 images of 5 x 6 or 7 x 10 positions,
# so the next sequence of an image's last one is the next image's first.
ALL_HEADS = [
    ("global", dict(), (3, 5, 6)),
    ("length-not-multiple-of-4", dict(), (3, 7, 10)),
    ("query-stride-2", dict(stride=2), (3, 7, 10)),
    ("local-span3", dict(span=3), (3, 7, 10)),
    ("no-qk", dict(use_qk=False), (3, 7, 10)),
    ("no-query-rpe", dict(use_query_rpe=False), (3, 7, 10)),
    ("no-key-rpe", dict(use_key_rpe=False), (3, 7, 10)),
    ("no-value-rpe", dict(use_value_rpe=False), (3, 7, 10)),
]


@pytest.mark.parametrize("case_id,kwargs,bhw", ALL_HEADS, ids=[c[0] for c in ALL_HEADS])
@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_head_of_a_sequence_together(layout, axis, case_id, kwargs, bhw):
    layer = make_layer(6, 12, 3, 12, axis=axis, **kwargs)
    b, h, w = bhw
    check(layer, torch.randn(b, 6, h, w, generator=torch.Generator().manual_seed(1)), layout)


@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_one_head(layout, axis):
    layer = make_layer(5, 6, 1, 4, axis=axis)
    check(layer, torch.randn(2, 5, 6, 9, generator=torch.Generator().manual_seed(2)), layout)


@pytest.mark.parametrize("span", [None, 9])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_heads_over_the_budget_one_at_a_time(layout, span):
    # 2 heads of key depth 64 and value depth 128 at length 201: a slot holds keys (64 x 224),
    # values (224 x 128) and queries (64 x 201), 55872 floats; two are over 96K floats
    layer = make_layer(8, 256, 2, 128, axis="width", span=span)
    check(layer, torch.randn(1, 8, 2, 201, generator=torch.Generator().manual_seed(3)), layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_rows_split_over_threads_inside_sequences(layout):
    # 2 x 10 sequences x 3 heads x 11 rows = 660 rows over three threads, 220 each: the shares
    # meet inside sequences (of 33 rows), so a thread starts on a sequence whose lines were not
    # fetched ahead, and the one before it stops partway through its last sequence
    layer = make_layer(6, 12, 3, 12, axis="height")
    x = torch.randn(2, 6, 11, 10, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = check(layer, x, layout)
        torch.set_num_threads(3)
        three = check(layer, x, layout)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(three, one, rtol=1e-6, atol=1e-6)
