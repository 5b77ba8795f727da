"""`dalpsr make-pairs`: synthesise HR/LR training pairs with degradation labels and prompt text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dalpsr.data.make_pairs import make_pairs
from dalpsr.degradations.config import JPEG_BACKENDS, PRESETS, DegradationConfig, preset


def add_commands(subparsers) -> None:
    """Register `make-pairs`."""
    p = subparsers.add_parser(
        "make-pairs",
        help="synthesise HR/LR training pairs with degradation labels and prompt text",
        description="HR crops + synthetic LR files + metadata.jsonl, resumable and deterministic.",
    )
    p.add_argument("hr_dir", help="folder of HR images (read only)")
    p.add_argument("out_dir", help="output folder (hr/, lr/, metadata.jsonl, run.json); resumed if it exists")
    p.add_argument("--scale", type=int, default=4, help="SR scale (default 4)")
    p.add_argument("--preset", default="realesrgan", choices=PRESETS, help="degradation preset (default realesrgan)")
    p.add_argument("--config", default=None, help="JSON file of a DegradationConfig (overrides --preset)")
    p.add_argument("--jpeg-backend", default="auto", choices=JPEG_BACKENDS, help="JPEG codec (default auto)")
    p.add_argument("--crops", type=int, default=1, help="random crops per image (default 1)")
    p.add_argument("--size", type=int, default=512, help="HR crop size (default 512)")
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default 0: in process)")
    p.add_argument("--recursive", action="store_true", help="include sub-folders of HR_DIR")
    p.add_argument("--max-pairs", type=int, default=None, help="stop after this many new pairs (resume later)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_make_pairs)


def run_make_pairs(args) -> int:
    try:
        config = preset(args.preset, scale=args.scale, jpeg_backend=args.jpeg_backend)
        if args.config:
            config = DegradationConfig.from_dict(json.loads(Path(args.config).read_text()))
        summary = make_pairs(
            args.hr_dir,
            args.out_dir,
            scale=args.scale,
            config=config,
            crops=args.crops,
            size=args.size,
            seed=args.seed,
            workers=args.workers,
            recursive=args.recursive,
            max_pairs=args.max_pairs,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"dalpsr make-pairs: error: {exc}", file=sys.stderr)
        return 2
    state = "complete" if summary.complete else "incomplete (run again to continue)"
    print(
        f"make-pairs: {summary.written} pairs written, {summary.already_done} already present, "
        f"{summary.total} planned; run {state}; output in {args.out_dir}"
    )
    for source, reason in summary.skipped:
        print(f"  skipped {source}: {reason}")
    return 1 if summary.skipped else 0
