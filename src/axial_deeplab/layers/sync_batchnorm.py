"""Synchronised BatchNorm for data-parallel training: every BatchNorm of a model, and the
similarity BatchNorm the attention layers compute themselves, normalise with the statistics of
the batch of all processes, so a batch of B images split over N processes normalises exactly
like one process seeing all B.

PyTorch's ``nn.SyncBatchNorm`` only runs on accelerators; on CPU (gloo) the models get
:class:`GlobalBatchNorm`, which all-reduces the per-channel sums with the autograd-aware
all-reduce of :mod:`.sync`.
"""

from __future__ import annotations

import torch
from torch import nn

from .sync import differentiable_all_reduce, is_distributed

__all__ = ["GlobalBatchNorm", "convert_sync_batchnorm"]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the batch of all processes.

    Mean and variance come from all-reduced per-channel sums (two passes: the mean, then
    the squared deviations), through a differentiable all-reduce so gradients
    flow across processes exactly as in single-process BatchNorm on the whole batch.
    Running statistics use the unbiased global variance, like ``nn.BatchNorm``. Outside a
    process group, or in eval mode, it is plain BatchNorm.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected at least 2-D input, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and is_distributed()):
            return super().forward(x)
        ar = differentiable_all_reduce
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        count_local = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
        total = ar(torch.cat([xf.sum(dims), count_local]))
        n = total[-1]
        mean = total[:c] / n
        centered = xf - mean.view(shape)
        var = ar(centered.pow(2).sum(dims)) / n
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    m = 1.0 / float(self.num_batches_tracked)
                else:
                    m = self.momentum
                unbiased = var.detach() * (n.detach() / torch.clamp(n.detach() - 1, min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm with the synchronised kind for ``device``: PyTorch's
    SyncBatchNorm on GPU, :class:`GlobalBatchNorm` on CPU. Parameters, buffers and
    hyper-parameters are carried over. Attention layers get ``sync_statistics`` set, so the
    similarity statistics they form themselves are summed over processes too."""
    from .axial_attention import PositionSensitiveAxialAttention

    for m in model.modules():
        if isinstance(m, PositionSensitiveAxialAttention):
            m.sync_statistics = True
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out
