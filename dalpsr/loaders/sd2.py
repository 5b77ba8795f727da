"""Stable Diffusion 2 base built offline: its architecture configs and a CLIP tokenizer, no download.

`configs/sd2_base/` (package data) holds the Stable Diffusion 2 base architecture (UNet, VAE, text
encoder) in diffusers/transformers config form, and the DDIM schedule SD2 was trained with, so a real-size pipeline
can be built with random weights for smoke and memory runs without any download.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib.resources import files

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dalpsr.models.controlnet import build_lr_controlnet
from dalpsr.package_data import package_data

SD2_PARTS = ("unet", "vae", "text_encoder", "scheduler")


def load_sd2_base_config(part: str) -> dict:
    """The SD2-base config dict of `part` (one of SD2_PARTS)."""
    if part not in SD2_PARTS:
        raise ValueError(f"`part` must be one of {SD2_PARTS}; got {part!r}.")
    return json.loads(package_data("configs", "sd2_base", f"{part}.json").read_text())


def build_sd2_base_components(device: str = "cpu", dtype=None) -> dict:
    """Random-weight SD2-base components for `DaLPSRPipeline(**components)`, LR ControlNet included.

    Args:
        device: where to build; "meta" builds shapes only (instant, no memory).
        dtype: optional torch dtype for the models.
    """
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
        "tokenizer": clip_tokenizer(),
        "scheduler": DDIMScheduler.from_config(load_sd2_base_config("scheduler")),
    }


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[str]]:
    """CLIP's byte-level BPE vocabulary and merges, built from open_clip's bundled merges file."""
    raw = gzip.decompress((files("open_clip") / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).decode("utf-8")
    merges = raw.split("\n")[1 : 49152 - 256 - 2 + 1]
    # GPT-2 byte ↔ unicode table: printable bytes map to themselves, the rest to 256 + n.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    byte_chars = [chr(c) for c in codes]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP tokenizer (49,408 tokens, SD2 padding with "!"), built offline from open_clip's vocabulary."""
    vocab, merges = _clip_bpe()
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, pad_token="!", model_max_length=model_max_length)
