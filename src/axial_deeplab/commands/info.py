"""``axial-deeplab info MODEL``: parameters and multiply-adds per stage and in total."""
from __future__ import annotations

from ..cli import UserError


def parse_input(text: str):
    try:
        dims = tuple(int(t) for t in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) == 3:
        dims = (1,) + dims
    if len(dims) != 4 or min(dims) < 1:
        raise UserError(f"--input must look like 3x224x224 (CxHxW) or 1x3x224x224, got {text!r}")
    return dims


def register(subparsers):
    p = subparsers.add_parser(
        "info", help="parameters and multiply-adds of a registered model",
        description="Print parameters and multiply-adds per stage and in total. Attention matmuls are "
                    "counted (common FLOP counters miss them). Use 'list' as MODEL to see all names.")
    p.add_argument("model", help="registered model name, e.g. axial_resnet_s or axial_deeplab_l")
    p.add_argument("--input", default="3x224x224", help="input size CxHxW (default 3x224x224)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the head")
    p.add_argument("--features-only", action="store_true", help="count the backbone without its classifier")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model overrides, e.g. span=65 output_stride=16")
    p.set_defaults(func=run)


def _parse_overrides(items):
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} must be KEY=VALUE")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def run(args) -> int:
    from ..models.complexity import build_on_meta, count_complexity
    from ..models import is_model, list_models

    if args.model == "list":
        print("\n".join(list_models()))
        return 0
    if not is_model(args.model):
        raise UserError(f"unknown model {args.model!r}; run 'axial-deeplab info list' to see the names")
    kwargs = _parse_overrides(args.set)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.features_only:
        kwargs["features_only"] = True
    shape = parse_input(args.input)
    model = build_on_meta(args.model, **kwargs)
    rows = count_complexity(model, shape)
    name_w = max(len(k) for k in rows) + 2
    print(f"{args.model}  input {'x'.join(map(str, shape))}")
    print(f"{'part':<{name_w}}{'params':>16}{'mult-adds':>20}")
    for k, v in rows.items():
        if k == "total":
            print("-" * (name_w + 36))
        print(f"{k:<{name_w}}{v['params']:>16,}{v['madds']:>20,}")
    t = rows["total"]
    print(f"total: {t['params'] / 1e6:.2f}M parameters, {t['madds'] / 1e9:.2f}G multiply-adds")
    return 0
