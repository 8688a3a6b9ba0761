"""Checkpoints that survive a kill at any instant and resume a run exactly.

A checkpoint is a folder::

    step-000100/
        model.safetensors     model weights (safetensors: no pickle, loads anywhere)
        training_state.pt     optimizer, schedule, grad scaler, step, RNG states, best metric
                              (plain tensors/dicts, read back with torch.load(weights_only=True))
        config.yaml           the resolved config, so evaluate/predict rebuild the model
        info.json             step, metrics and dataset metadata (class names, colours, things)

It is written under a temporary name and renamed into place in one ``os.replace``, so
a folder named ``step-*`` or ``best`` is always complete; leftovers of a killed write
(``*.tmp-*``) are removed on the next start.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..fileio import (  # noqa: F401  (re-exported: engine code imports them from here)
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    json_default,
)

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_model_weights",
    "load_training_state",
    "read_checkpoint_info",
    "prune_checkpoints",
    "remove_stale_tmp",
    "capture_rng_state",
    "restore_rng_state",
    "unwrap_model",
    "MODEL_FILE",
    "STATE_FILE",
    "CONFIG_FILE",
    "INFO_FILE",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
INFO_FILE = "info.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------- atomic files

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- RNG state

def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as plain tensors/lists."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ----------------------------------------------------------------------------- save / load

def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _model_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    tensors = {}
    for k, v in unwrap_model(model).state_dict().items():
        # clone: safetensors refuses tensors that share storage (views, tied weights)
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    return tensors


def save_checkpoint(
    directory: str,
    model: nn.Module,
    optimizer=None,
    scheduler=None,
    scaler=None,
    step: int = 0,
    extra_state: Optional[Dict[str, Any]] = None,
    config_text: Optional[str] = None,
    info: Optional[Dict[str, Any]] = None,
    rng_state: Optional[Dict[str, Any]] = None,
) -> str:
    """Write a complete checkpoint folder at ``directory`` atomically; returns its path.

    ``rng_state`` defaults to the current generator states (call :func:`capture_rng_state`
    yourself to store the state of an earlier moment).
    """
    from safetensors.torch import save_file

    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        save_file(_model_tensors(model), os.path.join(tmp, MODEL_FILE), metadata={"step": str(int(step))})
        state: Dict[str, Any] = {
            "step": int(step),
            "rng": rng_state if rng_state is not None else capture_rng_state(),
        }
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if extra_state:
            state["extra"] = extra_state
        torch.save(state, os.path.join(tmp, STATE_FILE))
        if config_text is not None:
            with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
                f.write(config_text)
        meta = {"step": int(step)}
        meta.update(info or {})
        with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, default=json_default)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(directory):
            # Replace an existing checkpoint of the same name: move it aside first (a
            # rename of a non-empty folder over another fails), then drop it.
            trash = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".old.tmp-", dir=parent)
            os.rmdir(trash)
            os.replace(directory, trash)
            os.replace(tmp, directory)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def remove_stale_tmp(checkpoint_root: str) -> List[str]:
    """Delete leftovers of interrupted writes (``*.tmp-*``); returns what was removed."""
    removed = []
    if not os.path.isdir(checkpoint_root):
        return removed
    for name in os.listdir(checkpoint_root):
        if ".tmp-" in name or name.endswith(".tmp"):
            path = os.path.join(checkpoint_root, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            removed.append(path)
    return removed


def list_checkpoints(checkpoint_root: str) -> List[str]:
    """Complete ``step-N`` folders under ``checkpoint_root``, oldest first."""
    if not os.path.isdir(checkpoint_root):
        return []
    found = []
    for name in os.listdir(checkpoint_root):
        m = _STEP_RE.match(name)
        path = os.path.join(checkpoint_root, name)
        if m and os.path.isfile(os.path.join(path, MODEL_FILE)):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_root: str) -> Optional[str]:
    ckpts = list_checkpoints(checkpoint_root)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(checkpoint_root: str, keep: int) -> List[str]:
    """Remove all but the newest ``keep`` step checkpoints; returns the removed paths."""
    ckpts = list_checkpoints(checkpoint_root)
    doomed = ckpts[:-keep] if keep > 0 else ckpts
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def resolve_checkpoint(path: str) -> str:
    """Accept a checkpoint folder, its model.safetensors, a run folder (its best, else
    newest checkpoint) or a checkpoints folder; return the checkpoint folder or file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        best = os.path.join(root, "best")
        if os.path.isfile(os.path.join(best, MODEL_FILE)):
            return best
        last = latest_checkpoint(root)
        if last:
            return last
    raise FileNotFoundError(f"{path}: no {MODEL_FILE} here, nor a best/ or step-*/ checkpoint below it")


def _model_file(path: str) -> str:
    path = resolve_checkpoint(path)
    return os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path


def load_model_weights(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load weights from a checkpoint (folder or .safetensors file) into ``model``.

    Also accepts ``.pt``/``.pth`` state dicts, read with ``weights_only=True``.
    """
    file = _model_file(path)
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            tensors = load_file(file)
        except Exception as e:  # safetensors raises its own error types on corrupt files
            raise ValueError(f"{file}: cannot read safetensors weights ({e})") from None
    else:
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{file}: cannot read weights ({e})") from None
        if isinstance(tensors, dict) and "state_dict" in tensors:
            tensors = tensors["state_dict"]
        if isinstance(tensors, dict) and "model" in tensors and isinstance(tensors["model"], dict):
            tensors = tensors["model"]
    target = unwrap_model(model)
    result = target.load_state_dict(tensors, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(
            f"{file}: weights do not fit the model: missing {result.missing_keys[:8]}"
            f"{' ...' if len(result.missing_keys) > 8 else ''}, unexpected {result.unexpected_keys[:8]}"
            f"{' ...' if len(result.unexpected_keys) > 8 else ''}"
        )
    return model


def load_training_state(path: str) -> Dict[str, Any]:
    """The optimizer/schedule/scaler/step/RNG dict of a checkpoint folder (weights_only)."""
    path = resolve_checkpoint(path)
    file = os.path.join(path, STATE_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {STATE_FILE} (weights-only checkpoint cannot resume training)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: cannot read training state ({e})") from None


def read_checkpoint_info(path: str) -> Dict[str, Any]:
    """``info.json`` of a checkpoint folder (empty dict for a bare weights file)."""
    path = resolve_checkpoint(path)
    if not os.path.isdir(path):
        return {}
    file = os.path.join(path, INFO_FILE)
    if not os.path.isfile(file):
        return {}
    with open(file, "r", encoding="utf-8") as f:
        return json.load(f)


def checkpoint_config_path(path: str) -> Optional[str]:
    """The config.yaml saved with a checkpoint, if any."""
    path = resolve_checkpoint(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(folder, CONFIG_FILE)
    return file if os.path.isfile(file) else None
