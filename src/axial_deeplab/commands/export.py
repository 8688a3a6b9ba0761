"""``axial-deeplab export``: a checkpoint or a registered model as ONNX, ExportedProgram (.pt2)
or TorchScript, verified against the eager model before it is written."""

from __future__ import annotations

from ..cli import UserError

EPILOG = """examples:
  axial-deeplab export --checkpoint runs/demo --format onnx --output demo.onnx
  axial-deeplab export --checkpoint runs/demo --format exported-program --output demo.pt2 --input 3x512x512
  axial-deeplab export --model axial_resnet_s --format torchscript --output resnet.pt --static

Dynamic exports (the default for onnx and exported-program) take any H and W that are multiples of
32 (64 to 4096); the example --input must be such a size. --static fixes the file to --input.
TorchScript is traced at --input and verified at that size. Panoptic models output
semantic_logits, center_heatmap and offset_map; the panoptic post-processing stays in Python.
The file is checked (loaded, run, compared with the eager model) before it replaces anything;
an existing --output is refused unless --force.
exit status: 0 written and verified; 2 bad input or a file that did not match (nothing written).
"""


def register(subparsers):
    import argparse

    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX, ExportedProgram (.pt2) or TorchScript",
        description="Export a trained checkpoint (or a registered model with fresh weights) for deployment. "
        "The attention layers run their exportable decomposition (standard operators only).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint folder, model.safetensors, or run folder")
    src.add_argument("--model", help="registered model name (random weights unless --weights)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the head (with --model)")
    p.add_argument("--weights", default=None, help="local weights file for --model")
    p.add_argument("--format", "-f", required=True, help="onnx, exported-program or torchscript")
    p.add_argument("--output", "-o", required=True, help="file to write (.onnx, .pt2, .pt)")
    p.add_argument("--input", default="3x224x224", help="example input size CxHxW (default 3x224x224)")
    dyn = p.add_mutually_exclusive_group()
    dyn.add_argument(
        "--dynamic",
        dest="dynamic",
        action="store_true",
        default=True,
        help="any H and W that are multiples of 32 (default; onnx and exported-program)",
    )
    dyn.add_argument("--static", dest="dynamic", action="store_false", help="fix the file to --input")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; default 18)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    p.add_argument("--config", "-c", default=None, help="config file (default: the one saved with the checkpoint)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override for --checkpoint, repeatable"
    )
    p.set_defaults(func=run)


def _parse_input(text: str):
    try:
        dims = tuple(int(t) for t in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 3 or dims[0] != 3 or min(dims) < 1:
        raise UserError(f"--input must look like 3x224x224 (3xHxW), got {text!r}")
    return dims


def run(args) -> int:
    import torch

    from ..engine.export import FORMATS, export_model

    if args.format not in FORMATS:
        raise UserError(f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}")
    shape = _parse_input(args.input)
    if args.checkpoint:
        from ..engine.predict import load_checkpoint_model

        try:
            model, _, _ = load_checkpoint_model(args.checkpoint, torch.device("cpu"), args.config, args.set)
        except FileNotFoundError as e:
            raise UserError(str(e).strip("'\"")) from None
    else:
        from ..models.registry import create_model, list_models

        if args.model not in list_models():
            raise UserError(f"unknown model {args.model!r}; see 'axial-deeplab info list'")
        kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
        model = create_model(args.model, pretrained=args.weights, **kwargs)
    report = export_model(
        model, args.format, args.output, shape, dynamic=args.dynamic, opset=args.opset, overwrite=args.force
    )
    checked = ", ".join(f"{h}x{w}: {d:.1e}" for (h, w), d in report.max_rel_diff.items())
    sizes = "H, W multiples of 32" if report.dynamic else "x".join(map(str, report.input_shape))
    print(
        f"wrote {report.path} ({args.format}, input {sizes}, outputs {', '.join(report.output_names)}) in "
        f"{report.export_seconds:.1f} s; verified against eager (max relative difference {checked})"
    )
    return 0
