"""Loading weights from local files only (safetensors, or torch.load with weights_only=True).

Also converts state dicts saved by the PyTorch ImageNet port (csrhddlam/axial-deeplab: keys such as
``layer1.0.hight_block.qkv_transform.weight``, ``...hight_block.relative``) into our layout, and fits
relative tables of any length to the model's (:func:`fit_relative_tables`), so any ImageNet checkpoint
loads into a model of any span.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Dict

import torch
from torch import nn


class CheckpointError(ValueError):
    pass


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (tensors only, never arbitrary pickles).

    Torch files may hold the state dict itself or wrap it under ``state_dict`` / ``model``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors' own error types; name the file
            raise CheckpointError(f"{path}: cannot be read as safetensors weights ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report which file and why
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({e})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def is_port_state_dict(sd: Dict[str, torch.Tensor]) -> bool:
    return any(".hight_block." in k or ".width_block." in k for k in sd)


_PORT_RENAMES = [
    (r"^conv1\.", "stem.0."),
    (r"^bn1\.", "stem.1."),
    (r"\.conv_down\.", ".conv1."),
    (r"\.conv_up\.", ".conv2."),
    (r"\.hight_block\.", ".attn_h."),
    (r"\.width_block\.", ".attn_w."),
    (r"\.qkv_transform\.", ".qkv."),
]


def convert_port_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map the PyTorch port's keys and tensor layouts onto ours.

    * ``qkv_transform`` is a Conv1d (C, Cin, 1): ours is a 1x1 Conv2d.
    * ``relative`` (2*d_v, 2K-1) stacks the q (d_v/2), k (d_v/2) and v (d_v) tables. The port
      indexes its q and v tables by (o - p) and its k table by (p - o); ours always use p - o,
      so the q and v tables are reversed along the offset axis.
    """
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in _PORT_RENAMES:
            new = re.sub(pattern, repl, new)
        if new.endswith(".qkv.weight") and value.dim() == 3:
            value = value.unsqueeze(-1)
        if new.endswith(".relative"):
            prefix = new[: -len("relative")]
            dv = value.shape[0] // 2
            q, k, v = value.split([dv // 2, dv // 2, dv], dim=0)
            out[prefix + "query_table"] = q.flip(-1).contiguous()
            out[prefix + "key_table"] = k.contiguous()
            out[prefix + "value_table"] = v.flip(-1).contiguous()
            continue
        if new.endswith("flatten_index"):
            continue  # a buffer derived from the input size; we compute indices on the fly
        out[new] = value
    return out


def fit_relative_tables(
    model: nn.Module, sd: Dict[str, torch.Tensor], source: str = "state dict"
) -> Dict[str, torch.Tensor]:
    """``sd`` with every relative table of an attention layer of ``model`` fitted to that layer's
    stored length (``PositionSensitiveAxialAttention.fit_table``): a span-sized table of an older
    checkpoint, the port's 2K-1 rows or another reach all load. Shorter tables extend by their edge
    rows (exactly the clipping they had), longer ones are centre-cropped (exact for local spans);
    one warning names the global-span layers whose outputs change on axes longer than their reach.
    Tables that are not (depth, odd length) of the layer's depth are left for the shape check."""
    from ..layers.axial_attention import TABLE_NAMES, PositionSensitiveAxialAttention

    out, cropped = dict(sd), []
    for name, module in model.named_modules():
        if not isinstance(module, PositionSensitiveAxialAttention):
            continue
        prefix = f"{name}." if name else ""
        for table_name, own in zip(TABLE_NAMES, module.relative_table_parameters()):
            table = sd.get(prefix + table_name)
            if (
                own is None
                or table is None
                or table.dim() != 2
                or table.shape[0] != own.shape[0]
                or table.shape[1] == own.shape[1]
                or table.shape[1] % 2 == 0
            ):
                continue
            out[prefix + table_name], note = module.fit_table(table_name, table)
            if note and (not cropped or cropped[-1][0] != name):
                cropped.append((name, note))
    if cropped:
        shown = "; ".join(f"{name}: {note}" for name, note in cropped[:3])
        more = f"; and {len(cropped) - 3} more layers" if len(cropped) > 3 else ""
        warnings.warn(
            f"{source}: relative tables longer than {len(cropped)} global-span layer(s) of "
            f"{type(model).__name__} can hold were centre-cropped ({shown}{more})",
            UserWarning,
            stacklevel=2,
        )
    return out


def load_state_dict_strict(model: nn.Module, sd: Dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load, raising an error that lists missing/unexpected keys and shape mismatches (relative
    tables of another length are fitted first: :func:`fit_relative_tables`)."""
    sd = fit_relative_tables(model, sd, source)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:

        def fmt(title, items):
            if not items:
                return ""
            shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            return f"\n  {title} ({len(items)}):\n    {shown}"

        raise CheckpointError(
            f"{source} does not match {type(model).__name__}:"
            + fmt("missing keys", missing)
            + fmt("unexpected keys", unexpected)
            + fmt("shape mismatches", mismatched)
        )
    model.load_state_dict(sd, strict=True)


def resolve_weights_file(path: str) -> str:
    """The weights file that ``path`` names: the path itself for a file; for a checkpoint folder
    its ``model.safetensors``; for a run folder (or its ``checkpoints/``) that of its ``best/``,
    else newest ``step-*/`` checkpoint, as ``predict`` and ``evaluate`` choose."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    from ..engine.checkpoint import MODEL_FILE, resolve_checkpoint

    found = resolve_checkpoint(path)  # FileNotFoundError naming the folder when it holds none
    return os.path.join(found, MODEL_FILE) if os.path.isdir(found) else found


def load_pretrained(model: nn.Module, path: str) -> nn.Module:
    """Load the weights of a file, checkpoint folder or run folder (see
    :func:`resolve_weights_file`) into ``model``, strictly (every key and shape must match)."""
    path = resolve_weights_file(path)
    sd = read_state_dict(path)
    if is_port_state_dict(sd):
        sd = convert_port_state_dict(sd)
    from ..engine.checkpoint import check_arrangement  # same keys, other function: refuse

    check_arrangement(model, path)
    load_state_dict_strict(model, sd, source=path)
    return model
