"""Distributed training under ``torchrun``: environment detection, process-group set-up
(NCCL on GPU, gloo on CPU), DDP wrapping, and helpers for rank-0-only writes and for
reducing metric statistics across processes. Synchronised BatchNorm is a layer:
:func:`axial_deeplab.layers.sync_batchnorm.convert_sync_batchnorm`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistEnv",
    "DEVICE_CHOICES",
    "resolve_device",
    "detect_env",
    "init_distributed",
    "cleanup_distributed",
    "is_dist",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "broadcast_object",
    "all_gather_objects",
    "all_reduce_tensor",
    "reduce_evaluator_states",
    "wrap_ddp",
    "split_batch_size",
]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env() -> DistEnv:
    """Read torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""

    def _int(name, default):
        v = os.environ.get(name)
        return int(v) if v not in (None, "") else default

    world = _int("WORLD_SIZE", 1)
    return DistEnv(
        rank=_int("RANK", 0),
        world_size=world,
        local_rank=_int("LOCAL_RANK", 0),
        local_world_size=_int("LOCAL_WORLD_SIZE", world),
    )


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: Optional[str], setting: str = "experiment.device", local_rank: int = 0) -> torch.device:
    """The torch device for a device setting: 'auto' (CUDA if present, else CPU), 'cpu',
    'cuda' (``cuda:local_rank``), 'cuda:N' or 'mps'. A name PyTorch cannot serve here raises
    a :class:`~axial_deeplab.errors.UserError` naming ``setting`` and what is missing, before
    any model is built."""
    from ..errors import UserError

    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"{setting}={name}: this PyTorch has no MPS (Apple GPU) device; use cpu or auto")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index = local_rank
        if text != "cuda":
            try:
                index = int(text[5:])
            except ValueError:
                index = -1
            if index < 0:
                raise UserError(f"{setting}={name}: not a device; choose {DEVICE_CHOICES} (N a GPU number)")
        if not torch.cuda.is_available():
            why = (
                "this PyTorch is built without CUDA"
                if torch.version.cuda is None
                else "no GPU is visible to PyTorch (check the driver and CUDA_VISIBLE_DEVICES)"
            )
            raise UserError(f"{setting}={name}: {why}; use cpu or auto")
        count = torch.cuda.device_count()
        if text != "cuda" and index >= count:
            raise UserError(
                f"{setting}={name}: there {'is' if count == 1 else 'are'} only {count} GPU(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
        return torch.device("cuda", index % max(count, 1))
    raise UserError(f"{setting}={name}: unknown device; choose {DEVICE_CHOICES}")


def init_distributed(device_kind: str = "auto", timeout_s: float = 1800.0) -> tuple:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1).

    Returns ``(env, device)``. GPU processes use NCCL and ``cuda:LOCAL_RANK``; CPU processes
    use gloo. Safe to call in a single process (no group is created). An unusable
    ``device_kind`` raises a UserError naming ``experiment.device``.
    """
    env = detect_env()
    device = resolve_device(device_kind, "experiment.device", env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {}
        if device.type == "cuda":
            kwargs["device_id"] = device
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        except TypeError:  # older torch without device_id
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return env, device


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> List[Any]:
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_tensor(t: torch.Tensor, op=None, average: bool = False) -> torch.Tensor:
    """Sum (or average) a tensor over processes; returns the input unchanged when alone."""
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    if average:
        t = t / dist.get_world_size()
    return t


def reduce_evaluator_states(evaluator) -> None:
    """Merge every process's evaluator statistics into every process's evaluator.

    Uses the evaluator's ``state()`` / ``merge(state)`` (sums of counts), so the result
    equals one process evaluating the whole dataset.
    """
    if not is_dist():
        return
    states = all_gather_objects(evaluator.state())
    me = get_rank()
    for r, st in enumerate(states):
        if r != me:
            evaluator.merge(st)


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel when in a process group, the model itself otherwise."""
    if not is_dist():
        return model
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index], output_device=device.index, find_unused_parameters=find_unused_parameters
        )
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


def split_batch_size(global_batch: int, world_size: int, what: str = "solver.batch_size") -> int:
    """Per-process batch for a global batch; the global batch must divide evenly."""
    if global_batch % world_size:
        raise ValueError(
            f"{what}={global_batch} is the global batch and must be divisible by the number of processes ({world_size})"
        )
    return global_batch // world_size


def run_on_main(fn: Callable, *args, **kwargs) -> Optional[Any]:
    """Call ``fn`` on rank 0 only (file writes), then wait for everyone."""
    result = fn(*args, **kwargs) if is_main_process() else None
    barrier()
    return result
