"""The training loop as a trainer with hooks, after detectron2's ``TrainerBase`` / ``HookBase`` /
``SimpleTrainer``: the trainer holds the state (step, model, optimizer) and runs one step at a
time; every periodic action (logging, images, evaluation, checkpoints) is a small hook called
after each step, so one can be read, changed or added (an EMA of the weights, say) without
touching the loop or the others.

What the loop guarantees on its own: a SIGINT ends the step in progress, which is then saved
(:class:`TrainingInterrupted`); a non-finite loss stops training before the step is applied
(:class:`TrainingDiverged`); under ``torchrun`` every process stops at the same step.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Callable, Dict, List, Optional

import torch

from ..errors import UserError
from .distributed import all_reduce_tensor, barrier
from .sampling import reraise_carried

__all__ = [
    "TrainingInterrupted",
    "TrainingDiverged",
    "StopRequest",
    "HookBase",
    "TrainerBase",
    "SimpleTrainer",
    "move_to_device",
    "split_batch",
]


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by SIGINT (Ctrl-C) after ``step``; ``checkpoint`` holds that step
    (None when no step was completed and no earlier checkpoint exists)."""

    def __init__(self, step: int, checkpoint: Optional[str], run_dir: str):
        super().__init__(f"interrupted after step {step}")
        self.step = step
        self.checkpoint = checkpoint
        self.run_dir = run_dir


class TrainingDiverged(UserError, FloatingPointError):
    """The training loss became NaN or infinite; the step was not applied and every earlier
    checkpoint is as it was."""


class StopRequest:
    """While active, the first SIGINT sets ``requested`` (the loop saves and stops after the
    step in progress); with ``escalate`` a second one raises KeyboardInterrupt at once. Only
    installed in the main thread, and only over Python's default handler (an ignored SIGINT
    stays ignored).

    Under torchrun a terminal's Ctrl-C reaches every process and the agent forwards it once
    more, then kills the processes after its shutdown timeout (30 s by default): there the
    repeat is not an order to stop at once, and the processes agree on the step to stop at
    (see :meth:`SimpleTrainer.run_step`), so the checkpoint is written if the step and the
    save fit in that time."""

    def __init__(self, escalate: bool = True):
        self.requested = False
        self.escalate = escalate
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            if self.escalate:
                raise KeyboardInterrupt
            return
        self.requested = True
        print(
            "\ninterrupted: finishing the current step and saving a checkpoint"
            + (" (Ctrl-C again to stop at once)" if self.escalate else ""),
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self):
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False


def move_to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


class HookBase:
    """A periodic action of the loop. Hooks run in the order they were registered, on every
    process (a hook that writes files checks the rank itself), and read the trainer's state:
    after a step ``trainer.step`` counts the completed steps, ``trainer.batch`` and
    ``trainer.losses`` are that step's."""

    trainer: "TrainerBase"

    def before_train(self) -> None:
        """Before the first step of this process (after a resume: the first step it runs)."""

    def after_step(self) -> None:
        """After each applied step."""

    def after_train(self, completed: bool) -> None:
        """Always, last; ``completed`` is False after an error, a divergence or an interruption,
        so a hook only releases what it holds then."""


class TrainerBase:
    """Runs :meth:`run_step` over ``loader`` until ``max_steps`` and calls the hooks around it.

    ``checkpointer`` (see :class:`~.hooks.RunCheckpointer`) is what an interruption saves the
    last completed step with, and what a divergence message names as intact."""

    def __init__(self, loader, start_step: int, max_steps: int, checkpointer, run_dir: str, distributed: bool = False):
        self.loader = loader
        self.step = start_step
        self.max_steps = max_steps
        self.checkpointer = checkpointer
        self.run_dir = run_dir
        self.distributed = distributed
        self.stop = StopRequest(escalate=not distributed)
        self.hooks: List[HookBase] = []

    def register_hooks(self, hooks: List[Optional[HookBase]]) -> None:
        for h in hooks:
            if h is not None:
                h.trainer = self
                self.hooks.append(h)

    def train(self) -> None:
        completed = False
        try:
            for h in self.hooks:
                h.before_train()
            with self.stop:
                self._loop()
            completed = True
        finally:
            for h in self.hooks:
                h.after_train(completed)

    def _loop(self) -> None:
        for batch in self.loader:
            if not self.run_step(batch):  # the processes agreed to stop before this step
                self._interrupt()
            for h in self.hooks:
                h.after_step()
            if self.step == self.max_steps:
                return
            if self.stop.requested and not self.distributed:
                self._interrupt()

    def _interrupt(self) -> None:
        """Keeps the state of the last completed step, then stops."""
        if self.step != self.checkpointer.saved_step and self.step > 0:
            self.checkpointer.save_step(self.step)
            barrier()
        raise TrainingInterrupted(self.step, self.checkpointer.last, self.run_dir)

    def run_step(self, batch) -> bool:
        raise NotImplementedError


