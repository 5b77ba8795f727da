"""One check for a machine with a CUDA GPU (offline, under 8 minutes): the `gpu` tests, then the speed and memory of
the SD2-base-size pipeline and of the regression restorers.

1. `pytest -m gpu` (the tests that need CUDA).
2. `DaLPSRPipeline` built with random weights at SD2-base size (`dalpsr.loaders.sd2.build_sd2_base_components`) in
   fp16; 128→512, 256→1024 and 512→2048 (×4, 20 steps, classifier-free guidance) with PyTorch SDPA attention, with
   xformers when it is installed, and with model CPU offload. Per run: seconds per image, peak VRAM, and the
   UNet + ControlNet FLOPs of the image (counted with `torch.utils.flop_counter.FlopCounterMode` on the first call
   of each input shape, then added per call) over the seconds: achieved FLOP/s, and its ratio to the GPU's dense
   fp16 tensor peak (the VAE, text encoder and tiling time is in the seconds but not in the FLOPs, so the ratio is
   a lower bound of the denoiser's own utilisation).
3. DAT-S (random weights) and the shipped restorer (`weights/degradation_tiny`) in fp16: 128→512 and 256→1024,
   FLOPs of the whole model.

Runs are skipped, and said to be, once the time budget is spent (`--budget`, default 420 s, tests included).

    python benchmarks/gpu_check.py                 # on the CUDA machine; paste the table into README
    python benchmarks/gpu_check.py --dry-run       # the same code on the CPU with tiny components, in seconds
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]

# Dense fp16 tensor-core peak (fp32 accumulate where the two differ), TFLOP/s, from the vendors' data sheets.
PEAK_FP16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "RTX A6000": 155.0,
    "V100": 125.0,
    "T4": 65.0,
}


def peak_tflops(name: str) -> float | None:
    """The table's peak for a CUDA device name (the longest matching key), or None."""
    for key in sorted(PEAK_FP16_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_FP16_TFLOPS[key]
    return None


def _signature(value) -> object:
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), str(value.dtype))
    if isinstance(value, list | tuple):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    return repr(value)


class FlopTally:
    """Counts the FLOPs of every call of some modules: each new input shape once under `FlopCounterMode`, then the
    count of that shape is added per call."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.modules, self.per_shape, self.total, self.counting = modules, {}, 0, False

    def install(self) -> None:
        for module in self.modules:
            module.forward = self._wrap(module.forward)

    def _wrap(self, forward: Callable) -> Callable:
        def counted(*args, **kwargs):
            if not self.counting:
                return forward(*args, **kwargs)
            key = (id(forward), _signature(args), _signature(kwargs))
            if key not in self.per_shape:
                with FlopCounterMode(display=False) as counter:
                    out = forward(*args, **kwargs)
                self.per_shape[key] = counter.get_total_flops()
            else:
                out = forward(*args, **kwargs)
            self.total += self.per_shape[key]
            return out

        return counted

    @contextmanager
    def count(self):
        self.total, self.counting = 0, True
        try:
            yield self
        finally:
            self.counting = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(median seconds per call, peak GiB allocated on `device` or None on the CPU), after the caller's warm-up."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


class Report:
    def __init__(self, peak: float | None, budget: float) -> None:
        self.rows, self.peak, self.start, self.budget = [], peak, time.perf_counter(), budget

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.budget

    def add(self, part: str, config: str, size: str, seconds=None, vram=None, flops=None, note: str = "") -> None:
        achieved = flops / seconds / 1e12 if flops and seconds else None
        ratio = f"{achieved / self.peak:.1%}" if achieved and self.peak else "–"
        row = (
            f"| {part} | {config} | {size} | {'–' if seconds is None else f'{seconds:.3f}'} | "
            f"{'–' if vram is None else f'{vram:.2f}'} | {'–' if not flops else f'{flops / 1e9:.1f}'} | "
            f"{'–' if achieved is None else f'{achieved:.3f}'} | {ratio} | {note} |"
        )
        self.rows.append(row)
        print(row, flush=True)


HEADER = (
    "| part | config | input→output | s/image | peak VRAM GiB | GFLOP/image | TFLOP/s | of peak | note |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def gpu_test_files() -> list[str]:
    """The test files with a `gpu` mark (collecting only them keeps the run short)."""
    return sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text())


def run_gpu_tests(dry_run: bool, timeout: float) -> str:
    """`pytest -m gpu` (only collected in a dry run); returns its last line."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *gpu_test_files()]
    if dry_run:
        cmd.append("--collect-only")
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"pytest -m gpu: timed out after {timeout:.0f} s"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return f"pytest -m gpu (exit {done.returncode}): {lines[-1] if lines else done.stderr[-500:]}"


