"""The C backward of CPU training takes query rows four at a time in offset coordinates, for
global and local spans alike, and moves each sequence-head's data with 8x8 transposes in the
position-major layout. This checks those paths at head widths where the transposes and the
channel groups have whole blocks and a rest (key depth 12, value depth 10), at lengths that
are not multiples of 4 or 8, with local spans cut by both ends of the axis, a span wider than
the axis, and each term switched off, through both entry points (position-major rows and the
channel-major sequence layout): output, input gradient and every parameter's gradient (the
three relative tables included) against the reference implementation."""

from __future__ import annotations

import pytest
import torch
from attention_testing import close_scaled, forward_backward, randomize_batch_norms

from axial_deeplab.layers import PositionSensitiveAxialAttention, cpu_kernel, ops

pytestmark = pytest.mark.skipif(
    not cpu_kernel.available(),
    reason="no C compiler: the C backward is not built (the PyTorch path is tested elsewhere)",
)


def make_layer(axis, span, **kwargs):
    torch.manual_seed(0)
    if span is None:
        kwargs.setdefault("max_relative_distance", 4)
    # key channels 36 over 3 heads: dk = 12; 30 output channels: dv = 10
    layer = PositionSensitiveAxialAttention(5, 30, num_heads=3, key_channels=36, axis=axis, span=span, **kwargs)
    randomize_batch_norms(layer)
    return layer


def run_path(path, layer, x, monkeypatch):
    """memory_efficient training through the given kernel entry point; asserts it ran."""
    calls = []
    if path == "channel_major":
        # the operator's rows kernel refused: it runs the sequence-layout kernels instead
        monkeypatch.setattr(ops, "_rows_kernel_applies", lambda geo, qkv: False)
        original = cpu_kernel.attention_backward
        name = "attention_backward"
    else:
        original = cpu_kernel.backward_strided
        name = "backward_strided"

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu_kernel, name, counting)
    y, grads, _, _ = forward_backward(layer, "memory_efficient", x)
    assert calls and all(calls), f"the C backward ({name}) did not run"
    return y, grads


def assert_matches_reference(layer, x, path, monkeypatch, tol=3e-5):
    y, grads = run_path(path, layer, x, monkeypatch)
    y_ref, grads_ref, _, _ = forward_backward(layer, "reference", x)
    close_scaled(y, y_ref, tol, "output")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        close_scaled(grads[name], grads_ref[name], tol, f"grad {name}")


# (id, axis, span, length): L = 13 and 14 leave 1 and 2 rows after the blocks of 4; span 5 on
# L = 13 cuts the first and last blocks' windows at both ends; span 33 is wider than L = 10.
CASES = [
    ("global-L13", "height", None, 13),
    ("local5-L13", "width", 5, 13),
    ("local5-L14", "height", 5, 14),
    ("local3-L9", "width", 3, 9),
    ("local33-wider-than-L10", "height", 33, 10),
]


def make_input(axis, length, seed=1):
    h, w = (length, 2) if axis == "height" else (2, length)
    return torch.randn(2, 5, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", ["position_major", "channel_major"])
@pytest.mark.parametrize("case_id,axis,span,length", CASES, ids=[c[0] for c in CASES])
def test_row_blocks_match_reference(case_id, axis, span, length, path, monkeypatch):
    layer = make_layer(axis, span)
    assert_matches_reference(layer, make_input(axis, length), path, monkeypatch)


@pytest.mark.parametrize("path", ["position_major", "channel_major"])
@pytest.mark.parametrize("term", ["use_qk", "use_query_rpe", "use_key_rpe", "use_value_rpe"])
def test_each_term_off_matches_reference(term, path, monkeypatch):
    layer = make_layer("width", 5, **{term: False})
    assert_matches_reference(layer, make_input("width", 11, seed=2), path, monkeypatch)
