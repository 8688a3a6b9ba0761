"""The training loop: one function, :func:`train`, for a single process or every process of
a ``torchrun`` job.

What it guarantees:

* the global batch is ``solver.batch_size`` whatever the number of processes;
* data order and augmentation are functions of (seed, step) (see ``sampling``), the RNG
  states are checkpointed, so ``resume`` continues exactly where the run stopped: the
  losses after a resume equal those of an uninterrupted run. A resume whose settings differ
  from the checkpoint's in anything but :data:`.resume.RESUME_MAY_CHANGE` is refused before any
  weight is loaded; the changes it honours are printed and recorded in the checkpoints;
* checkpoints are written atomically by rank 0 every ``train.checkpoint_every`` steps and
  at the end, the best evaluation (PQ, or top-1 for classification) is kept apart;
* ``overwrite`` deletes nothing until the config, the datasets and the model are built, and
  only in a folder that is a run of ours (see :mod:`.run_folder`);
* Ctrl-C (SIGINT) ends the step in progress, saves a checkpoint of it and raises
  :class:`TrainingInterrupted`; a non-finite loss raises :class:`TrainingDiverged` (a
  :class:`~axial_deeplab.errors.UserError`) before the step is applied;
* metrics go to metrics.jsonl / metrics.csv and TensorBoard; progress bars show rate and ETA.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch.utils.data import DataLoader

from ..errors import UserError
from ..fileio import atomic_write_text
from . import checkpoint as ckpt
from .builders import (build_dataset, build_loss, build_model, build_train_transform, compile_model,
                       dataset_metadata)
from .config import Config, ConfigError, dump_config
from .distributed import (all_reduce_tensor, barrier, cleanup_distributed, convert_sync_batchnorm, init_distributed,
                          split_batch_size, wrap_ddp)
from .metrics_log import MetricsLogger, read_metrics
from .optim import build_optimizer
from .resume import check_resolved_steps, describe_changes, resume_config_changes
from .run_folder import RUN_MARKER, check_fresh_start, check_overwritable, prepare_run_dir
from .sampling import CarryingCollate, SeededDataset, StepBatchSampler, ignore_sigint, reraise_carried
from .schedule import WarmupPolyLR

__all__ = ["train", "TrainResult", "TrainingInterrupted", "TrainingDiverged", "setup_runtime", "amp_settings",
           "move_to_device", "primary_metric_name", "RUN_MARKER"]


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


# ----------------------------------------------------------------------------- interruption

class _StopRequest:
    """While active, the first SIGINT sets ``requested`` (the loop saves and stops after the
    step in progress); with ``escalate`` a second one raises KeyboardInterrupt at once. Only
    installed in the main thread, and only over Python's default handler (an ignored SIGINT
    stays ignored).

    Under torchrun a terminal's Ctrl-C reaches every process and the agent forwards it once
    more, then kills the processes after its shutdown timeout (30 s by default): there the
    repeat is not an order to stop at once, and the processes agree on the step to stop at
    (see the loop), so the checkpoint is written if the step and the save fit in that time."""

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
        print("\ninterrupted: finishing the current step and saving a checkpoint"
              + (" (Ctrl-C again to stop at once)" if self.escalate else ""), file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False


@dataclass
class TrainResult:
    run_dir: str
    step: int
    last_checkpoint: Optional[str]
    best_checkpoint: Optional[str]
    best_metric: Optional[float]
    final_metrics: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    model: Any = None  # the trained model (unwrapped from DDP), for in-process use


def primary_metric_name(cfg: Config) -> str:
    return "top1" if cfg.experiment.task == "classification" else "PQ"


def setup_runtime(cfg: Config):
    """Threads, determinism and the process group; returns ``(env, device)``."""
    if cfg.experiment.threads:
        torch.set_num_threads(int(cfg.experiment.threads))
    if cfg.experiment.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    return init_distributed(cfg.experiment.device)


def amp_settings(cfg: Config, device: torch.device):
    """``(enabled, dtype, use_grad_scaler)`` for ``solver.amp`` on ``device``."""
    mode = cfg.solver.amp
    if device.type != "cuda" or mode == "none":
        return False, None, False
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "bf16":
        return True, torch.bfloat16, False
    return True, torch.float16, True


def move_to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def _resolve_steps(cfg: Config, train_len: int) -> None:
    s = cfg.solver
    if s.max_epochs:
        s.max_steps = max(1, math.ceil(s.max_epochs * train_len / s.batch_size))
    if s.warmup_epochs:
        s.warmup_steps = max(0, math.ceil(s.warmup_epochs * train_len / s.batch_size))


class _ClassificationSample:
    """Applies an image transform to the image of an (image, label) item."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, item):
        image, label = item
        return self.transform(image), label