def build_pipeline(dry_run: bool, device: torch.device, dtype: torch.dtype):
    from dalpsr.pipelines.pipeline_dalpsr import DaLPSRPipeline

    if dry_run:
        from dalpsr.testing import get_dummy_components

        components = get_dummy_components(seed=0, vae_scale_factor=8, unet_sample_size=4)  # native 32 px
    else:
        from dalpsr.loaders.sd2 import build_sd2_base_components

        components = build_sd2_base_components(device=str(device), dtype=dtype)
    pipe = DaLPSRPipeline(**components).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_pipeline(report: Report, args, device: torch.device, dtype: torch.dtype) -> None:
    sizes = [4, 8, 16] if args.dry_run else [128, 256, 512]
    pipe = build_pipeline(args.dry_run, device, dtype)
    tally = FlopTally(pipe.unet, pipe.controlnet)
    tally.install()
    flops: dict[int, int] = {}

    def upscale(size: int) -> Callable[[], object]:
        lr = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))

        def call():
            return pipe(
                lr,
                prompt="a photo",
                degradation_prompt="",
                upscale=4,
                num_inference_steps=args.steps,
                guidance_scale=5.5,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            )

        return call

    configs: list[tuple[str, Callable[[], None]]] = [("sdpa", lambda: None)]
    try:
        import xformers  # noqa: F401

        configs.append(("xformers", pipe.enable_xformers_memory_efficient_attention))
    except ImportError:
        report.add("pipeline", "xformers", "all", note="xformers not installed")
    if device.type == "cuda":
        configs.append(("cpu offload", lambda: (pipe.disable_xformers_memory_efficient_attention(), pipe.to("cpu"),
                                                pipe.enable_model_cpu_offload(device=device))))  # fmt: skip
    else:
        report.add("pipeline", "cpu offload", "all", note="skipped: offload needs an accelerator")
    for name, setup in configs:
        setup()
        for size in sizes:
            label = f"{size}→{size * 4}"
            if report.over_budget():
                report.add("pipeline", name, label, note="skipped: time budget spent")
                continue
            call = upscale(size)
            if size not in flops:  # the warm-up of the first config counts the denoiser FLOPs
                with tally.count():
                    call()
                flops[size] = tally.total
            else:
                call()
            seconds, vram = measure(call, device, args.repeats)
            report.add("pipeline", name, label, seconds, vram, flops[size])


def bench_restorers(report: Report, args, device: torch.device, half: torch.dtype | None) -> None:
    from dalpsr.loaders.restorers import load_restorer
    from dalpsr.models.dat import DAT
    from dalpsr.pipelines.engines import resolve_restorer_source

    sizes = [8, 16] if args.dry_run else [128, 256]
    if args.dry_run:
        dat_s = DAT.from_preset("dat_s", 4, embed_dim=32, depth=[2], num_heads=[2], split_size=[2, 4])
    else:
        dat_s = DAT.from_preset("dat_s", 4)
    shipped, encoder = load_restorer(resolve_restorer_source(None), device=device)
    models = {
        "DAT-S (random)": (dat_s.to(device).eval(), lambda m, x: m.super_resolve(x, dtype=half)),
        "shipped restorer": (shipped, lambda m, x: m.super_resolve(x, encoder=encoder, dtype=half)),
    }
    for name, (model, run) in models.items():
        for size in sizes:
            label = f"{size}→{size * 4}"
            if report.over_budget():
                report.add("restorer", name, label, note="skipped: time budget spent")
                continue
            lr = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)).to(device)
            with torch.no_grad():
                run(model, lr)  # warm-up
                with FlopCounterMode(display=False) as counter:
                    run(model, lr)
                seconds, vram = measure(lambda: run(model, lr), device, args.repeats)  # noqa: B023
            precision = "fp16" if half == torch.float16 else "fp32"
            report.add("restorer", f"{name} {precision}", label, seconds, vram, counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny components, 2 steps (checks the script)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; 2 with --dry-run)")
    parser.add_argument("--repeats", type=int, default=1, help="timed images per run after a warm-up (default 1)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which runs are skipped")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's fp16 peak (default: table)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run `pytest -m gpu`")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.dry_run else 20)
    if args.steps < 1 or args.repeats < 1:
        parser.error(f"`--steps` and `--repeats` must be positive; got {args.steps} and {args.repeats}.")
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; run with --dry-run to check the script on the CPU.", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.float16  # the CPU has no fast fp16: fp32 pipeline, bf16 autocast
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    peak = args.peak_tflops or (None if args.dry_run else peak_tflops(name))
    print(f"device: {name}; torch {torch.__version__}; fp16 peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown'}")
    report = Report(peak, args.budget)
    if not args.skip_tests:
        print(run_gpu_tests(args.dry_run, timeout=min(180.0, args.budget / 2)), flush=True)
    print(HEADER, flush=True)
    bench_pipeline(report, args, device, dtype)
    bench_restorers(report, args, device, None if args.dry_run else torch.float16)
    print(f"total {time.perf_counter() - report.start:.0f} s (budget {args.budget:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
