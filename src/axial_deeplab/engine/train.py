"""The training loop: one function, :func:`train`, for a single process or every process of
a ``torchrun`` job.

What it guarantees:

* the global batch is ``solver.batch_size`` whatever the number of processes;
* data order and augmentation are functions of (seed, step) (see ``sampling``), the RNG
  states are checkpointed, so ``resume`` continues exactly where the run stopped: the
  losses after a resume equal those of an uninterrupted run;
* checkpoints are written atomically by rank 0 every ``train.checkpoint_every`` steps and
  at the end, the best evaluation (PQ, or top-1 for classification) is kept apart;
* metrics go to metrics.jsonl / metrics.csv and TensorBoard; progress bars show rate and ETA.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .builders import build_dataset, build_loss, build_model, build_train_transform, dataset_metadata
from .config import Config, ConfigError, dump_config
from .distributed import (all_reduce_tensor, barrier, cleanup_distributed, convert_sync_batchnorm, init_distributed,
                          split_batch_size, wrap_ddp)
from .metrics_log import MetricsLogger, read_metrics
from .optim import build_optimizer
from .sampling import SeededDataset, StepBatchSampler
from .schedule import WarmupPolyLR

__all__ = ["train", "TrainResult", "setup_runtime", "amp_settings", "move_to_device", "primary_metric_name"]


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
        raise ConfigError(f"--resume {resume}: {path} has no {ckpt.STATE_FILE}; a weights-only file cannot resume "
                          f"training (use model.pretrained=... to start from it)")
    return path


def train(cfg: Config, resume: Union[None, bool, str] = None, overwrite: bool = False,
          on_log: Optional[Callable[[int, Dict[str, float]], None]] = None) -> TrainResult:
    """Train according to ``cfg``; ``resume`` is True/"auto" (newest checkpoint of the run
    folder, if any) or a checkpoint path. ``overwrite`` deletes an existing run folder first.
    """
    t_start = time.time()
    env, device = setup_runtime(cfg)
    main = env.is_main
    run_dir = cfg.output_dir
    ckpt_root = os.path.join(run_dir, "checkpoints")
    try:
        if main:
            if overwrite and os.path.isdir(run_dir) and not resume:
                shutil.rmtree(run_dir)
            os.makedirs(run_dir, exist_ok=True)
            ckpt.remove_stale_tmp(ckpt_root)
        barrier()
        resume_from = _resolve_resume(resume, ckpt_root)
        if resume and resume_from is None and main:
            print(f"--resume: no checkpoint in {ckpt_root} yet; starting from scratch", flush=True)
        if resume_from is None and not resume and ckpt.list_checkpoints(ckpt_root):
            raise ConfigError(
                f"{run_dir} already holds checkpoints of a run; pass --resume to continue it, --overwrite to "
                f"start over, or choose another experiment.output_dir / experiment.name"
            )
        return _train(cfg, env, device, run_dir, ckpt_root, resume_from, on_log, t_start)
    finally:
        if env.distributed:
            cleanup_distributed()


def _train(cfg, env, device, run_dir, ckpt_root, resume_from, on_log, t_start) -> TrainResult:
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
    max_steps = cfg.solver.max_steps

    # ---- model, optimizer, schedule
    _seed_everything(cfg.experiment.seed)
    if resume_from:
        cfg.model.pretrained = None  # the checkpoint holds every weight
    model = build_model(cfg, metadata, num_classes)
    start_step, best_metric = 0, None
    state = None
    if resume_from:
        ckpt.load_model_weights(model, resume_from)
        state = ckpt.load_training_state(resume_from)
        start_step = int(state["step"])
        best_metric = (state.get("extra") or {}).get("best_metric")
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
    model = wrap_ddp(model, device)
    loss_fn = build_loss(cfg, metadata)

    config_text = dump_config(cfg)
    info = {"task": task, "model": cfg.model.name}
    if metadata is not None:
        info["metadata"] = metadata.to_dict()
    else:
        info["classes"] = list(train_set.classes)

    logger = MetricsLogger(run_dir, enabled=main, tensorboard=cfg.train.tensorboard)
    if main:
        from .checkpoint import atomic_write_text

        atomic_write_text(os.path.join(run_dir, "config.yaml"), config_text)
        # rows after the checkpoint belong to steps about to be redone; a fresh start keeps none
        logger.truncate_after(start_step)

    sampler = StepBatchSampler(len(train_set), cfg.solver.batch_size, max_steps, seed=cfg.experiment.seed,
                               start_step=start_step, rank=env.rank, world_size=env.world_size)
    loader = DataLoader(SeededDataset(train_set, transform), batch_sampler=sampler,
                        num_workers=cfg.data.num_workers, collate_fn=_collate_fn(cfg),
                        pin_memory=device.type == "cuda", generator=torch.Generator(),
                        persistent_workers=False)

    eval_state: Dict[str, Any] = {}

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
    try:
        for batch in loader:
            batch = move_to_device(batch, device)
            losses = _compute_losses(cfg, model, loss_fn, batch, autocast)
            total = losses["total"]
            if not torch.isfinite(total.detach()):
                raise FloatingPointError(
                    f"training loss became {total.item()} at step {step + 1}; lower solver.lr, set "
                    f"solver.grad_clip_norm, or check the data")
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
                barrier()
            if is_last:
                break
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
