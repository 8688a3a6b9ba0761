"""The periodic actions of training, one hook each (see :class:`~.trainer.HookBase`): the progress
bar, the loss log, TensorBoard images, evaluation, step checkpoints, and the metric files with
their curves. :class:`RunCheckpointer` is what the checkpoint and evaluation hooks (and an
interruption) write checkpoints with, so the newest and the best are known in one place.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Optional

import torch

from . import checkpoint as ckpt
from .distributed import all_reduce_tensor, barrier
from .metrics_log import MetricsLogger, read_metrics
from .trainer import HookBase

__all__ = [
    "RunCheckpointer",
    "ProgressBar",
    "LossLogger",
    "TrainingImages",
    "EmaUpdate",
    "PeriodicEval",
    "PeriodicCheckpoint",
    "MetricFiles",
]


def _every(step: int, period: Optional[int]) -> bool:
    return bool(period) and step % period == 0


class RunCheckpointer:
    """Writes the run's checkpoints (rank 0 only; other ranks get None) and remembers the newest
    one (``last``, and the step it holds, ``saved_step``) and the best evaluation (``best_metric``,
    ``best_path``). Step checkpoints hold the full training state and are pruned to
    ``keep``; "best" holds the weights only: the model's, or the EMA's when those scored
    better (its info.json says which, ``"weights": "model" | "ema"``). With ``ema`` (a
    :class:`~.ema.ModelEma`) step checkpoints also hold the EMA (``ema.safetensors``)."""

    def __init__(
        self,
        ckpt_root: str,
        model,
        optimizer,
        scheduler,
        scaler,
        config_text: str,
        info: Dict[str, Any],
        keep: int,
        is_main: bool,
        resume_from: Optional[str] = None,
        start_step: int = 0,
        best_metric: Optional[float] = None,
        ema=None,
    ):
        self.ckpt_root = ckpt_root
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.config_text = config_text
        self.info = info
        self.keep = keep
        self.is_main = is_main
        self.last = resume_from
        self.saved_step = start_step if resume_from else None
        self.best_metric = best_metric
        self.best_path = os.path.join(ckpt_root, "best") if best_metric is not None else None
        self.ema = ema

    def save_step(self, step: int) -> None:
        self.last = self._save(step) or self.last
        self.saved_step = step

    def offer_best(self, step: int, value: Optional[float], scalars: Dict[str, float], weights: str = "model") -> None:
        """Keeps the weights (``"model"`` or ``"ema"``) as "best" when ``value`` beats every earlier
        evaluation (a tie keeps the earlier one)."""
        if value is not None and (self.best_metric is None or value > self.best_metric):
            self.best_metric = float(value)
            model = self.ema.module if weights == "ema" else self.model
            self.best_path = self._save(
                step, "best", weights_only=True, model=model, extra_info={"metrics": scalars, "weights": weights}
            )

    def _save(
        self, step: int, name: Optional[str] = None, weights_only: bool = False, model=None, extra_info=None
    ) -> Optional[str]:
        if not self.is_main:
            return None
        path = os.path.join(self.ckpt_root, name or f"step-{step:06d}")
        meta = dict(self.info)
        meta.update(extra_info or {})
        extra_state: Dict[str, Any] = {"best_metric": self.best_metric}
        if weights_only:
            return ckpt.save_checkpoint(
                path,
                model if model is not None else self.model,
                step=step,
                config_text=self.config_text,
                info=meta,
                extra_state=extra_state,
            )
        if self.ema is not None:
            extra_state["ema"] = self.ema.state()
        out = ckpt.save_checkpoint(
            path,
            self.model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            step=step,
            extra_state=extra_state,
            config_text=self.config_text,
            info=meta,
            ema_model=self.ema.module if self.ema is not None else None,
        )
        ckpt.prune_checkpoints(self.ckpt_root, self.keep)
        return out


class ProgressBar(HookBase):
    """The step bar (rate and ETA); other hooks print through :meth:`write` so lines and bar do
    not garble each other."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def before_train(self) -> None:
        from tqdm.auto import tqdm

        t = self.trainer
        self.bar = tqdm(
            total=t.max_steps,
            initial=t.step,
            desc="train",
            unit="it",
            dynamic_ncols=True,
            disable=not self.enabled,
            smoothing=0.1,
        )

    def after_step(self) -> None:
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values, refresh=False)

    def after_train(self, completed: bool) -> None:
        if self.bar is not None:
            self.bar.close()


class LossLogger(HookBase):
    """Every ``every`` steps and at the last: the losses averaged over the steps since the last
    row and over the processes, the learning rate and the speed, to the metric files, the bar
    and ``on_log``."""

    def __init__(
        self,
        logger: MetricsLogger,
        progress: ProgressBar,
        every: int,
        batch_size: int,
        on_log: Optional[Callable[[int, Dict[str, float]], None]] = None,
    ):
        self.logger = logger
        self.progress = progress
        self.every = every
        self.batch_size = batch_size
        self.on_log = on_log
        self.sums: Dict[str, float] = {}
        self.count = 0
        self.t_interval = time.time()

    def before_train(self) -> None:
        self.t_interval = time.time()

    def after_step(self) -> None:
        t = self.trainer
        for k, v in t.losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.count += 1
        if t.step % self.every == 0 or t.step == t.max_steps:
            self._write(t.step, t.lr)

    def _write(self, step: int, lr: float) -> None:
        keys = sorted(self.sums)
        vec = torch.tensor([self.sums[k] / self.count for k in keys], dtype=torch.float64)
        vec = all_reduce_tensor(vec, average=True)
        values = {("loss" if k == "total" else k): float(v) for k, v in zip(keys, vec.tolist())}
        elapsed = time.time() - self.t_interval
        values["lr"] = lr
        values["sec_per_step"] = elapsed / self.count
        values["images_per_sec"] = self.batch_size * self.count / max(elapsed, 1e-9)
        self.logger.log("train", step, values)
        self.progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
        if self.on_log is not None:
            self.on_log(step, values)
        self.sums, self.count = {}, 0
        self.t_interval = time.time()


