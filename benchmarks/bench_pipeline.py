"""DaLPSRPipeline speed and memory against references in the same run (ratios, not absolute timings).

1. Speed: A/B interleaved in one process, `DaLPSRPipeline` vs diffusers' `StableDiffusionControlNetPipeline` on the
   same components, steps and generator (the oracle setting: pure-noise start, shared text, no colour fix).
   Prints the median time ratio (goal ≤ 1.05).
2. Memory: a tiled ×4 run to 1024² output vs one to 512², each in a fresh subprocess; prints the ratio of the peak
   memory the run adds over the loaded pipeline (goal ≤ 1.3). On CUDA it uses `torch.cuda.max_memory_allocated`,
   on CPU the process high-water mark (VmHWM) minus the resident size before the run.

Models (random weights): the speed run uses a small SD2-shaped UNet/ControlNet/VAE with the real VAE factor 8 and
a 512-px native tile, so the pipeline's own overhead is visible; the memory run uses the real SD2-base VAE with that
small UNet, so activation memory is realistic where it peaks (VAE decode) while a CPU run stays short. `--sd2` uses
the full SD2-base architecture for both (slow on CPU).

    python benchmarks/bench_pipeline.py [--rounds 7] [--steps 10] [--threads 1] [--sd2] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def bench_components(sd2: bool, seed: int = 0, real_vae: bool = False) -> dict:
    from dalpsr.loaders.sd2 import build_sd2_base_components, load_sd2_base_config
    from dalpsr.testing import get_dummy_components

    if sd2:
        return build_sd2_base_components()
    components = get_dummy_components(seed, vae_scale_factor=8, unet_sample_size=64)
    if real_vae:
        from diffusers import AutoencoderKL

        components["vae"] = AutoencoderKL.from_config(load_sd2_base_config("vae"))
    return components


def speed(rounds: int, steps: int, sd2: bool, device: str) -> None:
    from diffusers import StableDiffusionControlNetPipeline

    from dalpsr import DaLPSRPipeline

    components = bench_components(sd2)
    ours = DaLPSRPipeline(**components).to(device)
    ref = StableDiffusionControlNetPipeline(**components, safety_checker=None, feature_extractor=None).to(device)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    lr = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    up = torch.nn.functional.interpolate(lr, size=(512, 512), mode="bicubic", align_corners=False).clamp(0, 1)
    text = "a photo"

    def run_ours():
        return ours(
            lr,
            prompt=text,
            degradation_prompt="",
            quality_prompt="",
            negative_prompt="",
            text_routing="shared",
            color_fix="none",
            num_inference_steps=steps,
            guidance_scale=5.5,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    def run_ref():
        return ref(
            prompt=text,
            negative_prompt="",
            image=up,
            height=512,
            width=512,
            num_inference_steps=steps,
            guidance_scale=5.5,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    # Time spent inside the shared models, so the pipelines' own overhead (total − models) is measured too: on a
    # busy machine the totals swing by more than that overhead.
    in_models = [0.0]

    def timing(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                in_models[0] += time.perf_counter() - t0

        return wrapper

    for name in ("unet", "controlnet", "text_encoder"):
        components[name].forward = timing(components[name].forward)
    components["vae"].decode = timing(components["vae"].decode)

    def timed(fn):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        in_models[0] = 0.0
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, in_models[0], out

    timed(run_ours)
    timed(run_ref)
    t_ours, t_ref, o_ours, o_ref = [], [], [], []
    for i in range(rounds):
        order = (run_ours, run_ref) if i % 2 == 0 else (run_ref, run_ours)
        for fn in order:
            t, models, _ = timed(fn)
            (t_ours if fn is run_ours else t_ref).append(t)
            (o_ours if fn is run_ours else o_ref).append(t - models)
    max_diff = (run_ours().cpu() - run_ref().cpu()).abs().max().item()
    ratio = statistics.median(t_ours) / statistics.median(t_ref)
    print(
        f"speed  512² ×4, {steps} steps, {rounds} interleaved rounds on {device}: "
        f"ours {statistics.median(t_ours):.3f}s  diffusers ControlNet {statistics.median(t_ref):.3f}s  "
        f"ratio {ratio:.3f} (goal ≤ 1.05); max |diff| {max_diff:.2e}\n"
        f"       time outside the models per call: ours {1e3 * statistics.median(o_ours):.1f} ms, "
        f"diffusers {1e3 * statistics.median(o_ref):.1f} ms"
    )


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(out_size: int, sd2: bool, device: str) -> None:
    from dalpsr import DaLPSRPipeline

    pipe = DaLPSRPipeline(**bench_components(sd2, real_vae=True)).to(device)
    pipe.set_progress_bar_config(disable=True)
    lr = torch.rand(1, 3, out_size // 4, out_size // 4, generator=torch.Generator().manual_seed(0))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
    pipe(lr, num_inference_steps=1, guidance_scale=5.5, generator=torch.Generator().manual_seed(0), output_type="pt")
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _rss_kib("VmHWM") * 1024
    print(json.dumps({"size": out_size, "added_peak_bytes": peak - base}))


def memory(sd2: bool, device: str, threads: int) -> None:
    added = {}
    for size in (512, 1024):
        cmd = [sys.executable, __file__, "--memory-child", str(size), "--device", device, "--threads", str(threads)]
        cmd += ["--sd2"] if sd2 else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        added[size] = json.loads(out)["added_peak_bytes"]
    ratio = added[1024] / added[512]
    print(
        f"memory tiled ×4 on {device}: added peak 512² {added[512] / 2**20:.1f} MiB, "
        f"1024² {added[1024] / 2**20:.1f} MiB, ratio {ratio:.2f} (goal ≤ 1.3)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sd2", action="store_true", help="real SD2-base architecture (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps timings stable on a busy machine)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.sd2, args.device)
        return
    if not args.skip_speed:
        speed(args.rounds, args.steps, args.sd2, args.device)
    if not args.skip_memory:
        memory(args.sd2, args.device, args.threads)


if __name__ == "__main__":
    main()
