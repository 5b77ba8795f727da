"""Architecture configs shipped with dalpsr (installed as `dalpsr.configs`).

`sd2_base/` holds the Stable Diffusion 2 base architecture (UNet, VAE, text encoder) in diffusers/transformers
config form, and the DDIM schedule SD2 was trained with, so a real-size pipeline can be built with random weights
for smoke and memory runs without any download.
"""

from __future__ import annotations

import json
from importlib.resources import files

SD2_PARTS = ("unet", "vae", "text_encoder", "scheduler")


def load_sd2_base_config(part: str) -> dict:
    """The SD2-base config dict of `part` (one of SD2_PARTS)."""
    if part not in SD2_PARTS:
        raise ValueError(f"`part` must be one of {SD2_PARTS}; got {part!r}.")
    return json.loads((files("dalpsr.configs") / "sd2_base" / f"{part}.json").read_text())


def build_sd2_base_components(device: str = "cpu", dtype=None) -> dict:
    """Random-weight SD2-base components for `DaLPSRPipeline(**components)`, LR ControlNet included.

    Args:
        device: where to build; "meta" builds shapes only (instant, no memory).
        dtype: optional torch dtype for the models.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dalpsr.pipelines.pipeline_dalpsr import build_lr_controlnet
    from dalpsr.testing import get_dummy_tokenizer

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(load_sd2_base_config("unet"))
        vae = AutoencoderKL.from_config(load_sd2_base_config("vae"))
        text_config = {k: v for k, v in load_sd2_base_config("text_encoder").items() if k != "architectures"}
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        controlnet = build_lr_controlnet(unet, 2 ** (len(vae.config.block_out_channels) - 1))
    models = {"vae": vae, "text_encoder": text_encoder, "unet": unet, "controlnet": controlnet}
    if dtype is not None:
        models = {k: m.to(dtype) for k, m in models.items()}
    return {
        **models,
        "tokenizer": get_dummy_tokenizer(),
        "scheduler": DDIMScheduler.from_config(load_sd2_base_config("scheduler")),
    }