def _collate_fn(cfg: Config):
    if cfg.experiment.task == "classification":
        from torch.utils.data import default_collate

        return default_collate
    from ..data.collate import collate_panoptic

    return collate_panoptic


def _compute_losses(cfg: Config, model, loss_fn, batch, autocast) -> Dict[str, torch.Tensor]:
    """The network runs under ``autocast`` (mixed precision on GPU); the losses in float32."""
    if cfg.experiment.task == "classification":
        images, labels = batch
        with autocast:
            logits = model(images)
        return {"total": loss_fn(logits.float(), labels)}
    with autocast:
        outputs = model(batch["image"])
    return loss_fn({k: v.float() for k, v in outputs.items()}, batch)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _resolve_resume(resume, ckpt_root: str) -> Optional[str]:
    if resume in (None, False, ""):
        return None
    if resume is True or resume == "auto":
        return ckpt.latest_checkpoint(ckpt_root)
    path = ckpt.resolve_checkpoint(str(resume))
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, ckpt.STATE_FILE)):
        raise ConfigError(f"--resume-from {resume}: {path} has no {ckpt.STATE_FILE}; a weights-only file cannot "
                          f"resume training (use model.pretrained=... to start from it)")
    return path


def train(cfg: Config, resume: Union[None, bool, str] = None, overwrite: bool = False,
          on_log: Optional[Callable[[int, Dict[str, float]], None]] = None) -> TrainResult:
    """Train according to ``cfg``; ``resume`` is True/"auto" (newest checkpoint of the run
    folder, if any) or a checkpoint path. ``overwrite`` empties an existing run folder once
    the config, data and model are checked (never a folder that is not a run: see
    :func:`check_overwritable`); it is ignored when resuming.

    Raises :class:`TrainingInterrupted` after saving a checkpoint when SIGINT arrives, and
    :class:`TrainingDiverged` when the loss stops being finite.
    """
    t_start = time.time()
    env, device = setup_runtime(cfg)
    main = env.is_main
    run_dir = cfg.output_dir
    ckpt_root = os.path.join(run_dir, "checkpoints")
    overwrite = bool(overwrite) and not resume
    try:
        if overwrite:
            check_overwritable(run_dir)  # refuse a folder that is not ours before any work
        resume_from = _resolve_resume(resume, ckpt_root)
        if resume and resume_from is None and main:
            print(f"--resume: no checkpoint in {ckpt_root} yet; starting from scratch", flush=True)
        if resume_from is None and not overwrite:
            if not resume and ckpt.list_checkpoints(ckpt_root):
                raise ConfigError(
                    f"{run_dir} already holds checkpoints of a run; pass --resume to continue it, --overwrite to "
                    f"start over, or choose another experiment.output_dir / experiment.name"
                )
            check_fresh_start(run_dir)
        changes, saved = ({}, None)
        if resume_from:
            changes, saved = resume_config_changes(cfg, resume_from)
        return _train(cfg, env, device, run_dir, ckpt_root, resume_from, on_log, t_start,
                      overwrite=overwrite, changes=changes, saved=saved)
    finally:
        if env.distributed:
            cleanup_distributed()


