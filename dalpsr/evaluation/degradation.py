"""Scoring degradation estimation: an encoder + prompt decoder on synthetic degradations with known labels."""

from __future__ import annotations

import math
import os

import torch
from torch.utils.data import DataLoader, Subset

from dalpsr.data.pairs import HRFolderPairs
from dalpsr.image_io import list_images, usable_images
from dalpsr.models.prompt_decoder import degradation_metrics


def labelled_crops(
    images_dir, crop_size: int, scale: int, degradation: str, n: int, seed: int, recursive: bool = False
):
    """(dataset, indices, skipped): `n` reproducible degraded crops over a folder of HR images."""
    if not os.path.isdir(images_dir):
        raise ValueError(f"`images` must be an existing folder of HR images; got {str(images_dir)!r}.")
    paths, skipped = usable_images(list_images([images_dir], recursive=recursive), crop_size)
    if not paths:
        raise ValueError(f"`images` {images_dir} has no image of at least {crop_size}×{crop_size} pixels.")
    crops = max(1, math.ceil(n / len(paths)))
    ds = HRFolderPairs(images_dir, crop_size, scale, degradation, crops_per_image=crops, seed=seed, paths=paths)
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


def pearson(a: list[float], b: list[float]) -> float | None:
    """Pearson correlation of two equal-length lists (e.g. an estimated blur σ against the true one); None when
    either is constant (a constant estimate follows nothing) or shorter than 2."""
    n = len(a)
    if n < 2:
        return None
    ma, mb = sum(a) / n, sum(b) / n
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    if va <= 1e-24 or vb <= 1e-24:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (va * vb) ** 0.5
