"""Training: :func:`train`, for a single process or every process of a ``torchrun`` job. It
builds the data, the model and the solver, then hands them to a :class:`~.trainer.SimpleTrainer`
whose periodic actions are the hooks of :mod:`.hooks`.

What it guarantees:

* the global batch is ``solver.batch_size`` whatever the number of processes and whatever
  ``solver.grad_accum_steps`` (micro-batches per optimizer step: memory, not the recipe);
* with ``solver.ema_decay`` an EMA of the weights (:mod:`.ema`) is updated after every step,
  evaluated beside the model, kept as "best" when it scores higher and checkpointed;
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
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch.utils.data import DataLoader

from ..errors import UserError
from ..fileio import atomic_write_text
from ..layers.sync_batchnorm import convert_sync_batchnorm
from . import checkpoint as ckpt
from .builders import build_dataset, build_loss, build_model, build_train_transform, compile_model, dataset_metadata
from .config import Config, ConfigError, dump_config
from .distributed import (
    barrier,
    cleanup_distributed,
    init_distributed,
    split_batch_size,
    wrap_ddp,
)
from .hooks import (
    EmaUpdate,
    LossLogger,
    MetricFiles,
    PeriodicCheckpoint,
    PeriodicEval,
    ProgressBar,
    RunCheckpointer,
    TrainingImages,
)
from .metrics_log import MetricsLogger
from .optim import build_optimizer
from .resume import check_resolved_steps, describe_changes, resume_config_changes
from .run_folder import RUN_MARKER, check_fresh_start, check_overwritable, prepare_run_dir
from .sampling import CarryingCollate, SeededDataset, StepBatchSampler, ignore_sigint
from .schedule import WarmupPolyLR
from .trainer import SimpleTrainer, TrainingDiverged, TrainingInterrupted, move_to_device

__all__ = [
    "train",
    "TrainResult",
    "TrainingInterrupted",
    "TrainingDiverged",
    "setup_runtime",
    "amp_settings",
    "move_to_device",
    "primary_metric_name",
    "RUN_MARKER",
]


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
    ema_model: Any = None  # the EMA of its weights (solver.ema_decay), else None
    final_ema_metrics: Dict[str, Any] = field(default_factory=dict)  # the EMA's last evaluation


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
    """``(enabled, dtype, use_grad_scaler)`` for ``solver.amp`` on ``device``. ``auto`` is mixed
    precision on CUDA only (bf16 where supported, else fp16 with a gradient scaler); ``bf16`` on
    CPU runs the network under CPU autocast (bfloat16 needs no gradient scaler). A mode the
    device cannot run is an error rather than silently full precision."""
    mode = cfg.solver.amp
    if mode == "none":
        return False, None, False
    if device.type == "cuda":
        if mode == "auto":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if mode == "bf16":
            return True, torch.bfloat16, False
        return True, torch.float16, True
    if mode == "auto":
        return False, None, False
    if device.type == "cpu" and mode == "bf16":
        return True, torch.bfloat16, False
    hint = "bf16 (CPU autocast) or none" if device.type == "cpu" else "none"
    raise ConfigError(
        f"solver.amp={mode} cannot run on the {device.type} device (fp16 needs CUDA; bf16 runs on "
        f"CUDA and CPU); use solver.amp={hint}"
    )


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
        raise ConfigError(
            f"--resume-from {resume}: {path} has no {ckpt.STATE_FILE}; a weights-only file cannot "
            f"resume training (use model.pretrained=... to start from it)"
        )
    return path


def train(
    cfg: Config,
    resume: Union[None, bool, str] = None,
    overwrite: bool = False,
    on_log: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> TrainResult:
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
        trainer = _build_trainer(
            cfg, env, device, resume_from, on_log, overwrite=overwrite, changes=changes, saved=saved
        )
        trainer.train()
        return _result(trainer, t_start)
    finally:
        if env.distributed:
            cleanup_distributed()


# ----------------------------------------------------------------------------- set-up


@dataclass
class _Data:
    """The training set with its transform and classes (``metadata`` is None for classification),
    and the evaluation set when training will need it (built early so its errors come first)."""

    train_set: Any
    transform: Any
    metadata: Any
    num_classes: int
    eval_set: Any = None


def _build_data(cfg: Config, resume_from: Optional[str], saved) -> _Data:
    train_set = build_dataset(cfg, cfg.data.train_split)
    if cfg.experiment.task == "classification":
        metadata, num_classes = None, len(train_set.classes)
        transform = _ClassificationSample(build_train_transform(cfg))
    else:
        metadata = dataset_metadata(train_set)
        num_classes = metadata.num_classes
        transform = None  # built with the model, whose pad_value the crops take (_build_trainer)
    _resolve_steps(cfg, len(train_set))
    if resume_from:
        check_resolved_steps(cfg, saved, resume_from)
    data = _Data(train_set, transform, metadata, num_classes)
    if cfg.train.eval_at_end or (cfg.train.eval_every and cfg.train.eval_every <= cfg.solver.max_steps):
        data.eval_set = build_dataset(cfg, cfg.data.eval_split)  # its errors come before any deletion
    return data


def _build_seeded_model(cfg: Config, data: _Data, resume_from: Optional[str]):
    _seed_everything(cfg.experiment.seed)
    build_cfg = cfg
    if resume_from and cfg.model.pretrained:
        build_cfg = copy.deepcopy(cfg)
        build_cfg.model.pretrained = None  # the checkpoint holds every weight
    return build_model(build_cfg, data.metadata, data.num_classes)


@dataclass
class _StartPoint:
    """Where training starts: step 0, or a checkpoint's step with its training state, its best
    metric and the record of the settings each resume changed (kept in every checkpoint)."""

    step: int = 0
    best_metric: Optional[float] = None
    state: Optional[Dict[str, Any]] = None
    history: List[Dict[str, Any]] = field(default_factory=list)


def _load_start_point(model, resume_from: Optional[str], changes, main: bool) -> _StartPoint:
    if not resume_from:
        return _StartPoint()
    ckpt.load_model_weights(model, resume_from)
    state = ckpt.load_training_state(resume_from)
    point = _StartPoint(int(state["step"]), (state.get("extra") or {}).get("best_metric"), state)
    try:
        point.history = list(ckpt.read_checkpoint_info(resume_from).get("resumed_with_changes") or [])
    except (OSError, ValueError, UserError):  # a damaged info.json only loses the record of changes
        point.history = []
    if changes:
        point.history.append({"step": point.step, "from": resume_from, "changes": changes})
        if main:
            print(f"resuming with changed settings: {describe_changes(changes)}", flush=True)
    return point


@dataclass
class _Solver:
    optimizer: Any
    scheduler: Any
    scaler: Any  # a GradScaler for fp16, else None
    autocast: Any  # the context the forward pass runs in


def _build_solver(cfg: Config, model, device: torch.device) -> _Solver:
    s = cfg.solver
    optimizer = build_optimizer(model, s)
    scheduler = WarmupPolyLR(
        optimizer,
        max_steps=s.max_steps,
        warmup_steps=s.warmup_steps,
        warmup_start_factor=s.warmup_start_factor,
        power=s.poly_power,
        kind=s.schedule,
        end_lr=s.end_lr,
    )
    amp_on, amp_dtype, use_scaler = amp_settings(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_on else contextlib.nullcontext()
    return _Solver(optimizer, scheduler, scaler, autocast)


def _build_ema(cfg: Config, model, start: "_StartPoint", resume_from: Optional[str], distributed: bool):
    """The EMA of the weights (None without ``solver.ema_decay``): a copy of the model as training
    starts, or the EMA the checkpoint holds."""
    if not cfg.solver.ema_decay:
        return None
    from .ema import ModelEma

    ema = ModelEma(model, cfg.solver.ema_decay, distributed=distributed)
    if resume_from:
        ema.load(resume_from, (start.state.get("extra") or {}).get("ema"))
    return ema


def _restore_solver(solver: _Solver, state: Dict[str, Any], model, resume_from: Optional[str] = None) -> None:
    """The solver's states, then the RNG states: nothing may draw random numbers between this and
    the first step, so that step draws what the interrupted run's would have. Optimizer states of
    relative tables saved with another row count are fitted first (``fit_optimizer_state``)."""
    if "optimizer" in state:
        source = os.path.join(resume_from, ckpt.STATE_FILE) if resume_from else "checkpoint"
        solver.optimizer.load_state_dict(
            ckpt.fit_optimizer_state(model, solver.optimizer, state["optimizer"], source=source)
        )
    if "scheduler" in state:
        solver.scheduler.load_state_dict(state["scheduler"])
    if solver.scaler is not None and "scaler" in state:
        solver.scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng_state(state["rng"])


def _run_info(cfg: Config, data: _Data, history) -> Dict[str, Any]:
    """What every checkpoint's info.json says about the run."""
    info: Dict[str, Any] = {"task": cfg.experiment.task, "model": cfg.model.name}
    if data.metadata is not None:
        info["metadata"] = data.metadata.to_dict()
    else:
        info["classes"] = list(data.train_set.classes)
    if history:
        info["resumed_with_changes"] = history  # what a resume changed, and at which step
    return info


