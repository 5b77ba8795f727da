"""SeeSR-compatible image cross-attention: key layout, strict loading, hook order, forward behaviour."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file

from dalpsr.loaders.seesr import load_seesr_controlnet, load_seesr_unet
from dalpsr.models.image_attention import SeeSRControlNetModel, SeeSRUNet2DConditionModel
from dalpsr.pipelines.pipeline_dalpsr import build_lr_controlnet
from dalpsr.testing import TINY_IMAGE_DIM, TINY_TEXT_DIM, get_dummy_components

CROSS_BLOCKS = {"UNet2DConditionModel": ("down_blocks.1.", "mid_block.", "up_blocks.0."), "ControlNetModel": None}


@pytest.fixture(scope="module")
def stock():
    components = get_dummy_components(0)
    return components["unet"], components["controlnet"]


def seesr_layout(stock_state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in SeeSR's layout, written from the stock one: every `X.attentions.i.*` of a cross-attention
    block gets a twin `X.image_attentions.i.*` whose attn2 key/value read 512-wide (here TINY_IMAGE_DIM) tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(v.shape, generator=gen) for k, v in stock_state.items()}
    for key, value in stock_state.items():
        if ".attentions." not in key:
            continue
        twin = key.replace(".attentions.", ".image_attentions.")
        shape = list(value.shape)
        if ".attn2.to_k." in key or ".attn2.to_v." in key:
            shape[1] = TINY_IMAGE_DIM
        out[twin] = torch.randn(shape, generator=gen)
    return out


def write_folder(path, config: dict, state: dict[str, torch.Tensor], fmt: str = "safetensors"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(state, path / "diffusion_pytorch_model.bin")


def seesr_config(model, class_name: str) -> dict:
    # As SeeSR saves it: the stock class name plus its two extra config entries.
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    config.update(_class_name=class_name, use_image_cross_attention=True, image_cross_attention_dim=TINY_IMAGE_DIM)
    return config


def test_keys_and_shapes_match_seesr_layout(stock):
    unet, controlnet = stock
    for base, cls in ((unet, SeeSRUNet2DConditionModel), (controlnet, SeeSRControlNetModel)):
        model = cls.from_config(base.config, use_image_cross_attention=True, image_cross_attention_dim=TINY_IMAGE_DIM)
        expected = {k: tuple(v.shape) for k, v in seesr_layout(base.state_dict()).items()}
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == expected
        assert any(k.startswith("mid_block.image_attentions.0.") for k in got)
    up = [k for k in got if k.startswith("up_blocks.")]
    assert not up  # the ControlNet has no up blocks
    unet_model = SeeSRUNet2DConditionModel.from_config(unet.config, use_image_cross_attention=True)
    assert any(k.startswith("up_blocks.0.image_attentions.0.") for k in unet_model.state_dict())


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_loaders_read_seesr_folders(tmp_path, stock, fmt):
    unet, controlnet = stock
    unet_state, cn_state = seesr_layout(unet.state_dict(), 1), seesr_layout(controlnet.state_dict(), 2)
    write_folder(tmp_path / "seesr" / "unet", seesr_config(unet, "UNet2DConditionModel"), unet_state, fmt)
    write_folder(tmp_path / "seesr" / "controlnet", seesr_config(controlnet, "ControlNetModel"), cn_state, fmt)
    loaded_unet = load_seesr_unet(tmp_path / "seesr")
    loaded_cn = load_seesr_controlnet(tmp_path / "seesr" / "controlnet")
    assert isinstance(loaded_unet, UNet2DConditionModel) and isinstance(loaded_cn, ControlNetModel)
    for model, state in ((loaded_unet, unet_state), (loaded_cn, cn_state)):
        assert model.config.use_image_cross_attention
        loaded = model.state_dict()
        assert set(loaded) == set(state)
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_loader_turns_image_attention_on_when_config_lacks_the_flag(tmp_path, stock):
    unet, _ = stock
    config = seesr_config(unet, "UNet2DConditionModel")
    del config["use_image_cross_attention"]
    write_folder(tmp_path / "unet", config, seesr_layout(unet.state_dict()))
    assert load_seesr_unet(tmp_path).config.use_image_cross_attention


@pytest.mark.parametrize("change", ["extra", "missing", "shape"])
def test_strict_loading(tmp_path, stock, change):
    unet, _ = stock
    state = seesr_layout(unet.state_dict())
    if change == "extra":
        state["mid_block.image_attentions.1.proj_in.weight"] = torch.zeros(4, 4)
    elif change == "missing":
        del state["up_blocks.0.image_attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    else:
        state["down_blocks.1.image_attentions.0.transformer_blocks.0.attn2.to_v.weight"] = torch.zeros(64, 7)
    write_folder(tmp_path / "unet", seesr_config(unet, "UNet2DConditionModel"), state)
    with pytest.raises(ValueError, match="image_attentions|size mismatch|do not match"):
        load_seesr_unet(tmp_path)


def test_plain_sd2_unet_folder_is_rejected(tmp_path, stock):
    unet, _ = stock
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="missing_keys"):
        load_seesr_unet(tmp_path)


def _seesr_pair(stock, seed=3):
    unet, _ = stock
    torch.manual_seed(seed)
    model = SeeSRUNet2DConditionModel.from_config(
        unet.config, use_image_cross_attention=True, image_cross_attention_dim=TINY_IMAGE_DIM
    ).eval()
    controlnet = SeeSRControlNetModel.from_unet(model, conditioning_embedding_out_channels=(16, 32)).eval()
    return model, controlnet


def _inputs(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=gen)
    text = torch.randn(batch, 5, TINY_TEXT_DIM, generator=gen)
    images = torch.randn(batch, 7, TINY_IMAGE_DIM, generator=gen)
    return sample, text, images


def test_module_order_text_then_image(stock):
    model, _ = _seesr_pair(stock)
    calls: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if re.fullmatch(r"(down_blocks\.1|mid_block|up_blocks\.0)\.(resnets|attentions|image_attentions)\.\d+", name):
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: calls.append(name)))
    sample, text, images = _inputs()
    with torch.no_grad():
        model(sample, 10, text, image_encoder_hidden_states=images)
    for handle in handles:
        handle.remove()
    assert calls == [
        "down_blocks.1.resnets.0",
        "down_blocks.1.attentions.0",
        "down_blocks.1.image_attentions.0",
        "mid_block.resnets.0",
        "mid_block.attentions.0",
        "mid_block.image_attentions.0",
        "mid_block.resnets.1",
        "up_blocks.0.resnets.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.image_attentions.0",
        "up_blocks.0.resnets.1",
        "up_blocks.0.attentions.1",
        "up_blocks.0.image_attentions.1",
    ]


def test_mid_block_output_is_text_then_image_then_resnet(stock):
    # Numeric check: a swapped order (image → text, or resnet before image) gives a different result.
    model, _ = _seesr_pair(stock)
    block = model.mid_block
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 64, 4, 4, generator=gen)
    temb = torch.randn(2, model.time_embedding.linear_2.out_features, generator=gen)
    text = torch.randn(2, 5, TINY_TEXT_DIM, generator=gen)
    images = torch.randn(2, 7, TINY_IMAGE_DIM, generator=gen)

    def text_attn(x):  # `.forward` skips the module's hooks
        return block.attentions[0].forward(x, encoder_hidden_states=text, return_dict=False)[0]

    def image_attn(x):
        return block.image_attentions[0](x, encoder_hidden_states=images, return_dict=False)[0]

    with torch.no_grad():
        x = block.resnets[0](hidden, temb)
        expected = block.resnets[1](image_attn(text_attn(x)), temb)
        swapped = block.resnets[1](text_attn(image_attn(x)), temb)
        model._image_states.value = images
        try:
            got = block(hidden, temb, encoder_hidden_states=text)
        finally:
            model._image_states.value = None
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - swapped).abs().max() > 1e-3


def test_embeddings_matter_and_are_validated(stock):
    model, controlnet = _seesr_pair(stock)
    sample, text, images = _inputs()
    with torch.no_grad():
        a = model(sample, 10, text, image_encoder_hidden_states=images).sample
        b = model(sample, 10, text, image_encoder_hidden_states=images * 2).sample
        down, mid = controlnet(
            sample, 10, text, torch.rand(2, 3, 16, 16), image_encoder_hidden_states=images, return_dict=False
        )
    assert (a - b).abs().max() > 1e-4
    assert mid.shape == (2, 64, 4, 4) and len(down) == 4
    with pytest.raises(ValueError, match="image_encoder_hidden_states` is required"):
        model(sample, 10, text)
    with pytest.raises(ValueError, match=r"shape \(batch=2, tokens, 16\)"):
        model(sample, 10, text, image_encoder_hidden_states=images[:1])
    with pytest.raises(ValueError, match=r"shape \(batch=2, tokens, 16\)"):
        model(sample, 10, text, image_encoder_hidden_states=torch.zeros(2, 7, 8))
    with pytest.raises(ValueError, match="without `image_encoder_hidden_states`"):
        model.mid_block(torch.zeros(2, 64, 4, 4), torch.zeros(2, 128), encoder_hidden_states=text[:, :, :])


def test_off_is_the_stock_model_bit_for_bit(stock):
    unet, controlnet = stock
    plain = SeeSRUNet2DConditionModel.from_config(unet.config)
    plain.load_state_dict(unet.state_dict())
    plain_cn = SeeSRControlNetModel.from_config(controlnet.config)
    plain_cn.load_state_dict(controlnet.state_dict())
    sample, text, images = _inputs()
    cond = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(sample, 10, text).sample, unet(sample, 10, text).sample)
        ours, theirs = plain_cn(sample, 10, text, cond)[1], controlnet(sample, 10, text, cond)[1]
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="no image cross-attention"):
        plain(sample, 10, text, image_encoder_hidden_states=images)


def test_controlnet_from_unet_copies_image_attention(stock):
    model, controlnet = _seesr_pair(stock)
    assert controlnet.config.use_image_cross_attention
    unet_state, cn_state = model.state_dict(), controlnet.state_dict()
    copied = [k for k in cn_state if k.startswith(("down_blocks.", "mid_block."))]
    assert any("image_attentions" in k for k in copied)
    assert all(torch.equal(cn_state[k], unet_state[k]) for k in copied)
    # From a stock UNet: fresh image attention on request, the rest copied.
    unet, _ = stock
    fresh = SeeSRControlNetModel.from_unet(unet, use_image_cross_attention=True)
    assert fresh.config.use_image_cross_attention
    assert torch.equal(fresh.mid_block.attentions[0].proj_in.weight, unet.mid_block.attentions[0].proj_in.weight)
    assert not SeeSRControlNetModel.from_unet(unet).config.use_image_cross_attention
    stock_cn = build_lr_controlnet(unet, 2)
    assert type(stock_cn) is ControlNetModel


def test_model_save_load_roundtrip(tmp_path, stock):
    model, controlnet = _seesr_pair(stock)
    model.save_pretrained(tmp_path / "unet")
    controlnet.save_pretrained(tmp_path / "controlnet")
    again = SeeSRUNet2DConditionModel.from_pretrained(tmp_path / "unet")
    again_cn = SeeSRControlNetModel.from_pretrained(tmp_path, subfolder="controlnet")
    sample, text, images = _inputs()
    with torch.no_grad():
        assert torch.equal(
            again(sample, 10, text, image_encoder_hidden_states=images).sample,
            model(sample, 10, text, image_encoder_hidden_states=images).sample,
        )
    assert again_cn.config.image_cross_attention_dim == TINY_IMAGE_DIM


def test_deepcopy_keeps_hooks_on_the_copy(stock):
    model, _ = _seesr_pair(stock)
    clone = copy.deepcopy(model)
    sample, text, images = _inputs()
    with torch.no_grad():
        before = model(sample, 10, text, image_encoder_hidden_states=images).sample
        clone.mid_block.image_attentions[0].proj_out.weight.mul_(3)
        after = model(sample, 10, text, image_encoder_hidden_states=images).sample
        changed = clone(sample, 10, text, image_encoder_hidden_states=images).sample
    assert torch.equal(before, after)
    assert (changed - before).abs().max() > 1e-4
    assert clone._image_states is not model._image_states
