"""2-D attention baselines: local m x m (with/without position sensitivity) and global."""

import pytest
import torch

import axial_deeplab
from axial_deeplab.layers.attention2d import GlobalSelfAttention2d, LocalSelfAttention2d


def naive_local(layer, x):
    """Per-position loops straight from the stand-alone attention equation."""
    B, _, H, W = x.shape
    q, k, v = [t.reshape(B, layer.num_heads, -1, H, W) for t in layer._project(x)]
    r = layer.kernel_size // 2
    D = layer.max_distance
    out = torch.zeros(B, layer.num_heads, layer.dv, H, W)
    for i in range(H):
        for j in range(W):
            logits, vals = [], []
            for a in range(max(0, i - r), min(H, i + r + 1)):
                for b in range(max(0, j - r), min(W, j + r + 1)):
                    row = (a - i + D) * (2 * D + 1) + (b - j + D)
                    lg = (q[:, :, :, i, j] * k[:, :, :, a, b]).sum(2)
                    lg = lg + (q[:, :, :, i, j] * layer.query_table[:, row]).sum(-1)
                    val = v[:, :, :, a, b]
                    if layer.position_sensitive:
                        lg = lg + (k[:, :, :, a, b] * layer.key_table[:, row]).sum(-1)
                        val = val + layer.value_table[:, row]
                    logits.append(lg)
                    vals.append(val)
            w = torch.stack(logits, -1).softmax(-1)
            out[:, :, :, i, j] = (w.unsqueeze(2) * torch.stack(vals, -1)).sum(-1)
    return out.reshape(B, -1, H, W)


@pytest.mark.parametrize("ps", [False, True])
def test_local_attention_matches_naive_loops(ps):
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(8, 8, kernel_size=3, num_heads=2, position_sensitive=ps).eval()
    x = torch.randn(1, 8, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_local(layer, x), rtol=1e-5, atol=1e-5)


def test_local_with_full_window_equals_global():
    torch.manual_seed(0)
    H, W = 4, 6
    m = 2 * max(H, W) - 1
    local = LocalSelfAttention2d(8, 16, kernel_size=m, num_heads=4, position_sensitive=True).eval()
    glob = GlobalSelfAttention2d(8, 16, num_heads=4, position_sensitive=True, max_distance=m // 2).eval()
    glob.load_state_dict(local.state_dict())
    x = torch.randn(2, 8, H, W)
    with torch.no_grad():
        torch.testing.assert_close(local(x), glob(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", ["local", "global"])
def test_attention_baselines_drop_into_resnet(block):
    model = axial_deeplab.create_model("resnet50", block=block, width=0.25, num_classes=4, span=3)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 4)
    out.sum().backward()
    assert any(isinstance(m, (LocalSelfAttention2d, GlobalSelfAttention2d)) for m in model.modules())