def _build_loader(cfg: Config, data: _Data, start_step: int, env, device: torch.device) -> DataLoader:
    sampler = StepBatchSampler(
        len(data.train_set),
        cfg.solver.batch_size,
        cfg.solver.max_steps,
        seed=cfg.experiment.seed,
        start_step=start_step,
        rank=env.rank,
        world_size=env.world_size,
    )
    return DataLoader(
        SeededDataset(data.train_set, data.transform, carry_errors=True),
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=CarryingCollate(_collate_fn(cfg)),
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
        persistent_workers=False,
        worker_init_fn=ignore_sigint,
    )


def _make_evaluate(cfg: Config, data: _Data, model, device: torch.device, main: bool) -> Callable[[int], Dict]:
    """Evaluation on the evaluation split of the bare trained model (back in train mode after),
    or of ``other`` (the EMA, always in eval mode)."""

    def evaluate(step: int, other=None) -> Dict[str, Any]:
        from .evaluate import evaluate_model

        if data.eval_set is None:
            data.eval_set = build_dataset(cfg, cfg.data.eval_split)

        def run(target, desc):
            progress = cfg.train.progress and main
            return evaluate_model(
                target, data.eval_set, cfg, device, metadata=data.metadata, progress=progress, desc=desc
            )

        if other is not None:
            return run(other, f"eval-ema@{step}")
        bare = ckpt.unwrap_model(model)
        bare.eval()
        try:
            return run(bare, f"eval@{step}")
        finally:
            bare.train()

    return evaluate


