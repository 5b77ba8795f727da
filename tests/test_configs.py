"""The shipped SD2-base architecture configs build the real-size models (shapes checked on the meta device)."""

from __future__ import annotations

import pytest
import torch

from dalpsr.loaders.sd2 import build_sd2_base_components, load_sd2_base_config


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sd2_base_architecture_has_the_published_parameter_counts():
    c = build_sd2_base_components(device="meta")
    # Parameter counts of the released SD2-base UNet, VAE and (23-layer) OpenCLIP ViT-H text tower.
    assert n_params(c["unet"]) == 865_910_724
    assert n_params(c["vae"]) == 83_653_863
    assert n_params(c["text_encoder"]) == 340_387_840
    assert c["controlnet"].config.conditioning_embedding_out_channels == (16, 32, 96, 256)
    assert c["scheduler"].config.prediction_type == "epsilon"
    assert c["tokenizer"].model_max_length == 77


def test_unknown_part_is_rejected():
    with pytest.raises(ValueError, match="part"):
        load_sd2_base_config("refiner")
