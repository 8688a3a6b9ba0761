"""Checkpoints that survive a kill at any instant and resume a run exactly.

A checkpoint is a folder::

    step-000100/
        model.safetensors     model weights (safetensors: no pickle, loads anywhere)
        ema.safetensors       the EMA of the weights, when training keeps one (solver.ema_decay)
        training_state.pt     optimizer, schedule, grad scaler, step, RNG states, best metric
                              (plain tensors/dicts, read back with torch.load(weights_only=True))
        config.yaml           the resolved config, so evaluate/predict rebuild the model
        info.json             step, metrics and dataset metadata (class names, colours, things)

It is written under a temporary name (``NAME.tmp-*``), renamed ``NAME.done.tmp-*`` once
complete, and then renamed into place, so a folder named ``step-*`` or ``best`` is always
complete. An existing folder of the same name is swapped with the new one in one atomic
exchange where the system offers it (Linux ``renameat2``); elsewhere it is first moved
to ``NAME.old.tmp-*``. Either way a kill at any instant leaves a complete copy: under the
real name, or (for a moment) under a ``.done.``/``.old.`` name, from which the next start
restores it. Other leftovers of a killed write are removed on the next start.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import re
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..errors import UserError, output_error
from ..fileio import current_umask, json_default

__all__ = [
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_model_weights",
    "weights_arrangement",
    "check_arrangement",
    "load_training_state",
    "fit_optimizer_state",
    "read_checkpoint_info",
    "prune_checkpoints",
    "remove_stale_tmp",
    "capture_rng_state",
    "restore_rng_state",
    "unwrap_model",
    "MODEL_FILE",
    "EMA_FILE",
    "STATE_FILE",
    "CONFIG_FILE",
    "INFO_FILE",
]

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"  # the EMA of the weights, beside MODEL_FILE
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
ARRANGEMENT_KEY = "arrangement"  # safetensors metadata: the backbones' arrangements (JSON)
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


_RENAME_EXCHANGE = 2
_renameat2 = None


def _exchange(a: str, b: str) -> bool:
    """Swap the folders ``a`` and ``b`` in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False where the system or file system cannot."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = False
    if not _renameat2:
        return False
    at_fdcwd = -100
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # not offered here: use the two-rename fallback
    raise OSError(code, os.strerror(code), a, None, b)


# Names of our temporary folders/files: NAME.tmp-XXXX (being written, maybe incomplete),
# NAME.done.tmp-XXXX (complete, about to be renamed in), NAME.old.tmp-XXXX (a complete
# earlier copy moved aside), and fileio's NAME.XXXXXXXX.tmp files.
_TMP_DIR_RE = re.compile(r"^(?P<name>.+?)\.(?:(?P<kind>done|old)\.)?tmp-[A-Za-z0-9_]+$")
_TMP_FILE_RE = re.compile(r"^.+\.[A-Za-z0-9_]{8}\.tmp$")


def _restore_missing(parent: str, name: str) -> Optional[str]:
    """If ``parent/name`` is missing but a complete copy of it survives under a
    ``.done.``/``.old.`` temporary name, rename the newest one back (a new copy before an
    old one); returns the restored path."""
    target = os.path.join(parent, name)
    if os.path.lexists(target):
        return None
    candidates = []
    for entry in os.listdir(parent):
        m = _TMP_DIR_RE.match(entry)
        path = os.path.join(parent, entry)
        if (
            m
            and m.group("name") == name
            and m.group("kind")
            and os.path.isdir(path)
            and not os.path.islink(path)
            and os.path.isfile(os.path.join(path, MODEL_FILE))
        ):
            candidates.append((m.group("kind") == "done", os.stat(path).st_mtime, path))
    if not candidates:
        return None
    source = max(candidates)[2]
    os.replace(source, target)
    _fsync_dir(parent)
    return target


def _write_failure(err: BaseException) -> Optional[BaseException]:
    """The OS error behind a failed write by torch.save / safetensors, or None when ``err``
    is not a write failure."""
    if isinstance(err, OSError):
        return err
    text = str(err)
    m = re.search(r"os error (\d+)", text)  # safetensors: "... No space left on device (os error 28)"
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    if isinstance(err, RuntimeError) and text.startswith("Parent directory ") and "does not exist" in text:
        return OSError(errno.ENOENT, os.strerror(errno.ENOENT))  # torch.save into a vanished folder
    if isinstance(err, RuntimeError) and (
        "unexpected pos" in text or "PytorchStreamWriter" in text or "file write failed" in text
    ):
        return err  # torch.save's zip writer; output_error reads "unexpected pos" as a full disk
    return None


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
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
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


