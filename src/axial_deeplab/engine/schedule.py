"""Learning-rate schedule: linear warm-up, then poly decay (power 0.9, DeepLab's), cosine, or a
constant learning rate; the kinds are those of ``solver.schedule`` (``config.ScheduleKind``).

The schedule is a pure function of the step, so its whole state is the step number:
resuming sets the step and the learning rates follow exactly.
"""

from __future__ import annotations

import math
from typing import Dict, List, get_args

from .config import ScheduleKind

__all__ = ["lr_factor", "WarmupPolyLR"]


def lr_factor(
    step: int,
    max_steps: int,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.001,
    power: float = 0.9,
    kind: ScheduleKind = "poly",
    end_factor: float = 0.0,
) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based).

    Warm-up: from ``warmup_start_factor`` at step 0 linearly to 1 at ``warmup_steps``.
    Then ``poly``: ``end + (1 - end) * (1 - t)^power`` with ``t = step / max_steps``
    (as DeepLab's PolynomialDecay, decaying over all steps); ``cosine``: half cosine to
    ``end``; ``constant``: 1 (``end`` unused). Each is multiplied by the warm-up factor while it is below 1.
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    step = min(max(int(step), 0), max_steps)
    t = step / max_steps
    if kind == "poly":
        decay = end_factor + (1.0 - end_factor) * (1.0 - t) ** power
    elif kind == "cosine":
        decay = end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    elif kind == "constant":
        decay = 1.0
    else:
        raise ValueError(f"schedule kind {kind!r} is not one of {', '.join(map(repr, get_args(ScheduleKind)))}")
    if warmup_steps > 0 and step < warmup_steps:
        alpha = step / warmup_steps
        decay *= warmup_start_factor + (1.0 - warmup_start_factor) * alpha
    return decay


class WarmupPolyLR:
    """Sets each param group's ``lr`` to ``initial_lr * lr_factor(step)``.

    Call :meth:`step` after each optimizer step. Works with any object that has
    ``param_groups`` (including :class:`~axial_deeplab.engine.optim.Lookahead`).
    """

    def __init__(
        self,
        optimizer,
        max_steps: int,
        warmup_steps: int = 0,
        warmup_start_factor: float = 0.001,
        power: float = 0.9,
        kind: ScheduleKind = "poly",
        end_lr: float = 0.0,
    ):
        self.optimizer = optimizer
        self.max_steps = int(max_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_factor = float(warmup_start_factor)
        self.power = float(power)
        self.kind = kind
        self.end_lr = float(end_lr)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.base_lrs: List[float] = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def factor(self, step: int, base_lr: float) -> float:
        end = self.end_lr / base_lr if base_lr > 0 else 0.0
        return lr_factor(step, self.max_steps, self.warmup_steps, self.warmup_start_factor, self.power, self.kind, end)

    def _apply(self):
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * self.factor(self.last_step, base)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict:
        return {
            "last_step": self.last_step,
            "base_lrs": list(self.base_lrs),
            "max_steps": self.max_steps,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
        }

    def load_state_dict(self, state: Dict) -> None:
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self._apply()
