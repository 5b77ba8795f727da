"""training/train_lora.py: a few steps on tiny components, saved LoRA weights, exact resume, argument errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalpsr.training_utils import list_checkpoints, load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SET5 = SHARED / "paired" / "Set5"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_lora", ROOT / "training" / "train_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_lora = _load_script()


def train(args):
    """`main(args)` in this process; Accelerate's state is per process, so reset it (mixed precision differs)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return train_lora.main(args)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny SD2 + ControlNet folders, a folder of 5 HR images, an 8×8 LR validation image, a caption cache."""
    from dalpsr.captioning import CaptionCache, image_content_sha256
    from dalpsr.testing import save_dummy_sd2

    base = tmp_path_factory.mktemp("train_lora")
    sd2, controlnet = save_dummy_sd2(base / "sd2", seed=0)
    if (SET5 / "hr").is_dir():  # real photographs when the shared data is present
        hr_dir = SET5 / "hr"
        lr_source = Image.open(SET5 / "lr_x4" / "butterfly.png").convert("RGB")
    else:
        from skimage import data

        hr_dir = base / "hr"
        hr_dir.mkdir()
        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
            Image.fromarray(getattr(data, name)()).resize((128, 128)).save(hr_dir / f"{name}.png")
        lr_source = Image.open(hr_dir / "astronaut.png").resize((32, 32))
    val = base / "val_lr.png"
    lr_source.crop((8, 8, 16, 16)).save(val)
    cache = base / "captions.jsonl"
    with CaptionCache(cache) as store:
        for path in sorted(hr_dir.glob("*.png"))[:3]:
            store.put(image_content_sha256(path), "test/model", "describe", f"a photo of {path.stem}", path=path.name)
    return {"base": base, "sd2": sd2, "controlnet": controlnet, "hr": str(hr_dir), "val": str(val), "cache": cache}


