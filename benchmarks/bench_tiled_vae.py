"""Tiled vs untiled VAE on the SD2-base architecture (random weights): error without and with GroupNorm sync.

Prints, for the encoder (image → latent) and the decoder (untiled latent → image), the max and mean absolute
difference between the tiled and the untiled result for each GroupNorm setting of `dalpsr.tiling.tiled_map`:
none (each tile its own statistics), "downsampled" (the pipeline's default), "tiles" (1 pass), and two references
that take the estimate apart:

- "whole-image statistics": the tiles normalised with the exact statistics of the untiled call (recorded from it);
  what is left is the convolutions' reach across tile borders (the receptive field), the floor of any estimate;
- "untiled, downsampled statistics": the untiled call normalised with the downsampled estimate; no tiles, so this
  is the estimate's own error as it propagates through the network;
- "downsampled, estimate at 1.25× tile": the estimate's input shrunk less (1.56× the memory of one tile).

"low" is the mean |error| after averaging it over 16×16-pixel blocks (2×2 latent pixels): the colour and
contrast shifts between tiles that the sync is for, without the pixel-level noise. Random weights are far less
local than trained ones, so every tiled result differs. The defaults (a 192-px image, 128-px tiles: latent
tiles of 16 with overlap 4) have the pipeline's proportions for a 768-px output with its 512-px VAE tiles.

Run: `OMP_NUM_THREADS=1 python benchmarks/bench_tiled_vae.py [--size 192] [--tile 128] [--image PATH] [--no-attention]`
(about 4 minutes on one CPU thread at the defaults). The image defaults to Set5 `baby.png` from ../shared/data (a
centre crop, resized to `--size`), or a synthetic half-flat, half-textured image when it is absent.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from dalpsr import tiling
from dalpsr.image_io import load_image
from dalpsr.tiling import tiled_map

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "paired" / "Set5" / "hr" / "baby.png"


def test_image(path: Path, size: int) -> tuple[torch.Tensor, str]:
    """1×3×size×size in [-1, 1]."""
    if path.is_file():
        rgb = load_image(path).rgb[None]
        side = min(rgb.shape[-2:])
        top, left = (rgb.shape[-2] - side) // 2, (rgb.shape[-1] - side) // 2
        crop = rgb[..., top : top + side, left : left + side]
        return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1) * 2 - 1, str(path)
    x = F.avg_pool2d(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)), 5, 1, 2) * 2 - 1
    x[..., : size // 2] = x[..., : size // 2] * 0.2 + 0.6
    return x, "synthetic (half flat, half textured)"


def record_statistics(module: torch.nn.Module, fn, x: torch.Tensor) -> dict:
    """Every GroupNorm call's per-(sample, group) statistics of `fn(x)` (the sync's own bookkeeping, whole input)."""
    sync = tiling._GroupNormSync(module)
    h, w = x.shape[-2:]
    with sync.active():
        sync.gather()
        sync.enter(h, w, (0, h), (0, w))
        fn(x)
        sync.finish()
    return sync.stats


def run_with_statistics(module: torch.nn.Module, fn, x: torch.Tensor, stats: dict, **tiles) -> torch.Tensor:
    """`fn(x)` untiled (no `tiles`) or tiled with `tiles`, every GroupNorm normalising with the given `stats`."""
    sync = tiling._GroupNormSync(module)
    if not tiles:
        sync.stats = stats
        h, w = x.shape[-2:]
        with sync.active():
            sync.enter(h, w, (0, h), (0, w))
            return fn(x)
    estimate = tiling._GroupNormSync.estimate
    tiling._GroupNormSync.estimate = lambda self, *args: setattr(self, "stats", stats)
    try:
        return tiled_map(fn, x, **tiles, group_norm_sync=module)
    finally:
        tiling._GroupNormSync.estimate = estimate


def shrunk_statistics(module: torch.nn.Module, fn, x: torch.Tensor, size: int, multiple: int) -> dict:
    """The "downsampled" estimate with the longer side of the shrunk input `size` (a multiple of `multiple`)."""
    h, w = x.shape[-2:]
    dh, dw = (max(multiple, round(n * min(1.0, size / max(h, w)) / multiple) * multiple) for n in (h, w))
    return record_statistics(module, fn, tiling._shrink(x, (dh, dw)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=192, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--tile", type=int, default=128, help="tile side in pixels (a multiple of 8); overlap 1/4")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random VAE weights")
    parser.add_argument(
        "--no-attention",
        action="store_true",
        help="drop the mid-block attention: random attention is near-uniform and global, which no tiling "
        "reproduces; without it the statistics' share of the tiling error shows",
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    config = json.loads((ROOT / "configs" / "sd2_base" / "vae.json").read_text())
    vae = AutoencoderKL.from_config(config, mid_block_add_attention=not args.no_attention).eval()
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    x, source = test_image(args.image, args.size)
    variant = ", no mid-block attention" if args.no_attention else ""
    print(f"SD2-base VAE (random weights, seed {args.seed}{variant}); image {source}, {args.size}×{args.size} px")
    print(f"tiles {args.tile} px, overlap {args.tile // 4} px (latent {args.tile // f}, {args.tile // f // 4})\n")

    def encode(t):
        return vae.encode(t).latent_dist.mode()

    def decode(t):
        return vae.decode(t).sample

    with torch.no_grad():
        start = time.perf_counter()
        z = encode(x)
        full = decode(z)
        print(f"untiled encode + decode: {time.perf_counter() - start:.1f} s; decoded std {full.std():.3f}\n")
        tiles = {
            "enc": dict(tile_size=args.tile, tile_overlap=args.tile // 4, scale=1 / f),
            "dec": dict(tile_size=args.tile // f, tile_overlap=args.tile // f // 4, scale=f),
        }
        exact = {"enc": record_statistics(vae, encode, x), "dec": record_statistics(vae, decode, z)}
        larger = {
            "enc": shrunk_statistics(vae, encode, x, round(args.tile * 1.25), f),
            "dec": shrunk_statistics(vae, decode, z, round(args.tile // f * 1.25), 1),
        }
        downsampled = {
            "enc": shrunk_statistics(vae, encode, x, args.tile, f),
            "dec": shrunk_statistics(vae, decode, z, args.tile // f, 1),
        }

        def sync(**kw):
            return lambda fn, t, part: tiled_map(fn, t, **tiles[part], group_norm_sync=vae, **kw)

        settings = [
            ("none", lambda fn, t, part: tiled_map(fn, t, **tiles[part])),
            ("downsampled", sync(sync_estimate="downsampled")),
            ("tiles, 1 pass", sync(sync_estimate="tiles")),
            ("whole-image statistics", lambda fn, t, part: run_with_statistics(vae, fn, t, exact[part], **tiles[part])),
            ("untiled, downsampled stats", lambda fn, t, part: run_with_statistics(vae, fn, t, downsampled[part])),
            (
                "downsampled, 1.25× tile",
                lambda fn, t, part: run_with_statistics(vae, fn, t, larger[part], **tiles[part]),
            ),
        ]
        header = ("enc max", "enc mean", "enc low", "dec max", "dec mean", "dec low", "time")
        print(f"{'GroupNorm statistics':27s} " + " ".join(f"{h:>9s}" for h in header))
        for name, run in settings:
            start = time.perf_counter()
            z_tiled, decoded = run(encode, x, "enc"), run(decode, z, "dec")
            seconds = time.perf_counter() - start
            ez, ed = (z_tiled - z).abs(), (decoded - full).abs()
            lz, ld = (F.avg_pool2d(d, k).abs().mean() for d, k in ((z_tiled - z, 2), (decoded - full, 2 * f)))
            errors = (ez.max(), ez.mean(), lz, ed.max(), ed.mean(), ld)
            print(f"{name:27s} " + " ".join(f"{e:9.4f}" for e in errors) + f" {seconds:8.1f}s")


if __name__ == "__main__":
    main()
