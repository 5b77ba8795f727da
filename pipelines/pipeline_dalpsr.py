"""`DaLPSRPipeline`: Stable Diffusion 2 super-resolution with an LR ControlNet and degradation-aligned prompts.

Follows the DaLPSR framework (degradation-aligned language prompts for Real-SR) on the SeeSR layout: the
LR branch is a ControlNet made from the SD2 UNet that sees the bicubic-upsampled LR image; a content
prompt (the caller's text or an MLLM caption) drives the ControlNet's cross-attention and the degradation
prompt plus quality words drive the UNet's ("split" routing); "shared" gives the joined text to both.
Differences from the papers' code: any diffusers scheduler, latent tiling with Gaussian blending in the
denoising loop, tiled VAE, exact `upscale ×` output size for any input size (pad, then crop), and every
prompt is an argument the caller can override.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.schedulers import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.peft_utils import get_adapter_name
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from dalpsr.color import COLOR_FIX_MODES, apply_color_fix
from dalpsr.image_io import RGBImage, tensor_to_pil, to_rgb_images
from dalpsr.tiling import gaussian_weights, tile_starts, tiled_map

DEFAULT_NEGATIVE_PROMPT = "dotted, noise, blur, lowres, oversmooth, worst quality, low quality, jpeg artifacts"
DEFAULT_QUALITY_PROMPT = "clean, high-resolution, 8k, ultra-detailed"
TEXT_ROUTINGS = ("split", "shared")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_UPSCALE = 16


@dataclass
class DaLPSRPipelineOutput(BaseOutput):
    """Output of `DaLPSRPipeline`.

    Args:
        images: the super-resolved images: PIL images, a B×H×W×3 float array in [0, 1] ("np"), a B×3×H×W
            tensor in [0, 1] ("pt") or latents ("latent"); when the inputs had different sizes, a list with one
            item per image (H×W×3 array, 3×H×W tensor).
        prompts: the content prompt (caller's text, caption or default) used for each image.
        degradation_prompts: the degradation prompt used for each image ("" when none).
        negative_prompts: the negative prompt used for each image.
        unet_prompts: the full text given to the UNet cross-attention for each image.
        controlnet_prompts: the full text given to the ControlNet cross-attention for each image.
        degradations: per-image degradation estimates from the prompt decoder, or None when none ran.
    """

    images: Any
    prompts: list[str]
    degradation_prompts: list[str]
    negative_prompts: list[str]
    unet_prompts: list[str]
    controlnet_prompts: list[str]
    degradations: list[Any] | None = None


def join_prompt(*parts: str | None) -> str:
    """Join non-empty prompt parts with ", "."""
    return ", ".join(p.strip().strip(",").strip() for p in parts if p and p.strip().strip(","))


def route_prompts(
    prompts: list[str], degradation_prompts: list[str], quality_prompt: str, text_routing: str
) -> tuple[list[str], list[str]]:
    """(ControlNet texts, UNet texts) per image, as the pipeline and the training scripts route them.

    "split": content prompt → ControlNet, degradation prompt + quality words → UNet; "shared": the joined text
    to both.
    """
    if text_routing not in TEXT_ROUTINGS:
        raise ValueError(f"`text_routing` must be one of {TEXT_ROUTINGS}; got {text_routing!r}.")
    unet_texts = [join_prompt(d, quality_prompt) for d in degradation_prompts]
    if text_routing == "split":
        return list(prompts), unet_texts
    joined = [join_prompt(p, u) for p, u in zip(prompts, unet_texts)]
    return joined, list(joined)


class DaLPSRPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    r"""Real-world super-resolution with a Stable Diffusion 2 prior and an LR ControlNet.

    Args:
        vae: the SD2 `AutoencoderKL`.
        text_encoder: the SD2 `CLIPTextModel` (OpenCLIP ViT-H text tower in SD2).
        tokenizer: its `CLIPTokenizer`.
        unet: the SD2 `UNet2DConditionModel`.
        controlnet: the LR branch, a `ControlNetModel` (e.g. `ControlNetModel.from_unet(unet)`).
        scheduler: any diffusers scheduler.
        degradation_encoder: optional CLIP degradation encoder (the shared feature stack).
        prompt_decoder: optional restoration prompt decoder that writes the degradation prompt.
        restorer: optional regression SR model (DAT) for two-stage restoration.
        captioner: optional MLLM captioner; not saved by `save_pretrained` (it is a transformers model with its
            own processor; pass it again after loading).
        image_encoder: optional image encoder for SeeSR-style image cross-attention (e.g. `RAMImageEncoder`):
            needed when the UNet and ControlNet have `image_attentions` (`use_image_cross_attention`); its
            `encode(lr)` embeddings of the LR image go to both (`DaLPSRPipeline.from_seesr`).
    """

    model_cpu_offload_seq = (
        "degradation_encoder->prompt_decoder->restorer->image_encoder->text_encoder->controlnet->unet->vae"
    )
    _optional_components = ["degradation_encoder", "prompt_decoder", "restorer", "captioner", "image_encoder"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "controlnet_prompt_embeds"]
    _lora_loadable_modules = ["unet", "text_encoder", "controlnet"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        scheduler: KarrasDiffusionSchedulers,
        degradation_encoder: Any = None,
        prompt_decoder: Any = None,
        restorer: Any = None,
        captioner: Any = None,
        image_encoder: Any = None,
    ):
        super().__init__()
        if not isinstance(controlnet, ControlNetModel):
            raise TypeError(f"`controlnet` must be a diffusers ControlNetModel; got {type(controlnet).__name__}.")
        if not isinstance(scheduler, SchedulerMixin):
            raise TypeError(f"`scheduler` must be a diffusers scheduler; got {type(scheduler).__name__}.")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            controlnet=controlnet,
            scheduler=scheduler,
            degradation_encoder=degradation_encoder,
            prompt_decoder=prompt_decoder,
            restorer=restorer,
            captioner=captioner,
            image_encoder=image_encoder,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DaLPSRPipeline:
        """`DiffusionPipeline.from_pretrained`, after importing the dalpsr modules that define the saved custom
        components (diffusers refuses to import a module named in model_index.json by itself; these are this
        package's own modules, so importing them runs no foreign code)."""
        config_kwargs = {
            k: kwargs[k] for k in ("cache_dir", "revision", "local_files_only", "token", "proxies") if k in kwargs
        }
        for entry in cls.load_config(pretrained_model_name_or_path, **config_kwargs).values():
            if isinstance(entry, list | tuple) and entry and isinstance(entry[0], str):
                if entry[0] == "dalpsr" or entry[0].startswith("dalpsr."):
                    importlib.import_module(entry[0])
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_sd2(
        cls,
        base: str | os.PathLike,
        controlnet: ControlNetModel | str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        **components,
    ) -> DaLPSRPipeline:
        """Build the pipeline from a Stable Diffusion 2 (base) diffusers folder or hub id.

        Args:
            base: a folder with `vae/`, `text_encoder/`, `tokenizer/`, `unet/`, `scheduler/` (the SD2-base layout)
                or a hub id.
            controlnet: a `ControlNetModel`, or a folder/hub id holding one; None builds a fresh LR branch from
                the UNet (`ControlNetModel.from_unet`), to be trained.
            torch_dtype: dtype for the loaded models.
            components: any other component (`scheduler`, `degradation_encoder`, ...) to use instead.
        """
        from diffusers import DDIMScheduler

        base = str(base)
        local = Path(base).is_dir()
        if not local and (Path(base).is_absolute() or base.startswith((".", "~")) or os.sep + os.sep in base):
            raise FileNotFoundError(f"`base` folder not found: {base}")

        def load(kind, subfolder):
            try:
                kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None and subfolder != "tokenizer" else {}
                return kind.from_pretrained(base, subfolder=subfolder, **kwargs)
            except OSError as err:
                raise OSError(
                    f"Could not load `{subfolder}` of the SD2 base model from {base!r}. Pass a local folder in the "
                    f"diffusers layout (vae/, text_encoder/, tokenizer/, unet/, scheduler/), e.g. a download of "
                    f"an SD2-base mirror made with `huggingface-cli download`; see README 'Weights'. ({err})"
                ) from err

        vae = components.pop("vae", None) or load(AutoencoderKL, "vae")
        text_encoder = components.pop("text_encoder", None) or load(CLIPTextModel, "text_encoder")
        tokenizer = components.pop("tokenizer", None) or load(CLIPTokenizer, "tokenizer")
        unet = components.pop("unet", None) or load(UNet2DConditionModel, "unet")
        scheduler = components.pop("scheduler", None) or load(DDIMScheduler, "scheduler")
        if controlnet is None:
            vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
            controlnet = build_lr_controlnet(unet, vae_factor)
        elif not isinstance(controlnet, ControlNetModel):
            controlnet = ControlNetModel.from_pretrained(
                str(controlnet), **({"torch_dtype": torch_dtype} if torch_dtype is not None else {})
            )
        return cls(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            controlnet=controlnet,
            scheduler=scheduler,
            **components,
        )

    @classmethod
    def from_seesr(
        cls,
        seesr_dir: str | os.PathLike,
        base: str | os.PathLike | None = None,
        ram: str | os.PathLike | None = None,
        dape: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        trust_pickle: bool = False,
        **components,
    ) -> DaLPSRPipeline:
        """Build the pipeline from SeeSR's released weights (cswry/SeeSR) on an SD2-base folder.

        Run it with SeeSR's settings via `pipe(image, **dalpsr.weights.seesr.seesr_call_kwargs())`.

        Args:
            seesr_dir: the SeeSR release folder holding `unet/` and `controlnet/` (Hub `CSWRY/SeeSR`, `seesr/`).
            base: SD2-base folder or hub id; None downloads the VAE, text encoder, tokenizer and scheduler of
                `dalpsr.weights.seesr.SD2_BASE_MIRROR` at the pinned `SD2_BASE_REVISION`.
            ram: RAM's `ram_swin_large_14m.pth` or a folder from `dalpsr convert-ram`.
            dape: SeeSR's `DAPE.pth`, merged into RAM's Swin (with a RAM `.pth`).
            torch_dtype: dtype for the loaded models.
            revision: hub revision of `base`.
            trust_pickle: allow full unpickling of `.pth` files that `torch.load(weights_only=True)` refuses.
            components: any other component to use instead (e.g. `captioner`, `scheduler`).
        """
        from diffusers import DDPMScheduler

        from dalpsr.weights.seesr import resolve_sd2_base, seesr_components

        base_dir = resolve_sd2_base(base, revision)
        parts = seesr_components(seesr_dir, ram, dape, torch_dtype=torch_dtype, trust_pickle=trust_pickle)
        if "scheduler" not in components:
            components["scheduler"] = DDPMScheduler.from_pretrained(base_dir, subfolder="scheduler")
        controlnet = parts.pop("controlnet")
        return cls.from_sd2(base_dir, controlnet=controlnet, torch_dtype=torch_dtype, **{**parts, **components})

    # ------------------------------------------------------------------ attention / LoRA
    def enable_xformers_memory_efficient_attention(self, attention_op: Callable | None = None) -> None:
        """Use xFormers memory-efficient attention in every attention layer (CUDA only)."""
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            raise ImportError(
                "xformers is not installed. Install the build that matches your CUDA torch "
                "(`pip install dalpsr[gpu]` or `pip install xformers --index-url <your torch CUDA index>`); "
                "without it the pipeline uses PyTorch scaled-dot-product attention, which is the default."
            )
        if not torch.cuda.is_available():
            raise RuntimeError("xformers attention needs a CUDA device; torch.cuda.is_available() is False.")
        super().enable_xformers_memory_efficient_attention(attention_op)

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        **kwargs,
    ) -> None:
        """Load LoRA weights into the UNet, the text encoder and the ControlNet.

        Keys prefixed `unet.` / `text_encoder.` load as in diffusers; keys prefixed `controlnet.` load into the LR
        branch (as written by `save_lora_weights(controlnet_lora_layers=...)` and `training/train_lora.py`).
        """
        state_dict = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)[0]
        if not state_dict or not all("lora" in key for key in state_dict):
            raise ValueError(
                "`pretrained_model_name_or_path_or_dict` is not a LoRA checkpoint: every key must contain 'lora'."
            )
        adapter_name = adapter_name or get_adapter_name(self.unet)
        controlnet_sd = {k: v for k, v in state_dict.items() if k.startswith("controlnet.")}
        rest = {k: v for k, v in state_dict.items() if not k.startswith("controlnet.")}
        if rest:
            super().load_lora_weights(rest, adapter_name=adapter_name)
        if controlnet_sd:
            self.controlnet.load_lora_adapter(controlnet_sd, prefix="controlnet", adapter_name=adapter_name)

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        unet_lora_layers: dict[str, torch.Tensor] | None = None,
        text_encoder_lora_layers: dict[str, torch.Tensor] | None = None,
        controlnet_lora_layers: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
    ) -> None:
        """Save LoRA layers of the UNet, text encoder and ControlNet (e.g. from `peft.get_peft_model_state_dict`)."""
        layers = {
            name: sd
            for name, sd in (
                ("unet", unet_lora_layers),
                ("text_encoder", text_encoder_lora_layers),
                ("controlnet", controlnet_lora_layers),
            )
            if sd
        }
        if not layers:
            raise ValueError(
                "Pass at least one of `unet_lora_layers`, `text_encoder_lora_layers`, `controlnet_lora_layers`."
            )
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=layers,
            lora_metadata={},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    # ------------------------------------------------------------------ helpers
    @property
    def pad_multiple(self) -> int:
        """Pixel multiple the UNet needs: VAE factor × 2^(number of UNet downsamplings)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The UNet's training resolution in pixels (512 for SD2-base); the default tile size."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def encode_prompt(self, texts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Encode texts with the CLIP text encoder: B×77×D hidden states (padded to the tokenizer max length)."""
        unique = list(dict.fromkeys(texts))
        ids = self.tokenizer(
            unique,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            embeds = self.text_encoder(ids.to(device), attention_mask=None)[0].to(dtype=dtype, device=device)
        index = {t: i for i, t in enumerate(unique)}
        return embeds[[index[t] for t in texts]]

    @staticmethod
    def _as_list(value: str | list[str] | None, batch: int, name: str) -> list[str | None]:
        if value is None:
            return [None] * batch
        if isinstance(value, str):
            return [value] * batch
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            if len(value) != batch:
                raise ValueError(f"`{name}` has {len(value)} entries but there are {batch} images; pass one per image.")
            return list(value)
        raise TypeError(f"`{name}` must be a str or a list of str; got {type(value).__name__}.")

    def check_inputs(
        self,
        num_inference_steps,
        upscale,
        guidance_scale,
        start_strength,
        controlnet_conditioning_scale,
        color_fix,
        text_routing,
        tile_size,
        tile_overlap,
        vae_tile_size,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps <= 0
        ):
            raise ValueError(f"`num_inference_steps` must be a positive int; got {num_inference_steps!r}.")
        if isinstance(upscale, bool) or not isinstance(upscale, Real) or not 1 <= upscale <= MAX_UPSCALE:
            raise ValueError(f"`upscale` must be a number in [1, {MAX_UPSCALE}]; got {upscale!r}.")
        if not isinstance(guidance_scale, Real) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a finite number ≥ 0; got {guidance_scale!r}.")
        if not isinstance(start_strength, Real) or not 0 < start_strength <= 1:
            raise ValueError(f"`start_strength` must be in (0, 1]; got {start_strength!r}.")
        if not isinstance(controlnet_conditioning_scale, Real) or not math.isfinite(controlnet_conditioning_scale):
            raise ValueError(
                f"`controlnet_conditioning_scale` must be a finite number; got {controlnet_conditioning_scale!r}."
            )
        if color_fix not in COLOR_FIX_MODES:
            raise ValueError(f"`color_fix` must be one of {COLOR_FIX_MODES}; got {color_fix!r}.")
        if text_routing not in TEXT_ROUTINGS:
            raise ValueError(f"`text_routing` must be one of {TEXT_ROUTINGS}; got {text_routing!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}; got {output_type!r}.")
        for name, size in (("tile_size", tile_size), ("vae_tile_size", vae_tile_size)):
            if size is not None and (not isinstance(size, int) or size < self.pad_multiple or size % self.pad_multiple):
                raise ValueError(
                    f"`{name}` must be a positive multiple of {self.pad_multiple} pixels (or None for automatic); "
                    f"got {size!r}."
                )
        effective_tile = tile_size or self.native_resolution
        if tile_overlap is not None and (not isinstance(tile_overlap, int) or not 0 <= tile_overlap < effective_tile):
            raise ValueError(
                f"`tile_overlap` must be an int in [0, tile_size={effective_tile}) pixels; got {tile_overlap!r}."
            )
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {bad}; allowed: {self._callback_tensor_inputs}."
            )

    def prepare_condition(
        self, images: list[RGBImage], upscale: float, device, dtype, restored: torch.Tensor | None = None
    ):
        """The LR-branch condition: bicubic-upsampled LR (or the `restored` regression estimate, resized to the
        output size when its scale differs), padded to the UNet multiple.

        Returns (condition B×3×H×W in [0, 1] at the exact output size, padded condition B×3×H'×W').
        """
        lr = torch.stack([im.rgb for im in images]).to(device=device, dtype=torch.float32)
        h, w = lr.shape[-2:]
        out_h, out_w = round(h * upscale), round(w * upscale)
        source = lr if restored is None else restored.to(device=device, dtype=torch.float32)
        if source.shape[-2:] == (out_h, out_w):
            up = source.clamp(0, 1)
        else:
            shrink = out_h < source.shape[-2]
            up = F.interpolate(source, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=shrink)
            up = up.clamp(0, 1)
        m = self.pad_multiple
        pad_h, pad_w = (-out_h) % m, (-out_w) % m
        cond = F.pad(up, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else up
        return up.to(dtype), cond.to(dtype)

    def encode_degradation(self, images: list[RGBImage], device):
        """One pass of the shared feature stack (`degradation_encoder`) over same-size LR images.

        Returns its `DegradationFeatures` (content / degradation embeddings, degradation tokens, hidden states),
        which the prompt decoder and the restorer consume.
        """
        if self.degradation_encoder is None:
            raise ValueError(
                "`degradation_encoder` is None but the prompt decoder (or the fusion restorer) needs its features; "
                "pass a DegradationEncoder component, or give `degradation_prompt` explicitly."
            )
        encoder = self.degradation_encoder
        lr = torch.stack([im.rgb for im in images]).to(device=device, dtype=torch.float32)
        pixel_values = encoder.preprocess(lr).to(device=device, dtype=encoder.dtype)
        return encoder(pixel_values)

    def _vae_encode(self, x: torch.Tensor, tile: int | None) -> torch.Tensor:
        # x: B×3×H×W in [-1, 1] → scaled latents (distribution mode: deterministic).
        def encode(t: torch.Tensor) -> torch.Tensor:
            return self.vae.encode(t).latent_dist.mode()

        if tile is not None and max(x.shape[-2:]) > tile:
            latents = tiled_map(encode, x, tile, tile // 4, scale=1 / self.vae_scale_factor)
        else:
            latents = encode(x)
        return latents * self.vae.config.scaling_factor

    def _vae_decode(self, latents: torch.Tensor, tile: int | None) -> torch.Tensor:
        # scaled latents → B×3×H×W in [-1, 1].
        latents = latents / self.vae.config.scaling_factor

        def decode(z: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(z, return_dict=False)[0]

        latent_tile = None if tile is None else tile // self.vae_scale_factor
        if latent_tile is not None and max(latents.shape[-2:]) > latent_tile:
            return tiled_map(decode, latents, latent_tile, latent_tile // 4, scale=self.vae_scale_factor)
        return decode(latents)

    def image_attention_kwargs(self, images: list[RGBImage], device, dtype, do_cfg: bool) -> dict:
        """`{"image_encoder_hidden_states": B×N×D}` of the LR images when UNet and ControlNet have image
        cross-attention (repeated for the CFG half), else {}."""
        flags = [bool(getattr(m.config, "use_image_cross_attention", False)) for m in (self.unet, self.controlnet)]
        if not any(flags):
            return {}
        if not all(flags):
            raise ValueError(
                f"Image cross-attention must be on in both the UNet and the ControlNet or in neither; got "
                f"unet={flags[0]}, controlnet={flags[1]} (`use_image_cross_attention`)."
            )
        if self.image_encoder is None:
            raise ValueError(
                "The UNet and ControlNet have image cross-attention (SeeSR) but the pipeline has no `image_encoder`; "
                "pass one (e.g. `RAMImageEncoder`, see `DaLPSRPipeline.from_seesr`)."
            )
        lr = torch.stack([im.rgb for im in images])
        embeds = self.image_encoder.encode(lr).to(device=device, dtype=dtype)
        return {"image_encoder_hidden_states": torch.cat([embeds, embeds]) if do_cfg else embeds}

    def _predict_noise(self, latent_in, t, cond, unet_embeds, cn_embeds, cn_scale, image_kwargs):
        # The condition (B×3×H×W) is repeated for the CFG half here, per tile, not at full resolution.
        if cond.shape[0] != latent_in.shape[0]:
            cond = cond.repeat(latent_in.shape[0] // cond.shape[0], 1, 1, 1)
        down, mid = self.controlnet(
            latent_in,
            t,
            encoder_hidden_states=cn_embeds,
            controlnet_cond=cond,
            conditioning_scale=cn_scale,
            return_dict=False,
            **image_kwargs,
        )
        # An fp32 LR branch may run beside an fp16/bf16 UNet: residuals join the UNet in its dtype.
        unet_dtype = self.unet.dtype
        down = [d.to(unet_dtype) for d in down]
        mid = mid.to(unet_dtype)
        return self.unet(
            latent_in,
            t,
            encoder_hidden_states=unet_embeds,
            cross_attention_kwargs=self.cross_attention_kwargs,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
            **image_kwargs,
        )[0]

    def _predict_noise_tiled(self, latent_in, t, cond, unet_embeds, cn_embeds, cn_scale, tile, overlap, image_kwargs):
        # latent_in: N×C×h×w; tiles of `tile` latent px, Gaussian-blended noise predictions.
        _, _, h, w = latent_in.shape
        th, tw = min(tile, h), min(tile, w)
        f = self.vae_scale_factor
        weight = gaussian_weights(th, tw, device=latent_in.device, dtype=torch.float32)
        out = torch.zeros(latent_in.shape, device=latent_in.device, dtype=torch.float32)
        norm = torch.zeros((h, w), device=latent_in.device, dtype=torch.float32)
        for y0 in tile_starts(h, th, min(overlap, th - 1)):
            for x0 in tile_starts(w, tw, min(overlap, tw - 1)):
                pred = self._predict_noise(
                    latent_in[:, :, y0 : y0 + th, x0 : x0 + tw],
                    t,
                    cond[:, :, y0 * f : (y0 + th) * f, x0 * f : (x0 + tw) * f],
                    unet_embeds,
                    cn_embeds,
                    cn_scale,
                    image_kwargs,
                )
                out[:, :, y0 : y0 + th, x0 : x0 + tw] += pred.float() * weight
                norm[y0 : y0 + th, x0 : x0 + tw] += weight
        return (out / norm).to(latent_in.dtype)

    # ------------------------------------------------------------------ properties used by callbacks
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        image,
        prompt: str | list[str] | None = None,
        degradation_prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = DEFAULT_NEGATIVE_PROMPT,
        quality_prompt: str = DEFAULT_QUALITY_PROMPT,
        upscale: float = 4,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.5,
        start_strength: float = 1.0,
        controlnet_conditioning_scale: float = 1.0,
        color_fix: str = "wavelet",
        text_routing: str = "split",
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        vae_tile_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        default_prompt: str = "",
        unload_captioner: bool = False,
        start_timestep: int | None = None,
        pre_restore: bool | None = None,
        restorer_tile_size: int | None = None,
    ):
        r"""Super-resolve `image`.

        Args:
            image: the low-resolution input(s): a path; a PIL image of any mode (RGBA/LA: the alpha channel is
                resized bicubically and reattached to PIL outputs; L/P/I;16/CMYK are converted to RGB); a numpy
                H×W(×C) array (uint8, uint16 or float in [0, 1]); a torch tensor C×H×W or B×C×H×W, float RGB or gray
                in [0, 1]; or a list of these (sizes may differ). EXIF orientation is applied to files and PIL images.
            prompt: the content prompt (the image description). None: the captioner's caption when a captioner is
                set, else `default_prompt`.
            degradation_prompt: the degradation prompt, e.g. "Deblur with sigma 0.50~0.75, Denoise with sigma
                0.25~0.50". None: written by the prompt decoder when one is set, else empty.
            negative_prompt: text for the unconditional branch of classifier-free guidance.
            quality_prompt: words appended to the UNet text ("" to disable).
            upscale: output size / input size, in [1, 16]; the output is exactly `round(upscale · size)`.
            num_inference_steps: denoising steps of the full schedule.
            guidance_scale: classifier-free guidance scale; ≤ 1 disables guidance.
            start_strength: in (0, 1]. 1.0 starts from pure noise; below 1 starts from the VAE latent of the
                upsampled LR noised to that fraction of the schedule (the last `start_strength` of the steps run).
            controlnet_conditioning_scale: multiplier of the LR branch residuals.
            color_fix: "wavelet" (default), "adain" or "none"; corrects colours against the LR-branch condition
                (the upsampled LR, or the restorer's estimate).
            text_routing: "split" (content → ControlNet, degradation + quality → UNet) or "shared" (the joined
                text to both).
            tile_size: latent tiling size in output pixels; None tiles automatically above the UNet's native
                resolution (512 px for SD2-base). A value smaller than the image forces tiling.
            tile_overlap: overlap between tiles in output pixels (default: tile_size // 4).
            vae_tile_size: VAE tile size in output pixels (default: the native resolution).
            generator: a torch.Generator or one per image, for reproducible sampling.
            latents: initial noise latents B×C×h×w (used instead of sampling; with `start_strength < 1` as the noise).
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return a `DaLPSRPipelineOutput` (True) or a tuple `(images, prompts)`.
            cross_attention_kwargs: passed to the attention processors (e.g. {"scale": lora_scale}).
            callback_on_step_end: called as `fn(pipe, step, timestep, callback_kwargs)` after every step; may
                return a dict with replacement "latents".
            callback_on_step_end_tensor_inputs: names from `_callback_tensor_inputs` to pass to the callback.
            default_prompt: content prompt used when `prompt` is None and no captioner is set.
            unload_captioner: free the captioner's model right after captioning, before diffusion (it reloads on
                its next use). Captions are trimmed at a phrase boundary to the text encoder's 77-token budget.
            start_timestep: start from the VAE latent of the upsampled LR noised to this training timestep and run
                the scheduled steps at or below it (SeeSR's LR start: 999 with DDPM); needs `start_strength=1`
                and a scheduler whose `add_noise` takes any training timestep (DDPM, DDIM).
            pre_restore: two-stage restoration (DiffBIR-style): the `restorer`'s regression estimate replaces the
                bicubic LR as the LR-branch condition, start latent, caption input and colour reference; it shares
                the degradation encoder's pass with the prompt decoder. None: on when a restorer is set.
            restorer_tile_size: tile edge in LR pixels for the restorer (None: whole images).
        """
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 1. Check inputs
        self.check_inputs(
            num_inference_steps,
            upscale,
            guidance_scale,
            start_strength,
            controlnet_conditioning_scale,
            color_fix,
            text_routing,
            tile_size,
            tile_overlap,
            vae_tile_size,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        if start_timestep is not None:
            train_steps = self.scheduler.config.num_train_timesteps
            if isinstance(start_timestep, bool) or not isinstance(start_timestep, int):
                raise ValueError(f"`start_timestep` must be an int or None; got {start_timestep!r}.")
            if not 0 <= start_timestep < train_steps or start_strength != 1.0:
                raise ValueError(
                    f"`start_timestep` must be in [0, {train_steps}) with `start_strength`=1.0; got "
                    f"start_timestep={start_timestep}, start_strength={start_strength}."
                )
        images = to_rgb_images(image)
        batch = len(images)
        prompts = self._as_list(prompt, batch, "prompt")
        degradation_prompts = self._as_list(degradation_prompt, batch, "degradation_prompt")
        negative_prompts = [n or "" for n in self._as_list(negative_prompt, batch, "negative_prompt")]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"`generator` is a list of {len(generator)} but there are {batch} images.")
        self._guidance_scale = float(guidance_scale)
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        run = dict(
            quality_prompt=quality_prompt,
            upscale=upscale,
            num_inference_steps=num_inference_steps,
            start_strength=float(start_strength),
            controlnet_conditioning_scale=float(controlnet_conditioning_scale),
            color_fix=color_fix,
            text_routing=text_routing,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            vae_tile_size=vae_tile_size,
            output_type=output_type,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            default_prompt=default_prompt,
            unload_captioner=unload_captioner,
            start_timestep=start_timestep,
            pre_restore=pre_restore,
            restorer_tile_size=restorer_tile_size,
        )
        # Images of different sizes run as separate batches, in input order.
        groups: list[list[int]] = []
        for i, im in enumerate(images):
            if groups and images[groups[-1][0]].size == im.size:
                groups[-1].append(i)
            else:
                groups.append([i])
        if latents is not None and len(groups) > 1:
            raise ValueError("`latents` can only be given when all images have the same size.")

        results = []
        for idx in groups:
            gen = [generator[i] for i in idx] if isinstance(generator, list) else generator
            results.append(
                self._generate(
                    [images[i] for i in idx],
                    [prompts[i] for i in idx],
                    [degradation_prompts[i] for i in idx],
                    [negative_prompts[i] for i in idx],
                    generator=gen[0] if isinstance(gen, list) and len(gen) == 1 else gen,
                    latents=latents,
                    **run,
                )
            )
        self.maybe_free_model_hooks()

        if len(results) == 1:
            out_images = results[0]["images"]
        else:
            out_images = [im for r in results for im in r["images"]]
        fields = {
            key: [v for r in results for v in r[key]]
            for key in (
                "prompts",
                "degradation_prompts",
                "negative_prompts",
                "unet_prompts",
                "controlnet_prompts",
            )
        }
        degradations = [d for r in results for d in (r["degradations"] or [])] or None
        if not return_dict:
            return out_images, fields["prompts"]
        return DaLPSRPipelineOutput(images=out_images, degradations=degradations, **fields)

    def _generate(
        self,
        images: list[RGBImage],
        prompts: list[str | None],
        degradation_prompts: list[str | None],
        negative_prompts: list[str],
        *,
        quality_prompt,
        upscale,
        num_inference_steps,
        start_strength,
        controlnet_conditioning_scale,
        color_fix,
        text_routing,
        tile_size,
        tile_overlap,
        vae_tile_size,
        output_type,
        generator,
        latents,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        default_prompt,
        unload_captioner,
        start_timestep,
        pre_restore,
        restorer_tile_size,
    ) -> dict:
        device = self._execution_device
        dtype = self.unet.dtype
        batch = len(images)

        # 2. One pass of the shared feature stack serves the prompt decoder and the restorer.
        decode_prompts = any(d is None for d in degradation_prompts) and self.prompt_decoder is not None
        restore = self.restorer is not None if pre_restore is None else pre_restore
        if restore and self.restorer is None:
            raise ValueError("`pre_restore=True` needs a `restorer` component (e.g. a DATRestorer); got None.")
        needs_features = decode_prompts or (restore and getattr(self.restorer, "needs_features", False))
        features = self.encode_degradation(images, device) if needs_features else None

        # 3. Prepare the image: the LR-branch condition at the exact output size (bicubic LR, or the restorer's
        # estimate, DiffBIR-style), padded for the UNet.
        restored = None
        if restore:
            lr = torch.stack([im.rgb for im in images]).to(device=device, dtype=self.restorer.dtype)
            restored = self.restorer.super_resolve(lr, features=features, tile_size=restorer_tile_size)
        upsampled, cond = self.prepare_condition(images, upscale, device, self.controlnet.dtype, restored=restored)
        out_h, out_w = upsampled.shape[-2:]

        # 4. Prompts: content (caller / caption of the condition image / default), degradation (caller / decoder).
        degradations = None
        if decode_prompts:
            prediction = self.prompt_decoder.decode(features)
            degradations = [prediction.report(i) for i in range(batch)]
            degradation_prompts = [
                given if given is not None else prediction.prompts[i] for i, given in enumerate(degradation_prompts)
            ]
        if any(p is None for p in prompts) and self.captioner is not None:
            from dalpsr.captioning import fit_to_token_budget

            missing = [i for i, p in enumerate(prompts) if p is None]
            captions = self.captioner([tensor_to_pil(upsampled[i]) for i in missing])
            if unload_captioner:
                self.captioner.unload()
            budget = self.tokenizer.model_max_length
            for i, caption in zip(missing, captions):
                prompts[i] = fit_to_token_budget(caption, self.tokenizer, budget)
        prompts = [default_prompt if p is None else p for p in prompts]
        degradation_prompts = ["" if d is None else d for d in degradation_prompts]
        cn_texts, unet_texts = route_prompts(prompts, degradation_prompts, quality_prompt, text_routing)

        # 4. Encode text.
        do_cfg = self.do_classifier_free_guidance
        unet_embeds = self.encode_prompt(unet_texts, device, dtype)
        cn_embeds = unet_embeds if cn_texts == unet_texts else self.encode_prompt(cn_texts, device, dtype)
        if do_cfg:
            neg = self.encode_prompt(negative_prompts, device, dtype)
            unet_embeds = torch.cat([neg, unet_embeds])
            cn_embeds = torch.cat([neg, cn_embeds])

        # 5. Timesteps.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if start_strength < 1.0:
            init_steps = min(round(num_inference_steps * start_strength), num_inference_steps)
            if init_steps < 1:
                raise ValueError(
                    f"`start_strength`={start_strength} with `num_inference_steps`={num_inference_steps} leaves no "
                    f"step to run; raise either."
                )
            t_start = (num_inference_steps - init_steps) * self.scheduler.order
            timesteps = timesteps[t_start:]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(t_start)
        if start_timestep is not None:
            skip = int((timesteps > start_timestep).sum())
            if skip == len(timesteps):
                raise ValueError(f"`start_timestep`={start_timestep} is below every scheduled timestep.")
            timesteps = timesteps[skip:]
            if skip and hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(skip)
        self._num_timesteps = len(timesteps)

        # 6. Latents.
        latent_shape = (
            batch,
            self.unet.config.in_channels,
            cond.shape[-2] // self.vae_scale_factor,
            cond.shape[-1] // self.vae_scale_factor,
        )
        if latents is not None:
            if tuple(latents.shape) != latent_shape:
                raise ValueError(f"`latents` must have shape {latent_shape}; got {tuple(latents.shape)}.")
            noise = latents.to(device=device, dtype=dtype)
        else:
            noise = randn_tensor(latent_shape, generator=generator, device=device, dtype=dtype)
        vae_tile = vae_tile_size or self.native_resolution
        if start_timestep is not None or start_strength < 1.0:
            init = self._vae_encode(cond.to(self.vae.dtype) * 2 - 1, vae_tile).to(dtype)
            start = timesteps[:1] if start_timestep is None else torch.tensor([start_timestep], device=device)
            lat = self.scheduler.add_noise(init, noise, start.repeat(batch))
        else:
            lat = noise * self.scheduler.init_noise_sigma

        # 7. Denoise.
        tile_px = tile_size or self.native_resolution
        latent_tile = tile_px // self.vae_scale_factor
        latent_overlap = (tile_overlap if tile_overlap is not None else tile_px // 4) // self.vae_scale_factor
        tiled = max(latent_shape[-2:]) > latent_tile
        extra_step = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            extra_step["generator"] = generator
        image_kwargs = self.image_attention_kwargs(images, device, dtype, do_cfg)
        prompt_embeds, controlnet_prompt_embeds = unet_embeds, cn_embeds
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_in = torch.cat([lat] * 2) if do_cfg else lat
                latent_in = self.scheduler.scale_model_input(latent_in, t)
                args = (
                    latent_in,
                    t,
                    cond,
                    prompt_embeds,
                    controlnet_prompt_embeds,
                    controlnet_conditioning_scale,
                )
                if tiled:
                    noise_pred = self._predict_noise_tiled(*args, latent_tile, latent_overlap, image_kwargs)
                else:
                    noise_pred = self._predict_noise(*args, image_kwargs)
                if do_cfg:
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + self.guidance_scale * (text - uncond)
                lat = self.scheduler.step(noise_pred, t, lat, **extra_step, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {
                        "latents": lat,
                        "prompt_embeds": prompt_embeds,
                        "controlnet_prompt_embeds": controlnet_prompt_embeds,
                    }
                    outputs = (
                        callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                        or {}
                    )
                    lat = outputs.pop("latents", lat)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    controlnet_prompt_embeds = outputs.pop("controlnet_prompt_embeds", controlnet_prompt_embeds)
                progress.update()

        record = {
            "prompts": prompts,
            "degradation_prompts": degradation_prompts,
            "negative_prompts": negative_prompts,
            "unet_prompts": unet_texts,
            "controlnet_prompts": cn_texts,
            "degradations": degradations,
        }
        if output_type == "latent":
            return {"images": lat, **record}

        # 8. Decode, crop the padding, colour-fix.
        decoded = self._vae_decode(lat.to(self.vae.dtype), vae_tile)
        sr = (decoded[:, :, :out_h, :out_w].float() / 2 + 0.5).clamp(0, 1)
        sr = apply_color_fix(sr, upsampled.float(), color_fix)

        # 9. Postprocess.
        if output_type == "pt":
            return {"images": sr, **record}
        if output_type == "np":
            return {"images": sr.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32), **record}
        pil = []
        for k, im in enumerate(images):
            alpha = None
            if im.alpha is not None:
                alpha = F.interpolate(im.alpha[None], size=(out_h, out_w), mode="bicubic", align_corners=False)[0]
            pil.append(tensor_to_pil(sr[k], alpha))
        return {"images": pil, **record}


def build_lr_controlnet(unet: UNet2DConditionModel, vae_scale_factor: int = 8) -> ControlNetModel:
    """The LR branch: a ControlNet copied from `unet` whose conditioning embedding downsamples by the VAE factor.

    The embedding has log2(factor) + 1 conv stages (SD: 16, 32, 96, 256 channels for factor 8).
    """
    stages = int(math.log2(vae_scale_factor)) + 1
    channels = (16, 32, 96, 256)[:stages] if stages <= 4 else tuple(16 * 2**i for i in range(stages))
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
