"""``axial-deeplab train --config FILE [key=value ...]``: train (or resume) a model.

Runs as one process, or as every process of ``torchrun --nproc-per-node N``.
"""
from __future__ import annotations

from ..cli import UserError

EPILOG = """examples:
  axial-deeplab train --config configs/synthetic.yaml
  axial-deeplab train --config configs/cityscapes_axial_deeplab_l.yaml data.root=/data/cityscapes
  axial-deeplab train --config configs/cityscapes_axial_deeplab_l.yaml --resume     # continue the run
  torchrun --nproc-per-node 8 -m axial_deeplab.cli train --config configs/coco_axial_deeplab_l.yaml \\
      data.root=/data/coco
  axial-deeplab train --print-defaults      # every config key, its default and its meaning
"""


def register(subparsers):
    import argparse

    p = subparsers.add_parser(
        "train", help="train a model from a YAML config (single process or under torchrun)",
        description="Train Axial-DeepLab (panoptic) or an Axial-ResNet (ImageNet) from a YAML config. "
                    "Overrides use dotted keys, e.g. solver.lr=1e-3 data.root=/data/cityscapes. "
                    "solver.batch_size is the global batch: under torchrun it is split over the processes. "
                    "Checkpoints, metrics.jsonl/csv, TensorBoard logs and the training-curve plot go to "
                    "experiment.output_dir (default runs/<experiment.name>).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides with dotted keys")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from the newest checkpoint of the run folder (or from CKPT)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run folder and start over")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--print-defaults", action="store_true", help="print every key with default and doc, and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.config import describe_config, dump_config, load_config

    if args.print_defaults:
        print(describe_config(), end="")
        return 0
    if not args.config:
        raise UserError("--config FILE is required (see configs/, or --print-defaults for the keys)")
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other")
    from ..engine.distributed import detect_env
    from ..engine.train import train

    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if detect_env().is_main:
        print(f"finished at step {result.step} in {result.seconds / 60:.1f} min; run folder: {result.run_dir}")
        if result.last_checkpoint:
            print(f"last checkpoint: {result.last_checkpoint}")
        if result.best_checkpoint:
            print(f"best checkpoint: {result.best_checkpoint} ({result.best_metric:.2f})")
    return 0
