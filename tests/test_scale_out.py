"""configs/accelerate/: every config parses and selects its launcher; DDP on 2 CPU processes trains
training/train_lora.py 2 steps, checkpoints, and a resumed run ends where the uninterrupted one does."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {
    "single_gpu.yaml": ("NO", dict(multi_gpu=False, use_fsdp=False, use_deepspeed=False)),
    "multi_gpu_ddp.yaml": ("MULTI_GPU", dict(multi_gpu=True, use_fsdp=False, use_deepspeed=False)),
    "fsdp.yaml": ("FSDP", dict(multi_gpu=False, use_fsdp=True, use_deepspeed=False)),
    "deepspeed_zero2.yaml": ("DEEPSPEED", dict(multi_gpu=False, use_fsdp=False, use_deepspeed=True)),
}


def test_the_shipped_configs_are_the_expected_ones():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_and_selects_its_launcher(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    distributed_type, flags = EXPECTED[name]
    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.value == distributed_type and config.machine_rank == 0
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "training/train_lora.py"])
    args, _, _ = _validate_launch_command(args)
    assert {k: bool(getattr(args, k)) for k in flags} == flags
    if name == "fsdp.yaml":
        assert args.fsdp_use_orig_params in (True, "true")  # LoRA: most parameters are frozen
        assert args.fsdp_state_dict_type == "FULL_STATE_DICT"
    if name == "deepspeed_zero2.yaml":
        assert int(args.zero_stage) == 2


# ------------------------------------------------------------------------------------------------ DDP on CPU
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from PIL import Image
    from skimage import data

    from dalpsr.testing import save_dummy_sd2

    base = tmp_path_factory.mktemp("ddp")
    sd2, controlnet = save_dummy_sd2(base / "sd2", seed=0)
    hr = base / "hr"
    hr.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).resize((64, 64)).save(hr / f"{name}.png")
    return {"base": base, "sd2": sd2, "controlnet": controlnet, "hr": str(hr)}


def train_ddp(work, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 training/train_lora.py` on CPU: torchrun starts the
    processes, $ACCELERATE_USE_CPU makes Accelerate join them in a gloo group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "training" / "train_lora.py"),
           "--pretrained_model_name_or_path", work["sd2"], "--controlnet_model_name_or_path", work["controlnet"],
           "--train_data_dir", work["hr"], "--output_dir", str(output_dir), "--resolution", "32", "--scale", "4",
           "--rank", "4", "--train_batch_size", "1", "--learning_rate", "2e-3", "--max_train_steps", "3",
           "--checkpointing_steps", "2", "--seed", "0", *extra]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_checkpoints_and_resumes(work, tmp_path):
    from safetensors.torch import load_file

    out_a = tmp_path / "a"
    done = train_ddp(work, out_a)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "× 2 processes" in done.stderr, "both processes joined one DDP group"
    assert (out_a / "checkpoint-2").is_dir() and (out_a / "pytorch_lora_weights.safetensors").is_file()

    out_b = tmp_path / "b"
    shutil.copytree(out_a / "checkpoint-2", out_b / "checkpoint-2")  # as if killed after step 2
    done = train_ddp(work, out_b, "--resume_from_checkpoint", "latest")
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(out_a / "pytorch_lora_weights.safetensors")
    b = load_file(out_b / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:  # same shards, crops, noise, optimizer and scheduler state on both ranks: the same step 3
        assert torch.equal(a[key], b[key]), key
