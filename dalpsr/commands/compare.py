"""`dalpsr compare`: compare methods on the images they share — one metric table plus image grids."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from dalpsr.commands._common import (
    EVAL_EXIT_CODES,
    add_protocol_args,
    metric_names,
    protocol_from_args,
    report_problems,
)
from dalpsr.evaluation.evaluate import compare_methods, protocol_line, write_compare_outputs
from dalpsr.evaluation.grids import make_grid
from dalpsr.evaluation.pairing import pair_folders
from dalpsr.image_io import load_image, save_image_atomic


def add_commands(subparsers) -> None:
    """Register `dalpsr compare`."""
    c = subparsers.add_parser(
        "compare",
        help="compare methods: one metric table plus image grids",
        description="Compare several methods on the images they share. " + EVAL_EXIT_CODES,
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
    add_protocol_args(c)
    c.set_defaults(func=run_compare)


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
    try:
        methods = _parse_methods(args.method)
        regions = _parse_regions(args.region)
        result = compare_methods(
            methods,
            args.gt,
            args.lr,
            metric_names(args.metrics),
            protocol_from_args(args),
            args.weights_dir,
            progress=not args.no_progress,
        )
        stems = _grid_stems(result, args.grid, args.grid_count)
    except (ValueError, TypeError, ImportError) as err:  # ImportError: the metrics extra is not installed
        print(f"error: {err}", file=sys.stderr)
        return 2
    clean = report_problems(result)
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
