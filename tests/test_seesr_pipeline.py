"""DaLPSRPipeline with SeeSR image cross-attention: wiring, tiling, colour fix, save/load, from_seesr."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dalpsr.loaders.seesr import SEESR_NEGATIVE_PROMPT, seesr_call_kwargs
from dalpsr.models.image_attention import SeeSRControlNetModel, SeeSRUNet2DConditionModel
from dalpsr.pipelines.pipeline_dalpsr import DaLPSRPipeline
from dalpsr.testing import get_dummy_components, get_dummy_image_encoder, get_dummy_seesr_components

RUN = dict(prompt="a red house", upscale=2, num_inference_steps=3, output_type="pt")


def make_pipe(**overrides) -> DaLPSRPipeline:
    pipe = DaLPSRPipeline(**{**get_dummy_seesr_components(0), **overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lr_image(seed=0, size=(16, 16)):
    return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed))


def run(pipe, image=None, seed=0, **kwargs):
    return pipe(
        lr_image() if image is None else image, generator=torch.Generator().manual_seed(seed), **{**RUN, **kwargs}
    )


def spy(model, store: list):
    return model.register_forward_pre_hook(
        lambda m, args, kwargs: store.append(kwargs.get("image_encoder_hidden_states")), with_kwargs=True
    )


def test_embeddings_reach_unet_and_controlnet_with_cfg():
    pipe = make_pipe()
    unet_calls, cn_calls = [], []
    handles = [spy(pipe.unet, unet_calls), spy(pipe.controlnet, cn_calls)]
    image = lr_image()
    out = run(pipe, image, guidance_scale=5.5)
    for h in handles:
        h.remove()
    assert out.images.shape == (1, 3, 32, 32)
    assert len(unet_calls) == len(cn_calls) == 3
    expected = pipe.image_encoder.encode(image)
    for embeds in unet_calls + cn_calls:
        assert embeds.shape == (2, 17, 16)  # negative + positive half
        torch.testing.assert_close(embeds, torch.cat([expected, expected]))
    # Without guidance: one copy.
    calls = []
    handle = spy(pipe.unet, calls)
    run(pipe, guidance_scale=1.0)
    handle.remove()
    assert calls[0].shape == (1, 17, 16)


def test_image_encoder_changes_the_output_and_runs_tiled_with_colour_fix():
    pipe = make_pipe()
    image = lr_image(1, (24, 20))
    base = run(pipe, image, color_fix="adain").images
    other = run(make_pipe(image_encoder=get_dummy_image_encoder(42)), image, color_fix="adain").images
    assert (base - other).abs().max() > 1e-4
    calls = []
    handle = spy(pipe.controlnet, calls)
    tiled = run(pipe, image, tile_size=32, tile_overlap=8, color_fix="wavelet", num_inference_steps=2).images
    handle.remove()
    assert tiled.shape == (1, 3, 48, 40) and torch.isfinite(tiled).all()
    assert len(calls) == 2 * 4 and all(torch.equal(c, calls[0]) for c in calls)  # same embeddings on every tile


def test_save_load_roundtrip(tmp_path):
    pipe = make_pipe()
    expected = run(pipe, start_timestep=999).images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["image_encoder"][1] == "RAMImageEncoder" and index["unet"][1] == "SeeSRUNet2DConditionModel"
    loaded = DaLPSRPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.controlnet, SeeSRControlNetModel) and loaded.controlnet.config.use_image_cross_attention
    assert torch.equal(run(loaded, start_timestep=999).images, expected)


def test_off_is_todays_pipeline():
    stock = DaLPSRPipeline(**get_dummy_components(0))
    stock.set_progress_bar_config(disable=True)
    components = get_dummy_components(0)
    for name, cls in (("unet", SeeSRUNet2DConditionModel), ("controlnet", SeeSRControlNetModel)):
        model = cls.from_config(components[name].config)
        model.load_state_dict(components[name].state_dict())
        components[name] = model
    plain = DaLPSRPipeline(**components)
    plain.set_progress_bar_config(disable=True)
    assert torch.equal(run(plain).images, run(stock).images)


def test_misconfigurations_raise():
    components = get_dummy_seesr_components(0)
    with pytest.raises(ValueError, match="no `image_encoder`"):
        run(make_pipe(image_encoder=None))
    with pytest.raises(ValueError, match="both the UNet and the ControlNet"):
        run(make_pipe(controlnet=get_dummy_components(0)["controlnet"]))
    assert components["unet"].config.use_image_cross_attention
    pipe = make_pipe()
    with pytest.raises(ValueError, match="start_timestep"):
        run(pipe, start_timestep=999, start_strength=0.5)
    with pytest.raises(ValueError, match="start_timestep"):
        run(pipe, start_timestep=1000)


def test_start_timestep_starts_from_the_noised_lr_latent():
    pipe = make_pipe()
    seen = {}

    def first(p, i, t, kw):
        seen.setdefault("t", int(t))
        return {}

    out_lr = run(pipe, start_timestep=500, num_inference_steps=4, callback_on_step_end=first).images
    assert pipe.num_timesteps == sum(int(t) <= 500 for t in pipe.scheduler.timesteps)
    assert seen["t"] <= 500
    assert pipe.num_timesteps == 3 and seen["t"] == 500  # DDPM, 4 steps: 750 skipped; 500, 250, 0 run
    assert not torch.equal(out_lr, run(pipe, num_inference_steps=4).images)
    kwargs = seesr_call_kwargs(num_inference_steps=2)
    assert kwargs["negative_prompt"] == SEESR_NEGATIVE_PROMPT and kwargs["start_timestep"] == 999
    out = pipe(lr_image(), prompt="a red house", upscale=2, output_type="pt", **kwargs)
    assert out.unet_prompts == out.controlnet_prompts == ["a red house, clean, high-resolution, 8k"]


def _write_seesr_release(root: Path) -> dict:
    """Tiny SD2-base folder, SeeSR release (stock class names, as SeeSR saves them), RAM and DAPE files."""
    components = get_dummy_seesr_components(0)
    base = root / "sd2-base"
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        components[name].save_pretrained(base / name)
    for name in ("unet", "controlnet"):
        components[name].save_pretrained(root / "seesr" / name)
        config_path = root / "seesr" / name / "config.json"
        config = json.loads(config_path.read_text())
        config["_class_name"] = "UNet2DConditionModel" if name == "unet" else "ControlNetModel"
        config_path.write_text(json.dumps(config))
    # RAM layout: `visual_encoder.` in the original Swin key layout (patch merging at the end of a stage).
    encoder_state = get_dummy_image_encoder(1).state_dict()
    ram = {
        re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
        for k, v in encoder_state.items()
    }
    torch.save({"model": ram}, root / "ram.pth")
    gen = torch.Generator().manual_seed(0)
    dape = {}
    for key, value in encoder_state.items():
        if key.endswith("attn.qkv.weight"):
            dim = value.shape[1]
            dape[key.replace(".weight", ".lora_A")] = torch.randn(16, dim, generator=gen)
            dape[key.replace(".weight", ".lora_B")] = torch.randn(2 * dim, 8, generator=gen)
    torch.save(dape, root / "DAPE.pth")
    return {"base": base, "seesr": root / "seesr", "ram": root / "ram.pth", "dape": root / "DAPE.pth"}


def test_from_seesr_builds_a_working_pipeline(tmp_path, monkeypatch):
    import dalpsr.loaders.seesr as seesr

    paths = _write_seesr_release(tmp_path)
    # The tiny RAM checkpoint is 32 px; the real one is 384 (the default).
    original = seesr.load_ram_encoder
    monkeypatch.setattr(seesr, "load_ram_encoder", lambda *a, **k: original(*a, **{**k, "image_size": 32}))
    pipe = DaLPSRPipeline.from_seesr(paths["seesr"], base=paths["base"], ram=paths["ram"], dape=paths["dape"])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert isinstance(pipe.unet, SeeSRUNet2DConditionModel) and pipe.image_encoder.num_tokens == 17
    out = pipe(
        lr_image(), prompt="a red house", upscale=2, output_type="np", **seesr_call_kwargs(num_inference_steps=2)
    )
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    with pytest.raises(ValueError, match="`ram` is required"):
        DaLPSRPipeline.from_seesr(paths["seesr"], base=paths["base"])
    with pytest.raises(FileNotFoundError, match="No SeeSR `unet` folder"):
        DaLPSRPipeline.from_seesr(tmp_path / "nowhere", base=paths["base"], ram=paths["ram"])


def test_cli_convert_ram_and_convert_seesr(tmp_path):
    from dalpsr.cli import main

    paths = _write_seesr_release(tmp_path)
    assert main(["convert-ram", str(paths["ram"]), str(tmp_path / "ram-enc"), "--dape", str(paths["dape"])]) == 0
    assert (tmp_path / "ram-enc" / "NOTICE.md").is_file()
    assert main(["convert-ram", str(paths["ram"]), str(tmp_path / "ram-enc")]) == 1  # exists, no --overwrite
    args = ["convert-seesr", str(paths["seesr"]), str(tmp_path / "pipe"), "--ram", str(tmp_path / "ram-enc")]
    assert main([*args, "--sd2-base", str(paths["base"])]) == 0
    pipe = DaLPSRPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.image_encoder.config.image_size == 384 and pipe.unet.config.use_image_cross_attention
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"


# ------------------------------------------------------------------------------------------- real weights
def _real_paths() -> dict[str, Path] | None:
    names = {
        "seesr": "DALPSR_SEESR_DIR",
        "base": "DALPSR_SD2_BASE",
        "ram": "DALPSR_RAM",
        "dape": "DALPSR_DAPE",
        "ref": "DALPSR_SEESR_REFERENCE",
    }
    paths = {k: Path(os.environ[v]) for k, v in names.items() if os.environ.get(v)}
    return paths if len(paths) == len(names) and all(p.exists() for p in paths.values()) else None


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(
    _real_paths() is None or not torch.cuda.is_available(),
    reason="needs CUDA and the real weights: DALPSR_SEESR_DIR (SeeSR release), DALPSR_SD2_BASE, DALPSR_RAM "
    "(ram_swin_large_14m.pth), DALPSR_DAPE (DAPE.pth) and DALPSR_SEESR_REFERENCE (inputs/*.png, SeeSR's "
    "test_seesr.py outputs in seesr/*.png with the same names, optionally its RAM embeddings in embeds/*.pt)",
)
def test_matches_seesr_reference_outputs():
    from dalpsr.image_io import load_image

    paths = _real_paths()
    pipe = DaLPSRPipeline.from_seesr(
        paths["seesr"], base=paths["base"], ram=paths["ram"], dape=paths["dape"], torch_dtype=torch.float16
    ).to("cuda")
    inputs = sorted((paths["ref"] / "inputs").glob("*.png"))
    assert inputs, "no reference inputs"
    for path in inputs:
        lr = load_image(path)
        embeds_path = paths["ref"] / "embeds" / f"{path.stem}.pt"
        if embeds_path.exists():  # RAM/DAPE embeddings must agree closely (fp16)
            ours = pipe.image_encoder.encode(lr.rgb[None].cuda()).float().cpu()
            theirs = torch.load(embeds_path, map_location="cpu", weights_only=True).float()
            assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) > 0.999
        out = pipe(
            lr.rgb[None],
            prompt="",
            upscale=4,
            output_type="np",
            generator=torch.Generator("cuda").manual_seed(0),
            **seesr_call_kwargs(),
        ).images[0]
        reference = load_image(paths["ref"] / "seesr" / path.name).rgb.permute(1, 2, 0).numpy()
        assert out.shape == reference.shape
        psnr = 10 * np.log10(1.0 / np.mean((out - reference) ** 2))
        # Different noise draws: the two samples agree in structure, not pixel for pixel.
        assert psnr > 24, f"{path.name}: PSNR to SeeSR's output {psnr:.2f} dB"
