"""`dalpsr describe`: the degradation report (types, bins, probabilities, prompt text) of images.

Each line says its evidence: a JPEG file's quality comes from its quantisation tables; the rest, and every
decoded image, from the learned estimator (degradation encoder + prompt decoder). With a kernel estimator
(`--kernel-model`, default: the shipped PL-IDENet when there is one) the report adds the estimated blur kernel: σ and
its principal axes in pixels of the image upscaled by the estimator's scale; `--kernel-png` draws it. The shipped
default skips images smaller than the estimator's input minimum (8 px a side).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

from dalpsr.commands._common import threshold_arg
from dalpsr.degradations.jpeg_tables import read_jpeg_quality
from dalpsr.image_io import load_image, save_image_atomic, scan_images
from dalpsr.loaders.degradation import (
    DECODER_SUBFOLDER,
    ENCODER_SUBFOLDER,
    DegradationModelNotFoundError,
    load_degradation_models,
)
from dalpsr.loaders.pl_idenet import KernelModelNotFoundError, load_kernel_estimator
from dalpsr.models.pl_idenet import MIN_INPUT_SIZE, kernel_picture
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
    p.add_argument(
        "--kernel-model",
        default=None,
        help="PL-IDENet folder for the blur-kernel line (default: the shipped one when present; 'none' to skip)",
    )
    p.add_argument(
        "--kernel-png",
        default=None,
        help="write the estimated kernel as a PNG: this file for one image, else a folder of IMAGE_STEM_kernel.png",
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
    kernel_model = None
    if args.kernel_model != "none":
        try:
            kernel_model = load_kernel_estimator(args.kernel_model, resolve_device(args.device))
        except KernelModelNotFoundError as err:
            if args.kernel_model is not None or args.kernel_png:
                print(f"error: {err}", file=sys.stderr)
                return 2
    if args.kernel_png and kernel_model is None:
        print("error: `--kernel-png` needs a kernel model (`--kernel-model` is 'none').", file=sys.stderr)
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
            estimate = None
            # the default (shipped) estimator skips images too small for it; a requested one reports them
            if kernel_model is not None and (args.kernel_model is not None or min(rgb.shape[-2:]) >= MIN_INPUT_SIZE):
                estimate = kernel_model.describe_kernel(rgb)
        except Exception as err:  # noqa: BLE001
            message = str(err) if str(path) in str(err) else f"{path}: {type(err).__name__}: {err}"
            print(f"error: {message}", file=sys.stderr)
            failed += 1
            continue
        report = {"image": str(path), **prediction.report(0), "jpeg_quality": jpeg.quality if jpeg else None}
        if estimate is not None:
            kernel = estimate.pop("kernel")
            report["kernel"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in estimate.items()}
            report["kernel"]["evidence"] = f"PL-IDENet kernel estimator (blur at x{estimate['scale']} before bicubic)"
            if args.kernel_png:
                target = Path(args.kernel_png)
                if len(found) > 1 or target.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    target = target / f"{path.stem}_kernel.png"
                save_image_atomic(Image.fromarray(kernel_picture(kernel)), target)
                report["kernel"]["png"] = str(target)
        if args.json:
            print(json.dumps(report))
            continue
        print(f"{path}\n  prompt: {report['prompt'] or '(no degradation detected)'}")
        for name, item in report["types"].items():
            probs = " ".join(f"{p:.2f}" for p in item["probabilities"])
            why = item["evidence"] if item["source"] == "file" else f"estimator, p(bins) = {probs}"
            print(f"  {name:<10} {item['text']:<32} {why}")
        if "kernel" in report:
            k = report["kernel"]
            text = f"sigma {k['sigma']:.2f} px at x{k['scale']}"
            axes = f"axes {k['sigma_major']:.2f}/{k['sigma_minor']:.2f} px at {k['angle_deg']:.0f} deg"
            print(f"  {'kernel':<10} {text:<32} {axes}; {k['evidence']}" + (f"; png {k['png']}" if "png" in k else ""))
    return 1 if failed else 0
