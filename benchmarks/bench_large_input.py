"""A large photo through the engines as users run them: exact output size, peak memory, time, seams.

`--engine dat`: `dalpsr upscale --engine dat --restorer DIR` (the CLI, in this process) with a tiny random
`DATRestorer` and degradation encoder (`dalpsr.testing`) saved with `save_pretrained` into DIR: image decoding,
the degradation features, the automatic LR tiling (`pipelines.engines.lr_tiling`, linear blend), the 8-bit
conversion and the PNG write are the real ones; only the network is small (the shipped one would need about
90 CPU-minutes for a 4000×3000 input). `--engine diffusion`: `DaLPSRPipeline` on the tiny random components
(`dalpsr.testing.get_dummy_pipeline`) called as `DiffusionEngine` calls it (a file in, a PIL image out, saved as
PNG): latent tiles, tiled VAE with GroupNorm sync, colour fix; `--tile` / `--vae-tile` set the tile sizes (the
CLI uses the UNet's native resolution, 64 px for the tiny components, far too many tiles for a large photo).

The input is a real LR photo of ../shared/data/real_lr resized to `--size` (bicubic), or a synthetic image when
that is absent. Prints the output size against `round(upscale · size)`, the wall time, the process's peak
resident memory (`resource.getrusage`: run one engine per process) beside the output's own size, and the seam
energy: mean |gradient| across the tile borders over the mean |gradient| elsewhere, beside the same ratio at the
borders shifted by 1/8 … 7/8 of the tile stride (a control: a border ratio within their range means no seam).

Run one at a time (measured here at 1 thread: about 16 minutes for the first, 6 for the second):
    OMP_NUM_THREADS=1 python benchmarks/bench_large_input.py --engine dat --size 4000x3000
    OMP_NUM_THREADS=1 python benchmarks/bench_large_input.py --engine diffusion --size 4000x3000 --upscale 1 \
        --tile 128 --vae-tile 128
(the tiny diffusion components at ×4 and 512-px tiles would take hours: their attention runs over a whole tile).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalpsr.tiling import linear_weights, tile_starts

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "real_lr"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def seam_ratio(image: torch.Tensor, borders: list[int], axis: int) -> float:
    """Mean |gradient| across the given borders along `axis` (-1: columns) over the mean elsewhere."""
    grad = image.diff(dim=axis).abs().mean(dim=tuple(d for d in range(image.ndim) if d != image.ndim + axis))
    near = {b + d for b in borders for d in (-1, 0, 1)}
    keep = [i for i in range(grad.shape[0]) if i not in near]
    return (grad[borders].mean() / grad[keep].mean()).item()


def make_input(path: Path, width: int, height: int) -> str:
    """Write an LR PNG of `width`×`height`; returns where it came from."""
    photos = sorted(p for p in PHOTOS.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if photos:
        with Image.open(photos[0]) as img:
            img.convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(path)
        return f"{photos[0]} resized"
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 37) * np.cos(yy / 53)], axis=-1)
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path)
    return "synthetic gradients"


def linear_band(starts: list[int], tile: int, overlap: int, scale: int) -> list[int]:
    """Output positions inside a linear cross-fade of the tile grid `starts` (LR units)."""
    band = set()
    for i, s in enumerate(starts):
        w = linear_weights(starts, i, tile, overlap, scale)
        offset = s * scale
        band |= {offset + k for k in torch.nonzero((w > 0) & (w < 1)).flatten().tolist()}
    return sorted(band)


def report_seams(image: torch.Tensor, grids: dict[str, list[tuple[int, list[int], int]]]) -> None:
    """`grids`: name → [(axis, borders, half the tile stride)] in output pixels (axis -1: columns, -2: rows)."""
    for name, axes in grids.items():
        for axis, borders, half in axes:
            length = image.shape[axis]
            borders = [b for b in borders if 1 < b < length - 3]
            if not borders:
                continue
            controls = []
            for k in range(1, 8):  # the same positions shifted by k/8 of two half strides: inside the tiles
                shifted = sorted({b + k * half // 4 for b in borders if b + k * half // 4 < length - 3} - set(borders))
                controls.append(seam_ratio(image, shifted, axis))
            where = f"{name} {'columns' if axis == -1 else 'rows'} ({len(borders)} positions)"
            print(
                f"seam energy, {where}: {seam_ratio(image, borders, axis):.3f} (the same positions shifted inside "
                f"the tiles: mean {sum(controls) / 7:.3f}, range {min(controls):.3f}-{max(controls):.3f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("dat", "diffusion"), required=True)
    parser.add_argument("--size", default="4000x3000", help="LR size W×H")
    parser.add_argument("--upscale", type=int, default=4)
    parser.add_argument("--tile", type=int, default=None, help="tile edge, output px (dat: automatic; diffusion: 512)")
    parser.add_argument("--vae-tile", type=int, default=512, help="diffusion: VAE tile edge in output px")
    parser.add_argument("--steps", type=int, default=1, help="diffusion steps")
    parser.add_argument("--color-fix", default="wavelet", help="diffusion: wavelet (default), adain or none")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.lower().split("x"))
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_large_"))
    work.mkdir(parents=True, exist_ok=True)
    lr_path, out_dir = work / "lr.png", work / "out"
    source = make_input(lr_path, width, height)
    print(f"engine {args.engine}, LR {width}×{height} ({source}), ×{args.upscale}")
    expected = (round(height * args.upscale), round(width * args.upscale))
    grids = {}
    if args.engine == "dat":
        from dalpsr.cli import main as cli
        from dalpsr.pipelines.engines import lr_tiling
        from dalpsr.testing import get_dummy_degradation_models, get_dummy_restorer

        restorer = get_dummy_restorer(seed=0, scale=args.upscale)
        restorer.save_pretrained(work / "model" / "restorer")
        get_dummy_degradation_models(seed=0)[0].save_pretrained(work / "model" / "degradation_encoder")
        argv = ["upscale", str(lr_path), "-o", str(out_dir), "--engine", "dat", "--restorer", str(work / "model")]
        argv += ["--upscale", str(args.upscale), "--overwrite"]
        if args.tile is not None:
            argv += ["--tile-size", str(args.tile)]
        tile, overlap = lr_tiling(args.tile, None, args.upscale, height, width, restorer.tile_multiple)
        if tile is not None:
            axes = []
            for axis, edge, length in zip((-2, -1), tile if isinstance(tile, tuple) else (tile, tile), (height, width)):
                edge = min(edge, length)
                band = linear_band(tile_starts(length, edge, min(overlap, edge - 1)), edge, overlap, args.upscale)
                axes.append((axis, band, (edge - overlap) * args.upscale // 2))
            grids[f"LR tiles {tile}, overlap {overlap}: cross-fades"] = axes
        baseline = peak_rss_mb()
        print(f"peak RSS after imports and setup {baseline:.0f} MB; tiles {tile} LR px, overlap {overlap}")
        start = time.perf_counter()
        code = cli(argv)
        seconds = time.perf_counter() - start
        if code:
            raise SystemExit(f"dalpsr upscale exited {code}")
        out_path = out_dir / "lr.png"
    else:
        from dalpsr.image_io import save_image_atomic
        from dalpsr.testing import get_dummy_pipeline

        pipe = get_dummy_pipeline(seed=0)
        tile = args.tile or 512
        f, m = pipe.vae_scale_factor, pipe.pad_multiple
        for name, edge in (("latent", tile), ("VAE", args.vae_tile)):
            t = edge // f
            axes = []
            for axis, length in zip((-2, -1), expected):
                starts = tile_starts(-(-length // m) * m // f, t, t // 4)
                borders = [(s + t) * f - 1 for s in starts[:-1]] + [s * f - 1 for s in starts[1:]]
                axes.append((axis, sorted(set(borders)), (t - t // 4) * f // 2))
            grids[f"{name} tiles {edge} px, edges"] = axes
        baseline = peak_rss_mb()
        print(f"peak RSS after imports and setup {baseline:.0f} MB; tiles {tile} px latent, {args.vae_tile} px VAE")
        start = time.perf_counter()
        image = pipe(
            str(lr_path),
            upscale=args.upscale,
            num_inference_steps=args.steps,
            guidance_scale=1.0,
            color_fix=args.color_fix,
            tile_size=tile,
            vae_tile_size=args.vae_tile,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        out_dir.mkdir(exist_ok=True)
        out_path = out_dir / "lr.png"
        save_image_atomic(image, out_path)
        seconds = time.perf_counter() - start
        del image
    peak = peak_rss_mb()
    Image.MAX_IMAGE_PIXELS = None  # reading back our own output
    with Image.open(out_path) as img:
        out_w, out_h = img.size
        rgb = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255
    exact = (out_h, out_w) == expected
    mp = out_w * out_h / 1e6
    print(f"output {out_w}×{out_h} (expected {expected[1]}×{expected[0]}): {exact}")
    print(f"time {seconds:.1f} s ({seconds / mp:.2f} s per output megapixel)")
    float_mb, byte_mb = out_w * out_h * 3 * 4 / 2**20, out_w * out_h * 3 / 2**20
    print(
        f"peak RSS {peak:.0f} MB, {peak - baseline:.0f} MB above setup; the output as a float32 tensor "
        f"{float_mb:.0f} MB, as 8-bit RGB {byte_mb:.0f} MB; (peak - setup) / float32 output "
        f"{(peak - baseline) / float_mb:.2f}"
    )
    report_seams(rgb[None], grids)
    if args.keep is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
