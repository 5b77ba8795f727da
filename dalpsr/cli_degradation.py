"""`dalpsr describe` and `dalpsr evaluate-degradation`: the degradation encoder + prompt decoder on images.

A model folder holds `degradation_encoder/` and `prompt_decoder/` (the layout of a saved `DaLPSRPipeline`
and of `training/train_degradation_encoder.py` output), optionally with `degradation_data.json` (the
crop size, scale and degradation preset it was trained with, used as evaluation defaults).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ENCODER_SUBFOLDER = "degradation_encoder"
DECODER_SUBFOLDER = "prompt_decoder"
DATA_FILE = "degradation_data.json"
DEFAULT_MODEL_NAME = "degradation_tiny"


class DegradationModelNotFoundError(FileNotFoundError):
    """No degradation encoder / prompt decoder folder was found where dalpsr looked."""


def default_model_dir() -> Path | None:
    """The small model shipped in `dalpsr.weights` (None when this installation has none)."""
    from importlib.resources import files

    path = Path(str(files("dalpsr.weights") / DEFAULT_MODEL_NAME))
    return path if (path / ENCODER_SUBFOLDER).is_dir() else None


def load_degradation_models(model_dir: str | os.PathLike | None = None, device: str = "cpu"):
    """(encoder, decoder, data settings) from a model folder, or from the shipped default when None."""
    from dalpsr.models.degradation_encoder import DegradationEncoder
    from dalpsr.models.prompt_decoder import RestorationPromptDecoder

    if model_dir is None:
        model_dir = default_model_dir()
        if model_dir is None:
            raise DegradationModelNotFoundError(
                f"No degradation model given and none shipped in dalpsr.weights/{DEFAULT_MODEL_NAME}; pass --model DIR "
                f"(a folder with {ENCODER_SUBFOLDER}/ and {DECODER_SUBFOLDER}/, e.g. the output of "
                "training/train_degradation_encoder.py or a saved pipeline)."
            )
    model_dir = Path(model_dir)
    missing = [s for s in (ENCODER_SUBFOLDER, DECODER_SUBFOLDER) if not (model_dir / s / "config.json").is_file()]
    if missing:
        raise DegradationModelNotFoundError(
            f"`model` {model_dir} lacks {', '.join(m + '/config.json' for m in missing)}."
        )
    encoder = DegradationEncoder.from_pretrained(model_dir / ENCODER_SUBFOLDER).to(device).eval()
    decoder = RestorationPromptDecoder.from_pretrained(model_dir / DECODER_SUBFOLDER).to(device).eval()
    data_file = model_dir / DATA_FILE
    data = json.loads(data_file.read_text()) if data_file.is_file() else {}
    return encoder, decoder, data


def usable_images(paths, min_size: int) -> tuple[list[Path], list[tuple[str, str]]]:
    """Split image paths into those whose shorter side is at least `min_size` and the skipped ones (with reasons)."""
    from PIL import Image

    ok, skipped = [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                w, h = img.size
        except (OSError, ValueError) as err:
            skipped.append((str(path), f"unreadable: {err}"))
            continue
        if min(w, h) < min_size:
            skipped.append((str(path), f"{w}×{h} is smaller than the crop size {min_size}"))
        else:
            ok.append(Path(path))
    return ok, skipped


def labelled_crops(
    images_dir, crop_size: int, scale: int, degradation: str, n: int, seed: int, recursive: bool = False
):
    """(dataset, indices, skipped): `n` reproducible degraded crops over a folder of HR images."""
    import torch

    from dalpsr.data.pairs import HRFolderPairs

    ds = HRFolderPairs(images_dir, size=crop_size, scale=scale, config=degradation, seed=seed, recursive=recursive)
    ds.paths, skipped = usable_images(ds.paths, crop_size)
    if not ds.paths:
        raise ValueError(f"`images` {images_dir} has no image of at least {crop_size}×{crop_size} pixels.")
    ds.crops_per_image = max(1, math.ceil(n / len(ds.paths)))
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(ds), generator=g)[:n].tolist()
    return ds, indices, skipped


def evaluate_degradation(
    encoder,
    decoder,
    images_dir: str | os.PathLike,
    n: int = 500,
    seed: int = 0,
    crop_size: int = 256,
    scale: int = 4,
    degradation: str = "realesrgan",
    batch_size: int = 16,
    threshold: float | None = None,
    num_workers: int = 0,
    recursive: bool = False,
) -> dict:
    """Synthesise `n` degraded crops of the HR images in `images_dir`, predict, and score per type.

    Returns `degradation_metrics` plus the settings and the images skipped (too small or unreadable).
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from dalpsr.models.prompt_decoder import degradation_metrics

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive int; got {n!r}.")
    ds, indices, skipped = labelled_crops(images_dir, crop_size, scale, degradation, n, seed, recursive)
    loader = DataLoader(Subset(ds, indices), batch_size=batch_size, num_workers=num_workers)
    predicted, target = [], []
    with torch.no_grad():
        for batch in loader:
            features = encoder.encode_images(batch["lr"].to(encoder.device))
            predicted.append(decoder.decode(features, threshold=threshold).labels)
            target.append(batch["labels"])
    metrics = degradation_metrics(torch.cat(predicted), torch.cat(target))
    metrics["settings"] = {
        "images": str(images_dir),
        "n": len(indices),
        "seed": seed,
        "crop_size": crop_size,
        "scale": scale,
        "degradation": degradation,
        "threshold": decoder.config.threshold if threshold is None else threshold,
    }
    metrics["skipped"] = [{"image": p, "reason": r} for p, r in skipped]
    return metrics


