"""The PL-IDENet ×4 kernel estimator shipped in `weights/pl_idenet_tiny/`: found, small, in the manifest, the
default of `dalpsr describe`, and its σ̂ follows the blur applied to a photo."""

from __future__ import annotations

from pathlib import Path

import pytest

from dalpsr.degradations.gaussian8 import blur_downsample
from dalpsr.degradations.kernels import gaussian_family_kernel
from dalpsr.image_io import load_image
from dalpsr.loaders.manifest import load_manifest
from dalpsr.loaders.pl_idenet import default_kernel_model_dir, load_kernel_estimator

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "pl_idenet_tiny"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_folder_is_the_default_small_and_listed():
    assert default_kernel_model_dir().resolve() == SHIPPED.resolve()
    files = list(SHIPPED.glob("*.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size < 20 * 2**20
    card = (SHIPPED / "README.md").read_text()
    assert "Setting 1" in card and "licence" in card.lower()
    entry = next(e for e in load_manifest() if e.name == "pl-idenet-tiny")
    assert "pl_idenet_tiny" in entry.layout and entry.env is None
    model = load_kernel_estimator()
    assert not model.training and model.config.scale == 4 and model.config.kernel_parameterization == "gaussian"


def test_shipped_estimate_follows_the_blur():
    model = load_kernel_estimator()
    hr = load_image(ROOT / "examples" / "canon004_sign.png").rgb  # 288×240, used as the HR
    sigmas = (1.0, 2.0, 3.0, 4.0)
    estimates = []
    for s in sigmas:
        k = gaussian_family_kernel("iso", 21, s, s, 0.0).float()
        estimates.append(model.describe_kernel(blur_downsample(hr[None], k, 4)[0])["sigma"])
    assert all(a < b for a, b in zip(estimates, estimates[1:])), estimates
    assert all(abs(e - s) < 0.6 for e, s in zip(estimates[1:3], sigmas[1:3])), estimates
    assert estimates[0] < 2.0  # σ = 1 is not read as the middle of the training range