def _hooks(cfg: Config, trainer: SimpleTrainer, data: _Data, logger: MetricsLogger, on_log, main: bool):
    """The periodic actions, in the order they run after a step (the EMA first: evaluation and
    checkpoints see the step's EMA)."""
    t = cfg.train
    ema = trainer.checkpointer.ema
    progress = ProgressBar(enabled=main and t.progress)
    images = None
    if main and logger.tensorboard_enabled and cfg.experiment.task == "panoptic":
        images = TrainingImages(logger, t.image_every, data.metadata, cfg)
    evaluate = _make_evaluate(cfg, data, trainer.model, trainer.device, main)
    curves = f"{cfg.experiment.name} ({cfg.model.name})" if main and t.plot_curves else None
    return [
        progress,
        EmaUpdate(ema) if ema is not None else None,
        LossLogger(logger, progress, t.log_every, cfg.solver.batch_size, on_log),
        images,
        PeriodicEval(
            evaluate,
            t.eval_every,
            t.eval_at_end,
            primary_metric_name(cfg),
            logger,
            trainer.checkpointer,
            progress,
            main,
            ema=ema,
        ),
        PeriodicCheckpoint(trainer.checkpointer, t.checkpoint_every),
        MetricFiles(logger, cfg.output_dir, curves),
    ]


