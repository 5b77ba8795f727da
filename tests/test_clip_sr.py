"""CLIP-SR (dalpsr/models/clip_sr.py): shapes at ×8/×16, zero-initialised text fusion reproducing the text-free
backbone exactly, text that edits the output once the fusion is trained, the prompt predictor, prompt helpers."""

from __future__ import annotations

import pytest
import torch

from dalpsr.degradations import vocabulary
from dalpsr.models.clip_sr import (
    CLIPSR,
    PromptPredictor,
    TIFBlock,
    embed_prompts,
    labels_to_classes,
    prediction_loss,
    swap_prompts,
    with_bin,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"text_dim": 16, "channels": 8, "num_blocks": 1, "predictor_channels": 8, "predictor_layers": 3}


def model(seed: int = 0, **kwargs) -> CLIPSR:
    torch.manual_seed(seed)
    return CLIPSR(**{**TINY, **kwargs}).eval()


@pytest.mark.parametrize("scale", [8, 16])
def test_shapes(scale):
    net = model(scale=scale)
    lr = torch.rand(2, 3, 5, 7)
    out = net(lr, torch.randn(2, 16))
    assert out.sample.shape == (2, 3, 5 * scale, 7 * scale)
    assert [s.shape[-1] for s in out.stages] == [7 * 2**i for i in range(1, len(out.stages) + 1)]
    assert len(out.stages) == {8: 3, 16: 4}[scale]
    assert net.prompt_predictor(lr).shape == (2, vocabulary.NUM_TYPES, vocabulary.NUM_BINS + 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`scale`"):
        CLIPSR(scale=6)
    with pytest.raises(ValueError, match="`stage_channels`"):
        CLIPSR(scale=8, stage_channels=[8, 8])
    net = model()
    with pytest.raises(ValueError, match="`text_embeds`"):
        net(torch.rand(2, 3, 4, 4), torch.randn(3, 16))
    with pytest.raises(ValueError, match="`lr`"):
        net(torch.rand(3, 4, 4))


def test_starts_as_bicubic_and_text_free():
    net = model()
    lr = torch.rand(1, 3, 6, 6)
    bic = lr
    for _ in range(3):
        bic = torch.nn.functional.interpolate(bic, scale_factor=2, mode="bicubic", align_corners=False)
    torch.testing.assert_close(net(lr, torch.randn(1, 16)).sample, bic, rtol=0, atol=0)


def perturb(net: torch.nn.Module, seed: int = 1) -> None:
    """Random weights everywhere (the zero-initialised RGB heads and text MLP outputs included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def test_zero_initialised_fusion_reproduces_backbone():
    fused = model(fusion=True)
    backbone = model(fusion=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking backbone; the text MLPs keep their zero-initialised outputs
        for name, p in fused.named_parameters():
            if ".affines." not in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    missing, unexpected = backbone.load_state_dict(fused.state_dict(), strict=False)
    assert missing == [] and unexpected and all(".affines." in k for k in unexpected)
    lr = torch.rand(2, 3, 6, 5)
    with torch.no_grad():
        reference = backbone(lr).sample
        for text in (None, torch.randn(2, 16), 10 * torch.randn(2, 16)):
            torch.testing.assert_close(fused(lr, text).sample, reference, rtol=0, atol=0)


def test_text_edits_the_output_once_fusion_is_trained():
    net = model()
    perturb(net)
    lr = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        a, b = net(lr, torch.randn(2, 16)).sample, net(lr, torch.randn(2, 16)).sample
        # no text is the stored empty-prompt embedding
        net.set_null_text(torch.ones(16))
        torch.testing.assert_close(net(lr).sample, net(lr, torch.ones(16)).sample)
    assert (a - b).abs().mean() > 1e-3


def test_tifblock_shortcut_and_fuse_order():
    block = TIFBlock(4, 6, 8, text_dim=5, fuse_first=True)
    assert block(torch.rand(2, 4, 3, 3), torch.randn(2, 5)).shape == (2, 8, 3, 3)
    assert isinstance(block.shortcut, torch.nn.Conv2d)


def test_round_trip(tmp_path):
    net = model()
    perturb(net)
    net.save_pretrained(tmp_path)
    back = CLIPSR.from_pretrained(tmp_path).eval()
    lr, text = torch.rand(1, 3, 4, 4), torch.randn(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(lr, text).sample, net(lr, text).sample, rtol=0, atol=0)
    assert back.config.scale == 8 and back.prompt_predictor is not None


def test_predictor_labels_prompts_and_loss():
    labels = torch.zeros(2, *vocabulary.LABEL_SHAPE)
    labels[0, 1, 2] = 1  # noise bin 2
    labels[1, 0, 0] = labels[1, 2, 3] = 1
    assert labels_to_classes(labels).tolist() == [[0, 3, 0, 0], [1, 0, 4, 0]]
    torch.manual_seed(0)
    predictor = PromptPredictor(channels=8, num_layers=3)
    lr = torch.rand(2, 3, 8, 8)
    pred = predictor.predict(lr)
    for prompt, bins in zip(pred.prompts, pred.bins):
        assert vocabulary.labels_to_bins(vocabulary.text_to_labels(prompt)) == bins
    # a few steps on one batch fit its labels
    opt = torch.optim.Adam(predictor.parameters(), lr=1e-2)
    first = prediction_loss(predictor(lr), labels).item()
    for _ in range(30):
        opt.zero_grad()
        loss = prediction_loss(predictor(lr), labels)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert predictor.predict(lr).prompts == vocabulary.batch_labels_to_text(labels)


def test_prompt_helpers():
    prompts = ["Denoise with sigma 0.25~0.50", "Denoise with sigma 0.25~0.50", "", "Deblur with sigma 0.00~0.25"]
    swapped = swap_prompts(prompts)
    assert all(s != p for s, p in zip(swapped, prompts))
    assert swap_prompts(["a", "a"]) == ["a", "a"]
    base = "Deblur with sigma 0.25~0.50, Dejpeg with quality 50~69"
    assert (
        with_bin(base, "noise", 3)
        == "Deblur with sigma 0.25~0.50, Denoise with sigma 0.75~1.00, Dejpeg with quality 50~69"
    )
    assert with_bin(base, "blur", None) == "Dejpeg with quality 50~69"
    with pytest.raises(ValueError, match="`bin_index`"):
        with_bin(base, "noise", 4)


def test_embed_prompts_with_the_text_tower():
    from dalpsr.testing import get_dummy_degradation_models

    encoder, _ = get_dummy_degradation_models()
    cache: dict = {}
    prompts = ["", "Denoise with sigma 0.25~0.50", ""]
    emb = embed_prompts(encoder, prompts, cache)
    assert emb.shape == (3, 32) and set(cache) == {"", "Denoise with sigma 0.25~0.50"}
    torch.testing.assert_close(emb[0], emb[2])
    with torch.no_grad():
        torch.testing.assert_close(emb[1], encoder.encode_text(["Denoise with sigma 0.25~0.50"])[0])
    with pytest.raises(TypeError, match="`prompts`"):
        embed_prompts(encoder, "text")


def test_dat_restorer_tif_fusion_reproduces_dat_then_follows_text():
    from dalpsr.models.dat import DAT
    from dalpsr.models.fusion import DATRestorer
    from dalpsr.testing import TINY_DAT_CONFIG

    torch.manual_seed(0)
    dat = DAT(**{**TINY_DAT_CONFIG, "upscale": 2}).eval()
    restorer = DATRestorer.from_dat(dat, context_dim=16, fusion="tif").eval()
    assert restorer.needs_features and sorted(restorer.fusion_blocks) == ["0", "1"]
    lr = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        reference = dat(lr)
        for text in (torch.randn(2, 16), torch.randn(1, 16)):
            torch.testing.assert_close(restorer(lr, text), reference, rtol=0, atol=0)
        perturb(restorer.fusion_blocks)
        a, b = restorer(lr, torch.randn(2, 16)), restorer(lr, torch.randn(2, 16))
    assert (a - b).abs().mean() > 1e-4
    with pytest.raises(ValueError, match="`features`"):
        restorer(lr, torch.randn(2, 8))
    with pytest.raises(ValueError, match="`feature_source`"):
        DATRestorer(dat_config=TINY_DAT_CONFIG, context_dim=16, fusion="tif", feature_source="lpe")


def test_shipped_weights_load_with_their_text_tower():
    from dalpsr.loaders.degradation import load_degradation_models
    from dalpsr.loaders.manifest import shipped_weights

    folder = shipped_weights("clip_sr_tiny")
    if not (folder / "config.json").is_file():
        pytest.skip("weights/clip_sr_tiny is not installed")
    net = CLIPSR.from_pretrained(folder).eval()
    encoder = load_degradation_models()[0]
    assert net.config.scale == 8 and net.config.text_dim == encoder.clip.text_projection.shape[-1]
    with torch.no_grad():
        torch.testing.assert_close(net.null_text, encoder.encode_text([""])[0])
        lr = torch.rand(1, 3, 6, 6)
        a = net.super_resolve(lr, embed_prompts(encoder, ["Denoise with sigma 0.00~0.25"]))
        b = net.super_resolve(lr, embed_prompts(encoder, ["Denoise with sigma 0.75~1.00"]))
    assert a.shape == (1, 3, 48, 48) and (a - b).abs().mean() > 1e-3
