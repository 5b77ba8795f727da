"""Convert a DA-CLIP checkpoint (github.com/Algolzw/daclip-uir) into a `DegradationEncoder` folder.

The key mapping is the encoder's own (`dalpsr.models.degradation_encoder.convert_daclip_state_dict`, which
`DegradationEncoder.from_daclip` uses); this module writes folders and exports back to DA-CLIP's layout.
"""

from __future__ import annotations

import os
from pathlib import Path

from dalpsr.models.degradation_encoder import DegradationEncoder, to_daclip_state_dict

__all__ = ["convert_daclip_checkpoint", "to_daclip_state_dict"]


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
    encoder = DegradationEncoder.from_daclip(checkpoint_path, model=model, **encoder_kwargs)
    output_dir = Path(output_dir)
    encoder.save_pretrained(output_dir)
    return output_dir
