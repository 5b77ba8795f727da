"""CDSR: content-and-degradation-aware embedding (LPE + CSC), Domain Query Attention (DQA) and CDSR's SR network.

Adapted from Zhou et al., "Joint Learning Content and Degradation Aware Feature for Blind Super-Resolution"
(ACM MM 2022, arXiv 2208.13436; github.com/ZhouYiiFeng/CDSR, `model/CDSR.py`, `moco/builder.py`). As there:
- `LightweightPatchEncoder` (LPE): a pixel branch (7×7 conv, 1×1, stride-2 3×3, 1×1, 7×7, 1×1; BatchNorm +
  LeakyReLU 0.1 after each) and a patch branch (a `patch_size`×`patch_size` conv with that stride, then three
  3×3 convs), each average-pooled; the two vectors are concatenated and mapped by `Linear → LeakyReLU → Linear`
  to the embedding, which the codebook-based space compression (CSC) re-expresses as a softmax-weighted sum of
  `num_codes` learned basis vectors; a `Linear → LeakyReLU → Linear` head gives the contrastive projection.
- LPE is pre-trained by InfoNCE against a queue of momentum-encoder keys (MoCo, as CDSR and DASR; queue size,
  momentum 0.999 and temperature 0.07 as there): query and key are two crops of one image with the same
  degradation, the queue holds other images' keys (`MomentumContrast`).
- `DomainQueryAttention` (DQA): the channel-averaged feature map queries the degradation embedding through a
  C×C cross-modal attention with a zero-initialised gain (`gamma`, residual to the embedding); the result
  predicts one k×k depthwise kernel per channel (LeakyReLU, 1×1 conv), plus a channel attention (sigmoid) from
  the embedding; the two branches add.
- `DQABlock`: the embedding through `Linear → PReLU → Linear → Sigmoid` to C, then DQA → conv → DQA → conv with
  a residual (CDSR's `SFT_Layer` + `FuseBLK`); `CDSRNet` is CDSR's generator: conv, `num_blocks` × (DQABlock +
  three residual dense blocks, residual ×0.2), trunk conv + long skip, conv → PixelShuffle.

What differs:
- Widths, codebook size and depths are arguments (CDSR fixes 64/128/256 channels, 1024 codes, 10 blocks of
  64 features); the CSC logits are scaled by 1/sqrt(dim) (CDSR uses the raw dot product).
- The CSC embedding feeds the SR network and the projection head feeds InfoNCE, as in CDSR; its `fea` /
  `out` are `LPEOutput.embedding` / `.projection`. Inputs are [0, 1] images (CDSR divides 0–255 by 255).
- `DQABlock(zero_init=True)` zeroes its last conv so it starts as the identity: `DATRestorer(fusion="dqa")`
  uses that to reproduce the plain DAT exactly until fine-tuned. CDSRNet keeps CDSR's initialisation.
- `MomentumContrast` takes the query encoder as an argument (it owns only the key encoder and the queue), so
  the trained LPE saves alone; the queue wraps around for any batch size (MoCo requires K % B == 0), and its
  random start comes from an explicit `torch.Generator`.
- CDSR trains the SR network jointly with the contrastive loss, then freezes the encoder; here the encoder is
  pre-trained, then frozen while the SR network trains (CDSR's `--freeze_epoch` schedule, brought forward).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from dalpsr.models.dat import tiled_forward


def _check_widths(name: str, value, length: int) -> tuple[int, ...]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != length
        or any(not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(f"`{name}` must be {length} positive ints; got {value!r}.")
    return tuple(value)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int; got {value!r}.")


def _check_images(images: Tensor, name: str = "images", min_size: int = 1) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"`{name}` must be a float B×3×H×W tensor in [0, 1]; got {got}.")
    if min(images.shape[-2:]) < min_size:
        raise ValueError(f"`{name}` must be at least {min_size}×{min_size} pixels; got {tuple(images.shape[-2:])}.")


class _ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, True)
        )


class CodebookSpaceCompression(nn.Module):
    """CSC: an embedding (B, D) re-expressed as a softmax-weighted sum of `num_codes` learned basis vectors.

    Args:
        dim: embedding width D.
        num_codes: codebook size.
    """

    def __init__(self, dim: int, num_codes: int):
        super().__init__()
        self.codebook = nn.Embedding(num_codes, dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, D) -> (compressed (B, D), code weights (B, num_codes) summing to 1)."""
        codes = self.codebook.weight  # M, D
        logits = self.to_q(x) @ self.to_k(codes).t() / math.sqrt(x.shape[-1])  # B, M
        weights = logits.softmax(dim=-1)
        return weights @ codes, weights


