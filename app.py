"""Gradio demo for DaLPSRPipeline.

    python app.py --sd2-base PATH [--controlnet PATH] | --model DIR | --random-weights-for-testing
                  [--host 127.0.0.1] [--port 7860] [--max-upload-mb 20] [--max-input-pixels 1048576]

Binds to 127.0.0.1 unless `--host` says otherwise; uploads are bounded in bytes (`--max-upload-mb`) and the input
image in pixels (`--max-input-pixels`), so one request cannot exhaust memory. Needs `pip install dalpsr[app]`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from PIL import Image

from dalpsr.pipelines.engines import load_pipeline, resolve_pipeline_source


@dataclass
class DemoLimits:
    """Bounds applied to every request."""

    max_upload_mb: float = 20.0
    max_input_pixels: int = 1024 * 1024
    max_steps: int = 200

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DaLPSR Gradio demo")
    p.add_argument("--model", help="a saved DaLPSRPipeline folder")
    p.add_argument("--sd2-base", help="an SD2-base diffusers folder")
    p.add_argument("--controlnet", help="a trained LR ControlNet folder (with --sd2-base)")
    p.add_argument("--random-weights-for-testing", action="store_true", help="tiny random models (output is noise)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=DemoLimits.max_upload_mb)
    p.add_argument("--max-input-pixels", type=int, default=DemoLimits.max_input_pixels)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def upscale(
    pipe,
    limits: DemoLimits,
    image: Image.Image | None,
    prompt: str,
    degradation_prompt: str,
    upscale_factor: float,
    steps: int,
    guidance_scale: float,
    start_strength: float,
    color_fix: str,
    seed: int,
) -> tuple[Image.Image, dict]:
    """One demo request: validate, run the pipeline, return the image and the prompts actually used."""
    if image is None:
        raise ValueError("`image`: upload an image first.")
    if image.width * image.height > limits.max_input_pixels:
        raise ValueError(
            f"`image` has {image.width}×{image.height} = {image.width * image.height} pixels; this demo accepts at "
            f"most {limits.max_input_pixels} (start it with a larger --max-input-pixels)."
        )
    if not 1 <= int(steps) <= limits.max_steps:
        raise ValueError(f"`steps` must be in [1, {limits.max_steps}]; got {steps}.")
    result = pipe(
        image,
        prompt=prompt.strip() or None,
        degradation_prompt=degradation_prompt.strip() or None,
        upscale=float(upscale_factor),
        num_inference_steps=int(steps),
        guidance_scale=float(guidance_scale),
        start_strength=float(start_strength),
        color_fix=color_fix,
        generator=torch.Generator().manual_seed(int(seed)),
    )
    used = {
        "prompt": result.prompts[0],
        "degradation_prompt": result.degradation_prompts[0],
        "unet_prompt": result.unet_prompts[0],
        "controlnet_prompt": result.controlnet_prompts[0],
        "negative_prompt": result.negative_prompts[0],
    }
    return result.images[0], used


def build_demo(pipe, limits: DemoLimits):
    """The Gradio Blocks app around `pipe`."""
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError("The demo needs gradio: `pip install dalpsr[app]`.") from err

    def handler(*inputs):
        try:
            return upscale(pipe, limits, *inputs)
        except (ValueError, TypeError) as err:
            raise gr.Error(str(err)) from err

    with gr.Blocks(title="DaLPSR: real-world super-resolution") as demo:
        gr.Markdown(
            "# DaLPSR\nReal-world super-resolution with a Stable Diffusion 2 prior, an LR ControlNet and "
            "degradation-aligned prompts. Leave the prompts empty to use the captioner / prompt decoder when the "
            "model has them."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Low-resolution image", image_mode=None)
                prompt = gr.Textbox(label="Content prompt (empty: caption)")
                degradation = gr.Textbox(label="Degradation prompt (empty: estimated)")
                factor = gr.Slider(1, 8, value=4, step=0.5, label="Upscale")
                steps = gr.Slider(1, limits.max_steps, value=50, step=1, label="Steps")
                guidance = gr.Slider(0, 15, value=5.5, step=0.5, label="Guidance scale")
                strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Start strength (1 = pure noise)")
                color_fix = gr.Radio(["wavelet", "adain", "none"], value="wavelet", label="Colour fix")
                seed = gr.Number(value=0, precision=0, label="Seed")
                run = gr.Button("Upscale", variant="primary")
            with gr.Column():
                output = gr.Image(type="pil", label="Result", format="png")
                used = gr.JSON(label="Prompts used")
        run.click(
            handler,
            inputs=[image, prompt, degradation, factor, steps, guidance, strength, color_fix, seed],
            outputs=[output, used],
        )
    return demo


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    kind, source = resolve_pipeline_source(args.model, args.sd2_base, args.random_weights_for_testing)
    if kind == "random":
        from dalpsr.testing import get_dummy_pipeline

        pipe = get_dummy_pipeline(seed=args.seed)
    else:
        pipe, _ = load_pipeline(kind, source, args.controlnet, args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    limits = DemoLimits(max_upload_mb=args.max_upload_mb, max_input_pixels=args.max_input_pixels)
    demo = build_demo(pipe, limits)
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, max_file_size=limits.max_upload_bytes
    )


if __name__ == "__main__":
    main()
