"""training/train_degradation_encoder.py: a few tiny steps, checkpoints, exact resume, and the CLI on its output."""

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
    "encoder": {
        "clip_model": {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        },
        "num_degradation_tokens": 4,
        "resize_mode": "crop",
    },
    "decoder": {"embed_dim": 32, "hidden_dim": 32, "num_layers": 1, "num_heads": 2},
    "data": {"hr_size": 64, "scale": 2, "degradation": "realesrgan"},
}


def load_script():
    spec = importlib.util.spec_from_file_location(
        "train_degradation_encoder", ROOT / "training" / "train_degradation_encoder.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train():
    return load_script()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("deg_train")
    hr = root / "hr"
    hr.mkdir()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:80, 0:96] / 80.0
    for i in range(5):
        img = np.stack([np.sin(x * (3 + i)), np.cos(y * (2 + i)), np.sin((x + y) * (1 + i))], -1) * 0.4 + 0.5
        img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(hr / f"{i}.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(hr / "too_small.png")
    (root / "run.json").write_text(json.dumps(TINY_RUN))
    return root


def args_for(train, data: Path, out: Path, *extra: str):
    return train.parse_args(
        [
            "--model_config", str(data / "run.json"), "--train_data_dir", str(data / "hr"),
            "--validation_data_dir", str(data / "hr"), "--output_dir", str(out), "--max_train_steps", "5",
            "--train_batch_size", "4", "--crops_per_image", "2", "--checkpointing_steps", "2",
            "--validation_steps", "5", "--validation_samples", "8", "--lr_warmup_steps", "1", *extra,
        ]
    )  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_checkpoint_resume_and_cli(train, data, tmp_path, capsys):
    full = train.main(args_for(train, data, tmp_path / "full"))
    assert (full / "checkpoint-2").is_dir() and (full / "checkpoint-4").is_dir()
    val = json.loads((full / "validation" / "step-5.json").read_text())
    assert val["n"] == 8 and set(val["types"]) == {"blur", "noise", "jpeg", "downscale"}
    assert json.loads((full / "degradation_data.json").read_text()) == TINY_RUN["data"]

    # an interrupted run (only checkpoint-2 left) resumed with "latest" ends with exactly the same weights
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    train.main(args_for(train, data, resumed, "--resume_from_checkpoint", "latest"))
    for sub in ("degradation_encoder", "prompt_decoder"):
        a = load_file(full / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(resumed / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)

    from dalpsr.cli import main as cli

    out_json = tmp_path / "eval.json"
    assert cli(["evaluate-degradation", "--model", str(full), "--images", str(data / "hr"), "--n", "6",
                "--output", str(out_json), "--device", "cpu"]) == 0  # fmt: skip
    metrics = json.loads(out_json.read_text())
    assert metrics["n"] == 6 and metrics["settings"]["crop_size"] == 64 and metrics["settings"]["scale"] == 2
    assert [s["image"].endswith("too_small.png") for s in metrics["skipped"]] == [True]
    assert cli(["describe", str(data / "hr" / "0.png"), "--model", str(full), "--json", "--device", "cpu"]) == 0
    capsys.readouterr()
    # a bad input is reported and skipped; the others are still described
    assert cli(["describe", str(data / "hr" / "missing.png"), str(data / "hr" / "1.png"), "--model", str(full)]) == 1
    captured = capsys.readouterr()
    assert "missing.png" in captured.err and "1.png\n  prompt: " in captured.out
    assert cli(["evaluate-degradation", "--model", str(full), "--images", str(data / "nowhere")]) == 2
    assert cli(["describe", "x.png", "--model", str(data)]) == 2  # not a model folder


def test_parse_args_validation(train):
    with pytest.raises(ValueError, match="--max_train_steps"):
        train.parse_args(["--train_data_dir", "x", "--output_dir", "y", "--max_train_steps", "0"])
    with pytest.raises(ValueError, match="at most one"):
        train.parse_args(["--train_data_dir", "x", "--output_dir", "y", "--pretrained_open_clip", "a",
                          "--daclip_checkpoint", "b"])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="--model_config"):
        train.load_model_config("no_such_config.json")
    assert train.load_model_config("degradation_encoder_tiny.json")["data"] == {
        "hr_size": 64,
        "scale": 1,
        "degradation": "balanced",
    }
    assert train.load_model_config("degradation_encoder_vit_b32.json")["encoder"]["clip_model"] == "ViT-B-32"
