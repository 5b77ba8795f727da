"""`dalpsr describe` with a PL-IDENet kernel estimator: the kernel line, the JSON entry and `--kernel-png`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dalpsr.cli import main
from dalpsr.loaders.pl_idenet import KernelModelNotFoundError, load_kernel_estimator
from dalpsr.models.pl_idenet import PLIDENet
from dalpsr.testing import get_dummy_degradation_models

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "scale": 2, "kernel_size": 7, "estimator_channels": 8, "upsample_channels": 8, "wiener_filter_size": 3,
    "wiener_num_nsr": 2, "embed_dim": 16, "depths": [1], "num_heads": [2], "window_size": 4, "prompt_len": 8,
    "prompt_dim": 4, "prompt_scale_factors": [1], "prompt_num_heads": [1], "kernel_init_sigma": 1.2,
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("describe_kernel")
    encoder, decoder = get_dummy_degradation_models()
    encoder.save_pretrained(root / "degradation" / "degradation_encoder")
    decoder.save_pretrained(root / "degradation" / "prompt_decoder")
    torch.manual_seed(0)
    PLIDENet(**TINY).save_pretrained(root / "run" / "model")  # a training output folder
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / f"{name}.png")
    return root


def test_describe_reports_and_draws_the_kernel(folders, tmp_path, capsys):
    model = load_kernel_estimator(folders / "run")
    base = ["describe", "--model", str(folders / "degradation"), "--device", "cpu"]
    png = tmp_path / "k.png"
    args = [*base, str(folders / "a.png"), "--kernel-model", str(folders / "run"), "--kernel-png", str(png), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rgb = torch.from_numpy(np.array(Image.open(folders / "a.png"))).permute(2, 0, 1).float() / 255
    expected = model.describe_kernel(rgb)
    assert report["kernel"]["sigma"] == pytest.approx(expected["sigma"], abs=1e-3)
    assert report["kernel"]["scale"] == 2 and set(report["kernel"]) >= {"sigma_major", "sigma_minor", "angle_deg"}
    assert "PL-IDENet" in report["kernel"]["evidence"] and report["kernel"]["png"] == str(png)
    picture = np.asarray(Image.open(png))
    assert picture.shape == (7 * 8, 7 * 8) and picture.max() == 255

    # several images: --kernel-png is a folder of IMAGE_STEM_kernel.png; the text report has a kernel line
    out = tmp_path / "kernels"
    files = [str(folders / "a.png"), str(folders / "b.png")]
    assert main([*base, *files, "--kernel-model", str(folders / "run"), "--kernel-png", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("  kernel     sigma ") == 2 and "px at x2" in text
    assert sorted(p.name for p in out.iterdir()) == ["a_kernel.png", "b_kernel.png"]

    # 'none' skips the kernel; an explicit folder that is not a model is an error
    assert main([*base, files[0], "--kernel-model", "none", "--json"]) == 0
    assert "kernel" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*base, files[0], "--kernel-model", str(tmp_path)]) == 2
    assert "not a PLIDENet folder" in capsys.readouterr().err
    assert main([*base, files[0], "--kernel-model", "none", "--kernel-png", str(png)]) == 2


def test_loader_errors(tmp_path):
    with pytest.raises(KernelModelNotFoundError, match="no config.json"):
        load_kernel_estimator(tmp_path)


def test_describe_uses_the_shipped_kernel_model_by_default(folders, tmp_path, capsys):
    from dalpsr.loaders.pl_idenet import default_kernel_model_dir

    shipped = default_kernel_model_dir()
    if shipped is None:
        pytest.skip("this installation ships no PL-IDENet (weights/pl_idenet_tiny)")
    model = load_kernel_estimator()
    assert model.config.scale == 4 and not model.training
    base = ["describe", "--model", str(folders / "degradation"), "--device", "cpu", str(folders / "a.png")]
    assert main([*base, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rgb = torch.from_numpy(np.array(Image.open(folders / "a.png"))).permute(2, 0, 1).float() / 255
    assert report["kernel"]["sigma"] == pytest.approx(model.describe_kernel(rgb)["sigma"], abs=1e-3)
    assert report["kernel"]["scale"] == 4
    assert main(base) == 0
    assert "  kernel     sigma " in capsys.readouterr().out
    # an image too small for the estimator: the default skips the kernel line, a requested model reports it
    small = tmp_path / "small.png"
    Image.new("RGB", (5, 3), (10, 200, 30)).save(small)
    assert main([*base[:-1], str(small), "--json"]) == 0
    assert "kernel" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*base[:-1], str(small), "--kernel-model", str(shipped)]) == 1
    assert "h, w >= 8" in capsys.readouterr().err
