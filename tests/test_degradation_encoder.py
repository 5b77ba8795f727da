"""DegradationEncoder: DA-CLIP wiring, zero-init property, DA-CLIP / open_clip loading, save/load, preprocessing."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dalpsr.models.degradation_encoder import (
    DegradationEncoder,
    build_open_clip_model,
    convert_daclip_state_dict,
    to_daclip_state_dict,
)

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_(module: nn.Module, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def pixels(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class FakeDaCLIP(nn.Module):
    """A module laid out like DA-CLIP's `DaCLIP`, so its `state_dict()` has DA-CLIP's exact key layout."""

    class ControlTransformer(nn.Module):
        def __init__(self, transformer: nn.Module) -> None:
            super().__init__()
            self.transformer = transformer
            width = transformer.width
            self.zero_modules = nn.ModuleList(nn.Linear(width, width) for _ in transformer.resblocks)

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.visual = clip.visual
        self.visual_control = copy.deepcopy(clip.visual)
        self.visual_control.transformer = self.ControlTransformer(self.visual_control.transformer)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))

    def encode_image_control(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DA-CLIP's `encode_image(control=True)` restated: controller hiddens, then `control.pop()` per block."""
        ctrl = self.visual_control
        c = ctrl._embeds(image)
        hiddens = []
        for z, r in zip(ctrl.transformer.zero_modules, ctrl.transformer.transformer.resblocks):
            c = r(c)
            hiddens.append(z(c))
        degra, _ = ctrl._pool(c)
        degra = degra @ ctrl.proj
        x = self.clip.visual._embeds(image)
        for r in self.clip.visual.transformer.resblocks:
            x = r(x)
            x = x + hiddens.pop()
        content, _ = self.clip.visual._pool(x)
        return content @ self.clip.visual.proj, degra


def test_content_equals_plain_open_clip_right_after_construction():
    enc = DegradationEncoder(clip_model=TINY, num_degradation_tokens=4)
    plain = build_open_clip_model(TINY).requires_grad_(False)  # frozen like ours: same attention kernel
    plain.load_state_dict(enc.clip.state_dict())
    pv = pixels()
    with torch.no_grad():
        feats = enc(pv)
        expected = plain.encode_image(pv)
    torch.testing.assert_close(feats.content_embeds, expected, rtol=0, atol=0)
    # the controller starts as a copy of the tower, so its pooled output is the same embedding
    torch.testing.assert_close(feats.degradation_embeds, expected, rtol=1e-6, atol=1e-6)
    assert feats.degradation_tokens.shape == (2, 4, 32)
    assert feats.content_tokens.shape == (2, 16, 32)
    assert len(feats.hidden_states) == 3 and feats.hidden_states[0].shape == (2, 17, 64)
    assert all(not p.requires_grad for p in enc.clip.parameters())
    assert all(p.requires_grad for p in enc.trainable_parameters())


def test_control_is_reversed_last_controller_block_feeds_first_tower_block():
    enc = DegradationEncoder(clip_model=TINY)
    pv = pixels(1)
    with torch.no_grad():
        base = enc(pv).hidden_states
        randomize_(enc.zero_modules[-1], seed=3)
        only_last = enc(pv).hidden_states
        enc.reset_controller()
        randomize_(enc.zero_modules[0], seed=3)
        only_first = enc(pv).hidden_states
    assert not torch.allclose(only_last[0], base[0])  # zero module L-1 enters after tower block 0
    torch.testing.assert_close(only_first[0], base[0])  # zero module 0 does not touch block 0 ...
    torch.testing.assert_close(only_first[1], base[1])
    assert not torch.allclose(only_first[2], base[2])  # ... it enters after the last tower block


def make_daclip_state(seed: int = 0) -> tuple[FakeDaCLIP, dict[str, torch.Tensor]]:
    fake = FakeDaCLIP(build_open_clip_model(TINY))
    randomize_(fake, seed)
    return fake, fake.state_dict()


