"""``axial-deeplab convert``: a deeplab2 (TensorFlow 2) checkpoint as our checkpoint folder,
read without TensorFlow, with a report of every tensor mapped and every one left out."""

from __future__ import annotations

from ..cli import UserError

EPILOG = """examples:
  axial-deeplab convert --from deeplab2 ckpt/ckpt-60000 --model axial_deeplab_swidernet_1_1_1_cityscapes \\
      --output runs/from_deeplab2 --config cityscapes_base --set "model.kwargs={}" --set eval.top_k=400
  axial-deeplab convert --from deeplab2 ckpt/ --model axial_swidernet_1_1_1 --output DIR \\
      --set model.kwargs.features_only=true

CKPT is a checkpoint prefix (ckpt-N, next to ckpt-N.index and ckpt-N.data-*), its .index file, or a
folder with TensorFlow's 'checkpoint' file (its latest checkpoint). Optimizer slots and variables,
step counters and the object graph are left out; every weight of the model must come from the
checkpoint, else nothing is written and the missing keys are listed. The model is built with the
config's model.kwargs (--config, --set), as evaluate and predict rebuild it. The output folder holds
model.safetensors, config.yaml and info.json, like a training checkpoint: pass it to evaluate,
predict or export, or as model.pretrained. An existing --output is refused unless --force.
exit status: 0 written; 2 bad input or a checkpoint that does not fit the model (nothing written).
"""


def register(subparsers):
    import argparse

    p = subparsers.add_parser(
        "convert",
        help="convert a deeplab2 (TensorFlow) checkpoint into a checkpoint folder",
        description="Convert a TensorFlow 2 checkpoint of deeplab2 into our checkpoint folder "
        "(safetensors + config). TensorFlow is not needed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint prefix, .index file, or folder")
    p.add_argument("--from", dest="source", required=True, help="where the checkpoint comes from: deeplab2")
    p.add_argument("--model", required=True, help="registered model name to convert into")
    p.add_argument("--output", "-o", required=True, help="checkpoint folder to write")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the head (default: the model's; Cityscapes for panoptic models)",
    )
    p.add_argument(
        "--config",
        "-c",
        default=None,
        help="config to save with the weights (default: the defaults, with model.name=MODEL)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    p.add_argument("--quiet", "-q", action="store_true", help="print the summary only, not every tensor")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from ..convert.core import convert_weights
    from ..convert.deeplab2 import mapped_models, mapping_for
    from ..convert.tf_checkpoint import read_tf_checkpoint, resolve_tf_checkpoint
    from ..engine.checkpoint import save_checkpoint
    from ..engine.config import dump_config, load_config
    from ..models.registry import create_model, list_models
    from ..models.weights import load_state_dict_strict

    if args.source != "deeplab2":
        raise UserError(f"--from {args.source!r} is not supported; the one source is deeplab2")
    if args.model not in list_models():
        raise UserError(f"unknown model {args.model!r}; see 'axial-deeplab info list'")
    try:
        mapping = mapping_for(args.model)
    except KeyError:
        have = ", ".join(mapped_models()) or "none yet"
        raise UserError(f"no deeplab2 mapping for model {args.model!r}; models with one: {have}") from None
    if os.path.lexists(args.output) and not args.force:
        raise UserError(f"{args.output} exists; choose another --output or pass --force to replace it")

    prefix = resolve_tf_checkpoint(args.checkpoint)
    tensors = read_tf_checkpoint(prefix)
    cfg = load_config(args.config, args.set)
    # built with the config's model.kwargs, as evaluate / predict will rebuild it from the saved config
    model, task, info = _build(args, create_model, dict(cfg.model.kwargs))
    state, report = convert_weights(tensors, model, mapping, source=prefix + ".index")
    load_state_dict_strict(model, state, source=prefix)

    cfg.model.name = args.model
    cfg.model.pretrained = None
    cfg.experiment.task = task
    if args.num_classes is not None:
        cfg.model.kwargs["num_classes"] = args.num_classes
    info.update(
        {
            "converted_from": os.path.abspath(prefix),
            "source": "deeplab2",
            "mapped": len(report.mapped),
            "left_out": len(report.left_out),
        }
    )
    path = save_checkpoint(args.output, model, step=0, config_text=dump_config(cfg), info=info)
    lines = report.lines()
    if args.quiet:
        lines = [line for line in lines if not line.startswith("  ")]
    print("\n".join(lines))
    print(f"wrote {path} ({args.model}, {len(report.mapped)} tensors from {prefix})")
    return 0


def _build(args, create_model, kwargs=None):
    """(model, task, info) for ``--model`` with the config's ``model.kwargs``: panoptic models get
    Cityscapes' classes unless --num-classes (deeplab2's published panoptic checkpoints are Cityscapes')."""
    from ..models.panoptic_deeplab import PanopticDeepLab

    kwargs = dict(kwargs or {})
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    try:
        model = create_model(args.model, **kwargs)
    except TypeError as e:
        raise UserError(f"model.kwargs: {args.model} does not accept these arguments ({e})") from None
    if isinstance(model, PanopticDeepLab):
        from ..data.meta import cityscapes_metadata

        metadata = cityscapes_metadata()  # the panoptic models' default classes
        same = model.num_classes == metadata.num_classes and model.class_names in (None, metadata.class_names)
        return model, "panoptic", ({"metadata": metadata.to_dict()} if same and args.num_classes is None else {})
    classes = getattr(model, "num_classes", None)
    return model, "classification", {"classes": [str(i) for i in range(classes)] if classes else []}
