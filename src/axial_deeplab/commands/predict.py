"""``axial-deeplab predict --checkpoint CKPT INPUT... --output DIR``: panoptic predictions for
image files and folders (COCO-panoptic PNG + JSON, and colour overlays)."""
from __future__ import annotations

import sys

from ..cli import UserError

EPILOG = """examples:
  axial-deeplab predict --checkpoint runs/demo photos/ street.jpg --output predictions/
  axial-deeplab predict --checkpoint runs/x/checkpoints/best img.png --output out --set eval.threshold=0.2
exit status: 0 when every image was processed, 1 when some could not be read (they are listed), 2 on bad input.
"""


def register(subparsers):
    import argparse

    p = subparsers.add_parser(
        "predict", help="predict panoptic segmentations for images or folders",
        description="Run a trained checkpoint on images (files, or folders searched recursively). Writes "
                    "OUTPUT/panoptic/<name>.png and OUTPUT/predictions.json in COCO-panoptic format and "
                    "OUTPUT/overlay/<name>.png (input beside the colour overlay with instance outlines). "
                    "Unreadable images are skipped and named at the end (exit status 1).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, model.safetensors, or run folder")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--config", "-c", default=None, help="config file (default: the one saved with the checkpoint)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable: --set eval.threshold=0.2 --set eval.flip=true")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the config's experiment.device)")
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay pictures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..engine.predict import collect_images, load_checkpoint_model, predict_images

    try:
        files = collect_images(args.inputs)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if not files:
        raise UserError(f"no image files found in {', '.join(args.inputs)}")
    overrides = list(args.set)
    if args.device:
        overrides.append(f"experiment.device={args.device}")
    device_name = args.device or "auto"
    device = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available() else
                          (device_name if device_name != "auto" else "cpu"))
    model, cfg, metadata = load_checkpoint_model(args.checkpoint, device, args.config, overrides)
    if cfg.experiment.task != "panoptic":
        raise UserError(f"{args.checkpoint}: predict needs a panoptic checkpoint (this one is {cfg.experiment.task})")
    report = predict_images(model, cfg, metadata, files, args.output, device, progress=not args.no_progress,
                            inputs=args.inputs, overlays=not args.no_overlays)
    print(f"{len(report.processed)} of {len(files)} images processed; predictions in {args.output} "
          f"(predictions.json, panoptic/, overlay/)")
    if report.failed:
        print(f"could not process {len(report.failed)} image(s):", file=sys.stderr)
        for path, reason in report.failed:
            print(f"  {reason}" if reason.startswith(path) else f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0
