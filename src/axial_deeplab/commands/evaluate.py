"""``axial-deeplab evaluate --checkpoint CKPT``: score a trained model on a dataset split and
print the PQ/SQ/RQ (All/Things/Stuff), mIoU and AP summary."""

from __future__ import annotations

from ..errors import UserError

EPILOG = """examples:
  axial-deeplab evaluate --checkpoint runs/cityscapes_axial_deeplab_l data.root=/data/cityscapes
  axial-deeplab evaluate --checkpoint runs/x/checkpoints/best --per-class eval.scales=[0.75,1.0,1.25] eval.flip=true
  axial-deeplab evaluate --checkpoint runs/x --map-classes-by-name data.options.val.json_path=other.json
  axial-deeplab evaluate --checkpoint runs/x --predictions preds/
      (then: axial-deeplab pq --gt-json ... --pred-json preds/predictions.json ...)
  torchrun --nproc-per-node 4 -m axial_deeplab.cli evaluate --checkpoint runs/x --config cityscapes_axial_deeplab_l
"""


def register(subparsers):
    import argparse

    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint (PQ/SQ/RQ, mIoU, AP or top-1/top-5)",
        description="Evaluate a checkpoint on the config's eval split. The config saved with the checkpoint is "
        "used unless --config is given; KEY=VALUE overrides apply on top (e.g. data.root=..., "
        "eval.compute_ap=true, eval.scales=[0.5,1.0,1.5] eval.flip=true for test-time augmentation).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder, its model.safetensors, or a run folder (uses best/, else newest)",
    )
    p.add_argument("--config", "-c", default=None, help="config file (default: the one saved with the checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides with dotted keys")
    p.add_argument("--split", default=None, help="dataset split (default: data.eval_split)")
    p.add_argument("--per-class", action="store_true", help="also print PQ and IoU per class")
    p.add_argument("--ap", action="store_true", help="also compute COCO mask AP (same as eval.compute_ap=true)")
    p.add_argument(
        "--map-classes-by-name",
        action="store_true",
        help="match the checkpoint's classes to the dataset's by name (same classes listed in another "
        "order or under other category ids); without it any difference in the classes is refused",
    )
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--json", default=None, metavar="FILE", help="write the metrics as JSON")
    p.add_argument(
        "--predictions",
        default=None,
        metavar="DIR",
        help="also write the predictions as DIR/predictions.json + DIR/panoptic/*.png (COCO panoptic, "
        "the dataset's own image and category ids, ground-truth size), ready for panopticapi, "
        "cityscapesscripts or `axial-deeplab pq`; one process only (not under torchrun)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="--predictions DIR already holds predictions: delete them (predictions.json, panoptic/ "
        "and overlay/ PNGs; nothing else) and write the new ones",
    )
    p.add_argument("--overlays", default=None, metavar="DIR", help="write input/prediction/ground-truth pictures")
    p.add_argument("--num-overlays", type=int, default=8, help="how many pictures for --overlays (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..engine.builders import build_dataset, compile_model
    from ..engine.distributed import cleanup_distributed, is_main_process
    from ..engine.evaluate import evaluate_model, format_results
    from ..engine.predict import load_checkpoint_model
    from ..engine.train import setup_runtime
    from ..fileio import atomic_write_json

    overrides = list(args.overrides)
    if args.replace and not args.predictions:
        raise UserError("--replace applies to --predictions DIR; give --predictions")
    if args.ap:
        overrides.append("eval.compute_ap=true")
    from ..engine.checkpoint import checkpoint_config_path, resolve_checkpoint
    from ..engine.config import load_config

    cfg_path = args.config or checkpoint_config_path(resolve_checkpoint(args.checkpoint))
    pre = load_config(cfg_path, overrides) if cfg_path else None
    env, device = setup_runtime(pre) if pre is not None else (None, None)
    if device is None:
        import torch

        device = torch.device("cpu")
    folder = None
    try:
        if args.predictions:
            from ..engine.distributed import get_world_size
            from ..engine.predict import OutputFolder

            if get_world_size() > 1:
                raise UserError(
                    f"--predictions {args.predictions}: prediction files are written by one process "
                    f"only; run evaluate --predictions without torchrun (the scores are the same)"
                )
            # checked and locked before the model loads, so a refused folder costs nothing
            folder = OutputFolder(
                args.predictions,
                "replace" if args.replace else "refuse",
                option="--predictions",
                command="evaluate",
                flags=("--replace",),
            )
        model, cfg, metadata = load_checkpoint_model(args.checkpoint, device, args.config, overrides)
        model = compile_model(model, cfg, inference=True)
        split = args.split or cfg.data.eval_split
        dataset = build_dataset(cfg, split)
        kw = {}
        if cfg.experiment.task == "panoptic":
            from ..engine.evaluate import dataset_label

            # the checkpoint's classes must mean what the dataset's mean (checked before any image)
            kw = {
                "map_classes_by_name": args.map_classes_by_name,
                "model_source": resolve_checkpoint(args.checkpoint),
                "dataset_source": dataset_label(dataset, split, cfg.data.dataset),
            }
            if args.overlays:
                kw.update(overlay_dir=args.overlays, num_overlays=args.num_overlays)
        if folder is not None:
            kw["predictions"] = folder
        metrics = evaluate_model(
            model,
            dataset,
            cfg,
            device,
            metadata=metadata,
            progress=not args.no_progress and is_main_process(),
            desc=f"evaluate {split}",
            max_images=args.max_images,
            **kw,
        )
        if is_main_process():
            print(f"{cfg.model.name} on {cfg.data.dataset}/{split}:")
            print(format_results(metrics, metadata, per_class=args.per_class or cfg.eval.per_class))
            if args.json:
                clean = {k: v for k, v in metrics.items() if not k.startswith("_") and k != "predictions_json"}
                if "_pq_results" in metrics:
                    clean["panoptic"] = metrics["_pq_results"]
                atomic_write_json(args.json, json.loads(json.dumps(clean, default=float)))
                print(f"metrics written to {args.json}")
            if args.overlays:
                print(f"pictures written to {args.overlays}")
            if folder is not None:
                print(f"predictions written to {metrics['predictions_json']} and {folder.path / 'panoptic'}")
    finally:
        if folder is not None:
            folder.close()
        cleanup_distributed()
    return 0
