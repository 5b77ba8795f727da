"""Throughput of `dalpsr upscale` with 1 process against 2 processes (`accelerate launch`), one thread each.

For each engine (the shipped DAT restorer; the diffusion pipeline on tiny random components) the same folder of
random images is upscaled by `python -m dalpsr upscale` and by `accelerate launch --multi_gpu --num_processes 2 -m
dalpsr upscale` on the CPU (torchrun starts the processes; $ACCELERATE_USE_CPU joins them in a gloo group), with
OMP_NUM_THREADS=1 in every process. Two figures per run:

- steady: images per second once the engines are loaded, from the outputs' modification times. Each process
  owns every N-th image of the sorted plan, so its images are known: (its images - 1) / (its last - its first
  output time), summed over the processes.
- end-to-end: images / wall time of the whole command (start-up and model loading included).

The ratio 2 processes / 1 process is printed for both (goal: steady ≥ 1.8× on 2 free cores). Both runs must write
the same bytes; the script says whether they did. On a shared machine the ratio measures the free cores too.

    python benchmarks/bench_scaling.py                        # both engines, defaults below
    python benchmarks/bench_scaling.py --engines dat --images 32 --size 64
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ENGINE_ARGS = {
    "dat": ["--engine", "dat"],
    "diffusion": ["--random-weights-for-testing", "--upscale", "2"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(num_processes: int, args: list[str]) -> list[str]:
    if num_processes == 1:
        return [sys.executable, "-m", "dalpsr", *args]
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
            "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "dalpsr", *args]  # fmt: skip


def run(num_processes: int, inputs: Path, out: Path, engine_args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["ACCELERATE_USE_CPU"] = "1"
    start = time.perf_counter()
    done = subprocess.run(
        command(num_processes, ["upscale", str(inputs), "-o", str(out), *engine_args]),
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{num_processes}-process run failed:\n{done.stderr[-3000:]}")
    keys = sorted(p.name for p in inputs.iterdir())
    steady = 0.0
    for rank in range(num_processes):
        times = sorted((out / Path(k).with_suffix(".png")).stat().st_mtime_ns / 1e9 for k in keys[rank::num_processes])
        if len(times) > 1 and times[-1] > times[0]:
            steady += (len(times) - 1) / (times[-1] - times[0])
    return {"wall": wall, "end_to_end": len(keys) / wall, "steady": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", choices=list(ENGINE_ARGS), default=list(ENGINE_ARGS))
    parser.add_argument("--images", type=int, default=16, help="images per run (default 16)")
    parser.add_argument("--size", type=int, default=48, help="input side in pixels (default 48)")
    parser.add_argument("--steps", type=int, default=8, help="diffusion steps (default 8)")
    args = parser.parse_args()
    if args.images < 4 or args.size < 8:
        parser.error(f"`--images` must be >= 4 and `--size` >= 8; got {args.images} and {args.size}.")

    print(f"{args.images} images of {args.size}x{args.size}, OMP_NUM_THREADS=1 per process, cpu count {os.cpu_count()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| engine | processes | wall s | end-to-end img/s | steady img/s |")
    print("|---|---|---|---|---|")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            pixels = (rng.random((args.size, args.size, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(inputs / f"im{i:04d}.png")
        for engine in args.engines:
            extra = ENGINE_ARGS[engine] + (["--steps", str(args.steps)] if engine == "diffusion" else [])
            results = {}
            for n in (1, 2):
                results[n] = run(n, inputs, Path(tmp) / f"{engine}-{n}", extra)
                r = results[n]
                print(f"| {engine} | {n} | {r['wall']:.1f} | {r['end_to_end']:.3f} | {r['steady']:.3f} |", flush=True)
            same = all(
                (Path(tmp) / f"{engine}-1" / f.name).read_bytes() == f.read_bytes()
                for f in sorted((Path(tmp) / f"{engine}-2").glob("*.png"))
            )
            ratios[engine] = (
                results[2]["steady"] / results[1]["steady"],
                results[2]["end_to_end"] / results[1]["end_to_end"],
                same,
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for engine, (steady, e2e, same) in ratios.items():
        print(
            f"{engine}: 2 vs 1 process throughput, steady {steady:.2f}x, end-to-end {e2e:.2f}x (goal: steady >= 1.8x); "
            f"outputs byte-identical: {same}"
        )


if __name__ == "__main__":
    main()
