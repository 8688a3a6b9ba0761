"""2-D self-attention baselines for the paper's ablations, each a drop-in for a 3x3 conv.

* ``LocalSelfAttention2d``: stand-alone m x m self-attention (Ramachandran et al. 2019). With
  ``position_sensitive=False`` it has the stand-alone layer's query-only relative term
  (q.k + q.r); with ``True`` it adds k.r^k and the r^v retrieval, like the axial layer.
* ``GlobalSelfAttention2d``: every position attends to all H x W positions (O(h^2 w^2)).

Relative offsets (dy, dx) index a 2-D table of (2D+1)^2 rows, clipped beyond +-D, so any input
size runs. Like the axial layer: 1x1 projection + BN, heads concatenated, stride after the layer.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class _Attention2dBase(nn.Module):
    def __init__(self, in_channels, out_channels, num_heads, key_channels, position_sensitive, max_distance, stride):
        super().__init__()
        key_channels = out_channels // 2 if key_channels is None else key_channels
        if out_channels % num_heads or key_channels % num_heads:
            raise ValueError(
                f"out_channels ({out_channels}) and key_channels ({key_channels}) "
                f"must be divisible by num_heads ({num_heads})"
            )
        self.num_heads, self.stride = num_heads, stride
        self.dk, self.dv = key_channels // num_heads, out_channels // num_heads
        self.out_channels = out_channels
        self.position_sensitive = position_sensitive
        self.max_distance = max_distance
        self.qkv = nn.Conv2d(in_channels, 2 * key_channels + out_channels, 1, bias=False)
        self.bn_qkv = nn.BatchNorm2d(2 * key_channels + out_channels)
        rows = (2 * max_distance + 1) ** 2
        self.query_table = nn.Parameter(torch.randn(self.dk, rows))
        self.key_table = nn.Parameter(torch.randn(self.dk, rows)) if position_sensitive else None
        self.value_table = nn.Parameter(torch.randn(self.dv, rows)) if position_sensitive else None
        nn.init.trunc_normal_(self.qkv.weight, std=in_channels**-0.5)

    def _project(self, x):
        B, _, H, W = x.shape
        qkv = self.bn_qkv(self.qkv(x)).reshape(B, self.num_heads, 2 * self.dk + self.dv, H * W)
        return qkv.split([self.dk, self.dk, self.dv], dim=2)  # (B, heads, d, HW)

    def _table_rows(self, dy, dx):
        D = self.max_distance
        return (dy.clamp(-D, D) + D) * (2 * D + 1) + (dx.clamp(-D, D) + D)

    def _finish(self, out, B, H, W):
        out = out.reshape(B, self.out_channels, H, W)
        if self.stride > 1:
            out = out[:, :, :: self.stride, :: self.stride]
        return out


class GlobalSelfAttention2d(_Attention2dBase):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_heads: int = 8,
        key_channels: Optional[int] = None,
        position_sensitive: bool = True,
        max_distance: int = 64,
        stride: int = 1,
    ):
        super().__init__(in_channels, out_channels, num_heads, key_channels, position_sensitive, max_distance, stride)

    def forward(self, x):
        B, _, H, W = x.shape
        q, k, v = self._project(x)
        ys, xs = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device), indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        rows = self._table_rows(ys[None, :] - ys[:, None], xs[None, :] - xs[:, None])  # (query, key)
        logits = torch.einsum("bhco,bhcp->bhop", q, k)
        logits = logits + torch.einsum("bhco,cop->bhop", q, self.query_table[:, rows])
        if self.position_sensitive:
            logits = logits + torch.einsum("bhcp,cop->bhop", k, self.key_table[:, rows])
        attn = logits.softmax(dim=-1)
        out = torch.einsum("bhop,bhcp->bhco", attn, v)
        if self.position_sensitive:
            out = out + torch.einsum("bhop,cop->bhco", attn, self.value_table[:, rows])
        return self._finish(out, B, H, W)


class LocalSelfAttention2d(_Attention2dBase):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 7,
        num_heads: int = 8,
        key_channels: Optional[int] = None,
        position_sensitive: bool = False,
        stride: int = 1,
    ):
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__(
            in_channels, out_channels, num_heads, key_channels, position_sensitive, (kernel_size - 1) // 2, stride
        )
        self.kernel_size = kernel_size

    def _neighbours(self, t, H, W):
        """(B, heads, d, HW) -> (B, heads, d, m*m, HW): the m x m window around each position."""
        B, h, d, _ = t.shape
        m = self.kernel_size
        cols = F.unfold(t.reshape(B, h * d, H, W), m, padding=m // 2)
        return cols.reshape(B, h, d, m * m, H * W)

    def forward(self, x):
        B, _, H, W = x.shape
        m, r = self.kernel_size, self.kernel_size // 2
        q, k, v = self._project(x)
        kn, vn = self._neighbours(k, H, W), self._neighbours(v, H, W)
        off = torch.arange(-r, r + 1, device=x.device)
        dy, dx = torch.meshgrid(off, off, indexing="ij")
        rows = self._table_rows(dy.reshape(-1), dx.reshape(-1))  # (m*m,)
        # window positions that fall outside the image are padding: mask them out
        inside = F.unfold(torch.ones(1, 1, H, W, device=x.device), m, padding=r).reshape(m * m, H * W) > 0
        logits = torch.einsum("bhco,bhcjo->bhjo", q, kn)
        logits = logits + torch.einsum("bhco,cj->bhjo", q, self.query_table[:, rows])
        if self.position_sensitive:
            logits = logits + torch.einsum("bhcjo,cj->bhjo", kn, self.key_table[:, rows])
        attn = logits.masked_fill(~inside, float("-inf")).softmax(dim=2)
        out = torch.einsum("bhjo,bhcjo->bhco", attn, vn)
        if self.position_sensitive:
            out = out + torch.einsum("bhjo,cj->bhco", attn, self.value_table[:, rows])
        return self._finish(out, B, H, W)
