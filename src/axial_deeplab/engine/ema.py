"""An exponential moving average (EMA) of the model's weights, updated after every optimizer
step: ``ema_0`` is the model as training starts (random or pretrained weights), then
``ema_t = decay * ema_{t-1} + (1 - decay) * w_t`` after step ``t`` (timm's ``ModelEmaV3`` and
d2go's model EMA without warm-up).

Built on :class:`torch.optim.swa_utils.AveragedModel` with a multi-tensor lerp. BatchNorm
running statistics are averaged like the weights (floating-point buffers, as timm and d2go
do by default), so the statistics match the averaged weights they are used with; integer
buffers (``num_batches_tracked``) are copied: a lerp of counters means nothing, and torch's
``get_ema_multi_avg_fn`` would truncate it.

Under ``torchrun`` every process holds its own EMA. The parameters are equal on every process
(DDP applies the same gradients), the BatchNorm statistics are not without SyncBatchNorm, so
the EMA's buffers are broadcast from rank 0 after each update (what DDP does with the model's
own buffers): every process evaluates the same weights.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..errors import UserError
from . import checkpoint as ckpt

__all__ = ["ModelEma", "EMA_FILE"]

EMA_FILE = ckpt.EMA_FILE


def _ema_multi_avg_fn(decay: float):
    """``AveragedModel``'s ``multi_avg_fn``: lerp of floating tensors, copy of the others
    (tensors arrive grouped by dtype and device)."""

    @torch.no_grad()
    def update(ema_tensors, model_tensors, _n_averaged):
        if torch.is_floating_point(ema_tensors[0]) or torch.is_complex(ema_tensors[0]):
            torch._foreach_lerp_(ema_tensors, model_tensors, 1.0 - decay)
        else:
            for e, m in zip(ema_tensors, model_tensors):
                e.copy_(m)

    return update


class ModelEma:
    """The EMA of ``model`` (unwrapped from DDP / torch.compile); ``module`` is the averaged model,
    always in eval mode and without gradients, ready to evaluate or save."""

    def __init__(self, model: nn.Module, decay: float, distributed: bool = False):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        bare = ckpt.unwrap_model(model)
        self.decay = float(decay)
        self.distributed = distributed
        self.averaged = AveragedModel(bare, multi_avg_fn=_ema_multi_avg_fn(self.decay), use_buffers=True)
        self.averaged.requires_grad_(False)
        self.averaged.eval()
        self.averaged.update_parameters(bare)  # the first update copies: ema_0 = the starting weights
        if distributed:  # the same start everywhere, whatever each process built
            self._broadcast(list(self.module.parameters()) + list(self.module.buffers()))

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def updates(self) -> int:
        """How many models were averaged in (the starting weights count as one)."""
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in the weights of ``model`` (after an optimizer step)."""
        self.averaged.update_parameters(ckpt.unwrap_model(model))
        if self.distributed:
            self._broadcast(list(self.module.buffers()))

    @staticmethod
    @torch.no_grad()
    def _broadcast(tensors) -> None:
        """Rank 0's values of ``tensors`` on every process, one flat broadcast per dtype and device."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        groups: Dict[Any, list] = {}
        for b in tensors:
            groups.setdefault((b.dtype, b.device), []).append(b)
        for group in groups.values():
            flat = _flatten_dense_tensors(group)
            dist.broadcast(flat, src=0)
            for t, synced in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(synced)

    def state(self) -> Dict[str, Any]:
        """What the training state keeps besides the weights (those go to :data:`EMA_FILE`)."""
        return {"decay": self.decay, "updates": self.updates}

    def load(self, checkpoint_dir: str, state: Dict[str, Any]) -> None:
        """Restore the EMA saved in ``checkpoint_dir`` with its training-state entry ``state``."""
        path = os.path.join(checkpoint_dir, EMA_FILE)
        if not os.path.isfile(path) or not state:
            raise UserError(
                f"--resume: {checkpoint_dir} holds no EMA of the weights ({EMA_FILE}) although "
                f"solver.ema_decay is set; it was trained without one"
            )
        ckpt.load_model_weights(self.module, path)
        self.averaged.n_averaged.fill_(int(state["updates"]))
