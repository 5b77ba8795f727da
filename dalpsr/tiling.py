"""Tiled processing: one engine for the latents of the denoising loop, the VAE and DAT.

`tiled_map` cuts the input into overlapping tiles measured in the input's own pixels, applies a function to
each and blends the results into an output `scale` times larger (1 for a UNet, 8 for a VAE decoder, 1/8 for its
encoder, the SR factor for DAT). The tile grid covers the input with stride `tile_size - tile_overlap`; the last
tile in each direction is aligned to the border so every tile has the full size (inputs smaller than a tile are
one tile, run as a plain call). Two blends:

- "gaussian": each tile's result is weighted by a separable Gaussian centred on the tile and the weighted sum is
  divided by the summed weights (MultiDiffusion / Mixture-of-Diffusers, as SeeSR's latent tiling), so overlaps
  cross-fade without seams.
- "linear": each seam is blended over the `tile_overlap` pixels that end where the earlier tile ends; the outer
  quarters of the seam (tile borders, where padding artefacts live) get weight 0 and the middle half a linear
  cross-fade. The weights sum to 1, so a function whose receptive field reaches less than `tile_overlap / 4`
  input pixels gives exactly the untiled result.

GroupNorm statistics (`group_norm_sync`): a tile normalised with its own GroupNorm statistics shifts colour and
contrast against its neighbours, the best-known defect of tiled VAEs. With `group_norm_sync=module`, every
GroupNorm layer of `module` normalises all tiles with per-(sample, group) statistics estimated for the whole
input, then the tiles run as usual (one at a time: the memory of one tile). Two estimates:

- "downsampled" (default): one pass of the function over the whole input shrunk to fit one tile (nearest-exact,
  each channel's mean and standard deviation restored), recording every layer's statistics: multidiffusion-
  upscaler's "fast" Tiled VAE estimate. Every layer's statistics come from one consistent forward pass.
- "tiles": passes over all tiles gather each layer's statistics over the full-resolution input, each pixel
  counted once (by the tile that owns it: overlaps split at their middle); every pass normalises with the
  previous pass's estimate (the first: each tile's own statistics), so after k passes the first k GroupNorm
  calls are exact. multidiffusion-upscaler's exact Tiled VAE instead pauses all tiles at every GroupNorm and
  syncs layer by layer in one pass, holding every tile's activations at once; here memory stays one tile's,
  and the price is one pass per layer for an exact result (few passes leave the deeper layers' statistics
  inconsistent: measured worse than no sync on random-weight VAEs, see benchmarks/bench_tiled_vae.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLENDS = ("gaussian", "linear")
SYNC_ESTIMATES = ("downsampled", "tiles")


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


AUTO_TILE_AREA = 256 * 256
"""Largest automatic tile area (input pixels, padded): bounds the memory of one restorer forward."""


def auto_tile(
    height: int,
    width: int,
    overlap: int = 16,
    multiple: int = 1,
    square: bool = False,
    area: int = AUTO_TILE_AREA,
) -> tuple[tuple[int, int] | None, int]:
    """(tile (height, width) or None for one call, overlap) for an input of `height`×`width`: the tiles whose
    padded area stays within `area` and that compute the fewest pixels.

    Each tile is counted padded to the model's `multiple` (DAT pads its attention windows to 32) and sides shorter
    than `multiple` as the model will pad them; `square` restricts to square tiles (spandrel architectures that
    need square inputs). The overlap is at most half the shortest tile edge that fits. A 500×351 photo with
    `multiple` 32: 3 full-width tiles of 128×500 compute 1.09× its padded area; square 184² tiles computed 1.23×,
    256² ones 2.18×.

    Raises:
        ValueError: `overlap` or `multiple` leave no tile within `area`.
    """

    def padded(edge: int) -> int:
        return -(-max(edge, multiple) // multiple) * multiple

    if padded(height) * padded(width) <= area and not (square and height != width):
        return None, 0
    height, width = max(height, multiple), max(width, multiple)
    overlap = min(overlap, min(height, width) // 2, math.isqrt(area) // 2)
    step = max(multiple, 8)

    def edges(length: int) -> list[int]:  # multiples of the step, and the whole side
        return [e for e in range(step, length, step) if e >= 2 * overlap] + [length]

    best = None
    for th in edges(height):
        if padded(th) * padded(min(width, th if square else step)) > area:
            break
        rows = len(tile_starts(height, th, min(overlap, th - 1)))
        for tw in [th] if square else edges(width):
            if padded(th) * padded(tw) > area:
                break
            cols = len(tile_starts(width, tw, min(overlap, tw - 1)))
            key = (rows * cols * padded(th) * padded(tw), rows * cols, -th * tw)
            if best is None or key < best[0]:
                best = (key, (th, tw))
    if best is None:
        raise ValueError(
            f"no tile of at most {area} pixels fits `overlap`={overlap} and `multiple`={multiple}; "
            "pass a tile size or a smaller overlap."
        )
    return best[1], overlap


def gaussian_weights(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """H×W separable Gaussian weight (sigma = size/4 per axis), strictly positive, peak 1 at the centre."""

    def axis(n: int) -> Tensor:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        sigma = max(n / 4, 1e-3)
        return torch.exp(-0.5 * (x / sigma) ** 2)

    w = axis(height)[:, None] * axis(width)[None, :]
    return w.to(device=device, dtype=dtype)


def linear_weights(starts: list[int], index: int, tile: int, overlap: int, scale: float = 1) -> Tensor:
    """1-D "linear" blend weights over the `tile·scale` output pixels of tile `index` of the grid `starts`
    (`tile`, `overlap` in input pixels). Over all tiles of the grid they sum to 1 at every output pixel."""
    length = round(tile * scale)
    seam = round(overlap * scale)
    margin = round((overlap // 4) * scale)
    ramp = max(seam - 2 * margin, 1)
    pos = torch.arange(length, dtype=torch.float64)

    def rise(seam_end: int) -> Tensor:  # 0 → 1 over the seam ending at output position `seam_end`
        return ((pos - (seam_end - seam) - margin + 0.5) / ramp).clamp(0, 1)

    weight = torch.ones(length, dtype=torch.float64)
    if overlap and index > 0:
        weight = weight * rise(round((starts[index - 1] + tile - starts[index]) * scale))
    if overlap and index + 1 < len(starts):
        weight = weight * (1 - rise(length))
    return weight.float()


def _owned_spans(starts: list[int], tile: int, length: int) -> list[tuple[float, float]]:
    # Global [begin, end) each tile owns: overlaps split at their middle, so the spans partition [0, length).
    cuts = [(starts[k + 1] + starts[k] + tile) / 2 for k in range(len(starts) - 1)]
    return list(zip([0.0, *cuts], [*cuts, float(length)]))


def _shrink(x: Tensor, size: tuple[int, int]) -> Tensor:
    # Nearest-exact resize keeping each channel's mean and standard deviation and the value range.
    small = F.interpolate(x, size=size, mode="nearest-exact")
    std, mean = torch.std_mean(x, dim=(0, 2, 3), keepdim=True)
    small_std, small_mean = torch.std_mean(small, dim=(0, 2, 3), keepdim=True)
    small = (small - small_mean) / small_std.clamp_min(1e-6) * std + mean
    return small.clamp(x.min(), x.max())


def _whole(value: float) -> int:
    if abs(value - round(value)) > 1e-6:
        raise ValueError(f"tile positions must map to whole output pixels under `scale`; got {value}.")
    return round(value)


class _GroupNormSync:
    """While active, every `nn.GroupNorm` of a module normalises with whole-input statistics once estimated.

    `gather()` opens an estimation pass: per-(sample, group) sums of x and x² over each tile's owned region,
    per layer and call; `finish()` turns them into mean and variance, which every later call uses (the
    estimation passes after the first one included).
    """

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.sums: dict[tuple[int, int], tuple[int, Tensor, Tensor]] | None = None
        self.calls: list[int] = []
        self.region: tuple[int, int, tuple[float, float], tuple[float, float]] | None = None

    @contextmanager
    def active(self) -> Iterator[_GroupNormSync]:
        saved = [m.__dict__.get("forward") for m in self.norms]  # e.g. accelerate hooks
        for i, m in enumerate(self.norms):
            m.forward = partial(self._forward, i, m)
        try:
            yield self
        finally:
            for m, forward in zip(self.norms, saved):
                del m.forward
                if forward is not None:
                    m.forward = forward

    def enter(self, tile_h: int, tile_w: int, rows: tuple[float, float], cols: tuple[float, float]) -> None:
        """The next calls belong to a tile of `tile_h`×`tile_w` input pixels owning `rows`×`cols` (relative)."""
        self.region = (tile_h, tile_w, rows, cols)
        self.calls = [0] * len(self.norms)

    def gather(self) -> None:
        self.sums = {}

    def finish(self) -> None:
        self.stats = {}
        for key, (count, total, squares) in self.sums.items():
            mean = total / count
            self.stats[key] = (mean.float(), (squares / count - mean.square()).clamp_min(0).float())
        self.sums = None

    def estimate(self, fn: Callable[..., Tensor], x: Tensor, context: tuple[Tensor, ...], size: int, scale: float):
        """Statistics from one call of `fn` on `x` (and `context`) shrunk so the longer side is `size`."""
        h, w = x.shape[-2:]
        multiple = _whole(1 / scale) if scale < 1 else 1  # e.g. a VAE encoder takes multiples of 8 pixels
        shrink = min(1.0, size / max(h, w))
        dh, dw = (max(multiple, round(n * shrink / multiple) * multiple) for n in (h, w))
        small = [_shrink(t, (dh * t.shape[-2] // h, dw * t.shape[-1] // w)) for t in (x, *context)]
        self.gather()
        self.enter(dh, dw, (0, dh), (0, dw))
        fn(*small)
        self.finish()

    def _owned(self, x: Tensor) -> Tensor:
        # x: B×G×(C/G)×spatial... → the owned part as B×G×(C/G)×h×w (whole tile when the layout is unknown).
        tile_h, tile_w, rows, cols = self.region
        if x.ndim == 4:  # B×G×(C/G)×N, e.g. the VAE attention's GroupNorm on flattened pixels
            r = math.sqrt(x.shape[-1] / (tile_h * tile_w))
            h, w = round(tile_h * r), round(tile_w * r)
            if h * w != x.shape[-1]:
                return x[..., None]
            x = x.unflatten(-1, (h, w))
        h, w = x.shape[-2:]
        rh, rw = h / tile_h, w / tile_w
        r0, r1 = (round(v * rh) for v in rows)
        c0, c1 = (round(v * rw) for v in cols)
        return x[..., r0:r1, c0:c1]

    def _forward(self, index: int, norm: nn.GroupNorm, x: Tensor) -> Tensor:
        key = (index, self.calls[index])
        self.calls[index] += 1
        b, g = x.shape[0], norm.num_groups
        if self.sums is not None:
            part = self._owned(x.reshape(b, g, x.shape[1] // g, *x.shape[2:])).double()
            count, total, squares = self.sums.get(key, (0, 0.0, 0.0))
            dims = tuple(range(2, part.ndim))
            self.sums[key] = (count + part[0, 0].numel(), total + part.sum(dims), squares + part.square().sum(dims))
        if key not in self.stats:
            return F.group_norm(x, g, norm.weight, norm.bias, norm.eps)
        mean, var = self.stats[key]
        y = (x.reshape(b, g, -1).float() - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)
        y = y.reshape(x.shape)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = y * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
        return y.to(x.dtype)


def tiled_map(
    fn: Callable[..., Tensor],
    x: Tensor,
    *context: Tensor,
    tile_size: int | tuple[int, int],
    tile_overlap: int,
    scale: float = 1,
    blend: str = "gaussian",
    group_norm_sync: nn.Module | None = None,
    sync_estimate: str = "downsampled",
    sync_passes: int = 1,
) -> Tensor:
    """Apply `fn` to overlapping tiles of `x` and blend the results (see the module docstring).

    Args:
        fn: maps a B×C×h×w tile of `x` (followed by the same region of every `context` tensor) to
            B×C'×(h·scale)×(w·scale).
        x: B×C×H×W input.
        context: tensors cropped to each tile's region at their own whole size ratio to `x` (e.g. the pixel-space
            ControlNet condition of latent tiles: ratio 8).
        tile_size: tile edge in pixels of `x`, or (height, width) for rectangular tiles (clipped to the input).
        tile_overlap: overlap between neighbouring tiles in pixels of `x`; "linear" needs at most half the
            shorter tile edge.
        scale: output size / input size of `fn`; tile positions must map to whole output pixels.
        blend: "gaussian" or "linear".
        group_norm_sync: a module whose GroupNorm layers normalise every tile with statistics estimated for the
            whole input instead of each tile's own (None: off).
        sync_estimate: "downsampled" or "tiles" (see the module docstring).
        sync_passes: estimation passes over the tiles for `sync_estimate="tiles"`.

    Returns:
        B×C'×round(H·scale)×round(W·scale) in `x`'s dtype.
    """
    if blend not in BLENDS:
        raise ValueError(f"`blend` must be one of {BLENDS}; got {blend!r}.")
    edges = tuple(tile_size) if isinstance(tile_size, (tuple, list)) else (tile_size, tile_size)
    if len(edges) != 2 or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in edges):
        raise ValueError(f"`tile_size` must be a positive int or (height, width) of positive ints; got {tile_size!r}.")
    limit = min(edges) // 2 if blend == "linear" else min(edges) - 1
    if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or not 0 <= tile_overlap <= limit:
        raise ValueError(f"`tile_overlap` must be in [0, {limit}] for {blend} blending; got {tile_overlap!r}.")
    if sync_estimate not in SYNC_ESTIMATES:
        raise ValueError(f"`sync_estimate` must be one of {SYNC_ESTIMATES}; got {sync_estimate!r}.")
    if isinstance(sync_passes, bool) or not isinstance(sync_passes, int) or sync_passes < 1:
        raise ValueError(f"`sync_passes` must be a positive int; got {sync_passes!r}.")
    h, w = x.shape[-2:]
    factors = []
    for c in context:
        k = c.shape[-2] // h
        if k < 1 or tuple(c.shape[-2:]) != (k * h, k * w):
            raise ValueError(f"`context` tensors must be a whole multiple of `x`'s {h}×{w}; got {tuple(c.shape)}.")
        factors.append(k)
    tile_h, tile_w = min(edges[0], h), min(edges[1], w)
    ys = tile_starts(h, tile_h, min(tile_overlap, tile_h - 1))
    xs = tile_starts(w, tile_w, min(tile_overlap, tile_w - 1))
    if len(ys) == len(xs) == 1:
        return fn(x, *context).to(x.dtype)
    sync = _GroupNormSync(group_norm_sync) if group_norm_sync is not None else None
    row_spans, col_spans = _owned_spans(ys, tile_h, h), _owned_spans(xs, tile_w, w)

    def run(iy: int, ix: int) -> Tensor:
        y0, x0 = ys[iy], xs[ix]
        if sync is not None:
            rows, cols = (tuple(v - y0 for v in row_spans[iy]), tuple(v - x0 for v in col_spans[ix]))
            sync.enter(tile_h, tile_w, rows, cols)
        crops = [
            t[..., y0 * k : (y0 + tile_h) * k, x0 * k : (x0 + tile_w) * k] for t, k in zip((x, *context), (1, *factors))
        ]
        return fn(*crops)

    tiles = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
    out_h, out_w = round(h * scale), round(w * scale)
    oth, otw = _whole(tile_h * scale), _whole(tile_w * scale)
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    if blend == "gaussian":
        gauss = gaussian_weights(oth, otw, device=x.device, dtype=acc_dtype)
        norm = torch.zeros(out_h, out_w, device=x.device, dtype=acc_dtype)
    else:  # the weights sum to 1: no normalisation
        wy = [linear_weights(ys, i, tile_h, tile_overlap, scale).to(x.device, acc_dtype) for i in range(len(ys))]
        wx = [linear_weights(xs, i, tile_w, tile_overlap, scale).to(x.device, acc_dtype) for i in range(len(xs))]
    out = None
    with sync.active() if sync is not None else nullcontext():
        if sync is not None and sync_estimate == "downsampled":
            sync.estimate(fn, x, context, max(tile_h, tile_w), scale)
        for _ in range(sync_passes if sync is not None and sync_estimate == "tiles" else 0):
            sync.gather()
            for iy, ix in tiles:
                run(iy, ix)
            sync.finish()
        for iy, ix in tiles:
            result = run(iy, ix)
            if out is None:
                out = torch.zeros(*result.shape[:-2], out_h, out_w, device=x.device, dtype=acc_dtype)
            oy, ox = _whole(ys[iy] * scale), _whole(xs[ix] * scale)
            window = (..., slice(oy, oy + oth), slice(ox, ox + otw))
            if blend == "gaussian":
                out[window] += result.to(acc_dtype) * gauss
                norm[oy : oy + oth, ox : ox + otw] += gauss
            else:
                out[window] += result.to(acc_dtype) * (wy[iy][:, None] * wx[ix][None, :])
    if blend == "gaussian":
        out /= norm
    return out.to(x.dtype)
