"""Find and load a degradation model folder: `degradation_encoder/` + `prompt_decoder/` (+ `degradation_data.json`).

That is the layout of a saved `DaLPSRPipeline`, of `training/train_degradation_encoder.py` output and of the small
model shipped in `weights/degradation_tiny/`; `degradation_data.json` holds the crop size, scale and degradation
preset it was trained with (used as evaluation defaults).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dalpsr.loaders.manifest import shipped_weights
from dalpsr.models.degradation_encoder import DegradationEncoder
from dalpsr.models.prompt_decoder import RestorationPromptDecoder

ENCODER_SUBFOLDER = "degradation_encoder"
DECODER_SUBFOLDER = "prompt_decoder"
DATA_FILE = "degradation_data.json"
DEFAULT_MODEL_NAME = "degradation_tiny"


class DegradationModelNotFoundError(FileNotFoundError):
    """No degradation encoder / prompt decoder folder was found where dalpsr looked."""


def default_model_dir() -> Path | None:
    """The small model shipped in `weights/` (None when this installation has none)."""
    path = shipped_weights(DEFAULT_MODEL_NAME)
    return path if (path / ENCODER_SUBFOLDER).is_dir() else None


def load_degradation_models(model_dir: str | os.PathLike | None = None, device: str = "cpu"):
    """(encoder, decoder, data settings) from a model folder, or from the shipped default when None."""
    if model_dir is None:
        model_dir = default_model_dir()
        if model_dir is None:
            raise DegradationModelNotFoundError(
                f"No degradation model given and none shipped in weights/{DEFAULT_MODEL_NAME}; pass --model DIR "
                f"(a folder with {ENCODER_SUBFOLDER}/ and {DECODER_SUBFOLDER}/, e.g. the output of "
                "training/train_degradation_encoder.py or a saved pipeline)."
            )
    model_dir = Path(model_dir)
    missing = [s for s in (ENCODER_SUBFOLDER, DECODER_SUBFOLDER) if not (model_dir / s / "config.json").is_file()]
    if missing:
        raise DegradationModelNotFoundError(
            f"`model` {model_dir} lacks {', '.join(m + '/config.json' for m in missing)}."
        )
    encoder = DegradationEncoder.from_pretrained(model_dir / ENCODER_SUBFOLDER).to(device).eval()
    decoder = RestorationPromptDecoder.from_pretrained(model_dir / DECODER_SUBFOLDER).to(device).eval()
    data_file = model_dir / DATA_FILE
    data = json.loads(data_file.read_text()) if data_file.is_file() else {}
    return encoder, decoder, data


def load_degradation_encoder(path: str | os.PathLike) -> DegradationEncoder:
    """A `DegradationEncoder` from its folder, or from a folder holding `degradation_encoder/` (a model folder,
    training output or saved pipeline)."""
    path = Path(path)
    if (path / ENCODER_SUBFOLDER / "config.json").is_file():
        path = path / ENCODER_SUBFOLDER
    if not (path / "config.json").is_file():
        raise DegradationModelNotFoundError(f"{path} is not a DegradationEncoder folder (no config.json).")
    return DegradationEncoder.from_pretrained(path)
