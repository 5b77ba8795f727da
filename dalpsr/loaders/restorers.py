"""Load a regression restorer for inference: a `DATRestorer` (with the degradation encoder its fusion needs), a
DAT folder, or an official DAT checkpoint.

Folder layout of a restorer with its encoder (training/train_dat.py output, a saved `DaLPSRPipeline`, the shipped
`weights/degradation_tiny/`): `restorer/` beside `degradation_encoder/`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dalpsr.loaders.dat import load_dat_checkpoint
from dalpsr.loaders.degradation import ENCODER_SUBFOLDER
from dalpsr.models.dat import DAT
from dalpsr.models.degradation_encoder import DegradationEncoder
from dalpsr.models.fusion import DATRestorer

RESTORER_SUBFOLDER = "restorer"


def load_restorer(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[DATRestorer, DegradationEncoder | None]:
    """Load a restorer (and the encoder its fusion blocks need) for inference, in eval mode.

    `path` may be:
    - a folder with `restorer/` (and `degradation_encoder/`): training output or a saved `DaLPSRPipeline`;
    - a `DATRestorer` folder (`config.json` + weights), with the encoder in `degradation_encoder/` inside it
      or beside it;
    - a plain DAT folder (converted with `convert_dat_checkpoint`) or an official DAT checkpoint file
      (`.pth` / `.safetensors`): wrapped as a restorer without fusion blocks.

    Args:
        path: see above.
        device: device to move the models to.
        dtype: weight dtype (None keeps float32).

    Raises:
        FileNotFoundError: nothing loadable at `path`, or fusion blocks without an encoder folder.
    """
    path = Path(path)
    encoder_dirs: list[Path] = []
    if path.is_file():
        model = DATRestorer.from_dat(load_dat_checkpoint(path), fusion_layers=[])
    elif path.is_dir():
        if (path / RESTORER_SUBFOLDER / "config.json").is_file():
            encoder_dirs.append(path / ENCODER_SUBFOLDER)
            path = path / RESTORER_SUBFOLDER
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json nor {RESTORER_SUBFOLDER}/config.json; expected a DATRestorer or DAT "
                "folder, training/train_dat.py output, or an official DAT checkpoint file."
            )
        class_name = json.loads((path / "config.json").read_text()).get("_class_name")
        if class_name == "DAT":
            model = DATRestorer.from_dat(DAT.from_pretrained(path), fusion_layers=[])
        elif class_name == "DATRestorer":
            model = DATRestorer.from_pretrained(path)
        else:
            raise FileNotFoundError(f"{path}/config.json describes {class_name!r}, not a DATRestorer or DAT.")
        encoder_dirs += [path / ENCODER_SUBFOLDER, path.parent / ENCODER_SUBFOLDER]
    else:
        raise FileNotFoundError(f"Restorer not found: {path} is neither a folder nor a checkpoint file.")
    encoder = None
    if model.needs_features:
        found = next((d for d in encoder_dirs if (d / "config.json").is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"The restorer at {path} has fusion blocks and needs its degradation encoder; looked in "
                f"{', '.join(str(d) for d in dict.fromkeys(encoder_dirs))} (no config.json)."
            )
        encoder = DegradationEncoder.from_pretrained(found).to(device).eval()
        if encoder.embed_dim != model.config.context_dim:
            raise ValueError(
                f"The encoder at {found} has embedding width {encoder.embed_dim}, the restorer expects "
                f"context_dim={model.config.context_dim}."
            )
    model = model.to(device) if dtype is None else model.to(device=device, dtype=dtype)
    model.eval()
    return model, encoder