def format_metrics(metrics: dict) -> str:
    """A plain-text table of `evaluate_degradation` results (per type, then the confusion matrices)."""
    head = f"{'type':<10} {'det.acc':>8} {'det.F1':>7} {'bin.acc':>8} {'bin.MAE':>8} {'maj.bin':>8} {'maj.det':>8}"
    lines = [f"{metrics['n']} samples", head]
    for name, m in metrics["types"].items():
        mae = f"{m['bin_mae']:.3f}" if m["bin_mae"] is not None else "-"
        lines.append(
            f"{name:<10} {m['detection_accuracy']:>8.3f} {m['detection_f1']:>7.3f} {m['bin_accuracy']:>8.3f} "
            f"{mae:>8} {m['majority_bin_accuracy']:>8.3f} {m['majority_detection_accuracy']:>8.3f}"
        )
    mean = metrics["mean"]
    lines.append(
        f"{'mean':<10} {mean['detection_accuracy']:>8.3f} {mean['detection_f1']:>7.3f} {mean['bin_accuracy']:>8.3f} "
        f"{'':>8} {mean['majority_bin_accuracy']:>8.3f} {mean['majority_detection_accuracy']:>8.3f}"
    )
    classes = metrics["classes"]
    for name, m in metrics["types"].items():
        lines.append(f"\nconfusion {name} (rows true, columns predicted: {' '.join(classes)})")
        lines.extend("  " + f"{c:<5}" + " ".join(f"{v:>5}" for v in row) for c, row in zip(classes, m["confusion"]))
    return "\n".join(lines)


def grid_crops(image, size: tuple[int, int], max_crops: int):
    """Up to `max_crops` crops of `size` from a 3×H×W image, spread evenly over it (n×n grid, overlapping
    when the image is not a multiple of `size`); the image itself when it is not larger than `size`."""
    if not isinstance(max_crops, int) or max_crops < 1:
        raise ValueError(f"`max_crops` must be a positive int; got {max_crops!r}.")
    import torch

    _, h, w = image.shape
    th, tw = size
    if h <= th and w <= tw:
        return image.unsqueeze(0)
    per_side = max(1, math.isqrt(max_crops))
    rows = min(per_side, math.ceil(h / th)) if h > th else 1
    cols = min(per_side, math.ceil(w / tw)) if w > tw else 1
    tops = torch.linspace(0, max(0, h - th), rows).round().long().tolist()
    lefts = torch.linspace(0, max(0, w - tw), cols).round().long().tolist()
    return torch.stack([image[:, t : t + min(th, h), left : left + min(tw, w)] for t in tops for left in lefts])


