"""``axial-deeplab train --config FILE [key=value ...]``: train (or resume) a model.

Runs as one process, or as every process of ``torchrun --nproc-per-node N``.
"""

from __future__ import annotations

import os
import sys

from ..cli import UserError

EPILOG = """examples:
  axial-deeplab train --config synthetic
  axial-deeplab train --config cityscapes_axial_deeplab_l data.root=/data/cityscapes
  axial-deeplab train --config cityscapes_axial_deeplab_l --resume     # continue the run
  axial-deeplab train --config synthetic --resume-from runs/demo/checkpoints/step-000350
  torchrun --nproc-per-node 8 -m axial_deeplab.cli train --config coco_axial_deeplab_l \\
      data.root=/data/coco
  axial-deeplab train --print-defaults      # every config key, its default and its meaning

resuming: the config and overrides must be those of the run, except for logging, checkpoint and
evaluation cadence (train.*), evaluation settings (eval.*), data.root, worker and thread counts,
the device and the run folder's name; any other change is refused, listing it.
Ctrl-C saves a checkpoint of the last completed step and exits with status 130; --resume
continues from it. --overwrite deletes only a run folder (never a folder holding other files),
and only once the config, the data and the model have been checked.
"""


def register(subparsers):
    import argparse

    p = subparsers.add_parser(
        "train",
        help="train a model from a YAML config (single process or under torchrun)",
        description="Train Axial-DeepLab (panoptic) or an Axial-ResNet (ImageNet) from a YAML config. "
        "Overrides use dotted keys, e.g. solver.lr=1e-3 data.root=/data/cityscapes. "
        "solver.batch_size is the global batch: under torchrun it is split over the processes. "
        "Checkpoints, metrics.jsonl/csv, TensorBoard logs and the training-curve plot go to "
        "experiment.output_dir (default runs/<experiment.name>).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", help="a shipped config's name (axial-deeplab config list) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides with dotted keys")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint of the run folder (from scratch if it has none)",
    )
    p.add_argument(
        "--resume-from",
        metavar="CKPT",
        default=None,
        help="continue from the checkpoint folder CKPT (a step-*/ folder with training_state.pt)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the existing run folder and start over (refused for a folder that is not a run)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--print-defaults", action="store_true", help="print every key with default and doc, and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.config import describe_config, dump_config, load_config

    if args.print_defaults:
        print(describe_config(), end="")
        return 0
    if not args.config:
        raise UserError(
            "--config NAME|FILE is required (axial-deeplab config list names the shipped ones; "
            "--print-defaults lists the keys)"
        )
    _refuse_old_resume_spelling(args)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    resume = args.resume_from or args.resume
    if resume and args.overwrite:
        raise UserError(f"{'--resume-from' if args.resume_from else '--resume'} and --overwrite contradict each other")
    from ..engine.distributed import detect_env
    from ..engine.train import TrainingInterrupted, train

    try:
        result = train(cfg, resume=resume, overwrite=args.overwrite)
    except TrainingInterrupted as e:
        if detect_env().is_main:
            if e.checkpoint:
                how = (
                    "the same command with --resume in place of --resume-from"
                    if args.resume_from
                    else "the same command"
                    if args.resume
                    else "the same command plus --resume"
                )
                print(
                    f"axial-deeplab train: interrupted after step {e.step}; checkpoint saved: {e.checkpoint}; "
                    f"continue with {how}",
                    file=sys.stderr,
                )
            else:
                print("axial-deeplab train: interrupted before the first step; nothing saved", file=sys.stderr)
        return 130
    if detect_env().is_main:
        print(f"finished at step {result.step} in {result.seconds / 60:.1f} min; run folder: {result.run_dir}")
        if result.last_checkpoint:
            print(f"last checkpoint: {result.last_checkpoint}")
        if result.best_checkpoint:
            print(f"best checkpoint: {result.best_checkpoint} ({result.best_metric:.2f})")
    return 0


def _refuse_old_resume_spelling(args) -> None:
    """``--resume PATH`` (the old spelling) now parses as ``--resume`` and an override ``PATH``:
    refuse a word without '=' that names a path or a checkpoint, pointing at --resume-from."""
    for word in args.overrides:
        if "=" in word:
            continue
        if args.resume or os.path.exists(word) or os.sep in word or "step-" in word or word.endswith(".safetensors"):
            raise UserError(
                f"{word!r} is not a KEY=VALUE override; to resume from a given checkpoint use "
                f"--resume-from {word} (--resume alone continues the newest checkpoint of the run folder)"
            )
