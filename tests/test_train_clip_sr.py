"""training/train_clip_sr.py: three tiny ×8 steps with prompts from a text tower, checkpoints, validation with the
true/wrong/no/predicted-text scores, and exact resume."""

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
TINY_RUN = {
    "model": {"scale": 8, "text_dim": 32, "channels": 8, "num_blocks": 1, "stage_channels": [8, 8, 8],
              "predictor_channels": 8, "predictor_layers": 3},
    "data": {"hr_size": 32, "scale": 8, "degradation": "balanced"},
}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_clip_sr", ROOT / "training" / "train_clip_sr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def photo(h: int, w: int, i: int, rng) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(x * (5 + i)), np.cos(y * (4 + i)), np.sin((x + y) * (3 + i))], -1) * 0.4 + 0.5
    return (np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dalpsr.testing import get_dummy_degradation_models

    root = tmp_path_factory.mktemp("clip_sr_train")
    rng = np.random.default_rng(0)
    for sub in ("hr", "val"):
        (root / sub).mkdir()
    for i in range(3):
        Image.fromarray(photo(40, 44, i, rng)).save(root / "hr" / f"{i}.png")
    Image.fromarray(photo(40, 40, 5, rng)).save(root / "hr" / "held.png")
    Image.fromarray(photo(36, 40, 7, rng)).save(root / "val" / "v0.png")
    Image.fromarray(photo(40, 36, 8, rng)).save(root / "val" / "v1.png")
    (root / "run.json").write_text(json.dumps(TINY_RUN))
    get_dummy_degradation_models()[0].save_pretrained(root / "encoder")
    return root


def args_for(train, data: Path, out: Path, *extra: str):
    return train.parse_args(
        [
            "--model_config", str(data / "run.json"), "--train_data_dir", str(data / "hr"),
            "--exclude_names", "held", "--text_encoder", str(data / "encoder"),
            "--validation_data_dir", str(data / "val"), "--validation_size", "32", "--output_dir", str(out),
            "--max_train_steps", "3", "--train_batch_size", "2", "--crops_per_image", "2",
            "--checkpointing_steps", "1", "--validation_steps", "3", "--lr_warmup_steps", "0",
            "--learning_rate", "1e-2", "--text_dropout", "0.5", *extra,
        ]
    )  # fmt: skip


def test_train_validate_and_resume(train, data, tmp_path):
    from dalpsr.models.clip_sr import CLIPSR

    full = train.main(args_for(train, data, tmp_path / "full"))
    assert all((full / f"checkpoint-{i}").is_dir() for i in (1, 2, 3))
    val = json.loads((full / "validation" / "step-3.json").read_text())
    assert val["n"] == 2 and val["protocol"]["crop_border"] == 8
    for name in ("true_text", "wrong_text", "no_text", "predicted_text", "bicubic"):
        assert 5 < val["mean"][f"{name}/psnr"] < 60
    assert val["mean"]["gap_psnr"] == pytest.approx(val["mean"]["true_text/psnr"] - val["mean"]["wrong_text/psnr"])
    assert all(0 <= val["mean"][f"predictor_acc/{t}"] <= 1 for t in ("blur", "noise", "jpeg", "downscale"))
    meta = json.loads((full / "model_data.json").read_text())
    assert meta["scale"] == 8 and meta["train_images"] == 3 and meta["steps"] == 3

    # every part trained (the zero-started RGB heads pass no gradient upstream in step 1): text MLPs, refinement
    # heads, predictor; the empty-prompt embedding is the tower's
    state = load_file(full / "model" / "diffusion_pytorch_model.safetensors")
    torch.manual_seed(0)
    init = CLIPSR(**TINY_RUN["model"]).state_dict()
    for key in ("blocks.0.fuse1.affines.0.gamma.2.weight", "to_rgb.2.weight", "prompt_predictor.head.weight"):
        assert not torch.equal(state[key], init[key]), key
    from dalpsr.loaders.degradation import load_degradation_encoder

    with torch.no_grad():
        empty = load_degradation_encoder(data / "encoder").encode_text([""])[0]
    torch.testing.assert_close(state["null_text"], empty)

    # an interrupted run (only checkpoint-1 left) resumed with "latest" ends with exactly the same weights
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-1", resumed / "checkpoint-1")
    train.main(args_for(train, data, resumed, "--resume_from_checkpoint", "latest"))
    other = load_file(resumed / "model" / "diffusion_pytorch_model.safetensors")
    assert state.keys() == other.keys()
    for key in state:
        torch.testing.assert_close(state[key], other[key], rtol=0, atol=0, msg=key)
    assert json.loads((resumed / "validation" / "step-3.json").read_text())["mean"] == val["mean"]

    # --train_predictor_only from the trained model: the predictor moves, nothing else does
    only = train.main(
        args_for(train, data, tmp_path / "only", "--pretrained_model", str(full / "model"), "--train_predictor_only")
    )
    after = load_file(only / "model" / "diffusion_pytorch_model.safetensors")
    for key in state:
        assert (not torch.equal(after[key], state[key])) == key.startswith("prompt_predictor."), key


def test_bad_arguments(train, data, tmp_path):
    with pytest.raises(ValueError, match="`--text_dropout`"):
        args_for(train, data, tmp_path, "--text_dropout", "1.5")
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"model": {**TINY_RUN["model"], "scale": 16, "stage_channels": None}, "data": TINY_RUN["data"]})
    )
    with pytest.raises(ValueError, match="upscales ×16"):
        train.main(args_for(train, data, tmp_path / "out", "--model_config", str(bad)))
