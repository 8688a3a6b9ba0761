"""Shared by the attention tests: BatchNorm state away from PyTorch's defaults, so a path
that ignored a running statistic or an affine parameter would show."""
from __future__ import annotations

import torch


def randomize_batch_norms(layer) -> None:
    with torch.no_grad():
        for bn in (layer.bn_qkv, layer.bn_similarity, layer.bn_output):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
