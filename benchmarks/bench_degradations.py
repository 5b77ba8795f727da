"""Degradation throughput on CPU: pairs per second for 256² HR crops, batched vs per-image, and the ratio.

Run: `python benchmarks/bench_degradations.py [--pairs 64] [--batch 16] [--preset realesrgan]`.
HR crops come from ../shared/data (Set5, RealSR HR) when present, else from skimage sample images.
Both paths compute identical outputs (checked here); the batched path runs each operation once per group
of same-shaped images instead of once per image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dalpsr.degradations import degrade, degrade_image, preset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "paired"


def _crops(n: int, size: int) -> torch.Tensor:
    from dalpsr.image_io import list_images, load_image

    folders = [SHARED / "RealSR" / "hr", SHARED / "Set5" / "hr"]
    images = [load_image(p).rgb for f in folders if f.is_dir() for p in list_images([f])]
    images = [im for im in images if min(im.shape[-2:]) >= size]
    if not images:
        from skimage import data

        images = [
            torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255.0
            for name in ("astronaut", "chelsea", "coffee", "rocket")
        ]
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        img = images[i % len(images)]
        _, h, w = img.shape
        top = int(torch.randint(0, h - size + 1, (1,), generator=g))
        left = int(torch.randint(0, w - size + 1, (1,), generator=g))
        out.append(img[:, top : top + size, left : left + size])
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--preset", default="realesrgan")
    parser.add_argument("--jpeg-backend", default="auto")
    args = parser.parse_args()
    config = preset(args.preset, jpeg_backend=args.jpeg_backend)
    hr = _crops(args.pairs, args.size)
    seeds = list(range(args.pairs))
    degrade(hr[: args.batch], config, seeds=seeds[: args.batch])  # warm-up

    t0 = time.perf_counter()
    batched = [
        degrade(hr[i : i + args.batch], config, seeds=seeds[i : i + args.batch]).lr
        for i in range(0, args.pairs, args.batch)
    ]
    t_batched = time.perf_counter() - t0

    t0 = time.perf_counter()
    single = [degrade_image(hr[i], config, generator=torch.Generator().manual_seed(s)).lr for i, s in enumerate(seeds)]
    t_single = time.perf_counter() - t0

    same = torch.equal(torch.cat(batched), torch.stack(single))
    print(f"preset={args.preset} jpeg_backend={args.jpeg_backend} crops={args.size}x{args.size} scale=4 "
          f"pairs={args.pairs} batch={args.batch} torch_threads={torch.get_num_threads()}")  # fmt: skip
    print(f"batched:   {args.pairs / t_batched:7.2f} pairs/s ({t_batched:.2f} s)")
    print(f"per-image: {args.pairs / t_single:7.2f} pairs/s ({t_single:.2f} s)")
    print(f"ratio batched/per-image: {t_single / t_batched:.2f}x; identical outputs: {same}")


if __name__ == "__main__":
    main()
