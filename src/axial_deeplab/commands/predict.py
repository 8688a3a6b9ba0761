"""``axial-deeplab predict --checkpoint CKPT INPUT... --output DIR``: panoptic predictions for
image files and folders (COCO-panoptic PNG + JSON, and colour overlays)."""

from __future__ import annotations

import sys

from ..cli import UserError

EPILOG = """examples:
  axial-deeplab predict --checkpoint runs/demo photos/ street.jpg --output predictions/
  axial-deeplab predict --checkpoint runs/x/checkpoints/best img.png --output out --set eval.threshold=0.2
  axial-deeplab predict --checkpoint runs/demo more_photos/ --output predictions/ --add
  axial-deeplab predict --checkpoint runs/coco coco/val2017/ --output preds/ \
      --image-ids coco/annotations/panoptic_val2017.json   # ids of the ground truth, ready for `pq`

Image ids: with --image-ids each image gets the id that JSON's images[] lists for its file name
(its path relative to its input folder, else its base name), so the predictions pair up with
that ground truth; without it the ids are 1..N and images[].file_name says which image each is.

An output folder that already holds predictions is refused unless --add (the new images join
predictions.json; names already there are refused) or --replace (its predictions.json, panoptic/
and overlay/ PNGs are deleted first; nothing else). Files under the output folder are never read
as input. One run at a time per output folder (a second one stops at once).
exit status: 0 when every image was processed, 1 when some could not be read (they are listed), 2 on bad
input, an output folder in use or holding predictions, or a failed write (the files of the run are removed).
"""


def register(subparsers):
    import argparse

    p = subparsers.add_parser(
        "predict",
        help="predict panoptic segmentations for images or folders",
        description="Run a trained checkpoint on images (files, or folders searched recursively). Writes "
        "OUTPUT/panoptic/<name>.png and OUTPUT/predictions.json in COCO-panoptic format (integer "
        "image ids, images[].file_name relative to the input folder) and "
        "OUTPUT/overlay/<name>.png (input beside the colour overlay with instance outlines). "
        "Unreadable images are skipped and named at the end (exit status 1).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, model.safetensors, or run folder")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--config", "-c", default=None, help="config file (default: the one saved with the checkpoint)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable: --set eval.threshold=0.2 --set eval.flip=true",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: the config's experiment.device)")
    p.add_argument(
        "--image-ids",
        default=None,
        metavar="JSON",
        help="an image-info or ground-truth COCO JSON: each image gets the id its images[] lists for "
        "its file name (an image it does not list is refused)",
    )
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay pictures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    earlier = p.add_mutually_exclusive_group()
    earlier.add_argument(
        "--add", action="store_true", help="the output folder holds predictions: add these images to them"
    )
    earlier.add_argument(
        "--replace",
        action="store_true",
        help="the output folder holds predictions: delete them (predictions.json, panoptic/ and "
        "overlay/ PNGs; nothing else) and write the new ones",
    )
    p.set_defaults(func=run)


def run(args) -> int:

    from ..engine.predict import (
        OutputFolder,
        assign_image_ids,
        collect_images,
        load_checkpoint_model,
        predict_images,
        read_image_ids,
    )

    existing = "add" if args.add else "replace" if args.replace else "refuse"
    skipped = []
    try:
        files = collect_images(args.inputs, output_dir=args.output, skipped=skipped)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    own = f"{len(skipped)} file(s) under the output folder {args.output} skipped: predict never reads its own outputs"
    if not files:
        raise UserError(f"no image files found in {', '.join(args.inputs)}" + (f" ({own})" if skipped else ""))
    image_ids = None
    if args.image_ids:  # read and matched before anything is written or loaded
        source = f"--image-ids {args.image_ids}"
        image_ids = read_image_ids(args.image_ids)
        assign_image_ids(files, args.inputs, image_ids, source)
    overrides = list(args.set)
    if args.device:
        overrides.append(f"experiment.device={args.device}")
    from ..engine.distributed import resolve_device

    device = resolve_device(args.device or "auto", "--device")
    with OutputFolder(args.output, existing) as folder:  # checked and locked before the model loads
        if skipped:
            print(own, file=sys.stderr)
        model, cfg, metadata = load_checkpoint_model(args.checkpoint, device, args.config, overrides)
        if cfg.experiment.task != "panoptic":
            raise UserError(
                f"{args.checkpoint}: predict needs a panoptic checkpoint (this one is {cfg.experiment.task})"
            )
        report = predict_images(
            model,
            cfg,
            metadata,
            files,
            args.output,
            device,
            progress=not args.no_progress,
            inputs=args.inputs,
            overlays=not args.no_overlays,
            folder=folder,
            image_ids=image_ids,
        )
    added = f", added to the {len(folder.previous['annotations'])} earlier ones" if folder.previous else ""
    print(
        f"{len(report.processed)} of {len(files)} images processed; predictions in {args.output} "
        f"(predictions.json, panoptic/, overlay/{added})"
    )
    if report.failed:
        print(f"could not process {len(report.failed)} image(s):", file=sys.stderr)
        for path, reason in report.failed:
            print(f"  {reason}" if reason.startswith(path) else f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0
