"""`DaLPSRPipeline`: Stable Diffusion 2 super-resolution with an LR ControlNet and degradation-aligned prompts.

Follows the DaLPSR framework (degradation-aligned language prompts for Real-SR) on the SeeSR layout: the
LR branch is a ControlNet made from the SD2 UNet that sees the bicubic-upsampled LR image; a content
prompt (the caller's text or an MLLM caption) drives the ControlNet's cross-attention and the degradation
prompt plus quality words drive the UNet's ("split" routing); "shared" gives the joined text to both.
Differences from the papers' code: any diffusers scheduler, latent tiling with Gaussian blending in the
denoising loop, tiled VAE with GroupNorm statistics estimated for the whole image, exact `upscale ×` output
size for any input size (pad, then crop), and every prompt is an argument the caller can override.
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
from diffusers.utils import USE_PEFT_BACKEND, BaseOutput, scale_lora_layers, unscale_lora_layers
from diffusers.utils.peft_utils import get_adapter_name
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from dalpsr.color import COLOR_FIX_MODES, apply_color_fix
from dalpsr.image_io import RGBImage, tensor_to_pil, to_rgb_images
from dalpsr.models.controlnet import build_lr_controlnet
from dalpsr.tiling import auto_tile, tiled_map

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
        restorer: optional regression SR model for two-stage restoration: a `DATRestorer` (its fusion blocks use
            the degradation features) or a `SpandrelRestorer` (any network spandrel loads, e.g. Real-ESRGAN).
        captioner: optional MLLM captioner; not saved by `save_pretrained` (it is a transformers model with its
            own processor; pass it again after loading).
        image_encoder: optional image encoder for SeeSR-style image cross-attention (e.g. `RAMImageEncoder`):
            needed when the UNet and ControlNet have `image_attentions` (`use_image_cross_attention`); its
            `encode(lr)` embeddings of the LR image go to both (`DaLPSRPipeline.from_seesr`).
        kernel_estimator: optional blur-kernel estimator (a `PLIDENet`): its estimate of each image's kernel (σ,
            principal axes, angle) joins `output.degradations` under "kernel" (a report; it does not change the
            prompts).
    """

    model_cpu_offload_seq = (
        "degradation_encoder->prompt_decoder->kernel_estimator->restorer->image_encoder->text_encoder->"
        "controlnet->unet->vae"
    )
    _optional_components = [
        "degradation_encoder",
        "prompt_decoder",
        "restorer",
        "captioner",
        "image_encoder",
        "kernel_estimator",
    ]
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
        kernel_estimator: Any = None,
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
            kernel_estimator=kernel_estimator,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def kernel_report(self, rgb: torch.Tensor) -> dict | None:
        """The kernel estimator's summary of one 3×h×w image (None for images under 8 px a side)."""
        if min(rgb.shape[-2:]) < 8:
            return None
        summary = self.kernel_estimator.describe_kernel(rgb)
        return {k: v for k, v in summary.items() if k != "kernel"}

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
        download: bool = False,
        **components,
    ) -> DaLPSRPipeline:
        """Build the pipeline from SeeSR's released weights (cswry/SeeSR) on an SD2-base folder.

        Run it with SeeSR's settings via `pipe(image, **dalpsr.loaders.seesr.seesr_call_kwargs())`.

        Args:
            seesr_dir: the SeeSR release folder holding `unet/` and `controlnet/` (Hub `CSWRY/SeeSR`, `seesr/`).
            base: SD2-base folder or hub id; None: the VAE, text encoder, tokenizer and scheduler of
                `dalpsr.loaders.seesr.SD2_BASE_MIRROR` at the pinned `SD2_BASE_REVISION`. A hub id is read from the
                local Hugging Face cache; without `download` a missing one fails at once (`FileNotFoundError`).
            ram: RAM's `ram_swin_large_14m.pth` or a folder from `dalpsr convert-ram`.
            dape: SeeSR's `DAPE.pth`, merged into RAM's Swin (with a RAM `.pth`).
            torch_dtype: dtype for the loaded models.
            revision: hub revision of `base`.
            trust_pickle: allow full unpickling of `.pth` files that `torch.load(weights_only=True)` refuses.
            download: allow downloading the SD2-base files from the hub (default: never).
            components: any other component to use instead (e.g. `captioner`, `scheduler`).
        """
        from diffusers import DDPMScheduler

        from dalpsr.loaders.seesr import resolve_sd2_base, seesr_components

        base_dir = resolve_sd2_base(base, revision, download=download)
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

    def latent_shape(self, image_size: tuple[int, int], upscale: float, batch_size: int) -> tuple[int, int, int, int]:
        """Shape of the latents for `batch_size` LR images of `image_size` (H, W): the output size, padded to
        `pad_multiple`, over the VAE factor."""
        m, f = self.pad_multiple, self.vae_scale_factor
        h, w = (math.ceil(round(s * upscale) / m) * m // f for s in image_size)
        return batch_size, self.unet.config.in_channels, h, w

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = False,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode text with the CLIP text encoder, as diffusers' `StableDiffusionPipeline.encode_prompt`.

        Args:
            prompt: the text(s); ignored when `prompt_embeds` is given.
            device: where the embeddings go.
            num_images_per_prompt: copies of each embedding (consecutive).
            do_classifier_free_guidance: also return the negative embeddings.
            negative_prompt: text(s) of the unconditional branch (None: ""); ignored when `negative_prompt_embeds`
                is given.
            prompt_embeds: precomputed B×77×D embeddings, used as they are.
            negative_prompt_embeds: precomputed negative embeddings.
            lora_scale: scale of the text encoder's LoRA layers while encoding.
            clip_skip: number of final CLIP layers to skip (1: the penultimate layer, then the final layer norm).

        Returns:
            (prompt_embeds, negative_prompt_embeds): B·num_images_per_prompt×77×D each in the text encoder's dtype;
            the negative one is None without classifier-free guidance.
        """
        if lora_scale is not None and USE_PEFT_BACKEND:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            if prompt_embeds is None:
                texts = [prompt] if isinstance(prompt, str) else list(prompt)
                prompt_embeds = self._encode_texts(texts, device, clip_skip)
            batch_size = prompt_embeds.shape[0]
            if do_classifier_free_guidance and negative_prompt_embeds is None:
                negatives = [negative_prompt or ""] * batch_size
                if isinstance(negative_prompt, list | tuple):
                    if len(negative_prompt) != batch_size:
                        raise ValueError(
                            f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {batch_size}."
                        )
                    negatives = list(negative_prompt)
                negative_prompt_embeds = self._encode_texts(negatives, device, None)
        finally:
            if lora_scale is not None and USE_PEFT_BACKEND:
                unscale_lora_layers(self.text_encoder, lora_scale)
        dtype = self.text_encoder.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds if do_classifier_free_guidance else None

    def _encode_texts(self, texts: list[str], device, clip_skip: int | None) -> torch.Tensor:
        # Each distinct text is encoded once (captions and degradation prompts repeat across a batch).
        unique = list(dict.fromkeys(texts))
        ids = self.tokenizer(
            unique,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        if clip_skip is None:
            embeds = self.text_encoder(ids, attention_mask=None)[0]
        else:
            hidden = self.text_encoder(ids, attention_mask=None, output_hidden_states=True).hidden_states
            text_model = getattr(self.text_encoder, "text_model", self.text_encoder)  # nested before transformers 5
            embeds = text_model.final_layer_norm(hidden[-(clip_skip + 1)])
        index = {t: i for i, t in enumerate(unique)}
        return embeds[[index[t] for t in texts]]

    @staticmethod
    def _text_needs(text_routing: str, has_prompt_embeds: bool, has_controlnet_embeds: bool) -> tuple[bool, bool]:
        """(content prompt needed, degradation prompt needed) given which embeddings the caller passed."""
        controlnet_given = has_controlnet_embeds or (text_routing == "shared" and has_prompt_embeds)
        if text_routing == "split":
            return not controlnet_given, not has_prompt_embeds
        needed = not (has_prompt_embeds and controlnet_given)
        return needed, needed

    def check_inputs(
        self,
        images: list[RGBImage],
        prompt,
        degradation_prompt,
        negative_prompt,
        prompt_embeds,
        controlnet_prompt_embeds,
        negative_prompt_embeds,
        upscale,
        num_inference_steps,
        guidance_scale,
        start_strength,
        start_timestep,
        controlnet_conditioning_scale,
        color_fix,
        text_routing,
        tile_size,
        tile_overlap,
        vae_tile_size,
        generator,
        latents,
        output_type,
        clip_skip,
        pre_restore,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        """Every argument check of `__call__`: raises `ValueError` / `TypeError` naming the argument."""
        batch = len(images)
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
        if round(num_inference_steps * start_strength) < 1:
            raise ValueError(
                f"`start_strength`={start_strength} with `num_inference_steps`={num_inference_steps} leaves no "
                f"step to run; raise either."
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
            self.scheduler.set_timesteps(num_inference_steps)
            if not (self.scheduler.timesteps <= start_timestep).any():
                raise ValueError(f"`start_timestep`={start_timestep} is below every scheduled timestep.")
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
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0):
            raise ValueError(f"`clip_skip` must be a non-negative int or None; got {clip_skip!r}.")
        for name, value in (
            ("prompt", prompt),
            ("degradation_prompt", degradation_prompt),
            ("negative_prompt", negative_prompt),
        ):
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"`{name}` must be a str or a list of str; got {type(value).__name__}.")
            if len(value) != batch:
                raise ValueError(f"`{name}` has {len(value)} entries but there are {batch} images; pass one per image.")
        embeds = {
            "prompt_embeds": prompt_embeds,
            "controlnet_prompt_embeds": controlnet_prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
        }
        shapes = set()
        for name, value in embeds.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.ndim != 3 or value.shape[0] != batch:
                raise ValueError(
                    f"`{name}` must be a {batch}×L×D tensor (one row per image, e.g. from `encode_prompt`); got "
                    f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}."
                )
            shapes.add(tuple(value.shape))
        if len(shapes) > 1:
            raise ValueError(f"The given embeddings must have one shape; got {sorted(shapes)}.")
        needs_content, needs_degradation = self._text_needs(
            text_routing, prompt_embeds is not None, controlnet_prompt_embeds is not None
        )
        for name, value, needed in (
            ("prompt", prompt, needs_content),
            ("degradation_prompt", degradation_prompt, needs_degradation),
        ):
            if value is not None and not needed:
                given = " and ".join(
                    f"`{k}`" for k in ("prompt_embeds", "controlnet_prompt_embeds") if embeds[k] is not None
                )
                raise ValueError(
                    f"`{name}` is not used with `text_routing`={text_routing!r} and {given} given; pass the text or "
                    f"the embeddings, not both."
                )
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"`generator` is a list of {len(generator)} but there are {batch} images.")
        if latents is not None:
            if len({im.size for im in images}) > 1:
                raise ValueError("`latents` can only be given when all images have the same size.")
            expected = self.latent_shape(images[0].size, upscale, batch)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                raise ValueError(
                    f"`latents` must have shape {expected}; got "
                    f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}."
                )
        if pre_restore and self.restorer is None:
            raise ValueError(
                "`pre_restore=True` needs a `restorer` component (a DATRestorer or SpandrelRestorer); got None."
            )
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {bad}; allowed: {self._callback_tensor_inputs}."
            )

    def prepare_image(
        self, images: list[RGBImage], upscale: float, device, dtype, restored: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
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

    def get_timesteps(
        self, num_inference_steps: int, start_strength: float = 1.0, start_timestep: int | None = None, device=None
    ) -> torch.Tensor:
        """The timesteps to run: the whole schedule, its last `start_strength` fraction, or the scheduled steps at
        or below `start_timestep`; the scheduler's begin index is set to match."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if start_timestep is not None:
            skip = int((timesteps > start_timestep).sum())
        else:
            init_steps = min(round(num_inference_steps * start_strength), num_inference_steps)
            skip = (num_inference_steps - init_steps) * self.scheduler.order
        if skip and hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(skip)
        return timesteps[skip:]

    def prepare_latents(
        self,
        image: torch.Tensor,
        dtype: torch.dtype,
        device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        vae_tile_size: int | None = None,
    ) -> torch.Tensor:
        """The start latents for the padded condition `image` (B×3×H×W in [0, 1]).

        `timestep` None: noise × the scheduler's initial sigma; else the VAE latent of `image` noised to `timestep`
        (`latents`, when given, is the noise).
        """
        f = self.vae_scale_factor
        shape = (image.shape[0], self.unet.config.in_channels, image.shape[-2] // f, image.shape[-1] // f)
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            noise = latents.to(device=device, dtype=dtype)
        if timestep is None:
            return noise * self.scheduler.init_noise_sigma
        init = self._vae_encode(image.to(self.vae.dtype) * 2 - 1, vae_tile_size).to(dtype)
        return self.scheduler.add_noise(init, noise, timestep.repeat(shape[0]))

    def decode_latents(self, latents: torch.Tensor, vae_tile_size: int | None = None) -> torch.Tensor:
        """Scaled latents → B×3×H×W float32 images in [0, 1] (tiled VAE above `vae_tile_size` pixels)."""
        images = self._vae_decode(latents.to(self.vae.dtype), vae_tile_size).float()
        return images.div_(2).add_(0.5).clamp_(0, 1)  # in place: no second copy of a large output

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

    def _caption(self, images: torch.Tensor, unload: bool = False) -> list[str]:
        """Captions of B×3×H×W images in [0, 1] by the `captioner`, trimmed to the text encoder's token budget."""
        from dalpsr.captioning import fit_to_token_budget

        captions = self.captioner([tensor_to_pil(im) for im in images])
        if unload:
            self.captioner.unload()
        return [fit_to_token_budget(c, self.tokenizer, self.tokenizer.model_max_length) for c in captions]

    def _vae_encode(self, x: torch.Tensor, tile: int | None) -> torch.Tensor:
        # x: B×3×H×W in [-1, 1] → scaled latents (distribution mode: deterministic).
        def encode(t: torch.Tensor) -> torch.Tensor:
            return self.vae.encode(t).latent_dist.mode()

        if tile is not None and max(x.shape[-2:]) > tile:
            latents = tiled_map(
                encode,
                x,
                tile_size=tile,
                tile_overlap=tile // 4,
                scale=1 / self.vae_scale_factor,
                group_norm_sync=self.vae,
            )
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
            return tiled_map(
                decode,
                latents,
                tile_size=latent_tile,
                tile_overlap=latent_tile // 4,
                scale=self.vae_scale_factor,
                group_norm_sync=self.vae,
            )
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
        # The condition (B×3×H×W) is repeated for the CFG half here, per tile, not at full resolution. Both models
        # get `cross_attention_kwargs`, so a LoRA `scale` applies to the ControlNet's LoRA layers too.
        if cond.shape[0] != latent_in.shape[0]:
            cond = cond.repeat(latent_in.shape[0] // cond.shape[0], 1, 1, 1)
        down, mid = self.controlnet(
            latent_in,
            t,
            encoder_hidden_states=cn_embeds,
            controlnet_cond=cond,
            conditioning_scale=cn_scale,
            cross_attention_kwargs=self.cross_attention_kwargs,
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
        # latent_in: N×C×h×w in tiles of `tile` latent px (the pixel-space `cond` cropped to match), Gaussian-blended.
        def predict(latent_tile: torch.Tensor, cond_tile: torch.Tensor) -> torch.Tensor:
            return self._predict_noise(latent_tile, t, cond_tile, unet_embeds, cn_embeds, cn_scale, image_kwargs)

        return tiled_map(predict, latent_in, cond, tile_size=tile, tile_overlap=overlap)

    def _postprocess(self, sr: torch.Tensor, images: list[RGBImage], output_type: str):
        # sr: B×3×H×W in [0, 1] → "pt" as is, "np" B×H×W×3, "pil" with each input's alpha resized and reattached.
        if output_type == "pt":
            return sr
        if output_type == "np":
            return sr.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        pil = []
        for k, im in enumerate(images):
            alpha = None
            if im.alpha is not None:
                alpha = F.interpolate(im.alpha[None], size=sr.shape[-2:], mode="bicubic", align_corners=False)[0]
            pil.append(tensor_to_pil(sr[k], alpha, im.mode))
        return pil

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
    def clip_skip(self) -> int | None:
        return self._clip_skip

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
        prompt_embeds: torch.Tensor | None = None,
        controlnet_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
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
                resized bicubically and reattached to PIL outputs; gray inputs (L, I;16, LA) give gray PIL outputs;
                P/CMYK are processed as RGB); a numpy
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
            vae_tile_size: VAE tile size in output pixels (default: the native resolution); the tiles share
                GroupNorm statistics estimated for the whole image (`dalpsr.tiling.tiled_map`).
            generator: a torch.Generator or one per image, for reproducible sampling.
            latents: initial noise latents B×C×h×w (used instead of sampling; with `start_strength < 1` as the noise).
            prompt_embeds: B×77×D embeddings for the UNet's cross-attention (e.g. from `encode_prompt`), used instead
                of encoding the UNet text.
            controlnet_prompt_embeds: B×77×D embeddings for the ControlNet's cross-attention, used instead of
                encoding its text; None with `text_routing="shared"` and `prompt_embeds` given: `prompt_embeds`.
                Text that a given embedding replaces must not be passed too; output fields of texts not used are None.
            negative_prompt_embeds: B×77×D embeddings of the unconditional branch, used instead of `negative_prompt`.
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return a `DaLPSRPipelineOutput` (True) or a tuple `(images, prompts)`.
            cross_attention_kwargs: passed to the attention processors of the UNet and the ControlNet; its "scale"
                scales every loaded LoRA (UNet, ControlNet, text encoder).
            clip_skip: number of final CLIP text layers to skip (as in diffusers).
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
            restorer_tile_size: tile edge in LR pixels for the restorer (None: automatic tiles of bounded memory,
                `dalpsr.tiling.auto_tile`; a small image runs whole).
        """
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 1. Check inputs (the images are loaded first: the other arguments are checked against them)
        images = to_rgb_images(image)
        self.check_inputs(
            images,
            prompt,
            degradation_prompt,
            negative_prompt,
            prompt_embeds,
            controlnet_prompt_embeds,
            negative_prompt_embeds,
            upscale,
            num_inference_steps,
            guidance_scale,
            start_strength,
            start_timestep,
            controlnet_conditioning_scale,
            color_fix,
            text_routing,
            tile_size,
            tile_overlap,
            vae_tile_size,
            generator,
            latents,
            output_type,
            clip_skip,
            pre_restore,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = float(guidance_scale)
        self._cross_attention_kwargs = cross_attention_kwargs
        self._clip_skip = clip_skip
        self._interrupt = False

        # 2. Define call parameters
        device = self._execution_device
        dtype = self.unet.dtype
        do_cfg = self.do_classifier_free_guidance
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        restore = self.restorer is not None if pre_restore is None else pre_restore
        needs_content, needs_degradation = self._text_needs(
            text_routing, prompt_embeds is not None, controlnet_prompt_embeds is not None
        )
        prompts = _per_image(prompt, len(images))
        degradation_prompts = _per_image(degradation_prompt, len(images))
        negative_prompts = _per_image(negative_prompt, len(images))
        negative_prompts = [None if negative_prompt_embeds is not None else n or "" for n in negative_prompts]
        vae_tile = vae_tile_size or self.native_resolution
        tile_px = tile_size or self.native_resolution
        latent_tile = tile_px // self.vae_scale_factor
        latent_overlap = (tile_px // 4 if tile_overlap is None else tile_overlap) // self.vae_scale_factor
        step_takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        outputs, unet_prompts, controlnet_prompts, degradations = [], [], [], []

        # Images of different sizes run as separate batches (steps 3–10), consecutive same-size images together.
        for idx in _size_groups(images):
            group = [images[i] for i in idx]
            group_generator = [generator[i] for i in idx] if isinstance(generator, list) else generator
            if isinstance(group_generator, list) and len(group_generator) == 1:
                group_generator = group_generator[0]
            extra_step_kwargs = {"generator": group_generator} if step_takes_generator else {}

            # 3. Degradation features: one pass of the shared feature stack feeds the prompt decoder and the restorer
            decode_prompts = (
                needs_degradation
                and self.prompt_decoder is not None
                and any(degradation_prompts[i] is None for i in idx)
            )
            needs_features = decode_prompts or (restore and getattr(self.restorer, "needs_features", False))
            features = self.encode_degradation(group, device) if needs_features else None

            # 4. Prepare image: the LR-branch condition at the exact output size (bicubic LR, or the restorer's
            # estimate, DiffBIR-style), padded for the UNet.
            restored = None
            if restore:
                lr = torch.stack([im.rgb for im in group]).to(device=device, dtype=self.restorer.dtype)
                tile, overlap = restorer_tile_size, 16
                if tile is None:  # automatic: memory bounded (`dalpsr.tiling.auto_tile`)
                    tile, overlap = auto_tile(
                        *lr.shape[-2:], 16, self.restorer.tile_multiple, self.restorer.tile_square
                    )
                restored = self.restorer.super_resolve(lr, features=features, tile_size=tile, tile_overlap=overlap)
            upsampled, cond = self.prepare_image(group, upscale, device, self.controlnet.dtype, restored=restored)
            out_h, out_w = upsampled.shape[-2:]

            # 5. Prompts: content (caller / caption of the condition image / default), degradation (caller / decoder).
            if decode_prompts:
                prediction = self.prompt_decoder.decode(features)
                degradations.extend(prediction.report(k) for k in range(len(idx)))
                for k, i in enumerate(idx):
                    if degradation_prompts[i] is None:
                        degradation_prompts[i] = prediction.prompts[k]
            if self.kernel_estimator is not None:
                kernels = [self.kernel_report(im.rgb) for im in group]
                if decode_prompts:
                    for report, kernel in zip(degradations[-len(idx) :], kernels):
                        report["kernel"] = kernel
                else:
                    degradations.extend({"kernel": kernel} for kernel in kernels)
            if needs_content:
                missing = [i for i in idx if prompts[i] is None]
                captions = [default_prompt] * len(missing)
                if missing and self.captioner is not None:
                    captions = self._caption(upsampled[[idx.index(i) for i in missing]], unload=unload_captioner)
                for i, text in zip(missing, captions):
                    prompts[i] = text
            if needs_degradation:
                for i in idx:
                    degradation_prompts[i] = degradation_prompts[i] or ""
            cn_texts, unet_texts = [None] * len(idx), [None] * len(idx)
            if needs_content or needs_degradation:
                cn_texts, unet_texts = route_prompts(
                    [prompts[i] or "" for i in idx],
                    [degradation_prompts[i] or "" for i in idx],
                    quality_prompt,
                    text_routing,
                )

            # 6. Encode the prompts (the negative one serves both models).
            unet_embeds, negative_embeds = self.encode_prompt(
                unet_texts,
                device,
                do_classifier_free_guidance=do_cfg,
                negative_prompt=[negative_prompts[i] for i in idx],
                prompt_embeds=None if prompt_embeds is None else prompt_embeds[idx],
                negative_prompt_embeds=None if negative_prompt_embeds is None else negative_prompt_embeds[idx],
                lora_scale=lora_scale,
                clip_skip=clip_skip,
            )
            # "shared" with only `prompt_embeds`: the ControlNet gets them too.
            shared_embeds = text_routing == "shared" and prompt_embeds is not None and controlnet_prompt_embeds is None
            if controlnet_prompt_embeds is not None:
                cn_embeds = controlnet_prompt_embeds[idx]
            elif shared_embeds or (prompt_embeds is None and cn_texts == unet_texts):
                cn_embeds = unet_embeds
            else:
                cn_embeds = self.encode_prompt(cn_texts, device, lora_scale=lora_scale, clip_skip=clip_skip)[0]
            if prompt_embeds is not None:
                unet_texts = [None] * len(idx)
            if controlnet_prompt_embeds is not None or shared_embeds:
                cn_texts = [None] * len(idx)
            unet_embeds, cn_embeds = unet_embeds.to(device, dtype), cn_embeds.to(device, dtype)
            if do_cfg:
                negative_embeds = negative_embeds.to(device, dtype)
                unet_embeds = torch.cat([negative_embeds, unet_embeds])
                cn_embeds = torch.cat([negative_embeds, cn_embeds])
            unet_prompts.extend(unet_texts)
            controlnet_prompts.extend(cn_texts)

            # 7. Prepare timesteps
            timesteps = self.get_timesteps(num_inference_steps, start_strength, start_timestep, device)
            self._num_timesteps = len(timesteps)

            # 8. Prepare latents: noise, or the LR latent noised to the first timestep (start_strength < 1) or to
            # `start_timestep`.
            start = None
            if start_timestep is not None:
                start = torch.tensor([start_timestep], device=device)
            elif start_strength < 1.0:
                start = timesteps[:1]
            lat = self.prepare_latents(cond, dtype, device, group_generator, latents, start, vae_tile)

            # 9. Denoising loop (latent tiles above `tile_size`)
            image_kwargs = self.image_attention_kwargs(group, device, dtype, do_cfg)
            tiled = max(lat.shape[-2:]) > latent_tile
            with self.progress_bar(total=len(timesteps)) as progress:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    latent_in = torch.cat([lat] * 2) if do_cfg else lat
                    latent_in = self.scheduler.scale_model_input(latent_in, t)
                    args = (latent_in, t, cond, unet_embeds, cn_embeds, controlnet_conditioning_scale)
                    if tiled:
                        noise_pred = self._predict_noise_tiled(*args, latent_tile, latent_overlap, image_kwargs)
                    else:
                        noise_pred = self._predict_noise(*args, image_kwargs)
                    if do_cfg:
                        uncond, text = noise_pred.chunk(2)
                        noise_pred = uncond + self.guidance_scale * (text - uncond)
                    lat = self.scheduler.step(noise_pred, t, lat, **extra_step_kwargs, return_dict=False)[0]
                    if callback_on_step_end is not None:
                        local = {"latents": lat, "prompt_embeds": unet_embeds, "controlnet_prompt_embeds": cn_embeds}
                        callback_kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                        replaced = callback_on_step_end(self, i, t, callback_kwargs) or {}
                        lat = replaced.pop("latents", lat)
                        unet_embeds = replaced.pop("prompt_embeds", unet_embeds)
                        cn_embeds = replaced.pop("controlnet_prompt_embeds", cn_embeds)
                    progress.update()

            # 10. Decode (tiled VAE above `vae_tile_size`), crop the padding, colour-fix, postprocess
            if output_type == "latent":
                outputs.append(lat)
                continue
            cond = args = None  # the padded condition, a full-size copy, is done with
            sr = self.decode_latents(lat, vae_tile)[:, :, :out_h, :out_w]
            sr = apply_color_fix(sr, upsampled.float(), color_fix)
            outputs.append(self._postprocess(sr, group, output_type))

        # 11. Offload all models; one output for one batch, else one item per image in input order
        self.maybe_free_model_hooks()
        out_images = outputs[0] if len(outputs) == 1 else [item for out in outputs for item in out]
        if not return_dict:
            return out_images, prompts
        return DaLPSRPipelineOutput(
            images=out_images,
            prompts=prompts,
            degradation_prompts=degradation_prompts,
            negative_prompts=negative_prompts,
            unet_prompts=unet_prompts,
            controlnet_prompts=controlnet_prompts,
            degradations=degradations or None,
        )


def _per_image(value: str | list[str] | None, batch: int) -> list[str | None]:
    # A prompt argument (checked by `check_inputs`) as one entry per image.
    return list(value) if isinstance(value, list | tuple) else [value] * batch


def _size_groups(images: list[RGBImage]) -> list[list[int]]:
    """Indices of runs of consecutive same-size images."""
    groups: list[list[int]] = []
    for i, im in enumerate(images):
        if groups and images[groups[-1][0]].size == im.size:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