@dataclass
class LPEOutput(BaseOutput):
    """Output of `LightweightPatchEncoder.forward`.

    Attributes:
        embedding: B×D content- and degradation-aware embedding after CSC (what the SR network reads).
        projection: B×P contrastive projection (InfoNCE reads its L2-normalised form).
        code_weights: B×M CSC weights over the codebook.
    """

    embedding: Tensor
    projection: Tensor
    code_weights: Tensor


class LightweightPatchEncoder(ModelMixin, ConfigMixin):
    """CDSR's lightweight patch-based encoder (LPE) with codebook-based space compression (CSC).

    Input: LR images (B, 3, H, W) in [0, 1], any size of at least `patch_size` (and 2) pixels.

    Args:
        pixel_channels: widths of the pixel branch's three stages (CDSR: 64, 128, 256).
        patch_channels: widths of the patch branch's three stages (CDSR: 64, 128, 256).
        patch_size: edge (and stride) of the patch branch's first conv (CDSR: 12).
        embed_dim: embedding width D (CDSR: 256).
        num_codes: CSC codebook size (CDSR: 1024).
        projection_dim: contrastive projection width (CDSR: 256).
    """

    @register_to_config
    def __init__(
        self,
        pixel_channels: Sequence[int] = (64, 128, 256),
        patch_channels: Sequence[int] = (64, 128, 256),
        patch_size: int = 12,
        embed_dim: int = 256,
        num_codes: int = 1024,
        projection_dim: int = 256,
    ):
        super().__init__()
        c0, c1, c2 = _check_widths("pixel_channels", pixel_channels, 3)
        p0, p1, p2 = _check_widths("patch_channels", patch_channels, 3)
        _check_positive(patch_size=patch_size, embed_dim=embed_dim, num_codes=num_codes, projection_dim=projection_dim)
        self.pixel_branch = nn.Sequential(
            _ConvBNAct(3, c0, 7, padding=3),
            _ConvBNAct(c0, c0, 1),
            _ConvBNAct(c0, c1, 3, stride=2, padding=1),
            _ConvBNAct(c1, c1, 1),
            _ConvBNAct(c1, c2, 7, padding=3),
            _ConvBNAct(c2, c2, 1),
        )
        self.patch_branch = nn.Sequential(
            _ConvBNAct(3, p0, patch_size, stride=patch_size),
            _ConvBNAct(p0, p0, 3, padding=1),
            _ConvBNAct(p0, p1, 3, padding=1),
            _ConvBNAct(p1, p2, 3, padding=1),
        )
        self.fuse = nn.Sequential(
            nn.Linear(c2 + p2, embed_dim), nn.LeakyReLU(0.1, True), nn.Linear(embed_dim, embed_dim)
        )
        self.csc = CodebookSpaceCompression(embed_dim, num_codes)
        self.head = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.LeakyReLU(0.1, True), nn.Linear(embed_dim, projection_dim)
        )

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def forward(self, images: Tensor, return_dict: bool = True) -> LPEOutput | tuple:
        """Encode LR images (B, 3, H, W) in [0, 1]."""
        _check_images(images, min_size=max(2, self.config.patch_size))
        weight = self.fuse[0].weight
        x = images.to(weight.device, weight.dtype)
        pixel = self.pixel_branch(x).mean(dim=(2, 3))  # B, c2
        patch = self.patch_branch(x).mean(dim=(2, 3))  # B, p2
        embedding, weights = self.csc(self.fuse(torch.cat([pixel, patch], dim=1)))  # B, D
        out = LPEOutput(embedding=embedding, projection=self.head(embedding), code_weights=weights)
        return out if return_dict else out.to_tuple()

    def encode_images(self, images: Tensor) -> Tensor:
        """The embedding (B, D) the SR networks read (the same call as `DegradationEncoder.encode_images`)."""
        return self(images).embedding


