"""benchmarks/eval_pl_idenet.py: the Setting 1/2 cases, kernel errors against fixed baselines, σ correlation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("eval_pl_idenet", ROOT / "benchmarks" / "eval_pl_idenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pearson():
    from dalpsr.evaluation.degradation import pearson

    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.5]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1])
    assert pearson([1.0, 2.0], [2.0, 1.0]) == pytest.approx(-1.0)
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # a constant estimate follows no blur
    assert pearson([1.0], [2.0]) is None


@pytest.mark.slow  # ~20 s on one thread (metric set-up and 9 cases)
def test_eval_runs_both_settings(tmp_path):
    from dalpsr.degradations.gaussian8 import gaussian8_sigmas
    from dalpsr.models.pl_idenet import PLIDENet

    ev = load_script()
    rng = np.random.default_rng(0)
    for sub, size in (("set5", 50), ("held", 64)):
        (tmp_path / sub).mkdir()
        Image.fromarray(rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)).save(tmp_path / sub / "a.png")
    torch.manual_seed(0)
    model = PLIDENet(
        scale=4, kernel_size=21, estimator_channels=8, upsample_channels=8, wiener_filter_size=3, wiener_num_nsr=2,
        embed_dim=16, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2.0, prompt_len=8, prompt_dim=4,
        prompt_scale_factors=[1], prompt_num_heads=[1], kernel_parameterization="gaussian",
        estimator_normalization=True,
    )  # fmt: skip
    model.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--dat-model", "", "--degradation-model", "", "--set5",
            str(tmp_path / "set5"), "--setting2-dir", str(tmp_path / "held")]  # fmt: skip
    summary = ev.main(ev.parse_args([*argv, "--json", str(tmp_path / "out.json")]))
    s1, s2 = summary["setting1"], summary["setting2"]
    assert s1["n"] == 8 and s2["n"] == 1
    # the delta kernel's σ error is the applied σ itself; the constant prior's is |2.1 − σ|
    sigmas = gaussian8_sigmas(4)
    assert s1["sigma_error_delta"] == pytest.approx(np.mean(sigmas), abs=0.02)
    assert s1["sigma_error_prior"] == pytest.approx(np.mean([abs(ev.PRIOR_SIGMA - s) for s in sigmas]), abs=0.02)
    assert s1["sigma_corr_est"] is None or -1 <= s1["sigma_corr_est"] <= 1
    assert s2["sigma_corr_est"] is None  # one case
    for key in ("bicubic_psnr", "pl_idenet_psnr", "pl_idenet_ssim"):
        assert key in s1 and key in s2
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [r["setting"] for r in rows].count("setting1") == 8 and "sigma_x" in rows[-1]
    # --kernel-only: the same kernel figures without PL-IDENet's SR
    quick = ev.main(ev.parse_args([*argv, "--kernel-only"]))["setting1"]
    assert "pl_idenet_psnr" not in quick and "bicubic_psnr" in quick
    for key in ("sigma_error_est", "kernel_l1_est", "sigma_corr_est"):
        assert quick[key] == pytest.approx(s1[key], abs=1e-6)
