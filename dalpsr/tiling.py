"""Tiled processing with Gaussian-weighted blending, for latents in the denoising loop and for the VAE.

The tile grid covers the input with stride `tile - overlap`; the last tile in each direction is aligned to the
border so every tile has the full size (inputs smaller than a tile are one tile). Each tile's result is
weighted by a separable Gaussian centred on the tile (MultiDiffusion / Mixture-of-Diffusers style, as SeeSR's
latent tiling) and the weighted sum is divided by the summed weights, so overlaps cross-fade without seams.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering `length` with at least `overlap` between neighbours."""
    if tile <= 0:
        raise ValueError(f"`tile` must be positive; got {tile}.")
    if not 0 <= overlap < tile:
        raise ValueError(f"`overlap` must be in [0, tile={tile}); got {overlap}.")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    starts = [min(i * stride, length - tile) for i in range(count)]
    return sorted(set(starts))


def gaussian_weights(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """H×W separable Gaussian weight (sigma = size/4 per axis), strictly positive, peak 1 at the centre."""

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        sigma = max(n / 4, 1e-3)
        return torch.exp(-0.5 * (x / sigma) ** 2)

    w = axis(height)[:, None] * axis(width)[None, :]
    return w.to(device=device, dtype=dtype)


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float = 1.0,
    out_channels: int | None = None,
) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of `x` (B×C×H×W) and blend the results with Gaussian weights.

    Args:
        fn: maps a B×C×h×w tile to B×C'×(h·scale)×(w·scale).
        x: the input.
        tile: tile size in input pixels (clipped to the input size).
        overlap: overlap between neighbouring tiles in input pixels.
        scale: output size / input size of `fn` (8 for a VAE decoder, 1/8 for its encoder, 1 for a UNet).
        out_channels: C' when it differs from C.
    """
    b, c, h, w = x.shape
    tile_h, tile_w = min(tile, h), min(tile, w)
    ys = tile_starts(h, tile_h, min(overlap, tile_h - 1))
    xs = tile_starts(w, tile_w, min(overlap, tile_w - 1))
    out_h, out_w = round(h * scale), round(w * scale)
    oth, otw = round(tile_h * scale), round(tile_w * scale)
    weight = gaussian_weights(oth, otw, device=x.device, dtype=torch.float32)
    out = None
    norm = torch.zeros(out_h, out_w, device=x.device, dtype=torch.float32)
    for y0 in ys:
        for x0 in xs:
            y = fn(x[:, :, y0 : y0 + tile_h, x0 : x0 + tile_w])
            if out is None:
                out = torch.zeros(b, out_channels or y.shape[1], out_h, out_w, device=x.device, dtype=torch.float32)
            oy, ox = round(y0 * scale), round(x0 * scale)
            out[:, :, oy : oy + oth, ox : ox + otw] += y.float() * weight
            norm[oy : oy + oth, ox : ox + otw] += weight
    return (out / norm).to(x.dtype)
