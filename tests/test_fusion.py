"""DATRestorer: zero-init fusion reproduces plain DAT, fusion learns, conditioning once for tiles, round trips."""

from __future__ import annotations

import json

import pytest
import torch

import dalpsr
from dalpsr.loaders.dat import load_dat_checkpoint
from dalpsr.loaders.restorers import load_restorer
from dalpsr.models.dat import DAT, tiled_forward
from dalpsr.models.fusion import DATRestorer, FusionBlock
from dalpsr.testing import get_dummy_degradation_models

TINY_DAT = {"embed_dim": 32, "depth": [2, 2], "num_heads": [2, 2], "split_size": [2, 4], "img_size": 64, "upscale": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder():
    return get_dummy_degradation_models(seed=0)[0]


def tiny_dat(seed: int = 0) -> DAT:
    torch.manual_seed(seed)
    return DAT(**TINY_DAT).eval()


def randomize_fusion(restorer: DATRestorer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in restorer.fusion_blocks.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_official_checkpoint_restorer_reproduces_plain_dat(encoder, tmp_path):
    torch.manual_seed(0)
    official = DAT.from_preset("dat_light", 4).eval()
    ckpt = tmp_path / "DAT_light_x4.pth"
    torch.save({"params": official.state_dict()}, ckpt)
    restorer = DATRestorer.from_dat(load_dat_checkpoint(ckpt), context_dim=encoder.embed_dim).eval()
    assert restorer.fusion_groups == [0] and restorer.config.dat_config["upsampler"] == "pixelshuffledirect"
    lr = torch.rand(2, 3, 11, 13, generator=torch.Generator().manual_seed(0))
    features = encoder.encode_images(lr)
    with torch.no_grad():
        expected = official(lr)
        got = restorer(lr, features)
    assert got.shape == (2, 3, 44, 52)
    assert torch.equal(got, expected)  # bit-exact: the fresh fusion block is the identity


def test_fusion_blocks_learn_and_use_the_features(encoder):
    dat = tiny_dat()
    restorer = DATRestorer.from_dat(dat, context_dim=encoder.embed_dim, fusion_num_heads=2).train()
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    hr = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    features = encoder.encode_images(lr)
    loss = (restorer(lr, features) - hr).abs().mean()
    loss.backward()
    for block in restorer.fusion_blocks.values():
        assert block.fuse_attn.to_out.weight.grad.abs().sum() > 0
        assert block.mlp[-1].weight.grad.abs().sum() > 0
    randomize_fusion(restorer)
    restorer.eval()
    other = encoder.encode_images(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        a, b, plain = restorer(lr, features), restorer(lr, other), dat(lr)
    assert (a - plain).abs().max() > 1e-3 and (a - b).abs().max() > 1e-4
    # single-image features broadcast over the batch
    one = encoder.encode_images(lr[:1])
    with torch.no_grad():
        both = restorer(lr, one)
        torch.testing.assert_close(both[:1], restorer(lr[:1], one), rtol=0, atol=1e-5)


def test_super_resolve_tiles_share_one_encoder_pass(encoder, monkeypatch):
    dat = tiny_dat()
    restorer = DATRestorer.from_dat(dat, context_dim=encoder.embed_dim, fusion_num_heads=2).eval()
    lr = torch.rand(1, 3, 20, 23, generator=torch.Generator().manual_seed(4))
    calls = []
    forward = type(encoder).forward
    monkeypatch.setattr(type(encoder), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    tiled = restorer.super_resolve(lr, encoder=encoder, tile_size=12, tile_overlap=4)
    assert len(calls) == 1  # conditioning once for the whole image, reused by every tile
    # identity fusion: tiles equal plain DAT's tiles
    torch.testing.assert_close(tiled, tiled_forward(dat, lr, 2, 12, 4), rtol=0, atol=1e-6)
    randomize_fusion(restorer)
    features = encoder.encode_images(lr)
    with torch.no_grad():
        whole = restorer(lr, features)
    torch.testing.assert_close(restorer.super_resolve(lr, features), whole, rtol=0, atol=1e-6)
    bf16 = restorer.super_resolve(lr, features, tile_size=12, tile_overlap=4, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and bf16.shape == whole.shape
    assert (bf16 - whole).abs().mean() < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_gpu(encoder):
    restorer = DATRestorer.from_dat(tiny_dat(), context_dim=encoder.embed_dim, fusion_num_heads=2).eval()
    randomize_fusion(restorer)
    restorer, enc = restorer.cuda(), encoder.cuda()
    lr = torch.rand(1, 3, 24, 24, device="cuda")
    full = restorer.super_resolve(lr, encoder=enc)
    half = restorer.super_resolve(lr, encoder=enc, tile_size=16, tile_overlap=8, dtype=torch.float16)
    assert half.dtype == torch.float32 and (half - full).abs().mean() < 0.02
    encoder.cpu()


def test_save_pretrained_round_trip_and_export(encoder, tmp_path):
    restorer = DATRestorer(
        dat_config=TINY_DAT, context_dim=encoder.embed_dim, fusion_layers=[1], fusion_num_heads=4, fusion_attn_ratio=0.5
    ).eval()
    randomize_fusion(restorer)
    restorer.save_pretrained(tmp_path / "r")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["_class_name"] == "DATRestorer" and config["fusion_layers"] == [1]
    loaded = dalpsr.DATRestorer.from_pretrained(tmp_path / "r").eval()
    assert set(loaded.fusion_blocks) == {"1"} and loaded.state_dict().keys() == restorer.state_dict().keys()
    lr = torch.rand(1, 3, 9, 7, generator=torch.Generator().manual_seed(5))
    features = encoder.encode_images(lr)
    with torch.no_grad():
        torch.testing.assert_close(loaded(lr, features), restorer(lr, features), rtol=0, atol=1e-6)
    assert "dat.layers.0.blocks.0.attn.qkv.weight" in restorer.state_dict()  # official DAT keys under dat.


def test_load_restorer_layouts(encoder, tmp_path):
    dat = tiny_dat()
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = dat(lr)
    # official checkpoint file and converted DAT folder: no fusion blocks, no encoder needed
    torch.save({"params_ema": dat.state_dict()}, tmp_path / "dat.pth")
    dat.save_pretrained(tmp_path / "dat_folder")
    for src in (tmp_path / "dat.pth", tmp_path / "dat_folder"):
        model, enc = load_restorer(src)
        assert enc is None and not model.needs_features
        assert torch.equal(model.super_resolve(lr), expected)
    # training output: restorer/ + degradation_encoder/
    run = tmp_path / "run"
    restorer = DATRestorer.from_dat(dat, context_dim=encoder.embed_dim, fusion_num_heads=2)
    restorer.save_pretrained(run / "restorer")
    with pytest.raises(FileNotFoundError, match="degradation encoder"):
        load_restorer(run)
    encoder.save_pretrained(run / "degradation_encoder")
    for src in (run, run / "restorer"):
        model, enc = load_restorer(src)
        assert isinstance(enc, type(encoder)) and model.needs_features
        assert torch.equal(model.super_resolve(lr, encoder=enc), expected)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_restorer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_restorer(tmp_path / "missing")


def test_pretrained_dat_from_a_restorer_folder(encoder, tmp_path):
    dat = tiny_dat()
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    plain = DATRestorer.from_dat(dat, context_dim=encoder.embed_dim, fusion_layers=[])
    plain.save_pretrained(tmp_path / "plain")
    loaded = load_dat_checkpoint(tmp_path / "plain")
    assert isinstance(loaded, DAT)
    with torch.no_grad():
        assert torch.equal(loaded(lr), dat(lr))
    # a restorer with fusion blocks as the starting DAT of another restorer: fine-tuning from it keeps DAT
    restorer = DATRestorer.from_dat(loaded, context_dim=encoder.embed_dim, fusion_num_heads=2).eval()
    with torch.no_grad():
        assert restorer.needs_features and torch.equal(restorer.super_resolve(lr, encoder=encoder), dat(lr))
    restorer.save_pretrained(tmp_path / "fused")
    with pytest.raises(ValueError, match="fusion blocks"):
        load_dat_checkpoint(tmp_path / "fused")


def test_bad_arguments(encoder):
    restorer = DATRestorer(dat_config=TINY_DAT, context_dim=encoder.embed_dim, fusion_num_heads=2)
    lr = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="`features` is None"):
        restorer(lr)
    with pytest.raises(ValueError, match="context_dim"):
        DATRestorer(dat_config=TINY_DAT, context_dim=16, fusion_num_heads=2)(lr, encoder.encode_images(lr))
    with pytest.raises(ValueError, match="are for 2 images"):
        restorer(lr, encoder.encode_images(torch.rand(2, 3, 8, 8)))
    with pytest.raises(TypeError, match="DegradationFeatures"):
        restorer(lr, {"content_embeds": 1})
    with pytest.raises(ValueError, match="`fusion_layers`"):
        DATRestorer(dat_config=TINY_DAT, fusion_layers=[2], fusion_num_heads=2)
    with pytest.raises(ValueError, match="`fusion_num_heads`"):
        DATRestorer(dat_config=TINY_DAT, fusion_num_heads=3)
    with pytest.raises(ValueError, match="unknown DAT arguments"):
        DATRestorer(dat_config={**TINY_DAT, "window": 8})
    plain = DATRestorer(dat_config=TINY_DAT, fusion_layers=[]).eval()
    assert plain.feature_proj is None and plain(lr).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="no SRCLIP fusion blocks"):
        plain.project_features(encoder.encode_images(lr))


def test_fusion_block_is_identity_at_init():
    torch.manual_seed(0)
    block = FusionBlock(24, num_heads=3, attn_ratio=0.5, mlp_ratio=2.0)
    x, c, d = torch.randn(2, 30, 24), torch.randn(2, 1, 24), torch.randn(2, 5, 24)
    out, c2, d2 = block(x, c, d)
    assert torch.equal(out, x) and c2.shape == c.shape and d2.shape == d.shape
