"""Load official DAT checkpoints (zhengchen1999/DAT, BasicSR layout) and convert them to diffusers folders.

The config is inferred from the state-dict keys and shapes, so any DAT variant (DAT, DAT-S, DAT-2,
DAT-light, ×2/×3/×4, or a custom one trained with the official code) loads without naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from torch import Tensor

from dalpsr.checkpoint_io import read_state_dict
from dalpsr.models.dat import DAT
from dalpsr.models.fusion import DATRestorer
from dalpsr.runtime import atomic_directory

_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")


def read_dat_state_dict(path: str | os.PathLike, param_key: str | None = None) -> dict[str, Tensor]:
    """Read a DAT state dict from `.pth` (BasicSR `{"params": ...}` or bare) or `.safetensors`.

    Args:
        path: checkpoint file.
        param_key: entry of a BasicSR checkpoint to use; None tries `params_ema`, `params`, `state_dict`,
            `model`, then the dict itself.

    Returns:
        The state dict with DataParallel/DDP `module.` prefixes removed.
    """
    return read_state_dict(path, wrapper_keys=_WRAPPER_KEYS, param_key=param_key)


def _count(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def infer_dat_config(state: dict[str, Tensor]) -> dict:
    """DAT constructor arguments from a state dict (keys as in the official `dat_arch.py`).

    `img_size` is read from any stored shift mask (64, the official value, when the state dict holds none, e.g.
    weights saved without them); the drop rates are training settings and stay at their defaults.
    """
    required = ("conv_first.weight", "layers.0.blocks.0.attn.attns.0.rpe_biases", "norm.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"`state` is not a DAT state dict: missing {missing}.")
    conv_first = state["conv_first.weight"]
    embed_dim, in_chans = conv_first.shape[0], conv_first.shape[1]
    num_groups = _count(state, "layers")
    depth = [_count(state, f"layers.{g}.blocks") for g in range(num_groups)]
    num_heads = []
    for g in range(num_groups):
        branch_heads = state[f"layers.{g}.blocks.0.attn.attns.0.pos.pos3.2.weight"].shape[0]
        num_heads.append(2 * branch_heads)
    split = (state["layers.0.blocks.0.attn.attns.0.rpe_biases"].max(dim=0).values + 1).tolist()
    split_size = [int(s) for s in split]
    img_size = 64
    mask_key = next((k for k in state if re.fullmatch(r"layers\.\d+\.blocks\.\d+\.attn\.attn_mask_0", k)), None)
    if mask_key is not None:
        mask = state[mask_key]
        img_size = math.isqrt(mask.shape[0] * mask.shape[1])
    expansion_factor = state["layers.0.blocks.0.ffn.fc1.weight"].shape[0] / embed_dim
    resi_connection = "1conv" if "conv_after_body.weight" in state else "3conv"
    if "conv_last.weight" in state:
        upsampler = "pixelshuffle"
        convs = [k for k in state if re.fullmatch(r"upsample\.\d+\.weight", k)]
        if not convs:
            upscale = 1
        elif len(convs) == 1 and state[convs[0]].shape[0] == 9 * state[convs[0]].shape[1]:
            upscale = 3
        else:
            upscale = 2 ** len(convs)
    else:
        upsampler = "pixelshuffledirect"
        upscale = math.isqrt(state["upsample.0.weight"].shape[0] // in_chans)
    return {
        "img_size": img_size,
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "split_size": split_size,
        "depth": depth,
        "num_heads": num_heads,
        "expansion_factor": float(expansion_factor),
        "qkv_bias": "layers.0.blocks.0.attn.qkv.bias" in state,
        "upscale": upscale,
        "img_range": 1.0,
        "resi_connection": resi_connection,
        "upsampler": upsampler,
    }


def load_dat_checkpoint(path: str | os.PathLike, param_key: str | None = None, img_range: float = 1.0) -> DAT:
    """Build a `DAT` from an official checkpoint (`.pth` / `.safetensors`) or a converted diffusers folder.

    Args:
        path: checkpoint file, or a folder written by `convert_dat_checkpoint` / `save_pretrained`.
        param_key: see `read_dat_state_dict`.
        img_range: the model's `img_range` (not stored in checkpoints; 1.0 for all released models).

    Returns:
        The model in eval mode, weights loaded strictly.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json; expected a DAT diffusers folder.")
        if json.loads((path / "config.json").read_text()).get("_class_name") == "DATRestorer":
            return _dat_of_restorer(path)
        return DAT.from_pretrained(path).eval()
    state = read_dat_state_dict(path, param_key)
    model = DAT(**{**infer_dat_config(state), "img_range": img_range})
    model.load_state_dict(state, strict=True)
    return model.eval()


def _dat_of_restorer(path: Path) -> DAT:
    """The DAT inside a `DATRestorer` folder that has no fusion blocks (e.g. the shipped `dat_light_x4`)."""
    restorer = DATRestorer.from_pretrained(path)
    if restorer.needs_features:
        raise ValueError(
            f"{path} is a DATRestorer with fusion blocks; its DAT alone would "
            "drop them. Load it with `DATRestorer.from_pretrained` (or `load_restorer`)."
        )
    return restorer.dat.eval()


def convert_dat_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, param_key: str | None = None, overwrite: bool = False
) -> Path:
    """Convert an official DAT checkpoint into a diffusers folder (`config.json` +
    `diffusion_pytorch_model.safetensors`) that `DAT.from_pretrained(dst)` loads.

    The folder is written next to `dst` and renamed into place, so an interrupted run leaves nothing half
    written.

    Args:
        src: checkpoint file.
        dst: output folder; must not exist unless `overwrite`.
        param_key: see `read_dat_state_dict`.
        overwrite: replace an existing `dst`.
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"`dst` must differ from `src`, got {dst}.")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it.")
    model = load_dat_checkpoint(src, param_key)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return dst


__all__ = ["convert_dat_checkpoint", "infer_dat_config", "load_dat_checkpoint", "read_dat_state_dict"]
