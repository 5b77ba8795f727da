"""Large photos (issue 18, item 13) at small sizes: the networks only ever see one tile, so memory grows with the
output buffer only, and the output has the exact `upscale ×` size. The 4000×3000 figures come from
benchmarks/bench_large_input.py."""

from __future__ import annotations

import tracemalloc

import numpy as np
import torch
from PIL import Image

from dalpsr import color
from dalpsr.batch import Job
from dalpsr.image_io import tensor_to_pil
from dalpsr.pipelines.engines import RestorerEngine
from dalpsr.testing import get_dummy_degradation_models, get_dummy_pipeline, get_dummy_restorer


def _record_sizes(module: torch.nn.Module, sizes: list[tuple[int, int]]):
    def hook(_module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        sizes.append(tuple(x.shape[-2:]))

    return module.register_forward_pre_hook(hook, with_kwargs=True)


@torch.no_grad()
def test_the_pipeline_runs_the_unet_and_the_vae_on_tiles_only_and_keeps_the_exact_size():
    pipe = get_dummy_pipeline(seed=0)
    lr = torch.rand(3, 27, 19, generator=torch.Generator().manual_seed(0))
    unet, encoder, decoder = [], [], []
    hooks = [
        _record_sizes(pipe.unet, unet),
        _record_sizes(pipe.vae.encoder, encoder),
        _record_sizes(pipe.vae.decoder, decoder),
    ]
    try:
        out = pipe(
            lr,
            upscale=3,
            num_inference_steps=2,
            start_strength=0.5,  # the start latent comes from the tiled VAE encoder
            guidance_scale=1.0,
            tile_size=32,
            vae_tile_size=32,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (1, 3, 81, 57)  # round(3 · 27) × round(3 · 19), cropped from the padded 84×60
    f = pipe.vae_scale_factor
    # Several tiles each; every call at most a tile (latent 16, VAE 32 px / 16 latent px); the GroupNorm estimate
    # runs on the input shrunk to one tile.
    assert len(unet) > 1 and max(max(s) for s in unet) <= 32 // f
    assert len(encoder) > 2 and max(max(s) for s in encoder) <= 32
    assert len(decoder) > 2 and max(max(s) for s in decoder) <= 32 // f


@torch.no_grad()
def test_the_dat_engine_runs_the_network_on_tiles_only_and_keeps_the_exact_size(tmp_path):
    restorer = get_dummy_restorer(seed=0, scale=4)
    restorer.save_pretrained(tmp_path / "model" / "restorer")
    get_dummy_degradation_models(seed=0)[0].save_pretrained(tmp_path / "model" / "degradation_encoder")
    src = tmp_path / "photo.png"
    Image.effect_noise((45, 34), 60).convert("RGB").save(src)
    engine = RestorerEngine(str(tmp_path / "model"), upscale=4, device="cpu", tile_size=64)
    sizes: list[tuple[int, int]] = []
    hook = _record_sizes(engine.model.dat, sizes)
    try:
        image, record = engine(Job(src=src, dst=tmp_path / "out.png", key="photo"))
    finally:
        hook.remove()
    assert image.size == (180, 136) and record["size_wh"] == [180, 136]
    assert len(sizes) == 4 * 5 and max(max(s) for s in sizes) <= 16  # 64 output px: 16-px LR tiles, overlap 8


def test_the_8_bit_conversion_makes_no_float_copy_of_the_whole_image():
    rgb = torch.rand(3, 1500, 2000, generator=torch.Generator().manual_seed(0))
    reference = (rgb.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    tracemalloc.start()  # numpy's buffers are traced (torch's are not)
    try:
        image = tensor_to_pil(rgb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(np.asarray(image), reference)
    # Converted at once, the scaled and the rounded float32 copies alone took 2 × 36 MB; in bands of rows, the
    # 9 MB uint8 result and two band-sized temporaries.
    assert peak < 0.5 * rgb.numel() * 4, peak


def test_the_wavelet_colour_fix_in_bands_of_rows_is_the_whole_image_fix(monkeypatch):
    g = torch.Generator().manual_seed(0)
    image, reference = torch.rand(2, 3, 300, 41, generator=g), torch.rand(2, 3, 300, 41, generator=g)
    whole = color.wavelet_color_fix(image, reference).clamp(0, 1)
    monkeypatch.setattr(color, "BAND_VALUES", 1)  # bands of the minimum 124 rows: 3 of them
    assert torch.equal(color.apply_color_fix(image, reference, "wavelet"), whole)
    view = torch.rand(1, 3, 310, 50, generator=g)[:, :, :300, :41]  # a cropped output, as the pipeline passes
    fixed = color.apply_color_fix(view, reference[:1], "wavelet")
    assert torch.equal(fixed, color.wavelet_color_fix(view, reference[:1]).clamp(0, 1))