def _save_weights(model: nn.Module, path: str, step: int) -> None:
    """Weights as safetensors, with the step and the backbone arrangement in the metadata."""
    from safetensors.torch import save_file

    save_file(
        _model_tensors(model), path, metadata={"step": str(int(step)), ARRANGEMENT_KEY: _arrangement_record(model)}
    )
    os.chmod(path, 0o666 & ~current_umask())  # safetensors writes 0600 files


def _write_contents(
    folder, model, optimizer, scheduler, scaler, step, extra_state, config_text, info, rng_state, ema_model
) -> None:
    """Every file of a checkpoint into ``folder`` (a temporary one), each flushed to disk."""
    _save_weights(model, os.path.join(folder, MODEL_FILE), step)
    if ema_model is not None:
        _save_weights(ema_model, os.path.join(folder, EMA_FILE), step)
    state: Dict[str, Any] = {"step": int(step), "rng": rng_state if rng_state is not None else capture_rng_state()}
    for key, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            state[key] = obj.state_dict()
    if extra_state:
        state["extra"] = extra_state
    torch.save(state, os.path.join(folder, STATE_FILE))
    if config_text is not None:
        with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(config_text)
    meta = {"step": int(step)}
    meta.update(info or {})
    with open(os.path.join(folder, INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, default=json_default)
    for entry in os.listdir(folder):
        with open(os.path.join(folder, entry), "rb") as f:
            os.fsync(f.fileno())


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
    ema_model: Optional[nn.Module] = None,
) -> str:
    """Write a complete checkpoint folder at ``directory`` atomically; returns its path.

    ``rng_state`` defaults to the current generator states (call :func:`capture_rng_state`
    yourself to store the state of an earlier moment). ``ema_model``: an average of the weights
    written as ``ema.safetensors`` beside the model's.
    """
    directory = os.path.abspath(directory)
    parent, name = os.path.split(directory)
    tmp = aside = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=name + ".tmp-", dir=parent)
        os.chmod(tmp, 0o777 & ~current_umask())
        _write_contents(
            tmp, model, optimizer, scheduler, scaler, step, extra_state, config_text, info, rng_state, ema_model
        )
        _fsync_dir(tmp)
        # complete from here on: the .done. name lets a later start restore it if need be
        suffix = os.path.basename(tmp)[len(name) + len(".tmp-") :]
        done = os.path.join(parent, f"{name}.done.tmp-{suffix}")
        os.replace(tmp, done)
        tmp = done
        if os.path.isdir(directory) and not os.path.islink(directory):
            if not _exchange(tmp, directory):
                # No atomic swap here: move the old copy aside, then rename the new one in. A
                # kill in between leaves both complete under .old./.done. names (restored on start).
                aside = os.path.join(parent, f"{name}.old.tmp-{suffix}")
                os.replace(directory, aside)
                os.replace(tmp, directory)
                tmp = aside
            shutil.rmtree(tmp, ignore_errors=True)  # the earlier copy, now under the temporary name
            tmp = None
        else:
            os.replace(tmp, directory)
            tmp = None
        _fsync_dir(parent)
    except BaseException as e:
        try:
            if tmp is not None:
                if os.path.lexists(directory) or ".done.tmp-" not in os.path.basename(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
                _restore_missing(parent, name)  # put back a complete copy if the name is empty
                if aside is not None and os.path.isdir(directory):
                    shutil.rmtree(aside, ignore_errors=True)
                    shutil.rmtree(aside.replace(".old.tmp-", ".done.tmp-"), ignore_errors=True)
        except OSError:
            pass  # the next start's remove_stale_tmp restores or removes what is left
        cause = _write_failure(e) if isinstance(e, Exception) and not isinstance(e, UserError) else None
        if cause is not None:
            raise output_error(directory, cause) from e
        raise
    return directory


def remove_stale_tmp(checkpoint_root: str) -> List[str]:
    """Clean up after interrupted writes; returns the paths removed.

    A checkpoint whose folder is missing while a complete copy survives under a temporary
    name (a kill in the middle of replacing it) is first restored from that copy. Only names
    of the forms this module and :mod:`axial_deeplab.fileio` create are touched."""
    removed: List[str] = []
    if not os.path.isdir(checkpoint_root):
        return removed
    for entry in sorted(os.listdir(checkpoint_root)):
        m = _TMP_DIR_RE.match(entry)
        if m and m.group("kind"):
            try:
                _restore_missing(checkpoint_root, m.group("name"))
            except OSError as e:
                raise output_error(os.path.join(checkpoint_root, m.group("name")), e) from e
    for entry in sorted(os.listdir(checkpoint_root)):
        path = os.path.join(checkpoint_root, entry)
        if _TMP_DIR_RE.match(entry) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif _TMP_FILE_RE.match(entry) and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.unlink(path)
            except OSError:
                continue
        else:
            continue
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


def _arrangement_record(model: nn.Module) -> str:
    from ..models.axial_resnet import model_arrangements

    return json.dumps(model_arrangements(unwrap_model(model)), sort_keys=True)


def weights_arrangement(path: str):
    """``(record, legacy)``: the backbone arrangements a checkpoint's ``model.safetensors``
    records (``{module path: arrangement}``, see ``models.axial_resnet.model_arrangements``).
    A checkpoint of ours written before the record existed gives ``({"*": "maxpool"}, True)``:
    every Axial-ResNet then had the stem max-pool. Other files give ``(None, False)``."""
    file = _model_file(path)
    if not file.endswith(".safetensors") or not os.path.isfile(file):
        return None, False
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise ValueError(f"{file}: cannot read safetensors weights ({e})") from None
    if ARRANGEMENT_KEY in meta:
        try:
            record = json.loads(meta[ARRANGEMENT_KEY])
        except ValueError:
            record = None
        if not isinstance(record, dict) or not all(isinstance(v, str) for v in record.values()):
            raise ValueError(f"{file}: corrupt '{ARRANGEMENT_KEY}' metadata {meta[ARRANGEMENT_KEY]!r}")
        return record, False
    if "step" in meta:  # written by save_checkpoint before it recorded the arrangement
        return {"*": "maxpool"}, True
    return None, False


def check_arrangement(model: nn.Module, path: str, prefix: str = "", warn: bool = False) -> None:
    """Refuse weights whose recorded backbone arrangement differs from ``model``'s: the state-dict
    keys and shapes of the two arrangements are the same, the functions are not. ``prefix``: the
    module path in the checkpoint's model that ``model`` is (``"backbone"`` when a backbone is
    taken from a whole panoptic checkpoint). ``warn``: a warning instead of the error, for
    weights that only initialise a model to train."""
    from ..models.axial_resnet import arrangement_mismatches

    record, legacy = weights_arrangement(path)
    if record is None:
        return
    if prefix:
        record = {
            ("*" if k == "*" else k[len(prefix) :].lstrip(".")): v
            for k, v in record.items()
            if k == "*" or k == prefix or k.startswith(prefix + ".")
        }
    bad = arrangement_mismatches(unwrap_model(model), record)
    if bad:
        name, have, want = bad[0]
        when = " (saved before checkpoints recorded it; all Axial-ResNets then had it)" if legacy else ""
        msg = (
            f"{_model_file(path)}: the weights were trained with arrangement={want!r}{when}, but "
            f"{'the model' if not name else name!r} is built with arrangement={have!r}; build the model "
            f"with arrangement={want!r} (config: model.kwargs.arrangement={want}; Python: "
            f"create_model(..., arrangement={want!r}))"
        )
        if not warn:
            raise ValueError(msg)
        import warnings

        warnings.warn(msg + " to compute the same function", UserWarning, stacklevel=3)


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
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{file}: expected a state dict of tensors")
    check_arrangement(target, file)
    from ..models.weights import fit_relative_tables

    tensors = fit_relative_tables(target, tensors, source=file)  # tables of another span or reach fit exactly
    own = target.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"{file}: {len(mismatched)} tensor(s) have other shapes than the model's "
            f"({'; '.join(mismatched[:3])}{'; ...' if len(mismatched) > 3 else ''}); the checkpoint was trained "
            f"with another model width or class count: use the config it was trained with (--config, "
            f"model.kwargs) and a dataset with the same classes"
        )
    result = target.load_state_dict(tensors, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(
            f"{file}: weights do not fit the model: missing {result.missing_keys[:8]}"
            f"{' ...' if len(result.missing_keys) > 8 else ''}, unexpected {result.unexpected_keys[:8]}"
            f"{' ...' if len(result.unexpected_keys) > 8 else ''} (another model or --config?)"
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


def _table_parameters(model: nn.Module) -> Dict[int, Any]:
    """``{id(parameter): (name, layer)}`` for every relative table of the attention layers."""
    from ..layers.axial_attention import TABLE_NAMES, PositionSensitiveAxialAttention

    found = {}
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, PositionSensitiveAxialAttention):
            for table_name, p in zip(TABLE_NAMES, module.relative_table_parameters()):
                if p is not None:
                    found[id(p)] = (f"{name}.{table_name}" if name else table_name, module)
    return found


def _fit_table_state(value: torch.Tensor, layer, name: str, what: str, source: str, moment: bool) -> torch.Tensor:
    """One per-parameter optimizer tensor of a relative table saved with another row count, as the
    layer stores it now. Exact when the saved rows covered every offset the layer uses: the rows
    beyond never had a gradient, so their moments are zero (``moment``), and weights (Lookahead's
    slow copy) extend as the model's own weights do."""
    from ..layers.axial_attention import fit_relative_table

    have, reach, used = (value.shape[1] - 1) // 2, layer.table_reach, layer.max_relative_distance
    rows = 2 * reach + 1
    if have < used or (
        have > reach and moment and bool(torch.cat([value[:, : have - reach], value[:, have + reach + 1 :]], 1).any())
    ):
        raise UserError(
            f"{source}: the optimizer state ({what}) of {name} has {value.shape[1]} rows, but the layer now "
            f"stores {rows} and its attention uses {2 * used + 1}: the run cannot continue exactly; start a new run "
            f"from its weights instead (model.pretrained=<this checkpoint>, in another experiment.output_dir)"
        )
    if not moment:
        return fit_relative_table(value, reach)
    out = value.new_zeros(value.shape[0], rows)
    keep = min(have, reach)
    out[:, reach - keep : reach + keep + 1] = value[:, have - keep : have + keep + 1]
    return out


def fit_optimizer_state(
    model: nn.Module, optimizer, state: Dict[str, Any], source: str = "checkpoint"
) -> Dict[str, Any]:
    """``state`` (``optimizer.state_dict()`` of a checkpoint) with the per-parameter tensors of
    relative tables fitted to the model's table rows, so a run saved when local-span tables held
    only their span's rows resumes exactly (moments of the added rows are zero, as for rows that
    never had a gradient; Lookahead's slow weights extend as the weights do; step counts are
    per parameter and unchanged). A state that cannot continue exactly raises a UserError saying so."""
    tables = _table_parameters(model)
    if not tables or not isinstance(state, dict):
        return state
    lookahead = "lookahead_slow" in state
    base = state.get("base") if lookahead else state
    if not isinstance(base, dict) or "param_groups" not in base or "state" not in base:
        return state
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in base["param_groups"] for i in g.get("params", [])]
    if len(saved_ids) != len(params):
        return state  # the optimizer's own load_state_dict reports it
    fitted_base = dict(base, state=dict(base["state"]))
    for saved_id, p in zip(saved_ids, params):
        entry = tables.get(id(p))
        if entry is None:
            continue
        name, layer = entry
        per_param = base["state"].get(saved_id)
        if isinstance(per_param, dict):
            fitted_base["state"][saved_id] = {
                k: (
                    _fit_table_state(v, layer, name, k, source, moment=True)
                    if isinstance(v, torch.Tensor)
                    and v.dim() == 2
                    and v.shape[0] == p.shape[0]
                    and v.shape[1] != p.shape[1]
                    and v.shape[1] % 2
                    else v
                )
                for k, v in per_param.items()
            }
    if not lookahead:
        return fitted_base
    slow = list(state["lookahead_slow"])
    for index, p in enumerate(params):
        entry = tables.get(id(p))
        if entry is not None and index < len(slow):
            v = slow[index]
            if (
                isinstance(v, torch.Tensor)
                and v.dim() == 2
                and v.shape[0] == p.shape[0]
                and v.shape[1] != p.shape[1]
                and v.shape[1] % 2
            ):
                slow[index] = _fit_table_state(v, entry[1], entry[0], "Lookahead slow weights", source, moment=False)
    return dict(state, base=fitted_base, lookahead_slow=slow)


def read_checkpoint_info(path: str) -> Dict[str, Any]:
    """``info.json`` of a checkpoint folder, or beside its ``model.safetensors`` given as a file
    (empty dict for another bare weights file)."""
    path = resolve_checkpoint(path)
    if not os.path.isdir(path):
        if os.path.basename(path) not in (MODEL_FILE, EMA_FILE):
            return {}
        path = os.path.dirname(path) or "."
    file = os.path.join(path, INFO_FILE)
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, "r", encoding="utf-8") as f:
            info = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(
            f"{file}: corrupt checkpoint info, not valid JSON ({e}); restore it from a copy of the checkpoint"
        ) from None
    if not isinstance(info, dict):
        raise ValueError(f"{file}: corrupt checkpoint info, expected a JSON object, got {type(info).__name__}")
    return info


def checkpoint_config_path(path: str) -> Optional[str]:
    """The config.yaml saved with a checkpoint, if any."""
    path = resolve_checkpoint(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(folder, CONFIG_FILE)
    return file if os.path.isfile(file) else None
