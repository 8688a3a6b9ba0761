"""The tiny Axial-DeepLab run that the engine and fault tests train, evaluate and save (a few
seconds on one core): one base config, each test file stating only what it changes."""

import copy
import os
import socket
import subprocess
import sys

TINY_MODEL = {
    "name": "axial_deeplab_s",
    "kwargs": {
        "backbone": "axial_resnet_tiny",
        "layers": [1, 1, 1, 1],
        "width": 0.125,
        "stem": "conv",
        "stem_width": 0.125,
        "num_heads": 2,
        "span": None,
        "aspp_channels": 16,
        "semantic_decoder_channels": 16,
        "semantic_low_level_channels": [8, 8],
        "semantic_head_channels": 16,
        "instance_decoder_channels": 16,
        "instance_low_level_channels": [8, 8],
        "instance_head_channels": 8,
    },
}

TINY_BASE = {
    "experiment": {"name": "tiny", "seed": 3, "device": "cpu", "threads": 1},
    "model": TINY_MODEL,
    "data": {"dataset": "synthetic", "options": {"image_size": 64}, "crop_size": [64, 64], "num_workers": 0},
    "targets": {"sigma": 3.0, "small_instance_area": 128},
    "train": {"eval_every": 0, "tensorboard": False, "progress": False, "plot_curves": False},
    "eval": {"stuff_area": 16, "nms_kernel": 5, "top_k": 20},
}


def _merge(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def tiny_run(**sections) -> dict:
    """A fresh copy of :data:`TINY_BASE` with ``sections`` merged in (nested dicts key by key)."""
    return _merge(copy.deepcopy(TINY_BASE), sections)


def save_untrained_checkpoint(folder, config: dict) -> str:
    """A randomly initialised model of ``config`` (a :func:`tiny_run` dict) saved as the checkpoint
    folder ``folder`` with its config and classes, as ``train`` would write it; returns the path."""
    import torch

    from axial_deeplab.engine import checkpoint as ck
    from axial_deeplab.engine.builders import build_dataset, build_model, dataset_metadata
    from axial_deeplab.engine.config import config_from_dict, dump_config

    cfg = config_from_dict(copy.deepcopy(config))
    metadata = dataset_metadata(build_dataset(cfg, cfg.data.eval_split))
    torch.manual_seed(0)
    model = build_model(cfg, metadata)
    ck.save_checkpoint(str(folder), model, step=0, config_text=dump_config(cfg), info={"metadata": metadata.to_dict()})
    return str(folder)


# Child processes: one thread each and no warnings, so their output is the test's to read.
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(folder, worker_source: str, *args: str, nproc: int = 2, timeout: float = 240):
    """Write ``worker_source`` to ``folder/worker.py`` and run it as ``nproc`` processes under
    ``torch.distributed.run`` on a free local port, with ``args``; returns the finished
    :class:`subprocess.CompletedProcess` (text output captured)."""
    worker = os.path.join(str(folder), "worker.py")
    with open(worker, "w", encoding="utf-8") as f:
        f.write(worker_source)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), worker, *map(str, args)]
    return subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout)
