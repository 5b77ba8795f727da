"""`dalpsr eval`: score a folder of results with pyiqa metrics (paired with GT by file stem)."""

from __future__ import annotations

import sys

from dalpsr.batch import Shard
from dalpsr.commands._common import (
    EVAL_EXIT_CODES,
    add_protocol_args,
    metric_names,
    protocol_from_args,
    report_problems,
)
from dalpsr.evaluation.evaluate import evaluate_folder, protocol_line, write_eval_outputs
from dalpsr.evaluation.tables import markdown_table

DEFAULT_FR = ["psnr", "ssim"]


def add_commands(subparsers) -> None:
    """Register `dalpsr eval`."""
    p = subparsers.add_parser(
        "eval",
        help="score a folder of results with pyiqa metrics",
        description="Score predictions (paired with GT by file stem) with pyiqa metrics. Under `accelerate launch -m "
        "dalpsr eval ...` the images are split over the processes and the main process writes the results. "
        + EVAL_EXIT_CODES,
    )
    p.add_argument("--pred", required=True, help="folder of predicted images")
    p.add_argument("--gt", default=None, help="folder of ground-truth images (same stems)")
    p.add_argument("--out", default=None, help="write per_image.csv, summary.json and table.md here")
    add_protocol_args(p)
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    shard = Shard.current()
    try:
        args.device = str(shard.device(args.device))
        result = evaluate_folder(
            args.pred,
            args.gt,
            metric_names(args.metrics),
            protocol_from_args(args),
            args.weights_dir,
            progress=not args.no_progress,
            shard=shard,
        )
    except (ValueError, TypeError, ImportError) as err:  # ImportError: the metrics extra is not installed
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not shard.is_main:  # the main process reports for all
        return 0 if not result.metric_errors and not result.skipped and not result.cell_errors and result.n else 1
    clean = report_problems(result)
    for stem, why in result.skipped.items():
        print(f"skipped {stem}: {why}", file=sys.stderr)
    for key, why in result.cell_errors.items():
        print(f"failed {key}: {why}", file=sys.stderr)
    clean = clean and not result.skipped and not result.cell_errors and result.n > 0
    print(markdown_table({"pred": result.means}, result.lower_better), end="")
    print(protocol_line(result.protocol, result.n))
    if args.out:
        write_eval_outputs(result, args.out)
        print(f"wrote {args.out}/per_image.csv, summary.json, table.md")
    return 0 if clean else 1
