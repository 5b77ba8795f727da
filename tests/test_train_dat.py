"""training/train_dat.py: a few tiny steps with fusion, checkpoints, exact resume, validation metrics."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dalpsr.testing import TINY_OPEN_CLIP

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = {
    "dat": {"embed_dim": 32, "depth": [2, 2], "num_heads": [2, 2], "split_size": [2, 4], "img_size": 64, "upscale": 2},
    "fusion": {"fusion_num_heads": 2, "fusion_layers": [0, 1]},
    "encoder": {"clip_model": TINY_OPEN_CLIP, "num_degradation_tokens": 4, "resize_mode": "crop"},
    "data": {"hr_size": 32, "scale": 2, "degradation": "realesrgan"},
}


def load_script():
    spec = importlib.util.spec_from_file_location("train_dat", ROOT / "training" / "train_dat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train():
    return load_script()


pytestmark = pytest.mark.usefixtures("one_thread")


def photo(h: int, w: int, i: int, rng) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(x * (3 + i)), np.cos(y * (2 + i)), np.sin((x + y) * (1 + i))], -1) * 0.4 + 0.5
    return (np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dat_train")
    rng = np.random.default_rng(0)
    (root / "hr").mkdir()
    for i in range(3):
        Image.fromarray(photo(40, 48, i, rng)).save(root / "hr" / f"{i}.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "hr" / "too_small.png")
    for sub in ("val/hr", "val/lr_x2"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        hr = Image.fromarray(photo(24, 28, i + 5, rng))
        hr.save(root / "val" / "hr" / f"v{i}.png")
        hr.resize((14, 12), Image.BICUBIC).save(root / "val" / "lr_x2" / f"v{i}.png")
    (root / "run.json").write_text(json.dumps(TINY_RUN))
    return root


def args_for(train, data: Path, out: Path, *extra: str):
    return train.parse_args(
        [
            "--model_config", str(data / "run.json"), "--train_data_dir", str(data / "hr"),
            "--validation_data_dir", str(data / "val"), "--output_dir", str(out), "--max_train_steps", "4",
            "--train_batch_size", "2", "--crops_per_image", "2", "--checkpointing_steps", "2",
            "--validation_steps", "4", "--lr_warmup_steps", "1", "--learning_rate", "1e-3", "--ema_decay", "0.9",
            "--iqa_weights_dir", str(data / "no_iqa_weights"), *extra,
        ]
    )  # fmt: skip


def test_train_resume_validate_and_load(train, data, tmp_path, caplog):
    from dalpsr.loaders.restorers import load_restorer

    caplog.set_level(logging.INFO)
    full = train.main(args_for(train, data, tmp_path / "full"))
    assert "LPIPS loss skipped" in caplog.text and "too_small.png" in caplog.text
    assert (full / "checkpoint-2").is_dir() and (full / "checkpoint-4").is_dir()
    val = json.loads((full / "validation" / "step-4.json").read_text())
    assert val["n"] == 2 and val["step"] == 4 and val["protocol"]["crop_border"] == 4
    assert val["protocol"]["luma"] == "BT.601 YCbCr Y"
    for stats in (val["mean"], val["bicubic"]):
        assert 5 < stats["psnr"] < 60 and 0 < stats["ssim"] <= 1
    assert [r["name"] for r in val["images"]] == ["v0", "v1"]
    assert json.loads((full / "restorer_data.json").read_text())["scale"] == 2

    # the run trained: weights moved away from the zero-initialised fusion output
    state = load_file(full / "restorer" / "diffusion_pytorch_model.safetensors")
    assert state["fusion_blocks.0.fuse_attn.to_out.weight"].abs().sum() > 0

    # an interrupted run (only checkpoint-2 left) resumed with "latest" ends with exactly the same weights
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    train.main(args_for(train, data, resumed, "--resume_from_checkpoint", "latest"))
    other = load_file(resumed / "restorer" / "diffusion_pytorch_model.safetensors")
    assert state.keys() == other.keys()
    for key in state:
        torch.testing.assert_close(state[key], other[key], rtol=0, atol=0, msg=key)
    assert json.loads((resumed / "validation" / "step-4.json").read_text())["mean"] == val["mean"]

    # the output folder loads for inference (restorer + its encoder)
    model, encoder = load_restorer(full)
    assert encoder is not None and model.needs_features
    assert model.super_resolve(torch.rand(1, 3, 9, 11), encoder=encoder).shape == (1, 3, 18, 22)


def test_plain_dat_from_official_checkpoint(train, data, tmp_path):
    from dalpsr.models.dat import DAT

    torch.manual_seed(0)
    dat = DAT(**TINY_RUN["dat"])
    torch.save({"params": dat.state_dict()}, tmp_path / "dat.pth")
    out = train.main(
        args_for(
            train, data, tmp_path / "plain", "--no_fusion", "--pretrained_dat", str(tmp_path / "dat.pth"),
            "--max_train_steps", "1", "--ema_decay", "0",
        )
    )  # fmt: skip
    config = json.loads((out / "restorer" / "config.json").read_text())
    assert config["fusion_layers"] == [] and not (out / "degradation_encoder").exists()
    assert json.loads((out / "validation" / "step-1.json").read_text())["n"] == 2


def test_parse_args_and_config_validation(train, data, tmp_path):
    base = ["--train_data_dir", "x", "--output_dir", "y"]
    with pytest.raises(ValueError, match="--max_train_steps"):
        train.parse_args([*base, "--max_train_steps", "0"])
    with pytest.raises(ValueError, match="--ema_decay"):
        train.parse_args([*base, "--ema_decay", "1"])
    with pytest.raises(ValueError, match="--freeze_dat"):
        train.parse_args([*base, "--freeze_dat"])
    with pytest.raises(FileNotFoundError, match="--model_config"):
        train.load_model_config("no_such_config.json")
    shipped = train.load_model_config("train_dat_light_tiny.json")
    dat_config = train.dat_config_from(shipped["dat"])
    assert dat_config["embed_dim"] == 60 and dat_config["upsampler"] == "pixelshuffledirect"
    assert dat_config["upscale"] == shipped["data"]["scale"] == 4
    # a fusion config without any encoder is refused, naming the way out
    args = train.parse_args([*base, "--model_config", "train_dat_light_tiny.json"])
    with pytest.raises(ValueError, match="--degradation_encoder"):
        train.load_encoder(args, shipped)
    with pytest.raises(ValueError, match="lr_x2"):
        train.paired_files(data / "hr", 2)
