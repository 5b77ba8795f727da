"""training/train_pl_idenet.py: two tiny steps, checkpoints, exact resume, validation with the kernel error."""

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
    "model": {
        "scale": 2, "kernel_size": 21, "estimator_channels": 8, "upsample_channels": 8, "wiener_filter_size": 3,
        "wiener_num_nsr": 2, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 4,
        "mlp_ratio": 2.0, "drop_path_rate": 0.1, "prompt_len": 8, "prompt_dim": 4, "prompt_scale_factors": [1, 1],
        "prompt_num_heads": [1, 1],
    },
    "data": {"hr_size": 32, "scale": 2, "degradation": ["setting1", "setting2"]},
}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("train_pl_idenet", ROOT / "training" / "train_pl_idenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train():
    return load_script()


def photo(h: int, w: int, i: int, rng) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(x * (5 + i)), np.cos(y * (4 + i)), np.sin((x + y) * (3 + i))], -1) * 0.4 + 0.5
    return (np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pl_idenet_train")
    rng = np.random.default_rng(0)
    for sub in ("hr", "val"):
        (root / sub).mkdir()
    for i in range(3):
        Image.fromarray(photo(40, 44, i, rng)).save(root / "hr" / f"{i}.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "hr" / "too_small.png")
    Image.fromarray(photo(36, 40, 7, rng)).save(root / "val" / "v0.png")
    (root / "run.json").write_text(json.dumps(TINY_RUN))
    return root


def args_for(train, data: Path, out: Path, *extra: str):
    return train.parse_args(
        [
            "--model_config", str(data / "run.json"), "--train_data_dir", str(data / "hr"),
            "--validation_data_dir", str(data / "val"), "--validation_size", "32", "--output_dir", str(out),
            "--max_train_steps", "2", "--train_batch_size", "2", "--crops_per_image", "2",
            "--checkpointing_steps", "1", "--validation_steps", "2", "--lr_warmup_steps", "1",
            "--learning_rate", "1e-3", *extra,
        ]
    )  # fmt: skip


def test_train_resume_validate_and_load(train, data, tmp_path):
    from dalpsr.models.pl_idenet import PLIDENet

    full = train.main(args_for(train, data, tmp_path / "full"))
    assert (full / "checkpoint-1").is_dir() and (full / "checkpoint-2").is_dir()
    val = json.loads((full / "validation" / "step-2.json").read_text())
    assert val["n"] == 2 and val["step"] == 2 and val["protocol"]["crop_border"] == 2
    assert [r["name"] for r in val["images"]] == ["v0/setting1", "v0/setting2"]
    for stats in (val["mean"], val["bicubic"]):
        assert 5 < stats["psnr"] < 60 and 0 < stats["ssim"] <= 1
    # the applied kernels are the presets' Gaussians: σ within their ranges, a delta kernel is far from them
    for row in val["images"]:
        assert 0.2 <= row["sigma_true"] <= 4.0 and 0 < row["kernel_l1_delta"] <= 2
    assert val["bicubic"]["sigma_error"] == pytest.approx(np.mean([r["sigma_true"] for r in val["images"]]))
    assert json.loads((full / "model_data.json").read_text())["degradation"] == ["setting1", "setting2"]

    # the run trained every part: the estimator through the kernel loss, the rest through L1
    state = load_file(full / "model" / "diffusion_pytorch_model.safetensors")
    torch.manual_seed(0)
    init = PLIDENet(**TINY_RUN["model"]).state_dict()
    for key in ("estimator.head.2.weight", "wiener.log_nsr", "groups.0.prompt.bank", "conv_last.weight"):
        assert not torch.equal(state[key], init[key]), key

    # an interrupted run (only checkpoint-1 left) resumed with "latest" ends with exactly the same weights
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-1", resumed / "checkpoint-1")
    train.main(args_for(train, data, resumed, "--resume_from_checkpoint", "latest"))
    other = load_file(resumed / "model" / "diffusion_pytorch_model.safetensors")
    assert state.keys() == other.keys()
    for key in state:
        torch.testing.assert_close(state[key], other[key], rtol=0, atol=0, msg=key)
    assert json.loads((resumed / "validation" / "step-2.json").read_text())["mean"] == val["mean"]

    model = PLIDENet.from_pretrained(full / "model").eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 9, 11)).sample.shape == (1, 3, 18, 22)


def test_mixed_presets_and_applied_kernel(train):
    from dalpsr.degradations.config import preset
    from dalpsr.degradations.pipeline import degrade

    hr = torch.rand(6, 3, 32, 32)
    configs = [preset("setting1", scale=2), preset("setting2", scale=2)]
    seeds = list(range(6))
    lr, params = train.degrade_mixed(hr, configs, 2, seeds)
    assert lr.shape == (6, 3, 16, 16)
    used = {p.stage2 is None for p in params}
    assert used == {True, False}  # both presets were drawn (setting1 has no second stage)
    for i, p in enumerate(params):
        config = configs[0] if p.stage2 is None else configs[1]
        torch.testing.assert_close(lr[i : i + 1], degrade(hr[i : i + 1], config, scale=2, seeds=[seeds[i]]).lr)
        kernel = train.applied_kernel(p, 21)
        assert kernel.shape == (21, 21) and float(kernel.sum()) == pytest.approx(1, abs=1e-5)
    # the recorded kernel reproduces the blur the preset applied
    from dalpsr.degradations import ops

    p = next(q for q in params if q.stage2 is None)
    i = params.index(p)
    blurred = ops.filter2d(hr[i : i + 1], train.applied_kernel(p, 21)[None])
    ref = ops.resize(blurred, (16, 16), "bicubic_antialias")
    assert float((torch.round(ref.clamp(0, 1) * 255) / 255 - lr[i : i + 1]).abs().max()) < 1.5 / 255


