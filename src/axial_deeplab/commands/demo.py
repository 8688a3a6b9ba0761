"""``axial-deeplab demo``: train a small Axial-DeepLab on the built-in synthetic dataset on
the CPU, evaluate it on the held-out split, and leave pictures to look at.

The recipe is :data:`DEMO_RECIPE` (identical to the shipped config ``synthetic``, which a test
checks). Beyond the core install it needs matplotlib, the ``demo`` extra, for its plot.
"""

from __future__ import annotations

import os
import time

from ..cli import UserError

# A small Axial-DeepLab sized for 2 CPU cores and ~10 minutes; see axial_deeplab/configs/synthetic.yaml.
DEMO_RECIPE = {
    "experiment": {"name": "demo", "task": "panoptic", "seed": 0, "device": "cpu", "threads": 1},
    "model": {
        "name": "axial_deeplab_s",
        "kwargs": {
            "backbone": "axial_resnet_tiny",
            "layers": [1, 1, 1, 1],
            "width": 0.25,
            "stem": "conv",
            "stem_width": 0.25,
            "num_heads": 4,
            "span": None,
            "aspp_channels": 64,
            "semantic_decoder_channels": 64,
            "semantic_low_level_channels": [32, 16],
            "semantic_head_channels": 64,
            "instance_decoder_channels": 32,
            "instance_low_level_channels": [16, 8],
            "instance_head_channels": 16,
        },
    },
    "data": {
        "dataset": "synthetic",
        "options": {"image_size": 128, "train": {"length": 2000}, "val": {"length": 200}},
        "crop_size": [128, 128],
        "min_scale": 0.75,
        "max_scale": 1.25,
        "scale_step": 0.0,
        "flip": True,
        "photometric": False,
        "num_workers": 1,
        "eval_num_workers": 0,
    },
    "targets": {"sigma": 4.0, "small_instance_area": 256, "small_instance_weight": 3.0},
    "loss": {"semantic_top_k": 0.2, "center_weight": 200.0, "offset_weight": 0.01},
    "solver": {
        "optimizer": "adam",
        "lr": 2e-3,
        "weight_decay": 0.0,
        "warmup_steps": 50,
        "max_steps": 700,
        "batch_size": 8,
        "grad_clip_norm": 5.0,
        "amp": "none",
    },
    "train": {
        "log_every": 10,
        "checkpoint_every": 350,
        "keep_checkpoints": 1,
        "eval_every": 0,
        "eval_at_end": False,
        "image_every": 0,
        "tensorboard": True,
    },
    "eval": {"batch_size": 8, "threshold": 0.3, "nms_kernel": 13, "top_k": 50, "stuff_area": 64},
}

TIME_BUDGET_S = 600


def register(subparsers):
    import argparse

    p = subparsers.add_parser(
        "demo",
        help="train, evaluate and draw a small Axial-DeepLab on synthetic data (CPU, ~6 min)",
        description="Train a small Axial-DeepLab on the built-in synthetic panoptic dataset (digits, discs and "
        "rectangles over sky and ground), evaluate it on the held-out split, print the "
        "PQ/SQ/RQ/mIoU table, and write prediction overlays and the training-curve plot.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  axial-deeplab demo\n  axial-deeplab demo --output /tmp/demo solver.max_steps=100\n",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides with dotted keys")
    p.add_argument("--output", "-o", default=os.path.join("runs", "demo"), help="run folder (default runs/demo)")
    p.add_argument("--num-overlays", type=int, default=12, help="prediction pictures to write (default 12)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads (default 1: with a data worker beside it this uses the 2 cores "
        "without the thread contention that slows OpenMP down on a busy machine)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def demo_config(overrides=(), output=None, threads=None, progress=True):
    from ..engine.config import apply_overrides, config_from_dict

    data = apply_overrides(DEMO_RECIPE, overrides)
    data.setdefault("experiment", {})
    if output:
        data["experiment"]["output_dir"] = output
    if threads:
        data["experiment"]["threads"] = threads
    data.setdefault("train", {})["progress"] = progress
    return config_from_dict(data)


def run(args) -> int:
    import torch

    from ..engine.builders import build_dataset
    from ..engine.evaluate import evaluate_panoptic, format_results
    from ..engine.metrics_log import MetricsLogger, read_metrics
    from ..engine.predict import load_checkpoint_model
    from ..engine.train import train
    from ..engine.visualize import plot_training_curves
    from ..errors import require_extra

    # before minutes of training, not after them
    require_extra("matplotlib", "axial-deeplab demo (its training-curve plot)", "demo")
    t0 = time.time()
    cfg = demo_config(args.overrides, args.output, args.threads, progress=not args.no_progress)
    if cfg.data.dataset != "synthetic":
        raise UserError("the demo trains on the synthetic dataset; use 'axial-deeplab train' for other data")
    s = cfg.solver
    threads = cfg.experiment.threads or torch.get_num_threads()
    print(
        f"axial-deeplab demo: training {cfg.model.name} (small variant) on synthetic panoptic scenes, "
        f"{s.max_steps} steps of {s.batch_size} crops {cfg.data.crop_size[0]}x{cfg.data.crop_size[1]} "
        f"({threads} compute thread{'s' if threads > 1 else ''}, {cfg.data.num_workers} data worker"
        f"{'s' if cfg.data.num_workers != 1 else ''}), into {cfg.output_dir}",
        flush=True,
    )
    result = train(cfg, overwrite=True)
    t_train = time.time() - t0

    device = torch.device("cpu")
    model, cfg_loaded, metadata = load_checkpoint_model(result.last_checkpoint, device)
    cfg_loaded.train.progress = cfg.train.progress
    val = build_dataset(cfg_loaded, cfg_loaded.data.eval_split)
    overlay_dir = os.path.join(cfg.output_dir, "overlays")
    print(f"evaluating on the held-out split ({len(val)} images) ...", flush=True)
    metrics = evaluate_panoptic(
        model,
        val,
        cfg_loaded,
        device,
        metadata=metadata,
        progress=cfg.train.progress,
        desc="evaluate",
        overlay_dir=overlay_dir,
        num_overlays=args.num_overlays,
    )
    logger = MetricsLogger(cfg.output_dir, enabled=True, tensorboard=False)
    logger.log("eval", result.step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    logger.close()
    curves = os.path.join(cfg.output_dir, "training_curves.png")
    plot_training_curves(read_metrics(cfg.output_dir), curves, title="axial-deeplab demo (synthetic)")
    total = time.time() - t0

    print()
    print(f"held-out results ({metrics['num_images']} synthetic images):")
    print(format_results(metrics, metadata, per_class=True))
    print()
    print(
        f"time: {total / 60:.1f} min in all ({t_train / 60:.1f} min training, {total - t_train:.0f} s evaluating "
        f"and drawing)"
    )
    print(f"prediction overlays (input | prediction | ground truth): {overlay_dir}/")
    print(f"training curves: {curves}")
    print(f"checkpoint: {result.last_checkpoint}   metrics log: {os.path.join(cfg.output_dir, 'metrics.csv')}")
    print(
        f"predict on your own images: axial-deeplab predict --checkpoint {cfg.output_dir} IMAGES... "
        f"--output predictions/"
    )
    if total > TIME_BUDGET_S:
        print(f"note: the demo took longer than its {TIME_BUDGET_S // 60}-minute budget on this machine")
    return 0
