"""Argument types and messages shared by the `dalpsr` sub-commands."""

from __future__ import annotations

import argparse
import sys

from dalpsr.evaluation.metrics import MetricProtocol

EVAL_EXIT_CODES = (
    "Exit codes: 0 when every requested metric scored every paired image; 1 when something was left out (a metric "
    "without weights, a skipped image, a failed score; the outputs are still written); 2 on bad arguments."
)


def threshold_arg(text: str) -> float:
    """argparse type for `--threshold`: a probability strictly between 0 and 1."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1); got {text}")
    return value


def add_protocol_args(p: argparse.ArgumentParser) -> None:
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


def metric_names(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def protocol_from_args(args):
    return MetricProtocol(
        color=args.color,
        color_space=args.color_space,
        crop_border=args.crop_border,
        round_8bit=not args.no_round,
        size_mismatch=args.size_mismatch,
        device=args.device,
    )


def report_problems(result, out=None) -> bool:
    """Print problems (to stderr unless `out` is given; looked up at call time); True when nothing was left out."""
    out = out if out is not None else sys.stderr
    clean = True
    for line in result.pairing_report:
        print(f"warning: {line}", file=out)
    for name, msg in result.metric_errors.items():
        print(f"error: {msg}" if name in msg else f"error: {name}: {msg}", file=out)
        clean = False
    return clean
