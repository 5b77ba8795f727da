"""`dalpsr upscale`: super-resolve files and folders with `DaLPSRPipeline`."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_MODEL_DIR = Path(os.environ.get("DALPSR_HOME", Path.home() / ".cache" / "dalpsr")) / "pipeline"


@dataclass
class UpscaleSettings:
    """Run settings of `dalpsr upscale`, written as JSON beside the outputs."""

    model: str
    upscale: float = 4
    steps: int = 50
    guidance_scale: float = 5.5
    start_strength: float = 1.0
    controlnet_conditioning_scale: float = 1.0
    color_fix: str = "wavelet"
    text_routing: str = "split"
    prompt: str | None = None
    degradation_prompt: str | None = None
    negative_prompt: str | None = None
    seed: int = 0
    tile_size: int | None = None
    tile_overlap: int | None = None
    dtype: str = "auto"
    device: str = "auto"


class WeightsNotFoundError(FileNotFoundError):
    """No pipeline weights were found where `dalpsr upscale` looked."""


def add_commands(subparsers) -> None:
    """Register `dalpsr upscale`."""
    p = subparsers.add_parser(
        "upscale",
        help="super-resolve images (files or folders)",
        description="Super-resolve images with DaLPSRPipeline. Existing outputs are skipped, so a killed run resumes.",
    )
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output folder (never an input file)")
    src = p.add_argument_group("weights (first found wins)")
    src.add_argument("--model", help="a saved DaLPSRPipeline folder (save_pretrained layout)")
    src.add_argument("--sd2-base", help="an SD2-base diffusers folder; with --controlnet for a trained LR branch")
    src.add_argument("--controlnet", help="a ControlNetModel folder for the LR branch (with --sd2-base)")
    src.add_argument(
        "--random-weights-for-testing",
        action="store_true",
        help="use tiny random components (checks an installation; the output is noise)",
    )
    src.add_argument(
        "--dat-model",
        "--restorer",
        dest="dat_model",
        help="with --engine dat: train_dat.py output, a DATRestorer/DAT folder or an official DAT checkpoint",
    )
    p.add_argument(
        "--engine",
        choices=["diffusion", "dat"],
        default="diffusion",
        help="diffusion: the DaLPSR pipeline; dat: the DAT regression restorer alone (no diffusion weights)",
    )
    p.add_argument("--upscale", type=float, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=5.5)
    p.add_argument("--start-strength", type=float, default=1.0)
    p.add_argument("--controlnet-conditioning-scale", type=float, default=1.0)
    p.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default="wavelet")
    p.add_argument("--text-routing", choices=["split", "shared"], default="split")
    p.add_argument("--prompt", help="content prompt (default: the captioner's caption, if any)")
    p.add_argument("--degradation-prompt", help="degradation prompt (default: from the prompt decoder, if any)")
    p.add_argument("--negative-prompt", help="negative prompt (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-size", type=int, help="latent tile size in output pixels (default: automatic)")
    p.add_argument("--tile-overlap", type=int, help="tile overlap in output pixels")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--format", choices=["png", "webp", "jpg"], default="png", help="output image format")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.set_defaults(func=run_upscale)


def resolve_model_source(args) -> str:
    """Which weights to load: --model, --sd2-base, $DALPSR_MODEL, $DALPSR_SD2_BASE (recorded as --sd2-base), then
    the default folder."""
    if args.random_weights_for_testing:
        return "random-weights-for-testing"
    if args.model:
        return args.model
    if args.sd2_base:
        return args.sd2_base
    env = os.environ.get("DALPSR_MODEL")
    if env:
        return env
    sd2_env = os.environ.get("DALPSR_SD2_BASE")
    if sd2_env:
        args.sd2_base = sd2_env
        return sd2_env
    if (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        return str(DEFAULT_MODEL_DIR)
    raise WeightsNotFoundError(
        "No DaLPSR weights found. Looked at: --model (not given), --sd2-base (not given), $DALPSR_MODEL and "
        "$DALPSR_SD2_BASE (unset), "
        f"{DEFAULT_MODEL_DIR} (no model_index.json). Provide Stable Diffusion 2 base weights as a local diffusers "
        "folder with `--sd2-base PATH` (and a trained LR ControlNet with `--controlnet PATH`), or a saved "
        "DaLPSRPipeline folder with `--model PATH` or $DALPSR_MODEL; see README 'Weights'."
    )


def load_pipeline(args, source: str):
    import torch

    from dalpsr.pipelines.pipeline_dalpsr import DaLPSRPipeline

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes.get(args.dtype, torch.float16 if device.startswith("cuda") else torch.float32)
    if source == "random-weights-for-testing":
        from dalpsr.testing import get_dummy_pipeline

        pipe = get_dummy_pipeline(seed=args.seed)
    elif args.sd2_base and source == args.sd2_base:
        pipe = DaLPSRPipeline.from_sd2(source, controlnet=args.controlnet, torch_dtype=dtype)
    else:
        if not (Path(source) / "model_index.json").is_file():
            raise WeightsNotFoundError(
                f"{source} is not a saved DaLPSRPipeline folder (no model_index.json); see README 'Weights'."
            )
        pipe = DaLPSRPipeline.from_pretrained(source, torch_dtype=dtype)
    return pipe.to(device=device, dtype=dtype), device


def output_path_for(path: Path, root: Path | None, out_dir: Path, fmt: str) -> Path:
    """Output file for an input: its path relative to the folder it came from, with the output suffix."""
    rel = path.relative_to(root) if root is not None else Path(path.name)
    return out_dir / rel.with_suffix("." + fmt)


def run_upscale(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from dalpsr.image_io import IMAGE_EXTENSIONS, save_image_atomic

    out_dir = Path(args.output)
    jobs: list[tuple[Path, Path]] = []
    for item in args.inputs:
        p = Path(item)
        if p.is_dir():
            pattern = "**/*" if args.recursive else "*"
            files = sorted(q for q in p.glob(pattern) if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
            jobs.extend((f, output_path_for(f, p, out_dir, args.format)) for f in files)
        elif p.is_file():
            jobs.append((p, output_path_for(p, None, out_dir, args.format)))
        else:
            print(f"error: input not found: {p}", file=sys.stderr)
            return 2
    inputs = {f.resolve() for f, _ in jobs}
    collisions = [o for _, o in jobs if o.resolve() in inputs]
    if collisions:
        print(
            f"error: output {collisions[0]} would overwrite an input; choose another --output.",
            file=sys.stderr,
        )
        return 2
    todo = [(f, o) for f, o in jobs if args.overwrite or not o.exists()]
    skipped = len(jobs) - len(todo)
    if not todo:
        print(f"nothing to do: {skipped} outputs already exist in {out_dir}")
        return 0
    if args.engine == "dat":
        from dalpsr.cli_upscale_dat import run_dat_upscale

        return run_dat_upscale(args, todo, skipped, out_dir)
    try:
        source = resolve_model_source(args)
        pipe, device = load_pipeline(args, source)
    except (WeightsNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    settings = UpscaleSettings(
        model=source,
        upscale=args.upscale,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        start_strength=args.start_strength,
        controlnet_conditioning_scale=args.controlnet_conditioning_scale,
        color_fix=args.color_fix,
        text_routing=args.text_routing,
        prompt=args.prompt,
        degradation_prompt=args.degradation_prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        dtype=args.dtype,
        device=device,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dalpsr_upscale.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    pipe.set_progress_bar_config(disable=True)
    failures: list[tuple[Path, str]] = []
    extra = {} if args.negative_prompt is None else {"negative_prompt": args.negative_prompt}
    with open(out_dir / "dalpsr_upscale.jsonl", "a", encoding="utf-8") as log:
        for src, dst in tqdm(todo, desc="upscale", unit="img"):
            try:
                result = pipe(
                    str(src),
                    prompt=args.prompt,
                    degradation_prompt=args.degradation_prompt,
                    upscale=args.upscale,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale,
                    start_strength=args.start_strength,
                    controlnet_conditioning_scale=args.controlnet_conditioning_scale,
                    color_fix=args.color_fix,
                    text_routing=args.text_routing,
                    tile_size=args.tile_size,
                    tile_overlap=args.tile_overlap,
                    generator=torch.Generator(device="cpu").manual_seed(args.seed),
                    **extra,
                )
                image = result.images[0]
                if args.format == "jpg" and image.mode == "RGBA":
                    image = image.convert("RGB")
                save_image_atomic(image, dst)
                record = {
                    "input": str(src),
                    "output": str(dst),
                    "prompt": result.prompts[0],
                    "degradation_prompt": result.degradation_prompts[0],
                    "unet_prompt": result.unet_prompts[0],
                    "controlnet_prompt": result.controlnet_prompts[0],
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
            except Exception as err:  # a bad file must not stop the batch
                failures.append((src, f"{type(err).__name__}: {err}"))
                tqdm.write(f"failed: {src}: {type(err).__name__}: {err}", file=sys.stderr)
    done = len(todo) - len(failures)
    print(f"upscaled {done}, skipped {skipped} existing, failed {len(failures)} -> {out_dir}")
    for src, why in failures:
        print(f"  failed: {src}: {why}", file=sys.stderr)
    return 1 if failures else 0
