"""Tiled vs untiled VAE on the SD2-base architecture (random weights): error without and with GroupNorm sync.

Prints, for the encoder (image → latent) and the decoder (untiled latent → image), the max and mean absolute
difference between the tiled and the untiled result for each GroupNorm setting of `dalpsr.tiling.tiled_map`:
none (each tile its own statistics), "downsampled" (the pipeline's default) and "tiles" (1 pass). Random weights
are far less local than trained ones, so every tiled result differs; the differences between rows are the
statistics' share.

Run: `OMP_NUM_THREADS=1 python benchmarks/bench_tiled_vae.py [--size 96] [--tile 64] [--image PATH] [--no-attention]`
(about 45 s on one CPU thread at the defaults). The image defaults to Set5 `baby.png` from ../shared/data (a
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--tile", type=int, default=64, help="tile side in pixels (a multiple of 8); overlap 1/4")
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
        settings = [
            ("none", {}),
            ("downsampled", {"sync_estimate": "downsampled"}),
            ("tiles, 1 pass", {"sync_estimate": "tiles"}),
        ]
        header = ("enc max", "enc mean", "dec max", "dec mean", "time")
        print(f"{'GroupNorm statistics':22s} " + " ".join(f"{h:>9s}" for h in header))
        for name, kw in settings:
            sync = {"group_norm_sync": vae, **kw} if kw else {}
            start = time.perf_counter()
            z_tiled = tiled_map(encode, x, tile_size=args.tile, tile_overlap=args.tile // 4, scale=1 / f, **sync)
            tile, overlap = args.tile // f, args.tile // f // 4
            decoded = tiled_map(decode, z, tile_size=tile, tile_overlap=overlap, scale=f, **sync)
            seconds = time.perf_counter() - start
            ez, ed = (z_tiled - z).abs(), (decoded - full).abs()
            print(f"{name:22s} {ez.max():9.4f} {ez.mean():9.4f} {ed.max():9.4f} {ed.mean():9.4f} {seconds:8.1f}s")


if __name__ == "__main__":
    main()
