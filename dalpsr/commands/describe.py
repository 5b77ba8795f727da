"""`dalpsr describe`: the degradation report (types, bins, probabilities, prompt text) of images.

Each line says its evidence: a JPEG file's quality comes from its quantisation tables; the rest, and every
decoded image, from the learned estimator (degradation encoder + prompt decoder).
"""

from __future__ import annotations

import json
import sys

from dalpsr.commands._common import threshold_arg
from dalpsr.degradations.jpeg_tables import read_jpeg_quality
from dalpsr.image_io import load_image, scan_images
from dalpsr.loaders.degradation import (
    DECODER_SUBFOLDER,
    ENCODER_SUBFOLDER,
    DegradationModelNotFoundError,
    load_degradation_models,
)
from dalpsr.models.prompt_decoder import describe_image
from dalpsr.runtime import resolve_device

MODEL_HELP = f"folder with {ENCODER_SUBFOLDER}/ and {DECODER_SUBFOLDER}/ (default: the shipped small model)"


def add_commands(subparsers) -> None:
    """Register `dalpsr describe`."""
    p = subparsers.add_parser(
        "describe",
        help="print the degradation report (types, bins, probabilities, prompt text) of images",
        description="Estimate each image's degradations with the degradation encoder and prompt decoder.",
    )
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument(
        "--threshold", type=threshold_arg, default=None, help="summed bin probability needed to report a type"
    )
    p.add_argument(
        "--max-crops",
        type=int,
        default=16,
        help="average over up to this many crops of the encoder's input size (encoders that crop; default 16)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=run_describe)


def run_describe(args) -> int:
    try:
        encoder, decoder, _ = load_degradation_models(args.model, resolve_device(args.device))
    except DegradationModelNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    found, ignored, missing = scan_images(args.images)
    for path, why in ignored:
        print(f"ignored: {path}: {why}", file=sys.stderr)
    for path in missing:
        print(f"error: input not found: {path}", file=sys.stderr)
    failed = len(missing)
    for path, _ in found:
        try:  # any failure on one file (undecodable, too large, too small for the model) is reported; the rest go on
            rgb, jpeg = load_image(path).rgb, read_jpeg_quality(path)
            prediction = describe_image(encoder, decoder, rgb, args.max_crops, args.threshold, jpeg=jpeg)
        except Exception as err:  # noqa: BLE001
            message = str(err) if str(path) in str(err) else f"{path}: {type(err).__name__}: {err}"
            print(f"error: {message}", file=sys.stderr)
            failed += 1
            continue
        report = {"image": str(path), **prediction.report(0), "jpeg_quality": jpeg.quality if jpeg else None}
        if args.json:
            print(json.dumps(report))
            continue
        print(f"{path}\n  prompt: {report['prompt'] or '(no degradation detected)'}")
        for name, item in report["types"].items():
            probs = " ".join(f"{p:.2f}" for p in item["probabilities"])
            why = item["evidence"] if item["source"] == "file" else f"estimator, p(bins) = {probs}"
            print(f"  {name:<10} {item['text']:<32} {why}")
    return 1 if failed else 0
