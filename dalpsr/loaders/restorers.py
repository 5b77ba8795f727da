"""Load a regression restorer for inference: a `DATRestorer` (with the degradation encoder its fusion needs), a
DAT folder, an official DAT checkpoint, a `SpandrelRestorer` folder, or any SR checkpoint spandrel detects
(RRDBNet / Real-ESRGAN, SRVGGNetCompact, SwinIR, HAT, …).

Folder layout of a restorer with its encoder (training/train_dat.py output, a saved `DaLPSRPipeline`, the shipped
`weights/degradation_tiny/`): `restorer/` beside `degradation_encoder/`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dalpsr.checkpoint_io import read_state_dict
from dalpsr.loaders.dat import load_dat_checkpoint
from dalpsr.loaders.degradation import ENCODER_SUBFOLDER
from dalpsr.models.dat import DAT
from dalpsr.models.degradation_encoder import DegradationEncoder
from dalpsr.models.fusion import DATRestorer
from dalpsr.models.restorer import SpandrelRestorer

RESTORER_SUBFOLDER = "restorer"
# Entries that wrap the weights in checkpoints of BasicSR / Real-ESRGAN / SwinIR / HAT and their trainers.
WRAPPER_KEYS = ("params_ema", "params-ema", "params", "model_state_dict", "state_dict", "model", "net")


def load_checkpoint_restorer(path: str | os.PathLike) -> DATRestorer | SpandrelRestorer:
    """A restorer from one checkpoint file (`.pth` / `.safetensors`, read with `weights_only=True`).

    The architecture is detected by spandrel; a DAT checkpoint becomes our `DAT` (wrapped in a `DATRestorer`
    without fusion blocks, so it can be fine-tuned with fusion), anything else a `SpandrelRestorer`.

    Raises:
        ValueError: spandrel recognises no SR architecture in the file.
    """
    from spandrel import MAIN_REGISTRY, UnsupportedModelError

    state = read_state_dict(path, wrapper_keys=WRAPPER_KEYS)
    try:
        arch = next(a.architecture for a in MAIN_REGISTRY.architectures("detection") if a.architecture.detect(state))
    except StopIteration:
        arch = None
    if arch is not None and arch.id == "DAT":
        return DATRestorer.from_dat(load_dat_checkpoint(path), fusion_layers=[])
    try:
        return SpandrelRestorer.from_state_dict(state)
    except (ValueError, UnsupportedModelError) as err:
        raise ValueError(f"`path` {path}: {err}") from err


def load_restorer(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[DATRestorer | SpandrelRestorer, DegradationEncoder | None]:
    """Load a restorer (and the encoder its fusion blocks need) for inference, in eval mode.

    `path` may be:
    - a folder with `restorer/` (and `degradation_encoder/`): training output or a saved `DaLPSRPipeline`;
    - a `DATRestorer` folder (`config.json` + weights), with the encoder in `degradation_encoder/` inside it
      or beside it;
    - a plain DAT folder (converted with `convert_dat_checkpoint`): wrapped as a restorer without fusion blocks;
    - a `SpandrelRestorer` folder (e.g. written by `dalpsr convert-ncnn`);
    - a checkpoint file (`.pth` / `.safetensors`, `weights_only`) of any SR architecture spandrel detects: see
      `load_checkpoint_restorer` (an official DAT checkpoint becomes a `DATRestorer` without fusion blocks).

    Args:
        path: see above.
        device: device to move the models to.
        dtype: weight dtype (None keeps float32).

    Raises:
        FileNotFoundError: nothing loadable at `path`, or fusion blocks without an encoder folder.
        ValueError: a checkpoint file of an architecture spandrel does not recognise.
    """
    path = Path(path)
    encoder_dirs: list[Path] = []
    if path.is_file():
        model = load_checkpoint_restorer(path)
    elif path.is_dir():
        if (path / RESTORER_SUBFOLDER / "config.json").is_file():
            encoder_dirs.append(path / ENCODER_SUBFOLDER)
            path = path / RESTORER_SUBFOLDER
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json nor {RESTORER_SUBFOLDER}/config.json; expected a DATRestorer, DAT or "
                "SpandrelRestorer folder, training/train_dat.py output, or an SR checkpoint file."
            )
        class_name = json.loads((path / "config.json").read_text()).get("_class_name")
        if class_name == "DAT":
            model = DATRestorer.from_dat(DAT.from_pretrained(path), fusion_layers=[])
        elif class_name == "DATRestorer":
            model = DATRestorer.from_pretrained(path)
        elif class_name == "SpandrelRestorer":
            model = SpandrelRestorer.from_pretrained(path)
        else:
            raise FileNotFoundError(
                f"{path}/config.json describes {class_name!r}, not a DATRestorer, DAT or SpandrelRestorer."
            )
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