def describe_image(encoder, decoder, image, max_crops: int = 16, threshold: float | None = None):
    """`DegradationPrediction` of one 3×H×W image in [0, 1]: bin probabilities averaged over a grid of crops.

    An encoder with `resize_mode="crop"` sees one centre crop of its input size; a larger image is read
    through up to `max_crops` crops instead, so the report covers the whole image rather than its centre.
    """
    import torch

    from dalpsr.models.prompt_decoder import prediction_from_probabilities

    threshold = decoder.config.threshold if threshold is None else float(threshold)
    crops = image.unsqueeze(0)
    if encoder.config.resize_mode == "crop":
        crops = grid_crops(image, encoder.image_size, max_crops)
    with torch.no_grad():
        logits = decoder(encoder.encode_images(crops.to(encoder.device)).degradation_tokens).float()
    return prediction_from_probabilities(torch.sigmoid(logits).mean(0, keepdim=True), threshold)


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _run_evaluate(args) -> int:
    from dalpsr.image_io import atomic_write_bytes

    try:
        encoder, decoder, data = load_degradation_models(args.model, _device(args.device))
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


def _run_describe(args) -> int:

    from dalpsr.image_io import list_images, load_image

    try:
        encoder, decoder, _ = load_degradation_models(args.model, _device(args.device))
    except DegradationModelNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed, paths = 0, []
    for item in args.images:
        try:
            paths.extend(list_images([item]))
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    for path in paths:
        try:
            rgb = load_image(path).rgb
        except (OSError, ValueError) as err:
            print(f"error: {path}: {err}", file=sys.stderr)
            failed += 1
            continue
        prediction = describe_image(encoder, decoder, rgb, args.max_crops, args.threshold)
        report = {"image": str(path), **prediction.report(0)}
        if args.json:
            print(json.dumps(report))
            continue
        print(f"{path}\n  prompt: {report['prompt'] or '(no degradation detected)'}")
        for name, item in report["types"].items():
            probs = " ".join(f"{p:.2f}" for p in item["probabilities"])
            print(f"  {name:<10} {item['text']:<32} p(bins) = {probs}")
    return 1 if failed else 0


def _threshold(text: str) -> float:
    """argparse type for `--threshold`: a probability strictly between 0 and 1."""
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1); got {text}")
    return value


def add_commands(subparsers) -> None:
    """Register `describe` and `evaluate-degradation`."""
    model_help = f"folder with {ENCODER_SUBFOLDER}/ and {DECODER_SUBFOLDER}/ (default: the shipped small model)"
    p = subparsers.add_parser(
        "describe",
        help="print the degradation report (types, bins, probabilities, prompt text) of images",
        description="Estimate each image's degradations with the degradation encoder and prompt decoder.",
    )
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--threshold", type=_threshold, default=None, help="summed bin probability needed to report a type")
    p.add_argument(
        "--max-crops",
        type=int,
        default=16,
        help="average over up to this many crops of the encoder's input size (encoders that crop; default 16)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=_run_describe)

    p = subparsers.add_parser(
        "evaluate-degradation",
        help="score degradation estimation on synthetic degradations of HR images",
        description="Degrade random crops of HR images with known labels, predict them, and report per-type "
        "detection accuracy/F1, bin accuracy, mean absolute bin error and confusion matrices.",
    )
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--images", required=True, help="folder of HR images (read only)")
    p.add_argument("--n", type=int, default=500, help="number of degraded crops (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop-size", type=int, default=None, help="HR crop size (default: the model's training size)")
    p.add_argument("--scale", type=int, default=None, help="SR scale (default: the model's, else 4)")
    p.add_argument("--degradation", default=None, help="degradation preset (default: the model's, else realesrgan)")
    p.add_argument("--threshold", type=_threshold, default=None, help="summed bin probability needed to report a type")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--recursive", action="store_true", help="include sub-folders of --images")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default="degradation_evaluation.json", help="JSON results file")
    p.set_defaults(func=_run_evaluate)
