"""`dalpsr evaluate-degradation`: score degradation estimation on synthetic degradations of HR images."""

from __future__ import annotations

import json
import sys

from dalpsr.commands._common import threshold_arg
from dalpsr.commands.describe import MODEL_HELP
from dalpsr.evaluation.degradation import evaluate_degradation, format_metrics
from dalpsr.image_io import atomic_write_bytes
from dalpsr.loaders.degradation import DegradationModelNotFoundError, load_degradation_models
from dalpsr.runtime import resolve_device


def add_commands(subparsers) -> None:
    """Register `dalpsr evaluate-degradation`."""
    p = subparsers.add_parser(
        "evaluate-degradation",
        help="score degradation estimation on synthetic degradations of HR images",
        description="Degrade random crops of HR images with known labels, predict them, and report per-type "
        "detection accuracy/F1, bin accuracy, mean absolute bin error and confusion matrices.",
    )
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--images", required=True, help="folder of HR images (read only)")
    p.add_argument("--n", type=int, default=500, help="number of degraded crops (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop-size", type=int, default=None, help="HR crop size (default: the model's training size)")
    p.add_argument("--scale", type=int, default=None, help="SR scale (default: the model's, else 4)")
    p.add_argument("--degradation", default=None, help="degradation preset (default: the model's, else realesrgan)")
    p.add_argument(
        "--threshold", type=threshold_arg, default=None, help="summed bin probability needed to report a type"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--recursive", action="store_true", help="include sub-folders of --images")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default="degradation_evaluation.json", help="JSON results file")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    try:
        encoder, decoder, data = load_degradation_models(args.model, resolve_device(args.device))
    except DegradationModelNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    scale = args.scale or data.get("scale", 4)
    crop = args.crop_size or data.get("hr_size") or scale * max(encoder.image_size)
    try:
        metrics = evaluate_degradation(
            encoder,
            decoder,
            args.images,
            n=args.n,
            seed=args.seed,
            crop_size=crop,
            scale=scale,
            degradation=args.degradation or data.get("degradation", "realesrgan"),
            batch_size=args.batch_size,
            threshold=args.threshold,
            num_workers=args.workers,
            recursive=args.recursive,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics["settings"]["model"] = str(args.model) if args.model else "default"
    print(format_metrics(metrics))
    for item in metrics["skipped"]:
        print(f"skipped {item['image']}: {item['reason']}", file=sys.stderr)
    atomic_write_bytes(args.output, (json.dumps(metrics, indent=2) + "\n").encode())
    print(f"\nwrote {args.output}")
    return 0
