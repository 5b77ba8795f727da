"""Comparison grids: LR | each method | GT side by side, with zoomed crops below.

Layout (all panels share one width `panel_width`):

    [label strip]  LR      method 1 … method k   GT
    [full row]     whole images scaled to panel_width, crop regions outlined in colour
    [crop row i]   region i of each image, nearest-neighbour zoom to panel_width × panel_width

The LR image is upscaled (nearest) to the reference size so regions share coordinates; the reference size is
the GT size, or the first method's size without GT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from dalpsr.image_io import tensor_to_pil

REGION_COLOURS = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (255, 0, 255), (0, 220, 220))
Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive end


@dataclass
class GridLayout:
    """Where everything sits on the grid canvas (pixels).

    Args:
        size: canvas (width, height).
        labels: column labels, left to right.
        full_boxes: label → box of its full-image panel.
        crop_boxes: one dict per region: label → box of its zoomed crop panel.
        regions: crop regions in reference-image pixels as (top, left, size).
    """

    size: tuple[int, int]
    labels: list[str]
    full_boxes: dict[str, Box]
    crop_boxes: list[dict[str, Box]]
    regions: list[tuple[int, int, int]]


def _luma(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]  # H×W


def pick_regions(
    candidates: list[torch.Tensor], crop_size: int, count: int, gt: torch.Tensor | None = None
) -> list[tuple[int, int, int]]:
    """Square regions where the methods disagree most, chosen greedily without overlap.

    Disagreement is the per-pixel standard deviation of luminance across `candidates` (2+ images); with one
    candidate it is its absolute error against `gt`, or its gradient magnitude without `gt`.

    Args:
        candidates: method outputs, 3×H×W each at the reference size.
        crop_size: side of each square region in pixels.
        count: how many regions.
    Returns:
        (top, left, size) per region, most disagreement first.
    """
    if not candidates:
        raise ValueError("`candidates` is empty; pass at least one image.")
    h, w = candidates[0].shape[-2:]
    if crop_size < 1 or crop_size > min(h, w):
        raise ValueError(f"`crop_size` must be in [1, {min(h, w)}] for images of size {h}×{w}; got {crop_size}.")
    if count < 1:
        raise ValueError(f"`count` must be >= 1; got {count}.")
    lum = torch.stack([_luma(c) for c in candidates])  # N×H×W
    if len(candidates) > 1:
        energy = lum.std(dim=0)
    elif gt is not None:
        energy = (lum[0] - _luma(gt)).abs()
    else:
        gy, gx = torch.gradient(lum[0])
        energy = (gx**2 + gy**2).sqrt()
    # Mean energy of every crop_size window anchored at (top, left).
    window = F.avg_pool2d(energy[None, None], crop_size, stride=1)[0, 0]  # (H-c+1)×(W-c+1)
    regions: list[tuple[int, int, int]] = []
    blocked = torch.zeros_like(window, dtype=torch.bool)
    for _ in range(count):
        masked = window.masked_fill(blocked, -1.0)
        if float(masked.max()) < 0:
            break
        idx = int(masked.argmax())
        top, left = divmod(idx, window.shape[1])
        regions.append((top, left, crop_size))
        blocked[
            max(0, top - crop_size + 1) : top + crop_size,
            max(0, left - crop_size + 1) : left + crop_size,
        ] = True
    return regions


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kw = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
    return F.interpolate(x[None], size=size, mode=mode, **kw)[0].clamp(0, 1)


def make_grid(
    panels: dict[str, torch.Tensor],
    lr_label: str | None = "LR",
    regions: list[tuple[int, int, int]] | None = None,
    num_regions: int = 2,
    crop_size: int | None = None,
    panel_width: int = 256,
    margin: int = 4,
    label_height: int = 16,
    gt_label: str | None = "GT",
) -> tuple[Image.Image, GridLayout]:
    """Build a comparison grid.

    Args:
        panels: label → 3×H×W image in [0, 1], in column order (LR first, GT last by convention).
        lr_label: the label of the LR panel (upscaled with nearest to the reference size), or None.
        regions: crop regions as (top, left, size) in reference pixels; None picks `num_regions`
            automatically (see `pick_regions`) from the panels that are neither LR nor GT.
        crop_size: side of auto-picked regions; default a quarter of the shorter reference side.
        panel_width: width of every panel on the canvas.
        gt_label: the label of the GT panel, or None.
    Returns:
        (RGB PIL image, its layout).
    """
    if not panels:
        raise ValueError("`panels` is empty; pass at least one labelled image.")
    if panel_width < 8:
        raise ValueError(f"`panel_width` must be >= 8; got {panel_width}.")
    labels = list(panels)
    methods = [k for k in labels if k not in (lr_label, gt_label)]
    if gt_label in panels:
        ref_size = tuple(panels[gt_label].shape[-2:])
    elif methods:
        ref_size = tuple(panels[methods[0]].shape[-2:])
    else:
        ref_size = tuple(panels[labels[0]].shape[-2:])
    images = {k: _resize(v.float(), ref_size, "nearest" if k == lr_label else "bicubic") for k, v in panels.items()}
    rh, rw = ref_size
    if regions is None:
        size = crop_size or max(8, min(rh, rw) // 4)
        size = min(size, rh, rw)
        pool = [images[k] for k in methods] or [images[labels[0]]]
        regions = pick_regions(pool, size, num_regions, images.get(gt_label) if gt_label else None)
    for top, left, size in regions:
        if size < 1 or top < 0 or left < 0 or top + size > rh or left + size > rw:
            raise ValueError(
                f"`regions` entry (top={top}, left={left}, size={size}) lies outside the {rh}×{rw} reference."
            )

    ph = max(1, round(rh * panel_width / rw))
    ncol = len(labels)
    width = margin + ncol * (panel_width + margin)
    height = margin + label_height + ph + margin + len(regions) * (panel_width + margin)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    scale = panel_width / rw

    full_boxes: dict[str, Box] = {}
    crop_boxes: list[dict[str, Box]] = [{} for _ in regions]
    for col, label in enumerate(labels):
        x0 = margin + col * (panel_width + margin)
        draw.text((x0 + 2, margin + 1), _fit(draw, label, font, panel_width - 4), fill=(0, 0, 0), font=font)
        y0 = margin + label_height
        full = tensor_to_pil(_resize(images[label], (ph, panel_width), "bicubic"))
        canvas.paste(full, (x0, y0))
        full_boxes[label] = (x0, y0, x0 + panel_width, y0 + ph)
        for i, (top, left, size) in enumerate(regions):
            colour = REGION_COLOURS[i % len(REGION_COLOURS)]
            bx0, by0 = x0 + round(left * scale), y0 + round(top * scale)
            bx1, by1 = x0 + round((left + size) * scale) - 1, y0 + round((top + size) * scale) - 1
            draw.rectangle((bx0, by0, max(bx0, bx1), max(by0, by1)), outline=colour, width=1)
            crop = images[label][:, top : top + size, left : left + size]
            zoom = tensor_to_pil(_resize(crop, (panel_width, panel_width), "nearest"))
            cy0 = y0 + ph + margin + i * (panel_width + margin)
            canvas.paste(zoom, (x0, cy0))
            draw.rectangle((x0, cy0, x0 + panel_width - 1, cy0 + panel_width - 1), outline=colour, width=2)
            crop_boxes[i][label] = (x0, cy0, x0 + panel_width, cy0 + panel_width)
    return canvas, GridLayout((width, height), labels, full_boxes, crop_boxes, list(regions))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "..", font=font) > max_width:
        text = text[:-1]
    return text + ".."