class MomentumContrast(nn.Module):
    """InfoNCE with a queue of momentum-encoder keys (MoCo, as CDSR/DASR pre-train their encoders).

    Training-only: holds the key encoder (a momentum copy of the query encoder) and the queue; its state dict
    is what a resumed run needs. The query encoder is passed to `forward`, so the trained encoder saves alone.

    Args:
        encoder: the query `LightweightPatchEncoder` (copied into the key encoder).
        queue_size: negatives kept (CDSR: 32·256).
        momentum: key-encoder momentum (CDSR: 0.999).
        temperature: softmax temperature (CDSR: 0.07).
        generator: draws the queue's random start (None: a generator seeded with 0).
    """

    def __init__(
        self,
        encoder: LightweightPatchEncoder,
        queue_size: int = 8192,
        momentum: float = 0.999,
        temperature: float = 0.07,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not isinstance(encoder, LightweightPatchEncoder):
            raise TypeError(f"`encoder` must be a LightweightPatchEncoder; got {type(encoder).__name__}.")
        _check_positive(queue_size=queue_size)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1); got {momentum}.")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0; got {temperature}.")
        self.momentum, self.temperature = momentum, temperature
        self.key_encoder = copy.deepcopy(encoder).requires_grad_(False)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        queue = torch.randn(queue_size, encoder.config.projection_dim, generator=g)
        self.register_buffer("queue", F.normalize(queue, dim=1).to(encoder.device))  # K, P
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long, device=encoder.device))

    @torch.no_grad()
    def momentum_update(self, encoder: LightweightPatchEncoder) -> None:
        """key ← m·key + (1 − m)·query for parameters; buffers (BatchNorm statistics) copied."""
        for pk, pq in zip(self.key_encoder.parameters(), encoder.parameters()):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1.0 - self.momentum)
        for bk, bq in zip(self.key_encoder.buffers(), encoder.buffers()):
            bk.copy_(bq)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Replace the oldest queue entries by `keys` (B, P), wrapping around."""
        k = self.queue.shape[0]
        idx = (int(self.queue_ptr) + torch.arange(keys.shape[0], device=keys.device)) % k
        self.queue[idx] = keys[-k:] if keys.shape[0] > k else keys
        self.queue_ptr.fill_((int(self.queue_ptr) + keys.shape[0]) % k)

    def forward(
        self, encoder: LightweightPatchEncoder, query_images: Tensor, key_images: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(InfoNCE loss, logits B×(1+K)) for queries/keys: two crops of each image with the same degradation.

        Updates the key encoder (momentum) and the queue when `encoder` is in training mode.
        """
        if query_images.shape[0] != key_images.shape[0]:
            raise ValueError(
                f"`query_images` and `key_images` must be batches of equal size; got {query_images.shape[0]} and "
                f"{key_images.shape[0]}."
            )
        q = F.normalize(encoder(query_images).projection, dim=1)  # B, P
        with torch.no_grad():
            if encoder.training:
                self.momentum_update(encoder)
            self.key_encoder.train(encoder.training)
            k = F.normalize(self.key_encoder(key_images).projection, dim=1)  # B, P
        pos = (q * k).sum(dim=1, keepdim=True)  # B, 1
        neg = q @ self.queue.clone().t()  # B, K
        logits = torch.cat([pos, neg], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        if encoder.training:
            self.enqueue(k)
        return loss, logits


class DomainQueryAttention(nn.Module):
    """DQA: the feature map's channel average queries the degradation embedding; the answer predicts per-channel
    depthwise kernels, and the embedding a channel attention.

    Args:
        channels: feature channels C (also the embedding width this module reads).
        kernel_size: predicted depthwise kernel edge (CDSR: 3).
        reduction: channel-attention bottleneck ratio (CDSR: 2).
    """

    def __init__(self, channels: int, kernel_size: int = 3, reduction: int = 2):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be a positive odd int; got {kernel_size}.")
        if reduction < 1 or channels // reduction < 1:
            raise ValueError(f"`reduction` must be in [1, channels={channels}]; got {reduction}.")
        self.kernel_size = kernel_size
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.kernel = nn.Sequential(
            nn.Linear(channels, channels, bias=False),
            nn.LeakyReLU(0.1, True),
            nn.Linear(channels, channels * kernel_size * kernel_size, bias=False),
        )
        self.conv = nn.Conv2d(channels, channels, 1)
        self.channel_attention = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=False),
            nn.LeakyReLU(0.1, True),
            nn.Conv2d(channels // reduction, channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def query(self, x: Tensor, embedding: Tensor) -> Tensor:
        """The domain query: x (B, C, H, W), embedding (B, C) -> kernel embedding (B, C)."""
        q = self.to_q(x.mean(dim=(2, 3)))  # B, C
        k, v = self.to_k(embedding), self.to_v(embedding)  # B, C
        attn = (q[:, :, None] * k[:, None, :]).softmax(dim=-1)  # B, C, C
        out = torch.einsum("bj,bij->bi", v, attn)  # B, C
        return self.gamma * out + embedding

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        """x (B, C, H, W), embedding (B, C) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        kernels = self.kernel(self.query(x, embedding)).view(b * c, 1, self.kernel_size, self.kernel_size)
        out = F.conv2d(x.reshape(1, b * c, h, w), kernels, groups=b * c, padding=self.kernel_size // 2)
        out = self.conv(F.leaky_relu(out, 0.1).view(b, c, h, w))
        return out + x * self.channel_attention(embedding[:, :, None, None])


class DQABlock(nn.Module):
    """CDSR's fusion block: embedding → C (sigmoid), then DQA → conv → DQA → conv with a residual.

    Args:
        channels: feature channels C.
        embed_dim: width of the incoming embedding.
        hidden_dim: hidden width of the embedding map (CDSR: 256).
        kernel_size: DQA kernel edge and the convs' kernel edge (CDSR: 3).
        reduction: DQA channel-attention ratio (CDSR: 2).
        zero_init: zero the last conv so the block starts as the identity.
    """

    def __init__(
        self,
        channels: int,
        embed_dim: int,
        hidden_dim: int = 256,
        kernel_size: int = 3,
        reduction: int = 2,
        zero_init: bool = False,
    ):
        super().__init__()
        self.embed = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim), nn.PReLU(), nn.Linear(hidden_dim, channels), nn.Sigmoid()
        )
        self.dqa1 = DomainQueryAttention(channels, kernel_size, reduction)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.dqa2 = DomainQueryAttention(channels, kernel_size, reduction)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        if zero_init:
            self.reset_output()

    @torch.no_grad()
    def reset_output(self) -> None:
        """Zero the last conv: the block becomes the identity."""
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        """x (B, C, H, W), embedding (B, embed_dim) -> (B, C, H, W)."""
        e = self.embed(embedding)  # B, C
        out = F.leaky_relu(self.dqa1(x, e), 0.1)
        out = F.leaky_relu(self.conv1(out), 0.1)
        out = F.leaky_relu(self.dqa2(out, e), 0.1)
        return x + self.conv2(out)


def embedding_compressor(dim: int, hidden_dim: int, layers: int) -> nn.Sequential:
    """CDSR's `compress`: `layers` × (Linear → PReLU), `dim` → `hidden_dim`."""
    _check_positive(layers=layers)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(dim if i == 0 else hidden_dim, hidden_dim), nn.PReLU()]
    return nn.Sequential(*mods)


