"""DAT: equivalence with spandrel's reference DAT, checkpoint loading/conversion, fusion hook, tiling."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dalpsr.loaders.dat import convert_dat_checkpoint, infer_dat_config, load_dat_checkpoint
from dalpsr.models.dat import DAT, shift_window_mask, tiled_forward

spandrel = pytest.importorskip("spandrel")
from spandrel.architectures.DAT import DAT as RefDAT  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


_FIXED = ("rpe_biases", "relative_position_index", "num_batches_tracked", "attn_mask_0", "attn_mask_1")


def randomized(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every learned tensor and BN statistic drawn at random (index/mask buffers kept), so a mismatch in
    any layer shows in the output."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if key.endswith(_FIXED):
            out[key] = value.clone()
        elif key.endswith(("running_var", "temperature")):
            out[key] = torch.rand(value.shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(value.shape, generator=g) * 0.05
    return out


def image(*hw: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(seed))


def pair(name: str, scale: int, seed: int = 0) -> tuple[DAT, nn.Module, dict[str, torch.Tensor]]:
    ours = DAT.from_preset(name, scale).eval()
    ref = RefDAT(**DAT.preset_config(name, scale)).eval()
    state = randomized(ref.state_dict(), seed)
    ref.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)
    return ours, ref, state


def assert_same_output(ours: nn.Module, ref: nn.Module, hw: tuple[int, int], scale: int) -> None:
    x = image(*hw)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert got.shape == (1, 3, hw[0] * scale, hw[1] * scale)
    assert expected.std() > 0.05  # random weights give a non-trivial output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "scale", "hw"),
    [
        ("dat_light", 4, (11, 21)),
        ("dat_s", 3, (9, 13)),
        ("dat_2", 2, (9, 17)),
        ("dat", 4, (7, 19)),
        ("dat_light", 2, (57, 63)),  # pads to 64 = img_size: the stored shift masks are used
    ],
)
def test_matches_spandrel(name, scale, hw):
    ours, ref, _ = pair(name, scale)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert_same_output(ours, ref, hw, scale)


def test_matches_spandrel_small_custom():
    # two groups (shifted blocks at different positions), 29x31 pads to img_size 32: stored masks used;
    # 21x45 pads to 24x48: masks computed for that size
    cfg = dict(embed_dim=32, depth=[3, 5], num_heads=[2, 4], split_size=[4, 8], img_size=32, upscale=3)
    ours, ref = DAT(**cfg).eval(), RefDAT(**cfg).eval()
    state = randomized(ref.state_dict(), seed=4)
    ref.load_state_dict(state)
    ours.load_state_dict(state)
    for hw in [(29, 31), (21, 45), (3, 5)]:
        assert_same_output(ours, ref, hw, 3)


@pytest.mark.parametrize(
    ("name", "scale"),
    [
        ("dat_light", 3),
        pytest.param("dat_s", 4, marks=pytest.mark.slow),
        pytest.param("dat", 2, marks=pytest.mark.slow),
    ],
)
def test_spandrel_loads_our_weights(name, scale, tmp_path):
    ours = DAT.from_preset(name, scale).eval()
    ours.load_state_dict(randomized(ours.state_dict(), seed=3))
    ours.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    assert descriptor.architecture.id == "DAT"
    assert descriptor.scale == scale
    ref = descriptor.model.eval()
    cfg = DAT.preset_config(name, scale)
    assert ref.upsampler == cfg["upsampler"]
    assert ref.embed_dim == cfg["embed_dim"]
    assert [len(layer.blocks) for layer in ref.layers] == cfg["depth"]
    assert [ref.layers[i].blocks[1].attn.num_heads for i in range(len(cfg["depth"]))] == cfg["num_heads"]
    assert list(ref.layers[0].blocks[0].attn.split_size) == cfg["split_size"]
    x = image(9, 14)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name", ["dat_light", *(pytest.param(n, marks=pytest.mark.slow) for n in ("dat", "dat_s", "dat_2"))]
)
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_infer_config_of_every_release(name, scale):
    cfg = DAT.preset_config(name, scale)
    state = RefDAT(**cfg).state_dict()
    assert infer_dat_config(state) == cfg


def test_infer_config_custom():
    cfg = dict(
        img_size=32, in_chans=1, embed_dim=48, split_size=[4, 8], depth=[3, 2], num_heads=[4, 2],
        expansion_factor=3.0, qkv_bias=False, upscale=8, img_range=1.0, resi_connection="1conv",
        upsampler="pixelshuffle",
    )  # fmt: skip
    state = DAT(**cfg).state_dict()
    assert infer_dat_config(state) == cfg
    assert set(state) == set(RefDAT(**cfg).state_dict())
    # two blocks per group: the only shift masks are in group 1 (block 0), none in group 0
    cfg.update(depth=[2, 2], num_heads=[2, 2])
    state = DAT(**cfg).state_dict()
    assert not any(k.startswith("layers.0.") and "attn_mask" in k for k in state)
    assert infer_dat_config(state) == cfg


def test_load_official_layout_pth(tmp_path):
    ours, _, state = pair("dat_light", 3, seed=5)
    other = randomized(state, seed=6)
    path = tmp_path / "DAT_light_x3.pth"
    # BasicSR layout: {"params": ...}, here saved from a DataParallel wrapper
    torch.save({"params": {f"module.{k}": v for k, v in state.items()}}, path)
    model = load_dat_checkpoint(path)
    assert model.config.upscale == 3 and model.config.upsampler == "pixelshuffledirect"
    x = image(10, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), atol=0, rtol=0)
    # params_ema wins over params unless param_key says otherwise
    torch.save({"params": state, "params_ema": other}, path)
    ema = load_dat_checkpoint(path).state_dict()
    torch.testing.assert_close(ema["conv_first.weight"], other["conv_first.weight"])
    plain = load_dat_checkpoint(path, param_key="params").state_dict()
    torch.testing.assert_close(plain["conv_first.weight"], state["conv_first.weight"])
    with pytest.raises(ValueError, match="`param_key`"):
        load_dat_checkpoint(path, param_key="nope")


def test_load_safetensors_and_bad_inputs(tmp_path):
    ours = DAT.from_preset("dat_light", 2).eval()
    path = tmp_path / "dat.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(path))
    loaded = load_dat_checkpoint(path)
    x = image(8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x), atol=0, rtol=0)
    (tmp_path / "w.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="`path`"):
        load_dat_checkpoint(tmp_path / "w.onnx")
    with pytest.raises(FileNotFoundError):
        load_dat_checkpoint(tmp_path / "missing.pth")
    torch.save({"params": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DAT state dict"):
        load_dat_checkpoint(tmp_path / "other.pth")


def test_convert_to_diffusers_folder_and_cli(tmp_path):
    from dalpsr.cli import main

    ours, _, state = pair("dat_light", 2, seed=7)
    src = tmp_path / "DAT_light_x2.pth"
    torch.save({"params": state}, src)
    out = tmp_path / "dat-light-x2"
    assert main(["convert-dat", str(src), str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    model = DAT.from_pretrained(out).eval()
    assert model.config.split_size == [8, 32] and model.config.resi_connection == "3conv"
    torch.testing.assert_close(model.state_dict(), ours.state_dict(), atol=0, rtol=0)
    x = image(7, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x))
        torch.testing.assert_close(load_dat_checkpoint(out)(x), ours(x))
    assert main(["convert-dat", str(src), str(out)]) == 1  # exists: refuse
    assert main(["convert-dat", str(src), str(out), "--overwrite"]) == 0
    with pytest.raises(FileExistsError):
        convert_dat_checkpoint(src, out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_presets_and_argument_errors():
    assert DAT.preset_config("DAT-light", 2)["upsampler"] == "pixelshuffledirect"
    with pytest.raises(ValueError, match="`name`"):
        DAT.preset_config("swinir")
    with pytest.raises(ValueError, match="`scale`"):
        DAT.preset_config("dat", 5)
    with pytest.raises(ValueError, match="`upsampler`"):
        DAT(upsampler="nearest+conv")
    with pytest.raises(ValueError, match="`upscale`"):
        DAT(upscale=5)
    with pytest.raises(ValueError, match="`num_heads`"):
        DAT(embed_dim=60, depth=[2], num_heads=[3])
    with pytest.raises(ValueError, match="`x`"):
        DAT(embed_dim=12, depth=[2], num_heads=[2])(torch.zeros(1, 1, 8, 8))


def test_shift_mask_matches_reference():
    ref = RefDAT(embed_dim=32, depth=[3], num_heads=[2], split_size=[4, 8], img_size=32).layers[0].blocks[2].attn
    for h, w in [(32, 32), (16, 40)]:
        ref_0, ref_1 = ref.calculate_mask(h, w)
        torch.testing.assert_close(shift_window_mask(h, w, (4, 8), (2, 4)), ref_0)
        torch.testing.assert_close(shift_window_mask(h, w, (8, 4), (4, 2)), ref_1)


def test_pre_group_hook_is_the_fusion_extension_point():
    model = DAT(embed_dim=32, depth=[2, 3], num_heads=[2, 4], split_size=[4, 8], img_size=32, upscale=2).eval()
    model.load_state_dict(randomized(model.state_dict(), seed=8))
    x = image(12, 10)
    calls = []

    def identity(i, tokens, hw):
        calls.append((i, tuple(tokens.shape), hw))
        return tokens

    def shift(i, tokens, hw):
        return tokens + 0.1 if i == 1 else tokens

    with torch.no_grad():
        plain = model(x)
        torch.testing.assert_close(model(x, pre_group=identity), plain, atol=0, rtol=0)
        assert calls == [(0, (1, 120, 32), (12, 10)), (1, (1, 120, 32), (12, 10))]
        assert (model(x, pre_group=shift) - plain).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DAT(embed_dim=32, depth=[2, 2], num_heads=[2, 2], split_size=[4, 8], img_size=32).eval()
    x = image(9, 11)
    model(x).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert all(layer.gradient_checkpointing for layer in model.layers)
    model(x).square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], msg=name)


def test_tiled_blending_is_exact_for_a_local_model():
    # a 5x5 receptive field (2 px each side) needs an 8 px overlap (a quarter of it is dropped per side)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.PixelShuffle(2))
    x = image(37, 50)
    full = net(x).detach()
    tiled = tiled_forward(net, x, scale=2, tile_size=16, tile_overlap=8)
    torch.testing.assert_close(tiled, full, atol=1e-6, rtol=1e-6)
    # without overlap the seams show
    assert (tiled_forward(net, x, scale=2, tile_size=16, tile_overlap=0) - full).abs().max() > 1e-3
    with pytest.raises(ValueError, match="`tile_overlap`"):
        tiled_forward(net, x, scale=2, tile_size=16, tile_overlap=9)
    with pytest.raises(ValueError, match="`dtype`"):
        tiled_forward(net, x, scale=2, dtype=torch.float64)


def test_tiled_dat_close_to_untiled():
    # DAT's channel attention and AIM pooling see the whole input, so tiles differ slightly from one pass.
    # Measured on this model (random weights, 40x48 input, 24 px tiles, 8 px overlap, output std 0.135):
    # mean |diff| 3.8e-5, max 7.9e-4 (12 px overlap: 1.9e-5 / 1.7e-4); the bounds leave ~4x headroom.
    ours, _, _ = pair("dat_light", 2, seed=9)
    x = image(40, 48)
    with torch.no_grad():
        full = ours(x)
    assert torch.equal(ours.super_resolve(x, tile_size=64), full)  # one tile == plain forward
    tiled = ours.super_resolve(x, tile_size=24, tile_overlap=8)
    diff = (tiled - full).abs()
    assert tiled.shape == full.shape
    assert diff.mean() < 1.5e-4 and diff.max() < 3e-3


def test_bf16_autocast_on_cpu():
    ours, _, _ = pair("dat_light", 2, seed=10)
    x = image(16, 20)  # below the attention window: both runs go through the same window padding
    full = ours.super_resolve(x)
    low = ours.super_resolve(x, dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and low.shape == full.shape
    diff = (low - full).abs()  # measured: mean 3.6e-4, max 2.3e-3
    assert diff.mean() < 1.5e-3 and diff.max() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu(dtype):
    ours, ref, _ = pair("dat_s", 4, seed=11)
    ours, ref = ours.cuda(), ref.cuda()
    x = image(48, 40).cuda()
    with torch.no_grad():
        full = ref(x)
    low = ours.super_resolve(x, tile_size=32, tile_overlap=8, dtype=dtype)
    assert torch.isfinite(low).all()
    assert (low - full).abs().mean() < 2e-2