class TrainingImages(HookBase):
    """Every ``every`` steps: input / prediction / ground truth of the batch's first image to
    TensorBoard (panoptic runs, rank 0, TensorBoard on)."""

    def __init__(self, logger: MetricsLogger, every: Optional[int], metadata, cfg):
        self.logger = logger
        self.every = every
        self.metadata = metadata
        self.cfg = cfg

    def after_step(self) -> None:
        if _every(self.trainer.step, self.every):
            self._log_panel(self.trainer.step, self.trainer.model, self.trainer.batch)

    @torch.no_grad()
    def _log_panel(self, step: int, model, batch) -> None:
        from .evaluate import postprocess_outputs, postprocess_settings
        from .visualize import make_panel, overlay_panoptic, panoptic_from_labels

        md = self.metadata
        bare = ckpt.unwrap_model(model)
        was_training = bare.training
        bare.eval()
        try:
            image = batch["image"][:1]
            pan = postprocess_outputs(bare.predict_raw(image), md, postprocess_settings(bare, self.cfg))[0]
        finally:
            bare.train(was_training)
        pal = md.palette()
        gt = panoptic_from_labels(batch["semantic"][0], batch["instance"][0], md.label_divisor, md.ignore_label)
        panel = make_panel(
            [
                image[0],
                overlay_panoptic(image[0], pan, pal, md.label_divisor, md.thing_ids),
                overlay_panoptic(image[0], gt, pal, md.label_divisor, md.thing_ids),
            ]
        )
        self.logger.log_image("train/input_prediction_groundtruth", step, panel)


class EmaUpdate(HookBase):
    """After each step: averages the new weights into the EMA. Registered before the hooks that
    evaluate or save, so they see the EMA of the step they run after."""

    def __init__(self, ema):
        self.ema = ema

    def after_step(self) -> None:
        self.ema.update(self.trainer.model)


SUMMARY_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "AP", "top1", "top5")


class PeriodicEval(HookBase):
    """Every ``every`` steps and, with ``at_end``, after the last: evaluates the model, logs the
    scores, keeps the best weights (by ``metric``) and prints a one-line summary.
    ``evaluate(step, model=None)`` returns the metrics dict (of the trained model by default).

    With ``ema`` the EMA of the weights is evaluated too, logged as kind ``eval_ema``, and
    kept as "best" when it scores higher than every earlier evaluation of either."""

    def __init__(
        self,
        evaluate: Callable[..., Dict[str, Any]],
        every: Optional[int],
        at_end: bool,
        metric: str,
        logger: MetricsLogger,
        checkpointer: RunCheckpointer,
        progress: ProgressBar,
        is_main: bool,
        ema=None,
    ):
        self.evaluate = evaluate
        self.every = every
        self.at_end = at_end
        self.metric = metric
        self.logger = logger
        self.checkpointer = checkpointer
        self.progress = progress
        self.is_main = is_main
        self.ema = ema
        self.final_metrics: Dict[str, Any] = {}
        self.final_ema_metrics: Dict[str, Any] = {}

    def after_step(self) -> None:
        step = self.trainer.step
        if _every(step, self.every) or (step == self.trainer.max_steps and self.at_end):
            self._run(step)

    def _run(self, step: int) -> None:
        self.final_metrics = self._score(step, "eval", "model", self.evaluate(step))
        if self.ema is not None:
            self.final_ema_metrics = self._score(step, "eval_ema", "ema", self.evaluate(step, self.ema.module))

    def _score(self, step: int, kind: str, weights: str, metrics: Dict[str, Any]) -> Dict[str, Any]:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.logger.log(kind, step, scalars)
        self.checkpointer.offer_best(step, metrics.get(self.metric), scalars, weights=weights)
        barrier()
        if self.is_main:
            label = "" if weights == "model" else " (EMA)"
            self.progress.write(
                f"step {step}{label}: " + ", ".join(f"{k} {scalars[k]:.2f}" for k in SUMMARY_KEYS if k in scalars)
            )
        return metrics


class PeriodicCheckpoint(HookBase):
    """A full training-state checkpoint every ``every`` steps and after the last."""

    def __init__(self, checkpointer: RunCheckpointer, every: int):
        self.checkpointer = checkpointer
        self.every = every

    def after_step(self) -> None:
        step = self.trainer.step
        if step % self.every == 0 or step == self.trainer.max_steps:
            self.checkpointer.save_step(step)
            barrier()


class MetricFiles(HookBase):
    """Owns the metric files (metrics.jsonl / .csv, TensorBoard): flushed and closed at the end,
    with the training curves drawn after a completed run (``curves``: title of the plot, None
    for no plot). Registered last, so every other hook has written its rows."""

    def __init__(self, logger: MetricsLogger, run_dir: str, curves: Optional[str]):
        self.logger = logger
        self.run_dir = run_dir
        self.curves = curves

    def after_train(self, completed: bool) -> None:
        if not completed:
            self.logger.close()
            return
        self.logger.flush()
        if self.curves is not None:
            self._plot()
        self.logger.close()

    def _plot(self) -> None:
        from .visualize import plot_training_curves

        try:
            plot_training_curves(
                read_metrics(self.run_dir), os.path.join(self.run_dir, "training_curves.png"), title=self.curves
            )
        except Exception as e:  # a plot must never lose a finished run
            print(f"warning: could not draw the training curves: {e}", flush=True)