def test_parse_args_and_config_validation(train, tmp_path):
    base = ["--train_data_dir", "x", "--output_dir", "y"]
    with pytest.raises(ValueError, match="--max_train_steps"):
        train.parse_args([*base, "--max_train_steps", "0"])
    with pytest.raises(ValueError, match="--estimator_steps"):
        train.parse_args([*base, "--max_train_steps", "5", "--estimator_steps", "6"])
    with pytest.raises(ValueError, match="--estimator_learning_rate"):
        train.parse_args([*base, "--estimator_learning_rate", "0"])
    with pytest.raises(ValueError, match="--kernel_loss_weight"):
        train.parse_args([*base, "--kernel_loss_weight", "-1"])
    with pytest.raises(FileNotFoundError, match="--model_config"):
        train.load_model_config("no_such_config.json")
    shipped = train.load_model_config("train_pl_idenet_tiny.json")
    assert shipped["model"]["kernel_size"] == 21 and shipped["data"]["scale"] == 4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dat": {}}))
    with pytest.raises(ValueError, match="'model'"):
        train.load_model_config(str(bad))


def test_estimator_stage_then_frozen_joint_stage_resume_exactly(train, data, tmp_path):
    """--estimator_steps trains only the estimator (larger crops); --freeze_estimator then trains only the rest."""
    extra = ("--max_train_steps", "4", "--estimator_steps", "2", "--estimator_hr_size", "40",
             "--estimator_learning_rate", "1e-2", "--freeze_estimator", "--validation_steps", "2")  # fmt: skip
    full = train.main(args_for(train, data, tmp_path / "full", *extra))
    from dalpsr.models.pl_idenet import PLIDENet

    torch.manual_seed(0)
    init = PLIDENet(**TINY_RUN["model"]).state_dict()
    after_estimator = load_file(full / "checkpoint-2" / "model.safetensors")
    final = load_file(full / "model" / "diffusion_pytorch_model.safetensors")
    estimator = [k for k in init if k.startswith("estimator.")]
    restorer = [k for k in init if not k.startswith("estimator.")]
    assert all(not torch.equal(after_estimator[k], init[k]) for k in estimator if k.endswith("weight"))
    assert all(torch.equal(after_estimator[k], init[k]) for k in restorer)  # the SR body is untouched in stage 1
    assert all(torch.equal(final[k], after_estimator[k]) for k in estimator)  # frozen in the joint stage
    assert not torch.equal(final["conv_last.weight"], init["conv_last.weight"])
    val = json.loads((full / "validation" / "step-2.json").read_text())
    assert (
        val["stage"] == "estimator"
        and json.loads((full / "validation" / "step-4.json").read_text())["stage"] == "joint"
    )
    assert val["sigma_corr"] is None or -1 <= val["sigma_corr"] <= 1
    data_json = json.loads((full / "model_data.json").read_text())
    assert data_json["estimator_steps"] == 2 and data_json["estimator_hr_size"] == 40

    # resumed inside the estimator stage and at the stage boundary: the same weights, bit for bit
    for ckpt in ("checkpoint-1", "checkpoint-2"):
        resumed = tmp_path / f"resumed-{ckpt}"
        shutil.copytree(full / ckpt, resumed / ckpt)
        train.main(args_for(train, data, resumed, *extra, "--resume_from_checkpoint", "latest"))
        other = load_file(resumed / "model" / "diffusion_pytorch_model.safetensors")
        for key in final:
            torch.testing.assert_close(final[key], other[key], rtol=0, atol=0, msg=f"{ckpt}: {key}")


def test_init_restorer_from_keeps_the_estimator_fresh(train, data, tmp_path):
    from dalpsr.models.pl_idenet import PLIDENet

    torch.manual_seed(3)
    source = PLIDENet(**TINY_RUN["model"])
    source.save_pretrained(tmp_path / "source")
    model_cfg = {**TINY_RUN["model"], "kernel_parameterization": "gaussian", "estimator_normalization": True}
    (tmp_path / "run.json").write_text(json.dumps({**TINY_RUN, "model": model_cfg}))
    args = args_for(train, data, tmp_path / "out", "--max_train_steps", "1", "--learning_rate", "1e-12",
                    "--init_restorer_from", str(tmp_path / "source"), "--validation_steps", "5")  # fmt: skip
    args.model_config = str(tmp_path / "run.json")
    out = train.main(args)
    state = load_file(out / "model" / "diffusion_pytorch_model.safetensors")
    ref = source.state_dict()
    torch.testing.assert_close(state["groups.0.prompt.bank"], ref["groups.0.prompt.bank"], rtol=0, atol=1e-9)
    assert state["estimator.head.3.weight"].shape[0] == 3  # the Gaussian head of the new config, not the source's
    wider = {**TINY_RUN["model"], "embed_dim": 24}
    (tmp_path / "wide.json").write_text(json.dumps({**TINY_RUN, "model": wider}))
    args.model_config, args.output_dir = str(tmp_path / "wide.json"), str(tmp_path / "wide")
    with pytest.raises(ValueError, match="--init_restorer_from"):
        train.main(args)
