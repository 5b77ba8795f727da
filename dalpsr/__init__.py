"""dalpsr: real-world image super-resolution with a Stable Diffusion 2 prior, an LR ControlNet,
degradation-aligned prompts and MLLM captions.

Public names are imported on first use, so `import dalpsr` and the `dalpsr` command start fast. Saved pipelines
record each custom component by its defining module (e.g. `dalpsr.models.degradation_encoder`), so those modules
keep their class names importable at top level.
"""

from __future__ import annotations

import logging

from dalpsr._lazy import lazy_getattr

# diffusers imports bitsandbytes when it is installed (pyiqa depends on it); on CPUs with AVX512-BF16 its import warns
# that an optional CPU 4-bit kernel is missing. dalpsr quantises only on CUDA, so the Python API, the demo and the CLI
# keep that logger to errors (as `dalpsr.cli` does).
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.1.0"

# public name → module that defines it
_EXPORTS = {
    "DaLPSRPipeline": "dalpsr.pipelines.pipeline_dalpsr",
    "DaLPSRPipelineOutput": "dalpsr.pipelines.pipeline_dalpsr",
    "build_lr_controlnet": "dalpsr.models.controlnet",
    "apply_color_fix": "dalpsr.color",
    "load_image": "dalpsr.image_io",
    "to_rgb_images": "dalpsr.image_io",
    "DAT": "dalpsr.models.dat",
    "DATRestorer": "dalpsr.models.fusion",
    "SpandrelRestorer": "dalpsr.models.restorer",
    "CLIPSR": "dalpsr.models.clip_sr",
    "PLIDENet": "dalpsr.models.pl_idenet",
    "CDSRNet": "dalpsr.models.cdsr",
    "RAMImageEncoder": "dalpsr.models.ram_encoder",
    "SeeSRUNet2DConditionModel": "dalpsr.models.image_attention",
    "SeeSRControlNetModel": "dalpsr.models.image_attention",
    "load_seesr_unet": "dalpsr.loaders.seesr",
    "load_seesr_controlnet": "dalpsr.loaders.seesr",
    "load_ram_encoder": "dalpsr.loaders.seesr",
    "load_dat_checkpoint": "dalpsr.loaders.dat",
    "load_restorer": "dalpsr.loaders.restorers",
    "build_sd2_base_components": "dalpsr.loaders.sd2",
    "DegradationEncoder": "dalpsr.models.degradation_encoder",
    "DegradationFeatures": "dalpsr.models.degradation_encoder",
    "RestorationPromptDecoder": "dalpsr.models.prompt_decoder",
    "DegradationPrediction": "dalpsr.models.prompt_decoder",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
