"""RAMImageEncoder: RAM checkpoint conversion, DAPE LoRA merge, compact converter, preprocessing."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from dalpsr.loaders.seesr import (
    convert_ram_encoder,
    infer_ram_encoder_config,
    load_ram_encoder,
    merge_dape_lora,
    read_checkpoint,
)
from dalpsr.models.ram_encoder import IMAGENET_MEAN, IMAGENET_STD, RAMImageEncoder

TINY = dict(img_size=64, patch_size=4, embed_dim=8, depths=(2, 2, 2), num_heads=(1, 2, 2), window_size=4)


def reference_swin(seed: int = 0) -> SwinTransformer:
    """timm's Swin with random weights (LayerNorms too), as the reference implementation."""
    torch.manual_seed(seed)
    swin = SwinTransformer(num_classes=0, global_pool="", drop_path_rate=0.0, **TINY).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in swin.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] > 0 else 0))
    return swin


def original_swin_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm layout → original Swin layout (patch merging stored at the end of the previous stage), as in RAM."""
    out = {}
    for key, value in state.items():
        out[re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)] = value
    return out


def ram_checkpoint(swin: SwinTransformer, proj: nn.Linear) -> dict[str, torch.Tensor]:
    """A state dict laid out like ram_swin_large_14m.pth's `model` entry (plus buffers and unused text parts)."""
    state = {f"visual_encoder.{k}": v.clone() for k, v in original_swin_keys(swin.state_dict()).items()}
    state["visual_encoder.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    state["visual_encoder.layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
    state["image_proj.weight"] = proj.weight.detach().clone()
    state["image_proj.bias"] = proj.bias.detach().clone()
    state["tag_encoder.encoder.layer.0.attention.self.query.weight"] = torch.zeros(4, 4)
    state["label_embed"] = torch.zeros(10, 512)
    return state


def reference_embeddings(swin: SwinTransformer, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    tokens = swin.forward_features(x).flatten(1, 2)
    return proj(torch.cat([tokens.mean(1, keepdim=True), tokens], 1))


@pytest.fixture(scope="module")
def ram_parts():
    swin = reference_swin()
    torch.manual_seed(5)
    proj = nn.Linear(swin.num_features, 12)
    return swin, proj, ram_checkpoint(swin, proj)


def test_ram_swin_l_config_gives_145_tokens_of_512():
    with torch.device("meta"):
        encoder = RAMImageEncoder()
    assert encoder.num_tokens == 145
    assert tuple(encoder.image_proj.weight.shape) == (512, 1536)
    assert encoder.visual_encoder.num_features == 1536


def test_encoder_reproduces_timm_swin_plus_projection(ram_parts):
    swin, proj, state = ram_parts
    assert "visual_encoder.layers.0.downsample.reduction.weight" in state  # original layout
    encoder = load_ram_encoder(state, image_size=64)
    config = infer_ram_encoder_config(state, image_size=64)
    assert config["depths"] == (2, 2, 2) and config["num_heads"] == (1, 2, 2) and config["window_size"] == 4
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = encoder(x)
        expected = reference_embeddings(swin, proj, x)
    assert got.shape == (2, encoder.num_tokens, 12) == (2, 17, 12)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_load_ram_encoder_is_strict(ram_parts):
    _, _, state = ram_parts
    broken = dict(state)
    del broken["visual_encoder.layers.1.blocks.0.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="missing"):
        load_ram_encoder(broken, image_size=64)
    with pytest.raises(ValueError, match="Not a RAM checkpoint"):
        load_ram_encoder({"foo": torch.zeros(1)}, image_size=64)


class UnmergedLoRAQKV(nn.Module):
    """The DAPE qkv run unmerged, as loralib's MergedLinear(enable_lora=[True, False, True]) computes it."""

    def __init__(self, linear: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float = 1.0):
        super().__init__()
        self.linear, self.lora_a, self.lora_b = linear, lora_a, lora_b
        self.scaling = alpha / (lora_a.shape[0] // 2)

    def forward(self, x):
        after_a = F.linear(x, self.lora_a)  # ...×2r
        after_b = F.conv1d(after_a.reshape(-1, after_a.shape[-1], 1), self.lora_b.unsqueeze(-1), groups=2)
        after_b = after_b.reshape(*x.shape[:-1], -1)  # ...×2·dim: [q | v]
        dim = self.linear.in_features
        zero = torch.zeros(*x.shape[:-1], dim, dtype=x.dtype)
        delta = torch.cat([after_b[..., :dim], zero, after_b[..., dim:]], dim=-1)
        return self.linear(x) + delta * self.scaling


def dape_checkpoint(swin: SwinTransformer, r: int = 8, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dape = {}
    for name, module in swin.named_modules():
        if name.endswith("attn.qkv"):
            dim = module.in_features
            dape[f"visual_encoder.{name}.lora_A"] = torch.randn(2 * r, dim, generator=gen) * 0.3
            dape[f"visual_encoder.{name}.lora_B"] = torch.randn(2 * dim, r, generator=gen) * 0.3
    # DAPE.pth also holds LoRA of RAM's text side; it is ignored.
    dape["tag_encoder.encoder.layer.0.attention.self.query.lora_A"] = torch.zeros(8, 4)
    return dape


def test_dape_merge_equals_unmerged_lora(ram_parts):
    swin, proj, state = ram_parts
    dape = dape_checkpoint(swin)
    merged = load_ram_encoder(state, dape=dape, image_size=64)
    unmerged = reference_swin()
    for name, module in list(unmerged.named_modules()):
        if name.endswith(".attn"):
            key = f"visual_encoder.{name}.qkv"
            module.qkv = UnmergedLoRAQKV(module.qkv, dape[f"{key}.lora_A"], dape[f"{key}.lora_B"])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = merged(x)
        expected = reference_embeddings(unmerged, proj, x)
        plain = reference_embeddings(swin, proj, x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-2  # the LoRA changes the embeddings
    # Only q and v rows move.
    w_ram = load_ram_encoder(state, image_size=64).state_dict()
    w_dape = merged.state_dict()
    key = "visual_encoder.layers.1.blocks.0.attn.qkv.weight"
    dim = w_ram[key].shape[1]
    assert torch.equal(w_ram[key][dim : 2 * dim], w_dape[key][dim : 2 * dim])
    assert not torch.equal(w_ram[key][:dim], w_dape[key][:dim])
    assert not torch.equal(w_ram[key][2 * dim :], w_dape[key][2 * dim :])


def test_dape_checks(ram_parts):
    swin, _, state = ram_parts
    encoder_state = load_ram_encoder(state, image_size=64).state_dict()
    dape = dape_checkpoint(swin)
    with pytest.raises(ValueError, match="Not a DAPE checkpoint"):
        merge_dape_lora(encoder_state, {"tag_encoder.x.lora_A": torch.zeros(1)})
    one_sided = {k: v for k, v in dape.items() if not k.endswith("layers.0.blocks.0.attn.qkv.lora_B")}
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        merge_dape_lora(encoder_state, one_sided)
    with pytest.raises(ValueError, match="Unexpected Swin key"):
        merge_dape_lora(encoder_state, {**dape, "visual_encoder.norm.weight": torch.zeros(32)})
    bad = dict(dape)
    bad["visual_encoder.layers.0.blocks.0.attn.qkv.lora_B"] = torch.zeros(5, 8)
    with pytest.raises(ValueError, match="do not fit"):
        merge_dape_lora(encoder_state, bad)


def test_converter_writes_compact_folder_with_notice(tmp_path, ram_parts):
    swin, _, state = ram_parts
    torch.save({"model": state, "config": {"vit": "swin_l"}, "epoch": 3}, tmp_path / "ram.pth")
    torch.save(dape_checkpoint(swin), tmp_path / "DAPE.pth")
    out = convert_ram_encoder(tmp_path / "ram.pth", tmp_path / "enc", dape=tmp_path / "DAPE.pth", image_size=64)
    assert sorted(p.name for p in out.iterdir()) == ["NOTICE.md", "config.json", "diffusion_pytorch_model.safetensors"]
    assert "Apache License 2.0" in (out / "NOTICE.md").read_text() and "DAPE" in (out / "NOTICE.md").read_text()
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["license"] == "Apache-2.0" and meta["dape_merged"] == "true"
        assert not any(k.startswith(("tag_encoder", "label_embed")) for k in f.keys())
    direct = load_ram_encoder(tmp_path / "ram.pth", dape=tmp_path / "DAPE.pth", image_size=64)
    again = load_ram_encoder(out)
    x = torch.rand(1, 3, 40, 50)
    torch.testing.assert_close(again.encode(x), direct.encode(x), rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        convert_ram_encoder(tmp_path / "ram.pth", out, image_size=64)
    with pytest.raises(ValueError, match="merge DAPE when converting"):
        load_ram_encoder(out, dape=tmp_path / "DAPE.pth")


def test_read_checkpoint_refuses_pickled_objects(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "args": _Opaque()}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="trust_pickle"):
        read_checkpoint(tmp_path / "odd.pth")
    assert set(read_checkpoint(tmp_path / "odd.pth", trust_pickle=True)) == {"w"}
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "absent.pth")


class _Opaque:
    pass


def test_preprocess_resizes_and_normalises():
    encoder = RAMImageEncoder(
        image_size=32, patch_size=4, embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=4, projection_dim=16
    )
    images = torch.rand(2, 3, 20, 24)
    got = encoder.preprocess(images)
    resized = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(got, (resized - mean) / std)
    assert encoder.encode(images).shape == (2, 17, 16)
    with pytest.raises(ValueError, match="pixel_values"):
        encoder(torch.zeros(1, 3, 31, 31))
    with pytest.raises(ValueError, match="images"):
        encoder.preprocess(torch.zeros(3, 32, 32))
