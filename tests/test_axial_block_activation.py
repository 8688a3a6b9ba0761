"""The activation after an axial block's width layer: under autograd it leaves the attention's
output (a permuted or strided view of the rows it computed) unwritten, so the backward does not
rebuild that view's base; without autograd it writes in place. Outputs and gradients are those of
the ReLU applied to a copy."""

from __future__ import annotations

import pytest
import torch

from axial_deeplab.models.axial_resnet import AxialBlock


def _graph_nodes(tensor):
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def _block(stride):
    torch.manual_seed(0)
    blk = AxialBlock(16, 16, 32, stride=stride, num_heads=2).train()
    for bn in (blk.bn1, blk.bn2):
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)  # bn2 starts at 0, which would hide the spatial path
    return blk


@pytest.mark.parametrize("stride", [1, 2])
def test_training_step_matches_relu_on_a_copy(stride):
    blk = _block(stride)
    x = torch.randn(2, 16, 12, 10, generator=torch.Generator().manual_seed(1), requires_grad=True)
    g = torch.randn(blk(x).shape, generator=torch.Generator().manual_seed(2))

    def run(spatial):
        blk.zero_grad(set_to_none=True)
        x.grad = None
        blk.spatial = spatial
        try:
            out = blk(x)
            out.backward(g)
        finally:
            del blk.spatial
        return out.detach(), x.grad.clone(), [p.grad.clone() for p in blk.parameters()], _graph_nodes(out)

    ours = run(AxialBlock.spatial.__get__(blk))
    copy = run(lambda y: blk.relu(blk._attend(y).clone()))
    assert not {"CopySlices", "AsStridedBackward0"} & set(ours[3])
    torch.testing.assert_close(ours[0], copy[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], copy[1], rtol=1e-6, atol=1e-7)
    for a, b in zip(ours[2], copy[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_activation_in_place_only_without_autograd():
    blk = _block(1)
    base = torch.randn(2, 6, 5, 4)
    view = base.permute(0, 3, 1, 2)
    with torch.no_grad():
        assert blk._activate(view) is view  # written in place: no new tensor
    assert (base >= 0).all()
    base = torch.randn(2, 6, 5, 4, requires_grad=True)
    view = base.permute(0, 3, 1, 2)
    kept = view.detach().clone()
    out = blk._activate(view)
    assert out is not view and torch.equal(view.detach(), kept)
    torch.testing.assert_close(out, kept.clamp_min(0), rtol=0, atol=0)
