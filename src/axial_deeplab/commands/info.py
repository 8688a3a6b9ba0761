"""``axial-deeplab info MODEL``: parameters and multiply-adds per stage and in total, beside the
paper's figure for the models it tabulates; ``--attention``: which attention path each distinct
layer configuration runs, and why."""

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
        "info",
        help="parameters and multiply-adds of a registered model",
        description="Print parameters and multiply-adds per stage and in total. Attention matmuls are "
        "counted (common FLOP counters miss them). For the models the paper tabulates "
        "(Axial-DeepLab-S/M/L/XL at 3x1025x2049, Table 7's spans of L, ResNet-50 and "
        "Axial-ResNet-S at 3x224x224) the paper's figure and the difference follow. "
        "Use 'list' as MODEL to see all names.",
    )
    p.add_argument("model", help="registered model name, e.g. axial_resnet_s or axial_deeplab_l")
    p.add_argument("--input", default="3x224x224", help="input size CxHxW (default 3x224x224)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the head")
    p.add_argument("--features-only", action="store_true", help="count the backbone without its classifier")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="model overrides, e.g. span=65 output_stride=16"
    )
    p.add_argument(
        "--strided-attention",
        choices=("kept", "computed"),
        default="kept",
        help="M-Adds of a strided attention layer: the queries it keeps (what runs here, default) "
        "or every query, subsampled afterwards (what deeplab2 computes)",
    )
    p.add_argument(
        "--attention",
        action="store_true",
        help="instead of the counts, show for each distinct attention layer configuration the path "
        "that runs (impl='auto' unless forced by AXIAL_DEEPLAB_ATTENTION_IMPL) and why the faster "
        "ones were refused",
    )
    p.add_argument("--train", action="store_true", help="with --attention: a training step (default: inference)")
    p.add_argument("--device", default="cpu", help="with --attention: the device to decide for (default cpu)")
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
    from ..models import is_model, list_models
    from ..models.complexity import build_on_meta, count_complexity

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
    if args.attention:
        print(attention_report(model, shape, train=args.train, device=args.device, name=args.model))
        return 0
    rows = count_complexity(model, shape, strided_attention=args.strided_attention)
    name_w = max(len(k) for k in rows) + 2
    print(f"{args.model}  input {'x'.join(map(str, shape))}")
    print(f"{'part':<{name_w}}{'params':>16}{'mult-adds':>20}")
    for k, v in rows.items():
        if k == "total":
            print("-" * (name_w + 36))
        print(f"{k:<{name_w}}{v['params']:>16,}{v['madds']:>20,}")
    t = rows["total"]
    print(f"total: {t['params'] / 1e6:.2f}M parameters, {t['madds'] / 1e9:.2f}G multiply-adds")
    comparison = paper_comparison(args.model, kwargs, shape, t)
    if comparison:
        print(comparison)
    return 0


def paper_comparison(name, kwargs, shape, total) -> str:
    """Our totals beside the paper's figure for the same model and input, with the difference in
    percent; a hint when the paper tabulates the model at another input size; '' when it does not."""
    from ..models.complexity import paper_figure, percent_diff

    fig = paper_figure(name, kwargs)
    if fig is None or kwargs.get("features_only"):
        return ""
    h, w = fig.input_size
    if tuple(shape) != (1, 3, h, w):
        return (
            f"paper ({fig.source}): {fig.params_m}M parameters, {fig.madds_b}B M-Adds at 3x{h}x{w}; "
            f"rerun with --input 3x{h}x{w} to compare"
        )
    params, madds = total["params"] / 1e6, total["madds"] / 1e9
    return "\n".join(
        [
            f"{'':<12}{'params (M)':>12}{'M-Adds (B)':>14}   vs paper ({fig.source}, 3x{h}x{w})",
            f"{'ours':<12}{params:>12.2f}{madds:>14.{2 if madds < 100 else 1}f}",
            f"{'paper':<12}{fig.params_m:>12.1f}{fig.madds_b:>14.1f}",
            f"{'difference':<12}{percent_diff(params, fig.params_m):>+11.1f}%"
            f"{percent_diff(madds, fig.madds_b):>+13.1f}%",
        ]
    )


def attention_report(model, shape, train: bool = False, device: str = "cpu", name: str = "") -> str:
    """What :func:`axial_deeplab.layers.explain` says for each distinct attention layer
    configuration of ``model`` (on the meta device) at input ``shape`` (B, C, H, W). The input
    sizes each layer sees come from one forward on meta tensors; each distinct layer is then
    explained as an uninitialised copy on ``device`` (nothing runs there)."""
    import copy

    import torch

    from ..layers import PositionSensitiveAxialAttention, axial_attention_reference, explain

    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {device!r} is not usable here: {str(e).splitlines()[0]}") from None
    seen = {}  # (configuration, input channels) -> [(module name, input size)]: no check reads H or W
    layers = {}
    originals = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, PositionSensitiveAxialAttention):

            def record(x, _m=mod, _n=mod_name):
                key = (_m.extra_repr(), int(x.shape[1]))
                seen.setdefault(key, []).append((_n, tuple(x.shape[1:])))
                layers.setdefault(key, _m)
                return axial_attention_reference(_m, x)  # sizes only: meta tensors hold no values

            originals[mod] = mod.forward
            mod.forward = record
    was_training = model.training
    try:
        model.train()  # the raw forward path (no post-processing)
        with torch.no_grad():
            model(torch.zeros(shape, device="meta"))
    finally:
        for mod, forward in originals.items():
            mod.forward = forward
        model.train(was_training)
    mode = "training step" if train else "inference"
    out = [
        f"{name}  input {'x'.join(map(str, shape))}  {mode} on {dev}: "
        f"{len(seen)} distinct attention layer configuration(s), {sum(map(len, seen.values()))} layers"
    ]
    for i, (key, names) in enumerate(seen.items(), 1):
        twin = copy.deepcopy(layers[key]).to_empty(device=dev).train(train)
        x = torch.empty((shape[0],) + names[0][1], device=dev)
        with torch.set_grad_enabled(train):
            text = explain(twin, x)
        more = f" and {len(names) - 1} more like it" if len(names) > 1 else ""
        out.append("")
        out.append(f"[{i}] {names[0][0]}{more}")
        out.extend("    " + line for line in text.splitlines())
    return "\n".join(out)