def _train(cfg, env, device, run_dir, ckpt_root, resume_from, on_log, t_start, overwrite=False,
           changes=None, saved=None) -> TrainResult:
    from tqdm.auto import tqdm

    main = env.is_main
    task = cfg.experiment.task
    split_batch_size(cfg.solver.batch_size, env.world_size)  # the global batch must divide evenly

    # ---- data
    train_set = build_dataset(cfg, cfg.data.train_split)
    if task == "classification":
        metadata = None
        num_classes = len(train_set.classes)
        transform = _ClassificationSample(build_train_transform(cfg))
    else:
        metadata = dataset_metadata(train_set)
        num_classes = metadata.num_classes
        transform = build_train_transform(cfg, metadata)
    _resolve_steps(cfg, len(train_set))
    if resume_from:
        check_resolved_steps(cfg, saved, resume_from)
    max_steps = cfg.solver.max_steps
    eval_state: Dict[str, Any] = {}
    if cfg.train.eval_at_end or (cfg.train.eval_every and cfg.train.eval_every <= max_steps):
        eval_state["dataset"] = build_dataset(cfg, cfg.data.eval_split)  # its errors come before any deletion

    # ---- model, optimizer, schedule
    _seed_everything(cfg.experiment.seed)
    build_cfg = cfg
    if resume_from and cfg.model.pretrained:
        build_cfg = copy.deepcopy(cfg)
        build_cfg.model.pretrained = None  # the checkpoint holds every weight
    model = build_model(build_cfg, metadata, num_classes)

    # ---- every check has passed: only now is the run folder emptied (overwrite) or created
    if main:
        prepare_run_dir(run_dir, ckpt_root, overwrite)
    barrier()

    start_step, best_metric = 0, None
    state = None
    history: List[Dict[str, Any]] = []
    if resume_from:
        ckpt.load_model_weights(model, resume_from)
        state = ckpt.load_training_state(resume_from)
        start_step = int(state["step"])
        best_metric = (state.get("extra") or {}).get("best_metric")
        try:
            history = list(ckpt.read_checkpoint_info(resume_from).get("resumed_with_changes") or [])
        except (OSError, ValueError, UserError):  # a damaged info.json only loses the record of changes
            history = []
        if changes:
            history.append({"step": start_step, "from": resume_from, "changes": changes})
            if main:
                print(f"resuming with changed settings: {describe_changes(changes)}", flush=True)
    model.to(device)
    if env.distributed and cfg.model.sync_bn:
        model = convert_sync_batchnorm(model, device)
    bare_model = model
    optimizer = build_optimizer(bare_model, cfg.solver)
    scheduler = WarmupPolyLR(optimizer, max_steps=max_steps, warmup_steps=cfg.solver.warmup_steps,
                             warmup_start_factor=cfg.solver.warmup_start_factor, power=cfg.solver.poly_power,
                             kind=cfg.solver.schedule, end_lr=cfg.solver.end_lr)
    amp_on, amp_dtype, use_scaler = amp_settings(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    if state is not None:
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"])
    model = compile_model(wrap_ddp(model, device), cfg, dynamic=False)  # one crop size
    loss_fn = build_loss(cfg, metadata)

    config_text = dump_config(cfg)
    info: Dict[str, Any] = {"task": task, "model": cfg.model.name}
    if metadata is not None:
        info["metadata"] = metadata.to_dict()
    else:
        info["classes"] = list(train_set.classes)
    if history:
        info["resumed_with_changes"] = history  # what a resume changed, and at which step

    logger = MetricsLogger(run_dir, enabled=main, tensorboard=cfg.train.tensorboard)
    if main:
        atomic_write_text(os.path.join(run_dir, "config.yaml"), config_text)
        # rows after the checkpoint belong to steps about to be redone; a fresh start keeps none
        logger.truncate_after(start_step)

    sampler = StepBatchSampler(len(train_set), cfg.solver.batch_size, max_steps, seed=cfg.experiment.seed,
                               start_step=start_step, rank=env.rank, world_size=env.world_size)
    loader = DataLoader(SeededDataset(train_set, transform, carry_errors=True), batch_sampler=sampler,
                        num_workers=cfg.data.num_workers, collate_fn=CarryingCollate(_collate_fn(cfg)),
                        pin_memory=device.type == "cuda", generator=torch.Generator(),
                        persistent_workers=False, worker_init_fn=ignore_sigint)

    def run_eval(step: int) -> Dict[str, Any]:
        from .evaluate import evaluate_model

        if "dataset" not in eval_state:
            eval_state["dataset"] = build_dataset(cfg, cfg.data.eval_split)
        bare = ckpt.unwrap_model(model)
        bare.eval()
        try:
            metrics = evaluate_model(bare, eval_state["dataset"], cfg, device, metadata=metadata,
                                     progress=cfg.train.progress and main, desc=f"eval@{step}")
        finally:
            bare.train()
        return metrics

    def save(step: int, name: Optional[str] = None, weights_only: bool = False, extra_info=None) -> Optional[str]:
        if not main:
            return None
        path = os.path.join(ckpt_root, name or f"step-{step:06d}")
        meta = dict(info)
        meta.update(extra_info or {})
        if weights_only:
            out = ckpt.save_checkpoint(path, model, step=step, config_text=config_text, info=meta,
                                       extra_state={"best_metric": best_metric})
        else:
            out = ckpt.save_checkpoint(path, model, optimizer, scheduler, scaler, step=step,
                                       extra_state={"best_metric": best_metric}, config_text=config_text, info=meta)
            ckpt.prune_checkpoints(ckpt_root, cfg.train.keep_checkpoints)
        return out

    metric_name = primary_metric_name(cfg)
    step = start_step
    last_ckpt = resume_from
    saved_step = start_step if resume_from else None  # the step the newest step checkpoint holds
    best_ckpt = os.path.join(ckpt_root, "best") if best_metric is not None else None
    final_metrics: Dict[str, Any] = {}
    sums: Dict[str, float] = {}
    n_sum = 0
    t_interval = time.time()
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_on
                else contextlib.nullcontext())

    if main and resume_from:
        print(f"resuming from {resume_from} at step {start_step}", flush=True)
    pbar = tqdm(total=max_steps, initial=start_step, desc="train", unit="it", dynamic_ncols=True,
                disable=not (main and cfg.train.progress), smoothing=0.1)
    model.train()
    interrupted = False
    stop = _StopRequest(escalate=not env.distributed)
    try:
        with stop:
            for batch in loader:
                reraise_carried(batch)  # a bad file met by a worker: the error the main process would raise
                batch = move_to_device(batch, device)
                losses = _compute_losses(cfg, model, loss_fn, batch, autocast)
                total = losses["total"]
                bad_here = not bool(torch.isfinite(total.detach()))
                bad = bad_here
                if env.distributed:  # every process stops (diverged or interrupted) at the same step
                    flags = all_reduce_tensor(torch.tensor([float(bad_here), float(stop.requested)],
                                                           device=device))
                    bad = bool(flags[0] > 0)
                    if bool(flags[1] > 0) and not bad:
                        interrupted = True
                        break
                if bad:
                    value = f"{total.item()}" if bad_here else "non-finite on another process"
                    kept = (f"the last checkpoint, {last_ckpt}, is intact" if last_ckpt
                            else "no checkpoint had been written yet")
                    raise TrainingDiverged(
                        f"training diverged: the loss became {value} at step {step + 1} (not applied); lower "
                        f"solver.lr, set solver.grad_clip_norm, or check the data; {kept}")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(total).backward()
                    if cfg.solver.grad_clip_norm:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.solver.grad_clip_norm)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    total.backward()
                    if cfg.solver.grad_clip_norm:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.solver.grad_clip_norm)
                    optimizer.step()
                lr_now = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                n_sum += 1
                pbar.update(1)

                if step % cfg.train.log_every == 0 or step == max_steps:
                    keys = sorted(sums)
                    vec = torch.tensor([sums[k] / n_sum for k in keys], dtype=torch.float64)
                    vec = all_reduce_tensor(vec, average=True)
                    values = {("loss" if k == "total" else k): float(v) for k, v in zip(keys, vec.tolist())}
                    elapsed = time.time() - t_interval
                    values["lr"] = lr_now
                    values["sec_per_step"] = elapsed / n_sum
                    values["images_per_sec"] = cfg.solver.batch_size * n_sum / max(elapsed, 1e-9)
                    logger.log("train", step, values)
                    pbar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr_now:.2e}", refresh=False)
                    if on_log is not None:
                        on_log(step, values)
                    sums, n_sum = {}, 0
                    t_interval = time.time()

                if main and logger.tensorboard_enabled and task == "panoptic" and cfg.train.image_every and \
                        step % cfg.train.image_every == 0:
                    _log_training_panel(logger, step, model, batch, metadata, cfg)

                is_last = step == max_steps
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or (is_last and cfg.train.eval_at_end):
                    metrics = run_eval(step)
                    final_metrics = metrics
                    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                    logger.log("eval", step, scalars)
                    value = metrics.get(metric_name)
                    if value is not None and (best_metric is None or value > best_metric):
                        best_metric = float(value)
                        best_ckpt = save(step, "best", weights_only=True, extra_info={"metrics": scalars})
                    barrier()
                    if main:
                        pbar.write(f"step {step}: " + ", ".join(f"{k} {scalars[k]:.2f}" for k in
                                                                _summary_keys(scalars)))
                if step % cfg.train.checkpoint_every == 0 or is_last:
                    last_ckpt = save(step) or last_ckpt
                    saved_step = step
                    barrier()
                if is_last:
                    break
                if stop.requested and not env.distributed:
                    interrupted = True
                    break
            if interrupted:
                # the state is that of the last completed step: keep it, then stop
                if step != saved_step and step > 0:
                    last_ckpt = save(step) or last_ckpt
                    barrier()
                raise TrainingInterrupted(step, last_ckpt, run_dir)
    except BaseException:
        logger.close()
        raise
    finally:
        pbar.close()
        logger.flush()

    if main and cfg.train.plot_curves:
        from .visualize import plot_training_curves

        try:
            plot_training_curves(read_metrics(run_dir), os.path.join(run_dir, "training_curves.png"),
                                 title=f"{cfg.experiment.name} ({cfg.model.name})")
        except Exception as e:  # a plot must never lose a finished run
            print(f"warning: could not draw the training curves: {e}", flush=True)
    logger.close()
    return TrainResult(run_dir=run_dir, step=step, last_checkpoint=last_ckpt, best_checkpoint=best_ckpt,
                       best_metric=best_metric, final_metrics=final_metrics, seconds=time.time() - t_start,
                       model=ckpt.unwrap_model(model))


def _summary_keys(scalars: Dict[str, float]):
    return [k for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "AP", "top1", "top5") if k in scalars]


@torch.no_grad()
def _log_training_panel(logger, step, model, batch, metadata, cfg) -> None:
    """Input / prediction / ground truth of the batch's first image, to TensorBoard."""
    from .evaluate import postprocess_outputs
    from .visualize import make_panel, overlay_panoptic, panoptic_from_labels

    bare = ckpt.unwrap_model(model)
    was_training = bare.training
    bare.eval()
    try:
        image = batch["image"][:1]
        raw = bare.predict_raw(image)
        pan = postprocess_outputs(raw, metadata, cfg)[0]
    finally:
        bare.train(was_training)
    pal = metadata.palette()
    gt = panoptic_from_labels(batch["semantic"][0], batch["instance"][0], metadata.label_divisor,
                              metadata.ignore_label)
    panel = make_panel([image[0], overlay_panoptic(image[0], pan, pal, metadata.label_divisor, metadata.thing_ids),
                        overlay_panoptic(image[0], gt, pal, metadata.label_divisor, metadata.thing_ids)])
    logger.log_image("train/input_prediction_groundtruth", step, panel)
