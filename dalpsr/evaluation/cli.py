"""`dalpsr eval` and `dalpsr compare`: metric tables and comparison grids from folders of images.

Exit codes: 0 when every requested metric scored every paired image; 1 when something was left out (a
metric without weights, a skipped image, a failed score; the outputs are still written); 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import math
import sys

DEFAULT_FR = ["psnr", "ssim"]


def _add_protocol_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help="pyiqa metric names, e.g. psnr ssim lpips dists niqe musiq maniqa clipiqa topiq_nr "
        "(default: psnr ssim with --gt, niqe without). Comma-separated lists work too.",
    )
    p.add_argument(
        "--weights-dir",
        default=None,
        help="TORCH_HOME-style folder holding hub/pyiqa/<file>, hub/checkpoints/<file>, hub/clip/<file> "
        "(default: $DALPSR_IQA_WEIGHTS, else $TORCH_HOME, else ~/.cache/torch). Nothing is downloaded.",
    )
    p.add_argument("--color", choices=("y", "rgb"), default="y", help="psnr/ssim/ms_ssim channel (default y)")
    p.add_argument(
        "--color-space",
        choices=("ycbcr", "yiq"),
        default="ycbcr",
        help="luminance definition for --color y: BT.601 YCbCr (default, as BasicSR) or YIQ (pyiqa's default)",
    )
    p.add_argument("--crop-border", type=int, default=4, help="pixels cropped per edge for FR metrics (default 4)")
    p.add_argument("--no-round", action="store_true", help="do not round inputs to 8-bit levels")
    p.add_argument(
        "--size-mismatch",
        choices=("skip", "crop", "resize"),
        default="skip",
        help="prediction vs GT size differs: skip the image (default), crop both to the common top-left "
        "region, or resize the prediction to the GT (bicubic)",
    )
    p.add_argument("--device", default="cpu", help="torch device for the metric networks (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_commands(subparsers) -> None:
    """Register `dalpsr eval` and `dalpsr compare`."""
    p = subparsers.add_parser(
        "eval",
        help="score a folder of results with pyiqa metrics",
        description="Score predictions (paired with GT by file stem) with pyiqa metrics. " + __doc__.split("\n\n")[1],
    )
    p.add_argument("--pred", required=True, help="folder of predicted images")
    p.add_argument("--gt", default=None, help="folder of ground-truth images (same stems)")
    p.add_argument("--out", default=None, help="write per_image.csv, summary.json and table.md here")
    _add_protocol_args(p)
    p.set_defaults(func=run_eval)

    c = subparsers.add_parser(
        "compare",
        help="compare methods: one metric table plus image grids",
        description="Compare several methods on the images they share. " + __doc__.split("\n\n")[1],
    )
    c.add_argument(
        "--method", action="append", required=True, metavar="NAME=DIR", help="a method and its output folder"
    )
    c.add_argument("--gt", default=None, help="folder of ground-truth images")
    c.add_argument("--lr", default=None, help="folder of LR inputs (first grid column)")
    c.add_argument("--out", required=True, help="output folder: table.md, summary.json, per_image.csv, grids/")
    c.add_argument(
        "--grid", action="append", default=None, metavar="STEM", help="image stem to draw a grid for (repeatable)"
    )
    c.add_argument(
        "--grid-count",
        type=int,
        default=1,
        help="without --grid: draw this many grids, for the images whose scores differ most across methods",
    )
    c.add_argument(
        "--region",
        action="append",
        default=None,
        metavar="TOP,LEFT,SIZE",
        help="crop region in GT pixels (repeatable); default: picked where methods disagree most",
    )
    c.add_argument("--num-regions", type=int, default=2, help="auto-picked regions per grid (default 2)")
    c.add_argument("--crop-size", type=int, default=None, help="side of auto-picked regions in GT pixels")
    c.add_argument("--panel-width", type=int, default=256, help="panel width in the grid (default 256)")
    _add_protocol_args(c)
    c.set_defaults(func=run_compare)


def _metric_names(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def _protocol(args):
    from dalpsr.evaluation.metrics import MetricProtocol

    return MetricProtocol(
        color=args.color,
        color_space=args.color_space,
        crop_border=args.crop_border,
        round_8bit=not args.no_round,
        size_mismatch=args.size_mismatch,
        device=args.device,
    )


def _report(result, out=None) -> bool:
    """Print problems (to stderr unless `out` is given; looked up at call time); True when nothing was left out."""
    out = out if out is not None else sys.stderr
    clean = True
    for line in result.pairing_report:
        print(f"warning: {line}", file=out)
    for name, msg in result.metric_errors.items():
        print(f"error: {msg}" if name in msg else f"error: {name}: {msg}", file=out)
        clean = False
    return clean


def run_eval(args) -> int:
    from dalpsr.evaluation.evaluate import evaluate_folder, protocol_line, write_eval_outputs
    from dalpsr.evaluation.tables import markdown_table

    try:
        result = evaluate_folder(
            args.pred,
            args.gt,
            _metric_names(args.metrics),
            _protocol(args),
            args.weights_dir,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    clean = _report(result)
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


def _parse_methods(values: list[str]) -> dict[str, str]:
    methods: dict[str, str] = {}
    for v in values:
        name, sep, folder = v.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"`--method` must look like NAME=DIR; got {v!r}.")
        if name in methods:
            raise ValueError(f"`--method` name {name!r} is given twice.")
        methods[name] = folder
    return methods


def _parse_regions(values: list[str] | None) -> list[tuple[int, int, int]] | None:
    if not values:
        return None
    regions = []
    for v in values:
        parts = v.split(",")
        if len(parts) != 3 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise ValueError(f"`--region` must be TOP,LEFT,SIZE in pixels; got {v!r}.")
        regions.append(tuple(int(p) for p in parts))
    return regions


def _grid_stems(result, requested: list[str] | None, count: int) -> list[str]:
    if requested:
        unknown = [s for s in requested if s not in result.stems]
        if unknown:
            raise ValueError(f"`--grid` stems {unknown} are not among the {len(result.stems)} paired images.")
        return requested
    if count < 0:
        raise ValueError(f"`--grid-count` must be >= 0; got {count}.")
    metric = next(iter(result.lower_better), None)
    spread: dict[str, float] = {}
    for stem in result.stems:
        vals = []
        for r in result.methods.values():
            row = next((x for x in r.rows if x["image"] == stem), None)
            if row is not None and metric is not None and math.isfinite(row.get(metric, math.nan)):
                vals.append(row[metric])
        spread[stem] = (max(vals) - min(vals)) if len(vals) > 1 else 0.0
    return sorted(result.stems, key=lambda s: (-spread[s], s))[:count]


def run_compare(args) -> int:
    from pathlib import Path

    from dalpsr.evaluation.evaluate import compare_methods, protocol_line, write_compare_outputs
    from dalpsr.evaluation.grids import make_grid
    from dalpsr.evaluation.pairing import pair_folders
    from dalpsr.image_io import load_image, save_image_atomic

    try:
        methods = _parse_methods(args.method)
        regions = _parse_regions(args.region)
        result = compare_methods(
            methods,
            args.gt,
            args.lr,
            _metric_names(args.metrics),
            _protocol(args),
            args.weights_dir,
            progress=not args.no_progress,
        )
        stems = _grid_stems(result, args.grid, args.grid_count)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    clean = _report(result)
    for name, r in result.methods.items():
        for stem, why in r.skipped.items():
            print(f"skipped {name}/{stem}: {why}", file=sys.stderr)
        for key, why in r.cell_errors.items():
            print(f"failed {name}/{key}: {why}", file=sys.stderr)
        clean = clean and not r.skipped and not r.cell_errors
    clean = clean and bool(result.stems)
    print(result.table(), end="")
    print(protocol_line(result.protocol, len(result.stems)))
    write_compare_outputs(result, args.out)

    folders = {"LR": args.lr} if args.lr else {}
    folders |= methods
    if args.gt:
        folders["GT"] = args.gt
    paths = pair_folders(folders).files if stems else {}
    for stem in stems:
        try:
            panels = {label: load_image(paths[label][stem]).rgb for label in folders}
            image, _ = make_grid(
                panels,
                lr_label="LR" if args.lr else None,
                gt_label="GT" if args.gt else None,
                regions=regions,
                num_regions=args.num_regions,
                crop_size=args.crop_size,
                panel_width=args.panel_width,
            )
        except (OSError, ValueError) as err:
            print(f"grid {stem} failed: {err}", file=sys.stderr)
            clean = False
            continue
        target = Path(args.out) / "grids" / f"{stem}.png"
        save_image_atomic(image, target)
        print(f"wrote {target}")
    print(f"wrote {args.out}/per_image.csv, summary.json, table.md")
    return 0 if clean else 1
