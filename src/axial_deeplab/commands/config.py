"""``axial-deeplab config list|show``: the recipes shipped in the package, and what one of them
(or any config file) trains after its ``base`` chain, defaults and overrides are applied."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  axial-deeplab config list
  axial-deeplab config show coco_axial_deeplab_s
  axial-deeplab config show synthetic solver.max_steps=100     # with overrides
  axial-deeplab config show --raw my_run.yaml                  # only the keys the files set
  axial-deeplab train --config coco_axial_deeplab_s data.root=/data/coco
"""


def register(subparsers):
    p = subparsers.add_parser(
        "config",
        help="list the shipped configs, or show one merged (axial-deeplab config list|show NAME)",
        description="The shipped configs are addressable by name wherever a config is taken "
        "(train/evaluate/convert --config NAME); a path to a YAML file works too.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="config_command", metavar="{list,show}")
    ls = sub.add_parser("list", help="name and one-line description of every shipped config")
    ls.set_defaults(func=run_list)
    show = sub.add_parser("show", help="the config after inheritance (and overrides), as YAML")
    show.add_argument("name", metavar="NAME", help="a shipped config's name or a YAML file")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides with dotted keys")
    show.add_argument(
        "--raw", action="store_true", help="only the keys the file and its bases set (no defaults, not validated)"
    )
    show.set_defaults(func=run_show)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def run_list(args) -> int:
    from ..engine.config import config_description, shipped_configs

    configs = shipped_configs()
    width = max((len(n) for n in configs), default=0)
    for name, path in configs.items():
        print(f"{name:<{width}}  {config_description(path)}")
    return 0


def run_show(args) -> int:
    import yaml

    from ..engine.config import apply_overrides, dump_config, load_config, read_config_data

    if args.raw:
        data = apply_overrides(read_config_data(args.name), args.overrides)
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=None), end="")
    else:
        print(dump_config(load_config(args.name, args.overrides)), end="")
    return 0
