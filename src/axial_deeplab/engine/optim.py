"""Optimizers of the paper's recipes: Adam (deeplab2), RAdam + Lookahead (the paper's
choice for Axial-DeepLab), SGD with Nesterov momentum (ImageNet), with parameter groups
that keep weight decay off norms, biases and (unless ``solver.decay_relative_tables``)
relative-position tables.

Lookahead (Zhang et al. 2019) is written here as a thin wrapper around any
``torch.optim`` optimizer: every ``k`` inner steps the slow weights move a fraction
``alpha`` towards the fast weights and the fast weights restart from them. Its state
(slow weights, inner-step counter) is part of ``state_dict`` so a resumed run continues
exactly.

Both have twins in timm (``timm.optim.Lookahead``, ``timm.optim.param_groups_weight_decay``),
kept here because timm is an optional extra, and importing it imports torchvision, whose CPU-torch
import fails outright unless patched (``operator torchvision::nms does not exist``). They are not
drop-in equal either (tests/test_optim_twins.py runs both side by side):

- timm's groups decay every parameter with two or more dimensions, so the 2-D ``*_table``
  relative-position embeddings are decayed; with ``no_weight_decay_list=("*_table",)`` its groups
  hold exactly our parameters (on every registered model). deeplab2 does put L2 on its relative
  embeddings; the paper's panoptic recipes train with ``weight_decay: 0``, so they are unaffected.
  ``decay_tables=True`` (``solver.decay_relative_tables``) decays the tables as both of them do, and
  the groups then equal timm's default ``param_groups_weight_decay(model, wd)``.
- timm's Lookahead creates each slow weight at the first sync from the fast weights of that moment,
  so the first sync is a no-op and the slow weights start at step ``k``, not at the initial weights
  as in the paper's Algorithm 1 (ours). After that the updates are the same: ours wrapped around a
  base optimizer that has already taken ``k`` plain steps reproduces timm's run bit for bit. timm also
  skips parameters whose ``.grad`` is None at a sync, and allows ``alpha=0``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple, get_args

import torch
from torch import nn

from .config import OptimizerName

__all__ = ["Lookahead", "param_groups_weight_decay", "build_optimizer", "NO_DECAY_NORM_TYPES"]

NO_DECAY_NORM_TYPES: Tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def _is_no_decay(module: nn.Module, param_name: str, decay_tables: bool) -> bool:
    if isinstance(module, NO_DECAY_NORM_TYPES):
        return True
    if param_name == "bias" or (param_name.endswith("_table") and not decay_tables):
        return True
    return False


def param_groups_weight_decay(model: nn.Module, weight_decay: float, decay_tables: bool = False) -> List[Dict]:
    """Two groups: ``decay`` (conv/linear/attention projections) and ``no_decay`` (norm
    weights and biases, all biases, and, unless ``decay_tables``, parameters whose name ends
    with ``_table``).

    Equals timm's ``param_groups_weight_decay(model, wd, no_weight_decay_list=("*_table",))`` up to
    group order, and with ``decay_tables`` timm's ``param_groups_weight_decay(model, wd)``; the
    ``group_name``/``param_names`` keys are what logs and tests read."""
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    seen = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.requires_grad:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if _is_no_decay(module, p_name, decay_tables):
                no_decay.append(p)
                no_decay_names.append(full)
            else:
                decay.append(p)
                decay_names.append(full)
    groups = []
    if decay:
        groups.append(
            {"params": decay, "weight_decay": weight_decay, "group_name": "decay", "param_names": decay_names}
        )
    if no_decay:
        groups.append(
            {"params": no_decay, "weight_decay": 0.0, "group_name": "no_decay", "param_names": no_decay_names}
        )
    return groups


class Lookahead:
    """Lookahead around a base optimizer (``k`` fast steps, slow step ``alpha``).

    Exposes ``param_groups``, ``state``, ``step``, ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` like a ``torch.optim.Optimizer`` so schedules, gradient scalers
    and checkpoints treat it the same way.

    The slow weights are the weights at construction (the paper's phi_0), so the first sync already
    pulls back; timm's starts them at the first sync instead (see the module docstring).
    """

    def __init__(self, base: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5):
        if k < 1:
            raise ValueError(f"Lookahead k must be >= 1, got {k}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead alpha must be in (0, 1], got {alpha}")
        self.base = base
        self.k = int(k)
        self.alpha = float(alpha)
        self.counter = 0
        self.slow = [p.detach().clone() for p in self._params()]

    # torch.optim.Optimizer look-alike --------------------------------------------------
    @property
    def param_groups(self):
        return self.base.param_groups

    @property
    def state(self):
        return self.base.state

    @property
    def defaults(self):
        return self.base.defaults

    def _params(self) -> Iterable[torch.Tensor]:
        for g in self.base.param_groups:
            yield from g["params"]

    def zero_grad(self, set_to_none: bool = True):
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.base.step(closure)
        self.counter += 1
        if self.counter % self.k == 0:
            for p, s in zip(self._params(), self.slow):
                s.add_(p.detach() - s, alpha=self.alpha)
                p.copy_(s)
        return loss

    def state_dict(self) -> Dict:
        return {
            "base": self.base.state_dict(),
            "lookahead_slow": [s.clone() for s in self.slow],
            "lookahead_counter": self.counter,
            "lookahead_k": self.k,
            "lookahead_alpha": self.alpha,
        }

    def load_state_dict(self, state: Dict) -> None:
        if "lookahead_slow" not in state:
            raise ValueError("optimizer state is not a Lookahead state (no 'lookahead_slow')")
        self.base.load_state_dict(state["base"])
        slow = state["lookahead_slow"]
        params = list(self._params())
        if len(slow) != len(params):
            raise ValueError(f"Lookahead state has {len(slow)} slow tensors, the model has {len(params)} parameters")
        for s, p in zip(slow, params):
            if s.shape != p.shape:
                raise ValueError(f"Lookahead slow weight shape {tuple(s.shape)} != parameter {tuple(p.shape)}")
        self.slow = [s.to(device=p.device, dtype=p.dtype).clone() for s, p in zip(slow, params)]
        self.counter = int(state["lookahead_counter"])

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, base={self.base!r})"


def build_optimizer(model: nn.Module, solver) -> torch.optim.Optimizer:
    """Optimizer from a :class:`~axial_deeplab.engine.config.SolverConfig`-like object
    (fields optimizer, lr, weight_decay, decay_relative_tables, betas, eps, momentum, nesterov,
    lookahead_*); an object without decay_relative_tables keeps the tables undecayed."""
    groups = param_groups_weight_decay(
        model, solver.weight_decay, decay_tables=bool(getattr(solver, "decay_relative_tables", False))
    )
    for g in groups:
        g.pop("param_names", None)
    name = solver.optimizer
    betas = tuple(solver.betas)
    if name == "adam":
        # Adam's decay is L2 added to the gradient, as in deeplab2's Keras Adam with a regulariser.
        return torch.optim.Adam(groups, lr=solver.lr, betas=betas, eps=solver.eps)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=solver.lr, betas=betas, eps=solver.eps)
    if name == "radam_lookahead":
        base = torch.optim.RAdam(groups, lr=solver.lr, betas=betas, eps=solver.eps)
        return Lookahead(base, k=solver.lookahead_steps, alpha=solver.lookahead_alpha)
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=solver.lr, momentum=solver.momentum, nesterov=bool(solver.nesterov and solver.momentum > 0)
        )
    raise ValueError(f"solver.optimizer: {name!r} is not one of {', '.join(map(repr, get_args(OptimizerName)))}")
