"""dalpsr: real-world image super-resolution with a Stable Diffusion 2 prior, an LR ControlNet,
degradation-aligned prompts and MLLM captions."""

from dalpsr.color import apply_color_fix
from dalpsr.image_io import load_image, to_rgb_images
from dalpsr.pipelines.pipeline_dalpsr import DaLPSRPipeline, DaLPSRPipelineOutput, build_lr_controlnet

__version__ = "0.1.0"

__all__ = [
    "DaLPSRPipeline",
    "DaLPSRPipelineOutput",
    "apply_color_fix",
    "build_lr_controlnet",
    "load_image",
    "to_rgb_images",
]
