"""CDSR models: LPE/CSC shapes and behaviour, the InfoNCE queue, DQA, CDSRNet, save/load round trips."""

from __future__ import annotations

import pytest
import torch

from dalpsr.models.cdsr import (
    CDSRNet,
    CodebookSpaceCompression,
    DomainQueryAttention,
    DQABlock,
    LightweightPatchEncoder,
    MomentumContrast,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_LPE = {
    "pixel_channels": (8, 8, 16),
    "patch_channels": (8, 8, 16),
    "patch_size": 4,
    "embed_dim": 16,
    "num_codes": 8,
    "projection_dim": 12,
}
TINY_CDSR = {"num_features": 8, "growth_channels": 4, "num_blocks": 2, "embed_dim": 16, "scale": 2}


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_lpe(seed: int = 0) -> LightweightPatchEncoder:
    torch.manual_seed(seed)
    return LightweightPatchEncoder(**TINY_LPE)


def test_lpe_shapes_and_csc_is_a_convex_combination_of_the_codebook():
    lpe = tiny_lpe().eval()
    out = lpe(images(3))
    assert out.embedding.shape == (3, 16) and out.projection.shape == (3, 12) and out.code_weights.shape == (3, 8)
    assert torch.allclose(out.code_weights.sum(1), torch.ones(3)) and (out.code_weights >= 0).all()
    # CSC: the embedding lies in the span of the codebook with the reported weights
    assert torch.allclose(out.embedding, out.code_weights @ lpe.csc.codebook.weight, atol=1e-6)
    assert torch.equal(lpe.encode_images(images(3)), out.embedding)
    # any size of at least the patch size; content- and degradation-dependent
    assert lpe(images(2, size=13)).embedding.shape == (2, 16)
    assert not torch.allclose(out.embedding[0], out.embedding[1])


def test_csc_weights_follow_the_query():
    torch.manual_seed(0)
    csc = CodebookSpaceCompression(dim=4, num_codes=3)
    with torch.no_grad():
        csc.to_q.weight.copy_(torch.eye(4) * 50)
        csc.to_q.bias.zero_()
        csc.to_k.weight.copy_(torch.eye(4))
        csc.to_k.bias.zero_()
        csc.codebook.weight.copy_(torch.eye(3, 4))
    compressed, weights = csc(torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert weights.argmax() == 1 and weights[0, 1] > 0.99  # the code most aligned with the query dominates
    assert torch.allclose(compressed, torch.tensor([[0.0, 1.0, 0.0, 0.0]]), atol=0.01)


def test_lpe_rejects_bad_input():
    lpe = tiny_lpe()
    with pytest.raises(ValueError, match="`images`"):
        lpe(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="at least 4"):
        lpe(torch.rand(2, 3, 3, 16))
    with pytest.raises(ValueError, match="`pixel_channels`"):
        LightweightPatchEncoder(pixel_channels=(8, 8))


def test_infonce_queue_momentum_and_learning():
    lpe = tiny_lpe().train()
    contrast = MomentumContrast(lpe, queue_size=6, momentum=0.5, generator=torch.Generator().manual_seed(0))
    initial_queue = contrast.queue.clone()
    q, k = images(4, seed=1), images(4, seed=2)
    loss, logits = contrast(lpe, q, k)
    assert logits.shape == (4, 7) and loss.ndim == 0 and torch.isfinite(loss)
    # the 4 keys were enqueued (unit norm), the pointer wrapped modulo the queue size
    assert int(contrast.queue_ptr) == 4 and torch.allclose(contrast.queue[:4].norm(dim=1), torch.ones(4))
    assert torch.equal(contrast.queue[4:], initial_queue[4:]) and not torch.equal(contrast.queue[:4], initial_queue[:4])
    contrast(lpe, q, k)
    assert int(contrast.queue_ptr) == 2  # (4 + 4) mod 6
    # momentum: key ← 0.5 key + 0.5 query
    with torch.no_grad():
        for p in lpe.parameters():
            p.add_(1.0)
    before = [p.clone() for p in contrast.key_encoder.parameters()]
    contrast.momentum_update(lpe)
    for pk, pb, pq in zip(contrast.key_encoder.parameters(), before, lpe.parameters()):
        assert torch.allclose(pk, 0.5 * pb + 0.5 * pq)
    assert not any(p.requires_grad for p in contrast.key_encoder.parameters())
    # eval mode leaves the queue alone
    lpe.eval()
    ptr, queue = int(contrast.queue_ptr), contrast.queue.clone()
    contrast(lpe, q, k)
    assert int(contrast.queue_ptr) == ptr and torch.equal(contrast.queue, queue)


def test_infonce_separates_degradations_after_a_few_steps():
    """Two blur levels, two crops each: the encoder learns to tell a crop's partner from the queue."""
    lpe = tiny_lpe().train()
    contrast = MomentumContrast(lpe, queue_size=8, momentum=0.9, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(lpe.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(30):
        base = torch.rand(4, 3, 16, 16, generator=g)
        noise = torch.tensor([0.0, 0.3, 0.0, 0.3])[:, None, None, None]
        q = (base + noise * torch.randn(base.shape, generator=g)).clamp(0, 1)
        k = (torch.rand(4, 3, 16, 16, generator=g) + noise * torch.randn(base.shape, generator=g)).clamp(0, 1)
        loss, _ = contrast(lpe, q, k)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[5:10]) / 5


def test_dqa_uses_the_embedding_and_starts_as_a_pure_embedding_query():
    torch.manual_seed(0)
    dqa = DomainQueryAttention(channels=8, kernel_size=3, reduction=2)
    x, e = torch.rand(2, 8, 6, 6), torch.rand(2, 8)
    assert dqa.gamma.item() == 0.0
    assert torch.equal(dqa.query(x, e), e)  # gamma = 0: the kernel embedding is the degradation embedding
    with torch.no_grad():
        dqa.gamma.fill_(1.0)
    assert not torch.allclose(dqa.query(x, e), e)
    out = dqa(x, e)
    assert out.shape == x.shape
    assert not torch.allclose(out, dqa(x, torch.rand(2, 8)))  # another embedding, another result
    # per-sample kernels: each image depends only on its own embedding
    single = dqa(x[:1], e[:1])
    assert torch.allclose(single, out[:1], atol=1e-6)
    with pytest.raises(ValueError, match="`kernel_size`"):
        DomainQueryAttention(8, kernel_size=2)


def test_dqa_block_zero_init_is_identity_and_learns():
    torch.manual_seed(0)
    block = DQABlock(channels=8, embed_dim=16, hidden_dim=12, zero_init=True)
    x, e = torch.rand(2, 8, 5, 7), torch.rand(2, 16)
    assert torch.equal(block(x, e), x)
    target = torch.rand(2, 8, 5, 7)
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    for _ in range(3):
        loss = (block(x, e) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = block(x, e)
    assert not torch.equal(out, x) and not torch.allclose(out, block(x, torch.rand(2, 16)))


def test_cdsrnet_shapes_tiles_and_features():
    torch.manual_seed(0)
    net = CDSRNet(**TINY_CDSR).eval()
    lpe = tiny_lpe().eval()
    lr = images(2, size=12)
    emb = lpe.encode_images(lr)
    with torch.no_grad():
        sr = net(lr, emb)
        assert sr.shape == (2, 3, 24, 24)
        assert torch.equal(net(lr, encoder=lpe), sr)
        assert torch.allclose(net(lr, emb[:1])[0], sr[0])  # a 1-image embedding serves the batch
        assert not torch.allclose(net(lr, emb.flip(0)), sr)  # features steer the output
        whole = net.super_resolve(lr, emb)
        tiled = net.super_resolve(lr, encoder=lpe, tile_size=8, tile_overlap=4)
    assert torch.equal(whole, sr)
    # tiles read the whole image's embedding: only seams differ from the untiled result
    assert tiled.shape == sr.shape and (tiled - sr).abs().mean() < 0.1 * sr.abs().mean()
    with pytest.raises(ValueError, match="`features`"):
        net(lr, torch.rand(2, 5))
    with pytest.raises(ValueError, match="`features` is None"):
        net(lr)


def test_save_pretrained_round_trips(tmp_path):
    lpe, net = tiny_lpe().eval(), CDSRNet(**TINY_CDSR).eval()
    lpe.save_pretrained(tmp_path / "lpe")
    net.save_pretrained(tmp_path / "net")
    lpe2 = LightweightPatchEncoder.from_pretrained(tmp_path / "lpe").eval()
    net2 = CDSRNet.from_pretrained(tmp_path / "net").eval()
    assert lpe2.config.pixel_channels == [8, 8, 16] and net2.config.num_blocks == 2
    for a, b in ((lpe, lpe2), (net, net2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    lr = images(1, size=12)
    with torch.no_grad():
        assert torch.allclose(net2(lr, encoder=lpe2), net(lr, encoder=lpe), atol=1e-6)