def test_from_daclip_every_tensor_lands_and_outputs_match_daclip(tmp_path):
    fake, state = make_daclip_state()
    assert any(k.startswith("visual.") for k in state)  # DA-CLIP's duplicate tower entry
    assert "visual_control.transformer.transformer.resblocks.2.attn.in_proj_weight" in state
    assert "visual_control.transformer.zero_modules.2.weight" in state
    path = tmp_path / "daclip_tiny.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, path)

    fresh = DegradationEncoder(clip_model=TINY, num_degradation_tokens=4)
    enc = DegradationEncoder.from_daclip(path, model=TINY, num_degradation_tokens=4)
    ours = enc.state_dict()
    converted = convert_daclip_state_dict(state)
    assert set(ours) - set(converted) == {"token_head.weight", "token_head.bias"}
    for key, value in converted.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)
    # each DA-CLIP tensor is somewhere in ours, and the reverse mapping restores DA-CLIP's layout
    assert set(to_daclip_state_dict(ours)) == set(state)
    torch.testing.assert_close(enc.logit_scale.detach(), torch.tensor(state["logit_scale"].item()))

    pv = pixels(2)
    with torch.no_grad():
        feats = enc(pv)
        content, degra = fake.encode_image_control(pv)
        before = fresh(pv)
    torch.testing.assert_close(feats.content_embeds, content, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats.degradation_embeds, degra, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(feats.content_embeds, before.content_embeds, atol=1e-3)
    assert not torch.allclose(feats.degradation_embeds, before.degradation_embeds, atol=1e-3)


def test_daclip_converter_rejects_wrong_layouts(tmp_path):
    plain = build_open_clip_model(TINY).state_dict()
    with pytest.raises(ValueError, match="not a DA-CLIP checkpoint"):
        convert_daclip_state_dict(plain)
    _, state = make_daclip_state()
    with pytest.raises(ValueError, match="outside DA-CLIP"):
        convert_daclip_state_dict({**state, "visual_control.transformer.extra.weight": torch.zeros(1)})
    other = copy.deepcopy(TINY)
    other["vision_cfg"]["width"] = 128
    path = tmp_path / "daclip.safetensors"
    save_file({k: v.clone() for k, v in state.items()}, str(path))
    with pytest.raises(ValueError, match="does not match"):
        DegradationEncoder.from_daclip(path, model=other)
    with pytest.raises(FileNotFoundError):
        DegradationEncoder.from_daclip(tmp_path / "missing.pt", model=TINY)


def test_from_open_clip_checkpoint_loads_frozen_model_and_copies_controller(tmp_path):
    plain = build_open_clip_model(TINY).requires_grad_(False)
    randomize_(plain, seed=5)
    path = tmp_path / "open_clip.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    enc = DegradationEncoder.from_open_clip(TINY, path)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(enc.clip.state_dict()[key], value, rtol=0, atol=0)
    for key, value in plain.visual.state_dict().items():
        torch.testing.assert_close(enc.controller.state_dict()[key], value, rtol=0, atol=0)
    pv = pixels(3)
    with torch.no_grad():
        torch.testing.assert_close(enc(pv).content_embeds, plain.encode_image(pv), rtol=0, atol=0)
        text = enc.encode_text(["Denoise with sigma 0.25~0.50"])
        torch.testing.assert_close(text, plain.encode_text(enc.tokenizer(["Denoise with sigma 0.25~0.50"])))
    with pytest.raises(FileNotFoundError, match="neither a file"):
        DegradationEncoder.from_open_clip("ViT-B-32", "no-such-tag")


def test_save_pretrained_round_trip(tmp_path):
    _, state = make_daclip_state(seed=7)
    enc = DegradationEncoder(clip_model=TINY, num_degradation_tokens=3, resize_mode="crop")
    enc.load_converted_state_dict(convert_daclip_state_dict(state))
    enc.save_pretrained(tmp_path / "enc")
    loaded = DegradationEncoder.from_pretrained(tmp_path / "enc")
    assert loaded.config.clip_model == TINY and loaded.config.resize_mode == "crop"
    for key, value in enc.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    pv = pixels(4)
    enc.eval()
    with torch.no_grad():
        a, b = enc(pv), loaded(pv)
    for name in ("content_embeds", "degradation_embeds", "degradation_tokens", "content_tokens"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)


def test_preprocess_modes_and_validation():
    enc = DegradationEncoder(clip_model=TINY)
    mean, std = enc.pixel_mean, enc.pixel_std
    gray = torch.full((1, 3, 50, 70), 0.5)
    torch.testing.assert_close(enc.preprocess(gray), ((0.5 - mean) / std).expand(1, 3, 32, 32))
    image = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    crop = enc.preprocess(image, resize_mode="crop")
    torch.testing.assert_close(crop, (image[:, :, 8:40, 16:48] - mean) / std)  # native pixels, centre crop
    resized = enc.preprocess(image, resize_mode="resize")
    assert resized.shape == (2, 3, 32, 32) and not torch.allclose(resized, crop)
    small = enc.preprocess(torch.rand(3, 16, 20), resize_mode="crop")  # upscaled when smaller than the tower
    assert small.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="`images` values"):
        enc.preprocess(image * 2)
    with pytest.raises(ValueError, match="B×3×H×W"):
        enc.preprocess(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="`resize_mode`"):
        enc.preprocess(image, resize_mode="stretch")
    with pytest.raises(ValueError, match="`pixel_values`"):
        enc(torch.rand(1, 3, 64, 64))
    feats = enc.encode_images(image)
    assert feats.content_embeds.shape == (2, 32)


def test_invalid_configs():
    with pytest.raises(ValueError, match="not an open_clip model name"):
        DegradationEncoder(clip_model="no-such-model")
    with pytest.raises(ValueError, match="`num_degradation_tokens`"):
        DegradationEncoder(clip_model=TINY, num_degradation_tokens=0)
    with pytest.raises(ValueError, match="ViT image tower"):
        DegradationEncoder(clip_model={**TINY, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}})
    with pytest.raises(ValueError, match="patch_dropout"):
        DegradationEncoder(clip_model={**TINY, "vision_cfg": {**TINY["vision_cfg"], "patch_dropout": 0.5}})


def test_top_level_lazy_exports():
    import dalpsr
    import dalpsr.models

    assert dalpsr.DegradationEncoder is DegradationEncoder is dalpsr.models.DegradationEncoder
    assert dalpsr.RestorationPromptDecoder is dalpsr.models.RestorationPromptDecoder


@pytest.mark.slow
def test_vit_b32_daclip_layout_round_trip(tmp_path):
    enc = DegradationEncoder(clip_model="ViT-B-32")
    state = to_daclip_state_dict(enc.state_dict())
    assert "visual_control.transformer.zero_modules.11.weight" in state
    path = tmp_path / "daclip_ViT-B-32.safetensors"
    save_file({k: v.clone() for k, v in state.items()}, str(path))
    loaded = DegradationEncoder.from_daclip(path, model="daclip_ViT-B-32")
    assert loaded.image_size == (224, 224) and loaded.embed_dim == 512