class _ResidualDenseBlock(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(nf + i * gc, gc, 3, 1, 1) for i in range(4)])
        self.conv_last = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        for conv in [*self.convs, self.conv_last]:  # ESRGAN's initialisation: Kaiming × 0.1, zero bias
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(F.leaky_relu(conv(torch.cat(feats, dim=1)), 0.2))
        return x + 0.2 * self.conv_last(torch.cat(feats, dim=1))


class _RRDBDQA(nn.Module):
    def __init__(self, nf: int, gc: int, embed_dim: int, kernel_size: int, reduction: int):
        super().__init__()
        self.fusion = DQABlock(nf, embed_dim, embed_dim, kernel_size, reduction)
        self.rdbs = nn.Sequential(*[_ResidualDenseBlock(nf, gc) for _ in range(3)])

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        return x + 0.2 * self.rdbs(self.fusion(x, embedding))


class CDSRNet(ModelMixin, ConfigMixin):
    """CDSR's SR network: RRDB trunk with a DQA fusion block in every RRDB, fed by an LPE embedding.

    Input and output: images in [0, 1], (B, 3, H, W) + embedding (B, embed_dim) -> (B, 3, H*scale, W*scale),
    unclamped.

    Args:
        scale: SR scale.
        num_features: trunk width nf (CDSR: 64).
        growth_channels: dense-block growth gc (CDSR: 32).
        num_blocks: RRDBs (CDSR: 10).
        embed_dim: the encoder's embedding width (CDSR: 256).
        compress_layers: Linear → PReLU layers of the embedding compressor (CDSR: 4).
        kernel_size: DQA kernel edge (CDSR: 3).
        reduction: DQA channel-attention ratio (CDSR: 2).
    """

    @register_to_config
    def __init__(
        self,
        scale: int = 4,
        num_features: int = 64,
        growth_channels: int = 32,
        num_blocks: int = 10,
        embed_dim: int = 256,
        compress_layers: int = 4,
        kernel_size: int = 3,
        reduction: int = 2,
    ):
        super().__init__()
        _check_positive(
            scale=scale,
            num_features=num_features,
            growth_channels=growth_channels,
            num_blocks=num_blocks,
            embed_dim=embed_dim,
        )
        nf = num_features
        self.compress = embedding_compressor(embed_dim, embed_dim, compress_layers)
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.blocks = nn.ModuleList(
            [_RRDBDQA(nf, growth_channels, embed_dim, kernel_size, reduction) for _ in range(num_blocks)]
        )
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upsampler = nn.Sequential(nn.Conv2d(nf, 3 * scale * scale, 3, 1, 1), nn.PixelShuffle(scale))

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def needs_features(self) -> bool:
        return True

    def _embedding(self, features: Tensor, batch_size: int) -> Tensor:
        d = self.config.embed_dim
        if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[1] != d:
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"`features` must be an embedding tensor B×{d} (embed_dim); got {got}.")
        if features.shape[0] != batch_size:
            if features.shape[0] != 1:
                raise ValueError(f"`features` are for {features.shape[0]} images but `lr` has {batch_size}.")
            features = features.expand(batch_size, -1)
        weight = self.conv_first.weight
        return self.compress(features.to(weight.device, weight.dtype))

    def _conditioning(self, lr: Tensor, features: Tensor | None, encoder: LightweightPatchEncoder | None) -> Tensor:
        if features is None:
            if encoder is None:
                raise ValueError(
                    "`features` is None and no `encoder` was given: CDSRNet needs an LPE embedding of `lr`."
                )
            with torch.no_grad():
                features = encoder.encode_images(lr.float().clamp(0, 1))
        return self._embedding(features, lr.shape[0])

    def _run(self, lr: Tensor, embedding: Tensor) -> Tensor:
        weight = self.conv_first.weight
        x = self.conv_first(lr.to(weight.dtype))
        fea = x
        for block in self.blocks:
            fea = block(fea, embedding)
        return self.upsampler(x + self.trunk_conv(fea))

    def forward(
        self, lr: Tensor, features: Tensor | None = None, encoder: LightweightPatchEncoder | None = None
    ) -> Tensor:
        """Super-resolve LR images.

        Args:
            lr: (B, 3, H, W) in [0, 1].
            features: the LPE embedding of `lr` (B×embed_dim, or 1×embed_dim for the whole batch).
            encoder: computes `features` when they are None (no gradient through it).
        """
        _check_images(lr, "lr")
        return self._run(lr, self._conditioning(lr, features, encoder))

    @torch.no_grad()
    def super_resolve(
        self,
        lr: Tensor,
        features: Tensor | None = None,
        encoder: LightweightPatchEncoder | None = None,
        tile_size: int | None = None,
        tile_overlap: int = 16,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Inference: the embedding once on the whole images, the network over overlapping tiles (see
        `dalpsr.models.dat.tiled_forward`)."""
        _check_images(lr, "lr")
        embedding = self._conditioning(lr, features, encoder)
        return tiled_forward(lambda t: self._run(t, embedding), lr, self.scale, tile_size, tile_overlap, dtype)


__all__ = [
    "CDSRNet",
    "CodebookSpaceCompression",
    "DQABlock",
    "DomainQueryAttention",
    "LPEOutput",
    "LightweightPatchEncoder",
    "MomentumContrast",
    "embedding_compressor",
]
