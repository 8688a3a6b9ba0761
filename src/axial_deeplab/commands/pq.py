"""``axial-deeplab pq``: score COCO-panoptic prediction files against ground-truth files with
panopticapi's rules and numbers, on all cores."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pq",
        help="panoptic quality of COCO-panoptic files (like panopticapi's pq_compute)",
        description=(
            "Scores predicted COCO-panoptic files (JSON + PNG folder) against ground-truth files with the "
            "rules of panopticapi's pq_compute and prints PQ / SQ / RQ for All, Things and Stuff."
        ),
    )
    p.add_argument("--gt-json", required=True, help="ground-truth COCO-panoptic JSON (with categories)")
    p.add_argument("--gt-folder", required=True, help="folder of the ground-truth PNGs")
    p.add_argument("--pred-json", required=True, help="prediction COCO-panoptic JSON")
    p.add_argument("--pred-folder", required=True, help="folder of the predicted PNGs")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results here (values in [0, 1])")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--per-class", action="store_true", help="print the per-class table too")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.panoptic_io import load_json, write_json
    from ..evaluation.panoptic_quality import format_pq_table
    from ..evaluation.pq_files import pq_compute_files

    if args.workers is not None and args.workers < 1:
        from ..cli import UserError

        raise UserError(f"--workers must be at least 1, got {args.workers}")
    results = pq_compute_files(args.gt_json, args.gt_folder, args.pred_json, args.pred_folder, workers=args.workers)
    names = None
    if args.per_class:
        names = {c["id"]: c["name"] for c in load_json(args.gt_json)["categories"]}
    print(format_pq_table(results, names))
    if args.json_out:
        write_json(args.json_out, results, indent=2)
        print(f"results written to {args.json_out}", file=sys.stderr)
    return 0
