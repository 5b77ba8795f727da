"""How much a feature-conditioned restorer uses its features: the swapped-features test.

Each LR image is restored twice, with its own features and with the features of another image of the same set
(image i gets those of image (i + shift) mod n); the own − swapped PSNR/SSIM gap says how much restoration
depends on the features. A restorer that ignores them has a gap of exactly 0 and identical outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from dalpsr.evaluation.metrics import MetricProtocol, build_metrics, score

PAIR_METRICS = ("psnr", "ssim")


@dataclass
class FeatureUseResult:
    """Mean scores with own and swapped features, their gaps, and per-image rows.

    Attributes:
        n: images scored.
        own: mean metric values with each image's own features.
        swapped: mean metric values with another image's features.
        gap: own − swapped, per metric (how much the features are used).
        mean_abs_change: mean |output(own) − output(swapped)| over all pixels of all images (in [0, 1] units).
        protocol: the metric protocol.
        images: per-image rows (name, own, swapped, feature donor).
    """

    n: int
    own: dict[str, float]
    swapped: dict[str, float]
    gap: dict[str, float]
    mean_abs_change: float
    protocol: dict
    images: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def swapped_features_test(
    pairs: Sequence[tuple[str, Tensor, Tensor]],
    encode: Callable[[Tensor], Any],
    restore: Callable[[Tensor, Any], Tensor],
    protocol: MetricProtocol | None = None,
    shift: int = 1,
    metrics: Sequence[str] = PAIR_METRICS,
) -> FeatureUseResult:
    """Score a restorer with each image's own features and with another image's.

    Args:
        pairs: (name, LR 3×h×w, HR 3×H×W) in [0, 1]; the HR is cropped to the output size when larger.
        encode: LR batch (1×3×h×w) -> features (any object `restore` accepts).
        restore: (LR batch, features) -> SR batch (1×3×H×W).
        protocol: metric protocol (default: Y of BT.601 YCbCr, border 4, 8-bit).
        shift: image i gets the features of image (i + shift) mod n; must not be a multiple of n.
        metrics: full-reference pyiqa metric names.

    Raises:
        ValueError: fewer than 2 pairs, a `shift` that gives an image its own features, or an HR smaller than
            the output.
    """
    if len(pairs) < 2:
        raise ValueError(f"`pairs` must hold at least 2 images to swap features; got {len(pairs)}.")
    if not isinstance(shift, int) or shift % len(pairs) == 0:
        raise ValueError(f"`shift` must be an int that is not a multiple of len(pairs)={len(pairs)}; got {shift!r}.")
    protocol = protocol or MetricProtocol(color="y", color_space="ycbcr", crop_border=4, round_8bit=True)
    built, errors = build_metrics(list(metrics), protocol)
    if errors:
        raise RuntimeError(f"metrics could not be built: {errors}")
    features = [encode(lr[None]) for _, lr, _ in pairs]
    rows, change_sum, change_n = [], 0.0, 0
    for i, (name, lr, hr) in enumerate(pairs):
        donor = (i + shift) % len(pairs)
        own = restore(lr[None], features[i])[0].float().clamp(0, 1).cpu()
        swapped = restore(lr[None], features[donor])[0].float().clamp(0, 1).cpu()
        h, w = own.shape[-2:]
        if hr.shape[-2] < h or hr.shape[-1] < w:
            raise ValueError(f"pair {name!r}: HR {tuple(hr.shape[-2:])} is smaller than the output {(h, w)}.")
        gt = hr[:, :h, :w].float()
        change_sum += float((own - swapped).abs().sum())
        change_n += own.numel()
        rows.append(
            {
                "name": name,
                "donor": pairs[donor][0],
                "own": {k: score(m, own, gt, protocol) for k, m in built.items()},
                "swapped": {k: score(m, swapped, gt, protocol) for k, m in built.items()},
            }
        )
    mean_own = {k: sum(r["own"][k] for r in rows) / len(rows) for k in built}
    mean_swapped = {k: sum(r["swapped"][k] for r in rows) / len(rows) for k in built}
    return FeatureUseResult(
        n=len(rows),
        own=mean_own,
        swapped=mean_swapped,
        gap={k: mean_own[k] - mean_swapped[k] for k in built},
        mean_abs_change=change_sum / change_n,
        protocol=protocol.to_dict(),
        images=rows,
    )


__all__ = ["FeatureUseResult", "swapped_features_test"]
