"""DATRestorer with DQA fusion (CLIP or LPE features) and `fusion=None`; the swapped-features measurement."""

from __future__ import annotations

import pytest
import torch

from dalpsr.evaluation.feature_use import swapped_features_test
from dalpsr.models.cdsr import DQABlock, LightweightPatchEncoder
from dalpsr.models.dat import DAT
from dalpsr.models.fusion import DATRestorer
from dalpsr.testing import get_dummy_degradation_models

TINY_DAT = {"embed_dim": 32, "depth": [2, 2], "num_heads": [2, 2], "split_size": [2, 4], "img_size": 64, "upscale": 2}
TINY_LPE = {
    "pixel_channels": (8, 8, 16),
    "patch_channels": (8, 8, 16),
    "patch_size": 4,
    "embed_dim": 16,
    "num_codes": 8,
    "projection_dim": 8,
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder():
    return get_dummy_degradation_models(seed=0)[0]


@pytest.fixture(scope="module")
def lpe():
    torch.manual_seed(0)
    return LightweightPatchEncoder(**TINY_LPE).eval()


def tiny_dat(seed: int = 0) -> DAT:
    torch.manual_seed(seed)
    return DAT(**TINY_DAT).eval()


def randomize_fusion(restorer: DATRestorer, seed: int = 1) -> None:
    """Small random values in the zero-initialised fusion parameters, as after fine-tuning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in restorer.named_parameters():
            if not name.startswith("dat.") and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def lr_images(n: int = 2, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_dqa_restorer_from_official_checkpoint_reproduces_plain_dat_exactly(encoder, lpe):
    torch.manual_seed(0)
    official = DAT.from_preset("dat_light", 4).eval()
    lr = torch.rand(2, 3, 11, 13, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = official(lr)
        for source, enc in (("clip", encoder), ("lpe", lpe)):
            restorer = DATRestorer.from_dat(official, context_dim=enc.embed_dim, fusion="dqa", feature_source=source)
            restorer.eval()
            assert restorer.fusion_groups == [0] and isinstance(restorer.fusion_blocks["0"], DQABlock)
            assert restorer.needs_features
            assert torch.equal(restorer(lr, encoder=enc), expected)  # bit-exact: zero-initialised DQA blocks


def test_fusion_none_is_plain_dat_without_features():
    dat = tiny_dat()
    restorer = DATRestorer.from_dat(dat, fusion=None).eval()
    assert restorer.fusion_groups == [] and not restorer.needs_features and len(restorer.fusion_blocks) == 0
    lr = lr_images()
    with torch.no_grad():
        assert torch.equal(restorer(lr), dat(lr))


@pytest.mark.parametrize("source", ["clip", "lpe"])
def test_dqa_fusion_learns_and_uses_its_features(encoder, lpe, source):
    enc = encoder if source == "clip" else lpe
    restorer = DATRestorer.from_dat(tiny_dat(), context_dim=enc.embed_dim, fusion="dqa", feature_source=source)
    restorer.train()
    lr, hr = lr_images(), torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = enc.encode_images(lr)
    params = [p for n, p in restorer.named_parameters() if not n.startswith("dat.")]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        loss = (restorer(lr, features) - hr).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    restorer.eval()
    with torch.no_grad():
        own = restorer(lr, features)
        swapped = restorer(lr, enc.encode_images(lr.flip(0)))
        assert (own - swapped).abs().max() > 0  # trained DQA blocks read the features
        assert torch.equal(restorer(lr, encoder=enc), own)
        assert torch.equal(restorer.super_resolve(lr, features), own)


def test_dqa_round_trip_and_bad_features(encoder, lpe, tmp_path):
    restorer = DATRestorer(dat_config=TINY_DAT, context_dim=lpe.embed_dim, fusion="dqa", feature_source="lpe")
    randomize_fusion(restorer)
    restorer.eval().save_pretrained(tmp_path)
    loaded = DATRestorer.from_pretrained(tmp_path).eval()
    assert loaded.config.fusion == "dqa" and loaded.config.feature_source == "lpe"
    lr = lr_images()
    with torch.no_grad():
        assert torch.allclose(loaded(lr, encoder=lpe), restorer(lr, encoder=lpe), atol=1e-6)
    with pytest.raises(ValueError, match="LPE embedding"):
        restorer(lr, encoder.encode_images(lr))  # CLIP features to an LPE restorer
    clip_restorer = DATRestorer(dat_config=TINY_DAT, context_dim=encoder.embed_dim, fusion="dqa")
    with pytest.raises(TypeError, match="DegradationFeatures"):
        clip_restorer(lr, lpe.encode_images(lr))
    with pytest.raises(ValueError, match="`fusion`"):
        DATRestorer(dat_config=TINY_DAT, fusion="film")
    with pytest.raises(ValueError, match="`feature_source`"):
        DATRestorer(dat_config=TINY_DAT, fusion="srclip", feature_source="lpe")


def test_swapped_features_test_measures_feature_use(lpe):
    pairs = [(f"im{i}", lr_images(1, size=12, seed=i)[0], torch.rand(3, 24, 24)) for i in range(3)]
    restorer = DATRestorer.from_dat(tiny_dat(), context_dim=lpe.embed_dim, fusion="dqa", feature_source="lpe").eval()

    def restore(lr, f):
        return restorer.super_resolve(lr, f)

    unused = swapped_features_test(pairs, lpe.encode_images, restore)  # zero-init: features have no effect
    assert unused.n == 3 and unused.gap == {"psnr": 0.0, "ssim": 0.0} and unused.mean_abs_change == 0.0
    assert [r["donor"] for r in unused.images] == ["im1", "im2", "im0"]
    randomize_fusion(restorer)

    def distinct(lr):  # features that differ a lot between images (an untrained LPE's barely do)
        return lr.flatten(1)[:, :16] * 4

    used = swapped_features_test(pairs, distinct, restore, shift=2)
    assert used.mean_abs_change > 0 and used.gap["psnr"] != 0.0
    assert used.own["psnr"] == pytest.approx(sum(r["own"]["psnr"] for r in used.images) / 3)
    # an oracle whose "features" are the image itself: restoring from another image's features loses a lot
    g = torch.Generator().manual_seed(5)
    oracle_pairs = []
    for name, lr, _ in pairs:
        up = torch.nn.functional.interpolate(lr[None], scale_factor=2, mode="bicubic", align_corners=False)[0]
        oracle_pairs.append((name, lr, (up + 0.02 * torch.randn(up.shape, generator=g)).clamp(0, 1)))

    def from_features(lr, f):
        return torch.nn.functional.interpolate(f, scale_factor=2, mode="bicubic", align_corners=False)

    oracle = swapped_features_test(oracle_pairs, lambda lr: lr, from_features)
    assert oracle.gap["psnr"] > 10 and oracle.gap["ssim"] > 0.3 and oracle.own["psnr"] > 30
    with pytest.raises(ValueError, match="`shift`"):
        swapped_features_test(pairs, lpe.encode_images, restore, shift=3)
    with pytest.raises(ValueError, match="at least 2"):
        swapped_features_test(pairs[:1], lpe.encode_images, restore)
