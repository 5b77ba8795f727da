"""The DAT-light ×4 restorers shipped in `weights/`: plain `dat_light_x4/` and the default DAT+fusion one in
`degradation_tiny/restorer/` (with the shipped degradation encoder): found, load, beat bicubic on real pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalpsr.cli import main
from dalpsr.loaders.restorers import load_restorer
from dalpsr.models.dat import DAT
from dalpsr.pipelines.engines import resolve_restorer_source

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED = WEIGHTS / "degradation_tiny"
REALSR = Path(__file__).resolve().parents[2] / "shared" / "data" / "paired" / "RealSR"
# whole 128×128 real LR / 512×512 HR pairs whose gain over bicubic is near the median of the 50 RealSR pairs
# (+0.20 dB and +0.13 dB PSNR); small crops are not used because DAT loses context at their borders
PAIRS = ["Nikon_043_LR4.png", "Canon_040_LR4.png"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["degradation_tiny", "dat_light_x4"])
def shipped(request):
    return load_restorer(WEIGHTS / request.param)


def test_shipped_weights_are_the_default_and_small(shipped, monkeypatch):
    monkeypatch.delenv("DALPSR_DAT_MODEL", raising=False)
    assert Path(resolve_restorer_source(None)).resolve() == SHIPPED.resolve()
    weight_files = list((SHIPPED / "restorer").glob("*.safetensors"))
    assert len(weight_files) == 1 and weight_files[0].stat().st_size < 20 * 2**20
    assert (SHIPPED / "README.md").is_file()
    model, encoder = shipped
    # the default has fusion blocks fed by the shipped encoder; dat_light_x4 is its plain starting point
    assert (encoder is not None) == model.needs_features and model.scale == 4
    preset = DAT.preset_config("dat_light", 4)
    assert {k: model.dat.config[k] for k in ("embed_dim", "depth", "num_heads", "split_size")} == {
        k: preset[k] for k in ("embed_dim", "depth", "num_heads", "split_size")
    }


def test_upscale_cli_uses_shipped_weights_from_any_directory(tmp_path, monkeypatch, shipped):
    monkeypatch.delenv("DALPSR_DAT_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((12, 10, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    assert main(["upscale", "a.png", "-o", "out", "--engine", "dat"]) == 0
    assert Image.open(tmp_path / "out" / "a.png").size == (40, 48)


@pytest.mark.skipif(not REALSR.is_dir(), reason=f"shared real data not found at {REALSR}")
def test_shipped_weights_beat_bicubic_on_real_pairs(shipped):
    pytest.importorskip("pyiqa", reason="metrics need pyiqa (`pip install dalpsr[metrics]`)")
    from dalpsr.evaluation.metrics import MetricProtocol, build_metrics, score
    from dalpsr.image_io import load_image

    model, encoder = shipped
    protocol = MetricProtocol(color="y", color_space="ycbcr", crop_border=4, round_8bit=True)
    metrics, errors = build_metrics(["psnr", "ssim"], protocol)
    assert not errors
    ours, bicubic = {"psnr": [], "ssim": []}, {"psnr": [], "ssim": []}
    for name in PAIRS:
        lr = load_image(REALSR / "lr_x4" / name).rgb
        hr = load_image(REALSR / "hr" / name).rgb
        with torch.no_grad():
            sr = model.super_resolve(lr[None], encoder=encoder)[0].clamp(0, 1)
        bic = F.interpolate(lr[None], scale_factor=4, mode="bicubic", align_corners=False)[0].clamp(0, 1)
        assert sr.shape == hr.shape
        for key, metric in metrics.items():
            ours[key].append(score(metric, sr, hr, protocol))
            bicubic[key].append(score(metric, bic, hr, protocol))
    for key in metrics:
        assert np.mean(ours[key]) > np.mean(bicubic[key]), (key, ours[key], bicubic[key])
