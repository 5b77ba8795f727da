"""Forward time of dalpsr's DAT against spandrel's reference DAT on identical weights.

One process, both models built from the same random state dict, runs interleaved (the order flips each
round so neither side always runs on a warmer cache). Prints median times and the ratio ours / spandrel
(< 1 means ours is faster).

    nice python benchmarks/bench_dat.py                      # DAT-light and DAT-S, x4, 64^2 and 128^2
    python benchmarks/bench_dat.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dalpsr.models.dat import DAT

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    _sync(x.device)
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        model(x)
    _sync(x.device)
    return time.perf_counter() - start


def bench(
    name: str, scale: int, size: int, rounds: int, warmup: int, device: torch.device, dtype
) -> tuple[float, float, float]:
    from spandrel.architectures.DAT import DAT as RefDAT

    cfg = DAT.preset_config(name, scale)
    ref = RefDAT(**cfg).eval()
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in ref.state_dict().items():
        if key.endswith(("rpe_biases", "relative_position_index", "attn_mask_0", "attn_mask_1", "tracked")):
            state[key] = value
        elif key.endswith(("running_var", "temperature")):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=generator) * 0.02
    ref.load_state_dict(state, strict=True)
    ours = DAT(**cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref, ours = ref.to(device), ours.to(device)
    x = torch.rand(1, 3, size, size, generator=generator).to(device)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"outputs differ by {diff:.2e}: the comparison would be meaningless")
    for _ in range(warmup):
        _time(ours, x, dtype)
        _time(ref, x, dtype)
    t_ours, t_ref = [], []
    for i in range(rounds):
        pairs = [(ours, t_ours), (ref, t_ref)]
        for model, times in pairs if i % 2 == 0 else pairs[::-1]:
            times.append(_time(model, x, dtype))
    return statistics.median(t_ours), statistics.median(t_ref), diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["dat_light", "dat_s"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"rounds={args.rounds} scale=x{args.scale}"
    )
    print(f"{'variant':<10} {'input':>7} {'ours ms':>9} {'spandrel ms':>12} {'ratio':>6} {'max|diff|':>10}")
    for name in args.variants:
        for size in args.sizes:
            ours, ref, diff = bench(name, args.scale, size, args.rounds, args.warmup, device, DTYPES[args.dtype])
            print(
                f"{name:<10} {size:>4}^2 {ours * 1e3:>9.1f} {ref * 1e3:>12.1f} {ours / ref:>6.3f} {diff:>10.1e}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
