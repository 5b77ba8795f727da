"""training/train_cdsr.py: LPE pre-training and SR arms, exact resume, identical batches across arms."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY_LPE = {
    "pixel_channels": [4, 8, 8],
    "patch_channels": [4, 8, 8],
    "patch_size": 4,
    "embed_dim": 8,
    "num_codes": 4,
    "projection_dim": 8,
}
TINY_DAT = {"embed_dim": 32, "depth": [2, 2], "num_heads": [2, 2], "split_size": [2, 4], "img_size": 64, "upscale": 2}
TINY_CDSR = {"num_features": 8, "growth_channels": 4, "num_blocks": 1}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_cdsr", ROOT / "training" / "train_cdsr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cdsr_train")
    rng = np.random.default_rng(0)
    for i in range(3):
        y, x = np.mgrid[0:36, 0:40] / 40
        img = np.stack([np.sin(x * (3 + i)), np.cos(y * (2 + i)), np.sin((x + y) * (1 + i))], -1) * 0.4 + 0.5
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / f"{i}.png")
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "too_small.png")
    return root


def run_args(train, data: Path, out: Path, *extra: str):
    return train.parse_args(
        [
            "--train_data_dir", str(data), "--output_dir", str(out), "--hr_size", "24", "--scale", "2",
            "--max_train_steps", "4", "--train_batch_size", "2", "--crops_per_image", "2",
            "--checkpointing_steps", "2", "--lr_warmup_steps", "1", "--learning_rate", "1e-3", *extra,
        ]
    )  # fmt: skip


def lpe_args(train, data, out, *extra):
    return run_args(
        train, data, out, "--stage", "lpe", "--lpe_config", json.dumps(TINY_LPE), "--queue_size", "6", *extra
    )


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_file(a), load_file(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_lpe_pretraining_resumes_exactly(train, data, tmp_path):
    full = train.main(lpe_args(train, data, tmp_path / "full"))
    assert (full / "checkpoint-2").is_dir() and (full / "lpe" / "config.json").is_file()
    weights = full / "lpe" / "diffusion_pytorch_model.safetensors"
    # an interrupted run (only checkpoint-2 left: LPE, optimizer, key encoder and queue) resumes to the same weights
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    train.main(lpe_args(train, data, resumed, "--resume_from_checkpoint", "latest"))
    assert_same_weights(weights, resumed / "lpe" / "diffusion_pytorch_model.safetensors")
    # and a run from scratch repeats itself
    again = train.main(lpe_args(train, data, tmp_path / "again"))
    assert_same_weights(weights, again / "lpe" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_sr_arms_train_resume_and_load(train, data, tmp_path):
    from dalpsr.models.cdsr import CDSRNet, LightweightPatchEncoder
    from dalpsr.models.fusion import DATRestorer

    lpe_run = train.main(lpe_args(train, data, tmp_path / "lpe", "--max_train_steps", "1"))
    dat_config = json.dumps(TINY_DAT)
    arm = ["--stage", "sr", "--dat_config", dat_config, "--fusion", "dqa", "--feature_source", "lpe"]
    arm += ["--encoder", str(lpe_run), "--fusion_learning_rate", "1e-2", "--ema_decay", "0.5"]
    full = train.main(run_args(train, data, tmp_path / "dqa", *arm))
    restorer = full / "restorer" / "diffusion_pytorch_model.safetensors"
    state = load_file(restorer)
    assert state["fusion_blocks.0.conv2.weight"].abs().sum() > 0  # the zero-initialised DQA output moved
    resumed = tmp_path / "dqa_resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    train.main(run_args(train, data, resumed, *arm, "--resume_from_checkpoint", "latest"))
    assert_same_weights(restorer, resumed / "restorer" / "diffusion_pytorch_model.safetensors")

    model = DATRestorer.from_pretrained(full / "restorer").eval()
    lpe = LightweightPatchEncoder.from_pretrained(full / "lpe").eval()
    assert model.config.fusion == "dqa" and model.super_resolve(torch.rand(1, 3, 9, 11), encoder=lpe).shape == (
        1,
        3,
        18,
        22,
    )

    cdsr = train.main(
        run_args(train, data, tmp_path / "cdsr", "--stage", "sr", "--arch", "cdsr", "--feature_source", "lpe",
                 "--encoder", str(lpe_run), "--cdsr_config", json.dumps(TINY_CDSR), "--max_train_steps", "1")
    )  # fmt: skip
    net = CDSRNet.from_pretrained(cdsr / "restorer")
    assert net.config.embed_dim == TINY_LPE["embed_dim"] and net.config.scale == 2


def test_arms_see_identical_batches(train, data):
    """Crops, degradations and presets depend only on the seed and data, not on the arm."""
    from dalpsr.degradations.config import preset

    args = run_args(train, data, Path("unused"), "--stage", "sr", "--fusion", "none", "--dat_config", "{}")
    parts = train.build_dataset(args, two_crops=False)
    assert len(parts) == 1 and len(parts[0]) == 6  # too_small.png skipped, 3 images × 2 crops
    configs = [preset(name, scale=2) for name in args.degradations]
    items = [parts[0][i] for i in range(6)]
    hr = torch.stack([it["hr"] for it in items])
    seeds = [it["seed"] for it in items]
    lr = train.degrade_mixed(hr, seeds, configs, 2)
    again = train.degrade_mixed(hr, seeds, configs, 2)
    assert lr.shape == (6, 3, 12, 12) and torch.equal(lr, again)
    assert torch.equal(torch.stack([parts[0][i]["hr"] for i in range(6)]), hr)
    parts[0].set_epoch(1)
    assert not torch.equal(parts[0][0]["hr"], items[0]["hr"]) or parts[0][0]["seed"] != items[0]["seed"]
    # two crops of one image for the contrastive stage: same seed (same degradation), different positions
    pair = train.build_dataset(args, two_crops=True)[0][0]
    assert pair["hr_key"].shape == pair["hr"].shape and not torch.equal(pair["hr_key"], pair["hr"])


def test_parse_args_validation(train):
    base = ["--train_data_dir", "x", "--output_dir", "y"]
    with pytest.raises(ValueError, match="--max_train_steps"):
        train.parse_args([*base, "--stage", "lpe", "--max_train_steps", "0"])
    with pytest.raises(ValueError, match="--encoder"):
        train.parse_args([*base, "--stage", "sr", "--fusion", "dqa"])
    with pytest.raises(ValueError, match="--feature_source lpe"):
        train.parse_args([*base, "--stage", "sr", "--arch", "cdsr", "--encoder", "e"])
    with pytest.raises(ValueError, match="--fusion srclip"):
        train.parse_args([*base, "--stage", "sr", "--fusion", "srclip", "--feature_source", "lpe", "--encoder", "e"])
    with pytest.raises(ValueError, match="--hr_size"):
        train.parse_args([*base, "--stage", "lpe", "--hr_size", "30"])
