"""A large photo through the tiled engines: exact output size, peak memory, time, seams.

`--engine dat`: `DAT.super_resolve` (the shared tiling engine, linear blend) on an LR image of `--size W×H` with
a DAT of the tiny test architecture (`dalpsr.testing.TINY_DAT_CONFIG`; random weights, so the time is the
tiling engine around a small model, not DAT-light's). `--engine diffusion`: `DaLPSRPipeline` on the tiny random
components (`dalpsr.testing.get_dummy_pipeline`): latent tiles, tiled VAE with GroupNorm sync, colour fix.

Prints the output size against `round(upscale · size)`, the wall time, the process's peak resident memory
(`resource.getrusage`, so run one engine per process) next to the output tensor's own size, and (diffusion) the
seam energy: mean |gradient| across the latent tile borders over the mean |gradient| elsewhere (1.0 = no seam).

Run: `OMP_NUM_THREADS=1 python benchmarks/bench_large_input.py --engine dat --size 4000x3000`
     `OMP_NUM_THREADS=1 python benchmarks/bench_large_input.py --engine diffusion --size 4000x3000 --upscale 1`
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from dalpsr.tiling import tile_starts


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def seam_ratio(image: torch.Tensor, borders: list[int], axis: int) -> float:
    """Mean |gradient| across the given borders along `axis` (-1: columns) over the mean elsewhere."""
    grad = image.diff(dim=axis).abs().mean(dim=tuple(d for d in range(image.ndim) if d != image.ndim + axis))
    near = {b + d for b in borders for d in (-1, 0, 1)}
    keep = [i for i in range(grad.shape[0]) if i not in near]
    return (grad[borders].mean() / grad[keep].mean()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("dat", "diffusion"), required=True)
    parser.add_argument("--size", default="4000x3000", help="LR size W×H")
    parser.add_argument("--upscale", type=int, default=2)
    parser.add_argument("--tile", type=int, default=512, help="tile edge: LR px (dat) or output px (diffusion)")
    parser.add_argument("--steps", type=int, default=1, help="diffusion steps")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    lr = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    print(f"engine {args.engine}, LR {width}×{height}, ×{args.upscale}, tile {args.tile}; RSS after setup ", end="")
    if args.engine == "dat":
        from dalpsr.models.dat import DAT
        from dalpsr.testing import TINY_DAT_CONFIG

        torch.manual_seed(0)
        model = DAT(**{**TINY_DAT_CONFIG, "upscale": args.upscale}).eval()
        print(f"{peak_rss_mb():.0f} MB")
        start = time.perf_counter()
        out = model.super_resolve(lr, tile_size=args.tile, tile_overlap=16)
    else:
        from dalpsr.testing import get_dummy_pipeline

        pipe = get_dummy_pipeline(seed=0)
        pipe.set_progress_bar_config(disable=True)
        print(f"{peak_rss_mb():.0f} MB")
        start = time.perf_counter()
        out = pipe(
            lr,
            upscale=args.upscale,
            num_inference_steps=args.steps,
            guidance_scale=1.0,
            tile_size=args.tile,
            vae_tile_size=args.tile,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
    seconds = time.perf_counter() - start
    expected = (round(height * args.upscale), round(width * args.upscale))
    exact = tuple(out.shape[-2:]) == expected
    print(f"output {out.shape[-1]}×{out.shape[-2]} (expected {expected[1]}×{expected[0]}): {exact}")
    print(f"time {seconds:.1f} s ({seconds / (out.shape[-1] * out.shape[-2] / 1e6):.2f} s per output megapixel)")
    print(
        f"peak RSS {peak_rss_mb():.0f} MB; the output tensor alone {out.numel() * out.element_size() / 2**20:.0f} MB, "
        f"the LR input {lr.numel() * lr.element_size() / 2**20:.0f} MB"
    )
    if args.engine == "diffusion":
        f, tile = pipe.vae_scale_factor, args.tile // pipe.vae_scale_factor
        for axis, length in ((-1, expected[1]), (-2, expected[0])):
            starts = tile_starts(-(-length // pipe.pad_multiple) * pipe.pad_multiple // f, tile, tile // 4)
            borders = [(s + tile) * f - 1 for s in starts[:-1]] + [s * f - 1 for s in starts[1:]]
            borders = sorted(b for b in set(borders) if 0 < b < length - 2)
            print(
                f"seam energy ({'columns' if axis == -1 else 'rows'}, {len(borders)} tile edges): "
                f"{seam_ratio(out, borders, axis):.3f}"
            )


if __name__ == "__main__":
    main()
