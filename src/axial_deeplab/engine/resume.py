"""Which settings a resumed run may change. Exact resume needs the recipe the checkpoint was
trained with: a resume whose config differs in anything but :data:`RESUME_MAY_CHANGE` is
refused, listing ``key: old -> new``, before any weight is loaded."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..errors import UserError
from . import checkpoint as ckpt
from .config import Config, ConfigError, config_from_dict, config_to_dict, dump_config, load_config

__all__ = ["RESUME_MAY_CHANGE", "resume_config_changes", "check_resolved_steps", "describe_changes"]

# Settings a resumed run may change: they steer where files go, logging, checkpointing,
# evaluation and data loading, not the path the weights take. A key ending in "." stands for
# every key below it. Any other difference is refused (see resume_config_changes).
RESUME_MAY_CHANGE = (
    "experiment.name",  # the run folder's name / place
    "experiment.output_dir",
    "experiment.device",  # the checkpoint is device-independent
    "experiment.threads",
    "experiment.deterministic",  # kernel choice, not the recipe
    "experiment.compile",  # the same math, compiled
    "solver.grad_accum_steps",  # memory only: the same global batch, samples, schedule and optimizer
    # steps (BatchNorm then sees other micro-batches: exact only if unchanged)
    "model.pretrained",  # unused on resume: the checkpoint holds every weight
    "data.root",  # the same data moved elsewhere
    "data.num_workers",
    "data.eval_num_workers",
    "data.eval_split",
    "data.eval_size",
    "train.",  # log / checkpoint / eval cadence, keep_checkpoints, bars, TensorBoard, plots
    "eval.",  # evaluation settings
)


def _flatten(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _normalised(cfg: Config) -> Dict[str, Any]:
    """The config as flat dotted keys, as it reads after a round trip through config.yaml."""
    import yaml

    return _flatten(config_to_dict(config_from_dict(yaml.safe_load(dump_config(cfg)))))


def _may_change(key: str, cfg: Config) -> bool:
    allowed = RESUME_MAY_CHANGE
    if cfg.data.eval_split != cfg.data.train_split:  # dataset options of the evaluation split alone
        allowed = allowed + (f"data.options.{cfg.data.eval_split}.",)
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)


def _fmt(v) -> str:
    return "<unset>" if v is _UNSET else repr(v) if isinstance(v, str) else str(v)


_UNSET = object()


def resume_config_changes(cfg: Config, checkpoint: str) -> Tuple[Dict[str, Any], Optional[Config]]:
    """Compare ``cfg`` with the config saved in ``checkpoint``; returns ``(honoured, saved)``
    where ``honoured`` maps each changed key of :data:`RESUME_MAY_CHANGE` to ``[old, new]``.
    Raises a :class:`UserError` listing ``key: old -> new`` for every other change.
    ``saved`` is None for a checkpoint without a config (nothing to compare)."""
    saved_path = ckpt.checkpoint_config_path(checkpoint)
    if saved_path is None:
        return {}, None
    try:
        saved = load_config(saved_path)
    except (ConfigError, OSError) as e:
        raise UserError(f"--resume: cannot read {saved_path}, the config saved with the checkpoint ({e})") from None
    old, new = _normalised(saved), _normalised(cfg)
    derived = set()
    if cfg.solver.max_epochs:
        derived.add("solver.max_steps")  # from the dataset's length: compared once it is known
    if cfg.solver.warmup_epochs:
        derived.add("solver.warmup_steps")
    honoured: Dict[str, Any] = {}
    refused: List[str] = []
    legacy = _legacy_arrangement(checkpoint)
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if a is _UNSET and legacy and _is_arrangement_key(key):
            a = legacy  # what the run was trained with, before configs could say it
        if a == b or key in derived:
            continue
        if _may_change(key, cfg):
            honoured[key] = [None if a is _UNSET else a, None if b is _UNSET else b]
        else:
            refused.append(f"{key}: {_fmt(a)} -> {_fmt(b)}")
    if refused:
        raise _refuse_resume(checkpoint, refused)
    return honoured, saved


def _is_arrangement_key(key: str) -> bool:
    return key.startswith("model.kwargs.") and key.endswith(".arrangement")


def _legacy_arrangement(checkpoint: str) -> Optional[str]:
    """The arrangement every Axial-ResNet had when ``checkpoint`` was written, for a checkpoint
    written before the weights recorded it (``"maxpool"``), else None. Such a run's config has no
    ``model.kwargs.arrangement``: the setting that rebuilds its model is then no change."""
    try:
        record, legacy = ckpt.weights_arrangement(checkpoint)
    except (OSError, ValueError):
        return None  # an unreadable file is reported when the weights are loaded
    return record.get("*") if legacy and record else None


def _refuse_resume(checkpoint: str, refused: List[str]) -> UserError:
    may_change = ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_MAY_CHANGE)
    return UserError(
        f"cannot resume from {checkpoint} with other training settings than it was trained with: "
        f"{'; '.join(refused)}. Drop these overrides to continue the run as it was, or start a new run "
        f"(another experiment.output_dir, or --overwrite; model.pretrained=CKPT starts from its weights). "
        f"Settings that may change on resume: {may_change}"
    )


def check_resolved_steps(cfg: Config, saved: Optional[Config], checkpoint: str) -> None:
    """``solver.max_epochs`` / ``warmup_epochs`` become steps through the dataset's length:
    a resumed run must come out at the steps it was trained with."""
    if saved is None:
        return
    refused = [
        f"solver.{k}: {getattr(saved.solver, k)} -> {getattr(cfg.solver, k)} (from solver.{e}="
        f"{getattr(cfg.solver, e)} on this dataset)"
        for k, e in (("max_steps", "max_epochs"), ("warmup_steps", "warmup_epochs"))
        if getattr(cfg.solver, e) and getattr(saved.solver, k) != getattr(cfg.solver, k)
    ]
    if refused:
        raise _refuse_resume(checkpoint, refused)


def describe_changes(changes: Dict[str, Any]) -> str:
    """``key: old -> new; ...`` for the ``honoured`` dict of :func:`resume_config_changes`."""
    return "; ".join(f"{k}: {_fmt(old)} -> {_fmt(new)}" for k, (old, new) in changes.items())