def _check_batch_split(cfg: Config, world_size: int) -> None:
    """The global batch divides over the processes, and each process's over the micro-batches."""
    local_batch = split_batch_size(cfg.solver.batch_size, world_size)
    if local_batch % cfg.solver.grad_accum_steps:
        raise ConfigError(
            f"solver.grad_accum_steps={cfg.solver.grad_accum_steps} must divide the batch of each "
            f"process, solver.batch_size / processes = {cfg.solver.batch_size} / {world_size} = "
            f"{local_batch}"
        )


def _build_trainer(
    cfg: Config,
    env,
    device: torch.device,
    resume_from: Optional[str],
    on_log,
    overwrite=False,
    changes=None,
    saved=None,
) -> SimpleTrainer:
    """Everything is checked and built before the run folder is touched; the order of the steps
    that draw random numbers is what makes a resume exact."""
    main = env.is_main
    run_dir = cfg.output_dir
    ckpt_root = os.path.join(run_dir, "checkpoints")
    _check_batch_split(cfg, env.world_size)
    amp_settings(cfg, device)  # a precision the device cannot run is refused before any work
    data = _build_data(cfg, resume_from, saved)
    model = _build_seeded_model(cfg, data, resume_from)
    if data.transform is None:
        data.transform = build_train_transform(cfg, data.metadata, model=model)
    if main:  # every check has passed: only now is the run folder emptied (overwrite) or created
        prepare_run_dir(run_dir, ckpt_root, overwrite)
    barrier()
    start = _load_start_point(model, resume_from, changes, main)
    model.to(device)
    if env.distributed and cfg.model.sync_bn:
        model = convert_sync_batchnorm(model, device)
    ema = _build_ema(cfg, model, start, resume_from, env.distributed)
    solver = _build_solver(cfg, model, device)
    if start.state is not None:
        _restore_solver(solver, start.state, model, resume_from)
    model = compile_model(wrap_ddp(model, device), cfg, dynamic=False)  # one crop size
    loss_fn = build_loss(cfg, data.metadata)
    config_text = dump_config(cfg)
    logger = MetricsLogger(run_dir, enabled=main, tensorboard=cfg.train.tensorboard)
    if main:
        atomic_write_text(os.path.join(run_dir, "config.yaml"), config_text)
        logger.truncate_after(start.step)  # later rows are of steps about to be redone; a fresh start keeps none
    checkpointer = RunCheckpointer(
        ckpt_root,
        model,
        solver.optimizer,
        solver.scheduler,
        solver.scaler,
        config_text,
        _run_info(cfg, data, start.history),
        cfg.train.keep_checkpoints,
        main,
        resume_from=resume_from,
        start_step=start.step,
        best_metric=start.best_metric,
        ema=ema,
    )
    trainer = SimpleTrainer(
        model,
        lambda batch: _compute_losses(cfg, model, loss_fn, batch, solver.autocast),
        solver.optimizer,
        solver.scheduler,
        solver.scaler,
        device,
        cfg.solver.grad_clip_norm,
        grad_accum_steps=cfg.solver.grad_accum_steps,
        loader=_build_loader(cfg, data, start.step, env, device),
        start_step=start.step,
        max_steps=cfg.solver.max_steps,
        checkpointer=checkpointer,
        run_dir=run_dir,
        distributed=env.distributed,
    )
    trainer.register_hooks(_hooks(cfg, trainer, data, logger, on_log, main))
    if main and resume_from:
        print(f"resuming from {resume_from} at step {start.step}", flush=True)
    model.train()
    return trainer


def _result(trainer: SimpleTrainer, t_start: float) -> TrainResult:
    ck = trainer.checkpointer
    evals = next((h for h in trainer.hooks if isinstance(h, PeriodicEval)), None)
    return TrainResult(
        run_dir=trainer.run_dir,
        step=trainer.step,
        last_checkpoint=ck.last,
        best_checkpoint=ck.best_path,
        best_metric=ck.best_metric,
        final_metrics=evals.final_metrics if evals else {},
        seconds=time.time() - t_start,
        model=ckpt.unwrap_model(trainer.model),
        ema_model=ck.ema.module if ck.ema is not None else None,
        final_ema_metrics=evals.final_ema_metrics if evals else {},
    )