def tiny_args(work, output_dir, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", work["sd2"],
        "--controlnet_model_name_or_path", work["controlnet"],
        "--train_data_dir", work["hr"],
        "--caption_cache", str(work["cache"]),
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--scale", "4",
        "--rank", "4",
        "--lora_alpha", "8",
        "--train_batch_size", "1",
        "--gradient_accumulation_steps", "2",
        "--max_train_steps", "5",
        "--learning_rate", "2e-3",
        "--lr_scheduler", "linear",
        "--lr_warmup_steps", "2",
        "--proportion_empty_prompts", "0.3",
        "--random_flip",
        "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "1",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run_a(work):
    """5 optimizer steps (2 micro-batches each; 5 items → 3 steps per epoch, the last one from a single batch)."""
    out = work["base"] / "run_a"
    args = train_lora.parse_args(
        tiny_args(
            work,
            out,
            "--validation_image", work["val"],
            "--validation_steps", "4",
            "--validation_num_inference_steps", "1",
            "--validation_guidance_scale", "1.0",
        )
    )  # fmt: skip
    return out, train(args)


def lora_file(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "pytorch_lora_weights.safetensors")


def tiny_pipeline(work):
    from dalpsr.pipelines.pipeline_dalpsr import DaLPSRPipeline

    pipe = DaLPSRPipeline.from_sd2(work["sd2"], controlnet=work["controlnet"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sr(pipe, work) -> torch.Tensor:
    return pipe(
        work["val"],
        prompt="a photo",
        degradation_prompt="Denoise with sigma 0.25~0.50",
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def test_training_writes_losses_checkpoints_weights_and_validation(run_a):
    out, result = run_a
    assert result["initial_global_step"] == 0 and result["global_step"] == 5
    assert len(result["losses"]) == 5 and all(np.isfinite(result["losses"]))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]  # the limit removed checkpoint-2
    assert not list(out.glob("*.partial"))
    keys = lora_file(out)
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("controlnet.") for k in keys)
    assert all(".to_q." in k or ".to_k." in k or ".to_v." in k or ".to_out.0." in k for k in keys)
    for step in (4, 5):  # every --validation_steps, and after the last step
        (image,) = (out / "validation" / f"step-{step:06d}").glob("*.png")
        assert Image.open(image).size == (32, 32)
    saved = json.loads((out / train_lora.ARGS_FILE).read_text())
    assert saved["rank"] == 4 and saved["max_train_steps"] == 5
    again = train_lora.parse_args(["--config", str(out / train_lora.ARGS_FILE)])  # the run file is a --config file
    assert vars(again) == {**saved, "config": str(out / train_lora.ARGS_FILE)}


def test_resume_from_latest_reproduces_the_uninterrupted_run(work, run_a, tmp_path):
    out_a, _ = run_a
    out_b = tmp_path / "run_b"
    shutil.copytree(out_a / "checkpoint-4", out_b / "checkpoint-4")  # as if the run had stopped after step 4
    result = train(train_lora.parse_args(tiny_args(work, out_b, "--resume_from_checkpoint", "latest")))
    assert result["initial_global_step"] == 4 and result["global_step"] == 5 and len(result["losses"]) == 1
    a, b = lora_file(out_a), lora_file(out_b)
    assert a.keys() == b.keys()
    for key in a:  # same data order, crops, degradations, noise, optimizer and lr state: bit-identical
        assert torch.equal(a[key], b[key]), key


def test_saved_lora_loads_into_the_pipeline_and_changes_its_output(work, run_a):
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    out, _ = run_a
    pipe = tiny_pipeline(work)
    base = sr(pipe, work)
    pipe.load_lora_weights(out / "pytorch_lora_weights.safetensors")
    tuned = sr(pipe, work)
    assert tuned.shape == base.shape == (1, 3, 32, 32)
    assert (tuned - base).abs().max() > 1e-3

    # The checkpoint's pipeline file (alpha/rank folded into lora_B) gives the same output as the raw training
    # adapters with alpha 8, rank 4.
    ckpt = out / "checkpoint-4"
    pipe.unload_lora_weights()
    pipe.load_lora_weights(ckpt / "pytorch_lora_weights.safetensors")
    folded = sr(pipe, work)
    raw = tiny_pipeline(work)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    for name, file in (("unet", train_lora.UNET_LORA_FILE), ("controlnet", train_lora.CONTROLNET_LORA_FILE)):
        model = getattr(raw, name)
        model.add_adapter(config)
        set_peft_model_state_dict(model, load_file(ckpt / file), adapter_name="default")
    torch.testing.assert_close(folded, sr(raw, work), atol=1e-5, rtol=1e-5)
    assert (folded - base).abs().max() > 1e-3


def test_pairs_folder_pipeline_dir_full_controlnet_and_bf16(work, tmp_path):
    from diffusers import ControlNetModel

    from dalpsr.data.make_pairs import make_pairs

    pipeline_dir = tmp_path / "pipe"
    tiny_pipeline(work).save_pretrained(pipeline_dir)
    pairs = tmp_path / "pairs"
    make_pairs(work["hr"], pairs, scale=4, preset_name="light", size=48, progress=False)
    out = tmp_path / "full"
    args = train_lora.parse_args(
        [
            "--pipeline_dir", str(pipeline_dir),
            "--pairs_dir", str(pairs),
            "--output_dir", str(out),
            "--resolution", "32",
            "--lora_targets", "unet",
            "--train_controlnet_full",
            "--train_batch_size", "2",
            "--max_train_steps", "2",
            "--learning_rate", "1e-3",
            "--text_routing", "shared",
            "--gradient_checkpointing",
            "--mixed_precision", "bf16",
            "--validation_image", work["val"],
            "--validation_num_inference_steps", "1",
        ]
    )  # fmt: skip
    result = train(args)
    assert result["global_step"] == 2 and all(np.isfinite(result["losses"]))
    assert len(list((out / "validation" / "step-000002").glob("*.png"))) == 1  # fp32 ControlNet, bf16 UNet
    assert all(k.startswith("unet.") for k in lora_file(out))
    trained = ControlNetModel.from_pretrained(out / "controlnet")
    start = ControlNetModel.from_pretrained(work["controlnet"])
    changed = [
        n for n, p in trained.state_dict().items() if not torch.equal(p, start.state_dict()[n])
    ]  # fmt: skip
    assert changed, "full ControlNet training left every weight unchanged"


def test_seesr_image_attention_pipeline(work, tmp_path):
    """A pipeline with SeeSR image cross-attention: the image embeddings of the LR reach both networks."""
    from dalpsr.pipelines.pipeline_dalpsr import DaLPSRPipeline
    from dalpsr.testing import get_dummy_seesr_components

    pipeline_dir = tmp_path / "seesr"
    DaLPSRPipeline(**get_dummy_seesr_components(0)).save_pretrained(pipeline_dir)
    out = tmp_path / "out"
    args = train_lora.parse_args(
        [
            "--pipeline_dir", str(pipeline_dir),
            "--train_data_dir", work["hr"],
            "--output_dir", str(out),
            "--resolution", "32",
            "--train_batch_size", "2",
            "--max_train_steps", "1",
            "--learning_rate", "5e-3",
        ]
    )  # fmt: skip
    result = train(args)
    assert all(np.isfinite(result["losses"]))
    keys = lora_file(out)
    assert any("image_attentions" in k for k in keys if k.startswith("unet."))
    assert any("image_attentions" in k for k in keys if k.startswith("controlnet."))
    pipe = DaLPSRPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    base = sr(pipe, work)
    pipe.load_lora_weights(out / "pytorch_lora_weights.safetensors")
    assert (sr(pipe, work) - base).abs().max() > 1e-4


def test_text_routing_matches_the_pipeline(work):
    pipe = tiny_pipeline(work)
    for routing in ("split", "shared"):
        out = pipe(
            work["val"],
            prompt="a cat",
            degradation_prompt="Deblur with sigma 0.50~0.75",
            text_routing=routing,
            num_inference_steps=1,
            guidance_scale=1.0,
            output_type="latent",
        )
        cn, unet = train_lora.route_prompts(
            ["a cat"], ["Deblur with sigma 0.50~0.75"], train_lora.DEFAULT_QUALITY_PROMPT, routing
        )
        assert (cn, unet) == (out.controlnet_prompts, out.unet_prompts)


def test_config_file_with_command_line_overrides(work, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "rank": 8, "learning_rate": 1e-4}))
    base = [
        "--config", str(config),
        "--pretrained_model_name_or_path", work["sd2"],
        "--train_data_dir", work["hr"],
    ]  # fmt: skip
    args = train_lora.parse_args([*base, "--rank", "2"])
    assert args.rank == 2 and args.learning_rate == 1e-4 and args.output_dir == str(tmp_path / "o")
    config.write_text(json.dumps({"output_dir": "o", "random_flip": True, "validation_image": [work["val"]]}))
    args = train_lora.parse_args([*base, "--no-random_flip", "--validation_image"])  # flags switch config values off
    assert args.random_flip is False and args.validation_image == []
    for shipped in ("train_lora_tiny.json", "train_lora_sd2.json"):  # every key is an option of the script
        load_config(str(ROOT / "configs" / shipped), train_lora.build_parser())
    config.write_text(json.dumps({"output_dir": "o", "rnak": 8}))
    with pytest.raises(ValueError, match="unknown options \\['rnak'\\]"):
        train_lora.parse_args(base)
    config.write_text(json.dumps({"output_dir": "o", "rank": "eight"}))
    with pytest.raises(ValueError, match="`rank`.*integer"):
        train_lora.parse_args(base)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--pairs_dir", "."], "exactly one of `--train_data_dir`"),
        (["--pipeline_dir", "."], "either `--pipeline_dir`"),
        (["--resolution", "30"], "`--resolution` must be a multiple of `--scale`"),
        (["--lora_targets", "unet,vae"], "`--lora_targets`"),
        (["--lora_targets", "controlnet", "--train_controlnet_full"], "drop 'controlnet'"),
        (["--lora_targets", ""], "Nothing to train"),
        (["--proportion_empty_prompts", "1.5"], "`--proportion_empty_prompts`"),
        (["--rank", "0"], "`--rank` must be > 0"),
        (["--resume_from_checkpoint", "checkpoint-7"], "`--resume_from_checkpoint`"),
        (["--validation_image", "missing.png"], "`--validation_image` file not found"),
        (["--caption_cache", "missing.jsonl"], "`--caption_cache` file not found"),
    ],
)
def test_bad_arguments_raise_clear_errors(work, tmp_path, extra, match):
    base = [
        "--pretrained_model_name_or_path", work["sd2"],
        "--train_data_dir", work["hr"],
        "--output_dir", str(tmp_path),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=match):
        train_lora.parse_args([*base, *extra])


def test_missing_required_arguments(work, tmp_path):
    with pytest.raises(ValueError, match="`--output_dir` is required"):
        train_lora.parse_args(["--pretrained_model_name_or_path", work["sd2"], "--train_data_dir", work["hr"]])
    with pytest.raises(ValueError, match="`--pretrained_model_name_or_path`"):
        train_lora.parse_args(["--train_data_dir", work["hr"], "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="output convolutions are all zero"):  # a fresh LR ControlNet
        args = train_lora.parse_args(
            ["--pretrained_model_name_or_path", work["sd2"], "--train_data_dir", work["hr"]]
            + ["--output_dir", str(tmp_path), "--lora_targets", "unet,controlnet"]
        )
        train(args)
    with pytest.raises(ValueError, match="multiple of 4 for this model"):
        args = train_lora.parse_args(
            ["--pretrained_model_name_or_path", work["sd2"], "--train_data_dir", work["hr"]]
            + ["--output_dir", str(tmp_path), "--resolution", "34", "--scale", "2"]
            + ["--controlnet_model_name_or_path", work["controlnet"]]
        )
        train(args)