class SimpleTrainer(TrainerBase):
    """One optimizer step per batch: losses, a finiteness check agreed by every process, then
    backward (through the gradient scaler for fp16), optional clipping, the optimizer and the
    schedule. ``compute_losses(batch)`` returns a dict whose ``"total"`` is minimised.

    With ``grad_accum_steps`` k > 1 the process's batch is cut into k equal micro-batches, each
    run forward and backward on its own with its loss divided by k, and the optimizer steps once
    on the summed gradients: for a loss that is a mean over images this is the gradient of the
    whole batch, in the memory of one micro-batch (BatchNorm, though, normalises each
    micro-batch with its own statistics). The loader still yields one batch per optimizer step,
    so the schedule, the data position and a resume count optimizer steps. Under DDP the
    gradients are all-reduced once, on the last micro-batch (``no_sync`` before)."""

    def __init__(
        self,
        model,
        compute_losses: Callable[[Any], Dict[str, torch.Tensor]],
        optimizer,
        scheduler,
        scaler,
        device: torch.device,
        grad_clip_norm: Optional[float] = None,
        grad_accum_steps: int = 1,
        **kw,
    ):
        super().__init__(**kw)
        self.model = model
        self.compute_losses = compute_losses
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.device = device
        self.grad_clip_norm = grad_clip_norm
        self.grad_accum_steps = int(grad_accum_steps)
        self.batch = None  # the step's last micro-batch (the whole batch without accumulation), on the device
        self.losses: Dict[str, torch.Tensor] = {}  # the step's losses, averaged over its micro-batches
        self.lr = 0.0  # the learning rate the last step used

    def run_step(self, batch) -> bool:
        """False (nothing applied) when the processes agreed to stop before this step."""
        reraise_carried(batch)  # a bad file met by a worker: the error the main process would raise
        k = self.grad_accum_steps
        if k == 1:
            batch = move_to_device(batch, self.device)
            losses = self.compute_losses(batch)
            if not self._finite_or_stop(losses["total"]):
                return False
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(losses["total"])
        else:
            batch, losses = self._accumulate(batch, k)
            if not self._finite_or_stop(losses["total"]):
                self.optimizer.zero_grad(set_to_none=True)
                return False
        self._apply()
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        self.batch, self.losses = batch, losses
        return True

    def _accumulate(self, batch, k: int):
        """Forward and backward over the k micro-batches; returns the last micro-batch and the
        losses averaged over all (detached). The gradients are those of the mean loss; nothing
        is applied yet, so a non-finite loss still leaves the weights as they were."""
        self.optimizer.zero_grad(set_to_none=True)
        parts = split_batch(batch, k)
        sums: Dict[str, torch.Tensor] = {}
        for i, part in enumerate(parts):
            part = move_to_device(part, self.device)
            with _no_sync(self.model) if i < k - 1 else contextlib.nullcontext():
                losses = self.compute_losses(part)
                self._backward(losses["total"] / k)
            for name, value in losses.items():
                value = value.detach()
                sums[name] = sums[name] + value if name in sums else value
        return part, {name: value / k for name, value in sums.items()}

    def _backward(self, total: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(total).backward()
        else:
            total.backward()

    def _finite_or_stop(self, total: torch.Tensor) -> bool:
        """Raises :class:`TrainingDiverged` when the loss is not finite on any process; under
        torchrun also returns False when any process was asked to stop, so all stop together."""
        bad_here = not bool(torch.isfinite(total.detach()))
        bad = bad_here
        if self.distributed:
            flags = all_reduce_tensor(torch.tensor([float(bad_here), float(self.stop.requested)], device=self.device))
            bad = bool(flags[0] > 0)
            if bool(flags[1] > 0) and not bad:
                return False
        if bad:
            value = f"{total.item()}" if bad_here else "non-finite on another process"
            last = self.checkpointer.last
            kept = f"the last checkpoint, {last}, is intact" if last else "no checkpoint had been written yet"
            raise TrainingDiverged(
                f"training diverged: the loss became {value} at step {self.step + 1} (not applied); lower "
                f"solver.lr, set solver.grad_clip_norm, or check the data; {kept}"
            )
        return True

    def _apply(self) -> None:
        """Clip and step on the accumulated gradients (unscaled first under fp16)."""
        clip = self.grad_clip_norm
        if self.scaler is not None:
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()


def _no_sync(model):
    """DDP's ``no_sync`` (gradients kept local until the last micro-batch) for ``model`` wrapped
    in DDP, possibly under torch.compile; a null context otherwise."""
    m = model
    while isinstance(m, torch.nn.Module):
        if isinstance(m, torch.nn.parallel.DistributedDataParallel):
            return m.no_sync()
        m = getattr(m, "_orig_mod", None)
    return contextlib.nullcontext()


def _batch_len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, (torch.Tensor, list, tuple)):
                return len(v)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].shape[0]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into micro-batches")


def split_batch(batch, parts: int) -> List[Any]:
    """``batch`` cut into ``parts`` equal micro-batches along the sample axis: a tensor, a dict of
    per-sample tensors / lists (panoptic collate) or a tuple/list of tensors (image, label)."""
    if parts == 1:
        return [batch]
    n = _batch_len(batch)
    if n % parts:
        raise ValueError(f"a batch of {n} samples does not split into {parts} equal micro-batches")
    size = n // parts

    def cut(b, lo, hi):
        if isinstance(b, torch.Tensor):
            return b[lo:hi]
        if isinstance(b, dict):
            return {k: v[lo:hi] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in b.items()}
        return type(b)(v[lo:hi] for v in b)

    return [cut(batch, i * size, (i + 1) * size) for i in range(parts)]
