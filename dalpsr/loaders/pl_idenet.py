"""Find and load a PL-IDENet folder (the blind-SR kernel estimator): a given folder, or the small shipped one."""

from __future__ import annotations

import os
from pathlib import Path

from dalpsr.loaders.manifest import shipped_weights
from dalpsr.models.pl_idenet import PLIDENet

DEFAULT_KERNEL_MODEL = "pl_idenet_tiny"


class KernelModelNotFoundError(FileNotFoundError):
    """No PL-IDENet folder was found where dalpsr looked."""


def default_kernel_model_dir() -> Path | None:
    """The small PL-IDENet shipped in `weights/` (None when this installation has none)."""
    path = shipped_weights(DEFAULT_KERNEL_MODEL)
    return path if (path / "config.json").is_file() else None


def load_kernel_estimator(model_dir: str | os.PathLike | None = None, device: str = "cpu") -> PLIDENet:
    """A `PLIDENet` in eval mode from `model_dir` (a folder with config.json), or the shipped default when None.

    A training output folder (with `model/` inside) is accepted too.
    """
    if model_dir is None:
        model_dir = default_kernel_model_dir()
        if model_dir is None:
            raise KernelModelNotFoundError(
                f"No kernel model given and none shipped in weights/{DEFAULT_KERNEL_MODEL}; pass a PLIDENet folder "
                "(e.g. the model/ of training/train_pl_idenet.py output)."
            )
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() and (model_dir / "model" / "config.json").is_file():
        model_dir = model_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise KernelModelNotFoundError(f"`model_dir` {model_dir} is not a PLIDENet folder (no config.json).")
    return PLIDENet.from_pretrained(model_dir).to(device).eval()
