"""Read open_clip / DA-CLIP checkpoints and convert DA-CLIP's layout to `DegradationEncoder`.

DA-CLIP (github.com/Algolzw/daclip-uir, `da-clip/src/open_clip/daclip_model.py`) saves the state dict of
its `DaCLIP` module:
- `clip.*`: the whole open_clip CLIP (image and text towers, `clip.logit_scale`);
- `visual.*`: the same image tower again (DaCLIP registers `clip.visual` a second time as `visual`);
- `visual_control.*`: the controller, a copy of the image tower whose transformer is wrapped, so its
  blocks are `visual_control.transformer.transformer.resblocks.N.*` and its zero modules
  `visual_control.transformer.zero_modules.N.{weight,bias}`; other tower parts (`conv1`, embeddings,
  `ln_pre`, `ln_post`, `proj`) sit directly under `visual_control.`;
- `logit_scale`: DaCLIP's own temperature.
Training checkpoints wrap it as `{"state_dict": ..., "epoch": ...}`, possibly with DDP `module.` prefixes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import Tensor

from dalpsr.weights.checkpoint_io import read_state_dict as read_checkpoint

_WRAPPERS = ("state_dict", "model", "module")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A DA-CLIP / open_clip state dict from a file; `{"state_dict": ...}` / `{"model": ...}` wrappers and DDP
    `module.` prefixes are removed."""
    return read_checkpoint(path, wrapper_keys=_WRAPPERS)


_CTRL_BLOCK = re.compile(r"^visual_control\.transformer\.transformer\.resblocks\.(\d+)\.(.+)$")
_CTRL_ZERO = re.compile(r"^visual_control\.transformer\.zero_modules\.(\d+)\.(weight|bias)$")


def convert_daclip_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """DA-CLIP keys → `DegradationEncoder` keys.

    `clip.*` → `clip.*`; controller blocks → `controller.transformer.resblocks.N.*`; zero modules →
    `zero_modules.N.*`; other `visual_control.*` → `controller.*`; `logit_scale` → `logit_scale`.
    The duplicate `visual.*` copy is dropped (used only where `clip.visual.*` is absent).

    Raises:
        ValueError: no DA-CLIP controller keys, or keys outside the layout.
    """
    if not any(k.startswith("visual_control.") for k in state):
        raise ValueError(
            "`state` is not a DA-CLIP checkpoint: no `visual_control.*` keys "
            f"(first keys: {list(state)[:5]}). For plain open_clip weights use `DegradationEncoder.from_open_clip`."
        )
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("clip."):
            out[key] = value
        elif key.startswith("visual."):
            out.setdefault("clip." + key, value)
        elif m := _CTRL_BLOCK.match(key):
            out[f"controller.transformer.resblocks.{m.group(1)}.{m.group(2)}"] = value
        elif m := _CTRL_ZERO.match(key):
            out[f"zero_modules.{m.group(1)}.{m.group(2)}"] = value
        elif key.startswith("visual_control.transformer."):
            unknown.append(key)
        elif key.startswith("visual_control."):
            out["controller." + key[len("visual_control.") :]] = value
        elif key == "logit_scale":
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"`state` has keys outside DA-CLIP's layout, e.g. {unknown[:5]} ({len(unknown)}).")
    return out


def to_daclip_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`DegradationEncoder` keys → DA-CLIP keys (the inverse of `convert_daclip_state_dict`, with the
    `visual.*` duplicate); the token head, which DA-CLIP lacks, is left out."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("clip."):
            out[key] = value
            if key.startswith("clip.visual."):
                out[key[len("clip.") :]] = value
        elif key.startswith("controller.transformer.resblocks."):
            out["visual_control.transformer.transformer." + key[len("controller.transformer.") :]] = value
        elif key.startswith("controller."):
            out["visual_control." + key[len("controller.") :]] = value
        elif key.startswith("zero_modules."):
            out["visual_control.transformer." + key] = value
        elif key == "logit_scale":
            out[key] = value
    return out


def convert_daclip_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    model: str | dict = "ViT-B-32",
    **encoder_kwargs,
) -> Path:
    """Convert a DA-CLIP checkpoint into a `DegradationEncoder` folder (config.json + safetensors).

    Args:
        checkpoint_path: e.g. `daclip_ViT-B-32.pt`.
        output_dir: folder to write; `DegradationEncoder.from_pretrained(output_dir)` reads it back.
        model: open_clip name or config dict of the checkpoint.
        encoder_kwargs: other `DegradationEncoder` arguments (`num_degradation_tokens`, `resize_mode`, ...).
    """
    from dalpsr.models.degradation_encoder import DegradationEncoder

    encoder = DegradationEncoder.from_daclip(checkpoint_path, model=model, **encoder_kwargs)
    output_dir = Path(output_dir)
    encoder.save_pretrained(output_dir)
    return output_dir
