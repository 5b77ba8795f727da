"""The LR branch of DaLPSR: a diffusers `ControlNetModel` copied from the UNet (ControlNet, Zhang et al. 2023)."""

from __future__ import annotations

import math

from diffusers import ControlNetModel, UNet2DConditionModel


def build_lr_controlnet(unet: UNet2DConditionModel, vae_scale_factor: int = 8) -> ControlNetModel:
    """The LR branch: a ControlNet copied from `unet` whose conditioning embedding downsamples by the VAE factor.

    The embedding has log2(factor) + 1 conv stages (SD: 16, 32, 96, 256 channels for factor 8).
    """
    stages = int(math.log2(vae_scale_factor)) + 1
    channels = (16, 32, 96, 256)[:stages] if stages <= 4 else tuple(16 * 2**i for i in range(stages))
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
