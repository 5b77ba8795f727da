"""CLIP-SR: text-image fusion blocks, a prompt predictor and iterative refinement for large-factor SR (×8, ×16).

After "CLIP-SR: Collaborative Linguistic and Image Processing for Super-Resolution" (Hu, Liu, Zheng, Liu;
arXiv 2412.11609; code hengliusky/CLIP-SR). Facts kept from the paper's code: the TIFBlock is conv → text fusion
→ conv → text fusion plus a shortcut, where a text fusion is two text-conditioned affine layers (per-channel
γ, β from a Linear–ReLU–Linear MLP of the sentence embedding, each followed by LeakyReLU 0.2) whose last layers
start at γ = 1, β = 0 — so at initialisation the text changes nothing and the network is its text-free backbone;
refinement stages interleave text fusion with convolutions while the resolution grows; the sentence embedding
is the CLIP text tower's pooled (end-of-text) output.

What differs here:
- the text is the DaLPSR degradation prompt the vocabulary writes ("Deblur with sigma 0.25~0.50, Denoise with
  sigma 0.50~0.75", ...), embedded by the shared stack's open_clip text tower (`DegradationEncoder.encode_text`;
  the tiny one shipped in `weights/degradation_tiny`), not captions of CUB/CelebA/COCO embedded by ViT-B/32;
- no GAN: no discriminator, no CLIP-feature critic, no GALIP-style CLIP adapter (in the released code its
  output is overwritten before use), no perceptual loss; training is L1 plus the prompt predictor's loss;
- the input is not resized to a fixed 64×64: any LR size works; iterative refinement is log2(scale) stages,
  each doubling the resolution (nearest ×2 + text-fused block) and adding a predicted residual to the ×2
  bicubic of the previous stage's image, instead of the paper's encoder–decoder with skip additions and a
  final ×4 pixel shuffle;
- the prompt predictor is a small CNN of its own (not the project's `RestorationPromptDecoder`, whose shipped
  weights read 64 px crops at scale 1, while the ×8 LR here is 12–64 px): it classifies each degradation type
  of the vocabulary into none or one of its bins; its prompt is written as text by the vocabulary and embedded by
  the same text tower, so a predicted prompt is the same object a user edits;
- `fusion=False` builds the text-free backbone (same keys minus the fusion MLPs), which a zero-initialised
  fusion model reproduces exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from dalpsr.degradations import vocabulary

NUM_CLASSES = vocabulary.NUM_BINS + 1  # class 0: absent, class b + 1: bin b


class TextAffine(nn.Module):
    """Per-channel γ·x + β with γ, β from the text embedding (γ starts at 1, β at 0)."""

    def __init__(self, text_dim: int, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(text_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.beta = nn.Sequential(nn.Linear(text_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.reset_output()

    def reset_output(self) -> None:
        nn.init.zeros_(self.gamma[2].weight)
        nn.init.ones_(self.gamma[2].bias)
        nn.init.zeros_(self.beta[2].weight)
        nn.init.zeros_(self.beta[2].bias)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        # x: B×C×H×W, text: B×D
        return self.gamma(text)[:, :, None, None] * x + self.beta(text)[:, :, None, None]


class TextFusion(nn.Module):
    """Two text affines, each followed by LeakyReLU 0.2; without fusion, the two activations alone."""

    def __init__(self, text_dim: int, channels: int, fusion: bool = True) -> None:
        super().__init__()
        self.affines = nn.ModuleList([TextAffine(text_dim, channels) for _ in range(2)]) if fusion else None

    def forward(self, x: Tensor, text: Tensor | None) -> Tensor:
        for i in range(2):
            if self.affines is not None:
                x = self.affines[i](x, text)
            x = F.leaky_relu(x, 0.2)
        return x


class TIFBlock(nn.Module):
    """Text-Image Fusion Block: conv → text fusion → conv → text fusion, plus a (1×1 when widths differ) shortcut.

    Args:
        in_channels, mid_channels, out_channels: widths.
        text_dim: size of the sentence embedding.
        fusion: False builds the text-free block (same convolutions).
        fuse_first: fuse before each conv instead of after it (the paper's refinement-stage order).
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        text_dim: int,
        fusion: bool = True,
        fuse_first: bool = False,
    ) -> None:
        super().__init__()
        self.fuse_first = fuse_first
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, 1, 1)
        c1, c2 = (in_channels, mid_channels) if fuse_first else (mid_channels, out_channels)
        self.fuse1 = TextFusion(text_dim, c1, fusion)
        self.fuse2 = TextFusion(text_dim, c2, fusion)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, text: Tensor | None) -> Tensor:
        if self.fuse_first:
            h = self.conv2(self.fuse2(self.conv1(self.fuse1(x, text)), text))
        else:
            h = self.fuse2(self.conv2(self.fuse1(self.conv1(x), text)), text)
        return self.shortcut(x) + h


class ResidualTIFBlock(nn.Module):
    """A TIFBlock as a residual branch on a backbone's features: x + fusion(conv(fusion(conv(x)))), whose second
    conv starts at zero, so a fresh block is the identity (used as `DATRestorer(fusion="tif")`).

    Args:
        channels: feature width.
        text_dim: size of the sentence embedding.
    """

    def __init__(self, channels: int, text_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.fuse1 = TextAffine(text_dim, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.fuse2 = TextAffine(text_dim, channels)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        # x: B×C×H×W, text: B×D
        h = F.leaky_relu(self.fuse1(self.conv1(x), text), 0.2)
        return x + self.fuse2(self.conv2(h), text)


@dataclass
class PromptPrediction(BaseOutput):
    """`PromptPredictor.predict` output for B images.

    Attributes:
        prompts: degradation prompt text per image ("" when nothing is predicted).
        bins: per image, {type name: bin index or None}.
        logits: B×NUM_TYPES×(NUM_BINS + 1); class 0 is "absent".
    """

    prompts: list[str]
    bins: list[dict[str, int | None]]
    logits: Tensor


class PromptPredictor(ModelMixin, ConfigMixin):
    """A small CNN on the LR image → per degradation type, "absent" or one of the vocabulary's bins.

    Mean and standard deviation pooling of the last features feed a linear head (noise and JPEG are variance
    statistics, so the mean alone would hide them).

    Args:
        in_channels: image channels.
        channels: conv width.
        num_layers: 3×3 conv layers (the 2nd and 3rd have stride 2).
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, channels: int = 32, num_layers: int = 4) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"`num_layers` must be >= 1; got {num_layers}.")
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, 2 if i in (1, 2) else 1, 1)]
            layers += [nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(2 * channels, vocabulary.NUM_TYPES * NUM_CLASSES)

    def forward(self, lr: Tensor) -> Tensor:
        """B×3×h×w in [0, 1] → logits B×NUM_TYPES×(NUM_BINS + 1)."""
        h = self.body(lr * 2 - 1)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3), unbiased=False)], dim=1)
        return self.head(pooled).view(-1, vocabulary.NUM_TYPES, NUM_CLASSES)

    @torch.no_grad()
    def predict(self, lr: Tensor) -> PromptPrediction:
        logits = self(lr)
        classes = logits.argmax(dim=-1).cpu()
        bins = [
            {name: (int(c) - 1 if int(c) > 0 else None) for name, c in zip(vocabulary.TYPE_NAMES, row)}
            for row in classes
        ]
        prompts = [vocabulary.labels_to_text(b) for b in bins]
        return PromptPrediction(prompts=prompts, bins=bins, logits=logits)


def labels_to_classes(labels: Tensor) -> Tensor:
    """B×NUM_TYPES×NUM_BINS multi-hot labels → B×NUM_TYPES class indices (0 absent, b + 1 for bin b)."""
    if labels.ndim != 3 or tuple(labels.shape[1:]) != vocabulary.LABEL_SHAPE:
        raise ValueError(f"`labels` must be B×{vocabulary.LABEL_SHAPE}; got {tuple(labels.shape)}.")
    present = labels.sum(dim=-1) > 0.5
    return torch.where(present, labels.argmax(dim=-1) + 1, torch.zeros_like(present, dtype=torch.long))


def prediction_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of the predictor over types."""
    classes = labels_to_classes(labels).to(logits.device)
    return F.cross_entropy(logits.reshape(-1, NUM_CLASSES).float(), classes.reshape(-1))


@dataclass
class CLIPSROutput(BaseOutput):
    """`CLIPSR.forward` output.

    Attributes:
        sample: B×3×(h·scale)×(w·scale), unclamped.
        stages: the image after each refinement stage (×2, ×4, …, ×scale).
    """

    sample: Tensor
    stages: list[Tensor]


class CLIPSR(ModelMixin, ConfigMixin):
    """Text-guided SR at large factors: LR features, TIFBlocks, and log2(scale) text-fused refinement stages.

    Args:
        scale: SR factor, a power of 2 (8 and 16 are the targets).
        in_channels: image channels.
        text_dim: size of the sentence embeddings (the text tower's `embed_dim`; 64 for the shipped tiny one).
        channels: feature width at LR resolution.
        num_blocks: TIFBlocks at LR resolution.
        stage_channels: width of each refinement stage (len = log2(scale)); None halves `channels` down to 16.
        fusion: False builds the text-free backbone.
        predictor_channels: width of the prompt predictor; 0 builds none.
        predictor_layers: conv layers of the prompt predictor.
    """

    @register_to_config
    def __init__(
        self,
        scale: int = 8,
        in_channels: int = 3,
        text_dim: int = 64,
        channels: int = 32,
        num_blocks: int = 2,
        stage_channels: Sequence[int] | None = None,
        fusion: bool = True,
        predictor_channels: int = 32,
        predictor_layers: int = 4,
    ) -> None:
        super().__init__()
        if not isinstance(scale, int) or scale < 2 or scale & (scale - 1):
            raise ValueError(f"`scale` must be a power of 2 (2, 4, 8, 16, ...); got {scale!r}.")
        num_stages = int(math.log2(scale))
        if stage_channels is None:
            stage_channels = [max(16, channels // 2**i) for i in range(num_stages)]
        stage_channels = list(stage_channels)
        if len(stage_channels) != num_stages:
            raise ValueError(
                f"`stage_channels` must have log2(scale) = {num_stages} entries; got {len(stage_channels)}."
            )
        self.head = nn.Conv2d(in_channels, channels, 3, 1, 1)
        self.blocks = nn.ModuleList(
            [TIFBlock(channels, channels, channels, text_dim, fusion) for _ in range(num_blocks)]
        )
        self.stages = nn.ModuleList()
        self.to_rgb = nn.ModuleList()
        width = channels
        for c in stage_channels:
            self.stages.append(TIFBlock(width, c, c, text_dim, fusion, fuse_first=True))
            rgb = nn.Conv2d(c, in_channels, 3, 1, 1)
            nn.init.zeros_(rgb.weight)
            nn.init.zeros_(rgb.bias)
            self.to_rgb.append(rgb)  # each stage starts as the bicubic ×2 of the previous image
            width = c
        self.prompt_predictor = (
            PromptPredictor(in_channels, predictor_channels, predictor_layers) if predictor_channels > 0 else None
        )
        # the embedding of the empty prompt: used when no text is given (set from the text tower in training)
        self.register_buffer("null_text", torch.zeros(text_dim))

    @property
    def scale(self) -> int:
        return self.config.scale

    def set_null_text(self, embedding: Tensor) -> None:
        """Store the text tower's embedding of "" (the no-text condition)."""
        if embedding.shape[-1] != self.config.text_dim:
            raise ValueError(f"`embedding` must have {self.config.text_dim} entries; got {tuple(embedding.shape)}.")
        self.null_text.copy_(embedding.reshape(-1).to(self.null_text))

    def _text(self, text_embeds: Tensor | None, batch: int) -> Tensor | None:
        if not self.config.fusion:
            return None
        if text_embeds is None:
            return self.null_text.expand(batch, -1)
        if text_embeds.ndim == 1:
            text_embeds = text_embeds.expand(batch, -1)
        if text_embeds.ndim != 2 or text_embeds.shape != (batch, self.config.text_dim):
            raise ValueError(
                f"`text_embeds` must be B×{self.config.text_dim} with B = {batch} (or one vector); "
                f"got {tuple(text_embeds.shape)}."
            )
        return text_embeds.to(self.head.weight.dtype)

    def forward(self, lr: Tensor, text_embeds: Tensor | None = None, return_dict: bool = True) -> CLIPSROutput | tuple:
        """Args:
        lr: B×3×h×w in [0, 1].
        text_embeds: B×text_dim sentence embeddings (`embed_prompts`), one vector for all, or None for the
            empty prompt.
        """
        if not isinstance(lr, Tensor) or lr.ndim != 4 or lr.shape[1] != self.config.in_channels:
            shape = tuple(lr.shape) if isinstance(lr, Tensor) else type(lr).__name__
            raise ValueError(f"`lr` must be a B×{self.config.in_channels}×h×w tensor; got {shape}.")
        text = self._text(text_embeds, lr.shape[0])
        h = self.head(lr)
        for block in self.blocks:
            h = block(h, text)
        image, stages = lr, []
        for stage, to_rgb in zip(self.stages, self.to_rgb):
            h = stage(F.interpolate(h, scale_factor=2, mode="nearest"), text)
            image = F.interpolate(image, scale_factor=2, mode="bicubic", align_corners=False) + to_rgb(h)
            stages.append(image)
        if not return_dict:
            return image, stages
        return CLIPSROutput(sample=image, stages=stages)

    @torch.no_grad()
    def super_resolve(self, lr: Tensor, text_embeds: Tensor | None = None) -> Tensor:
        """Inference on whole images: B×3×(h·scale)×(w·scale), clamped to [0, 1]."""
        return self(lr, text_embeds).sample.clamp(0, 1)


@torch.no_grad()
def embed_prompts(encoder, prompts: Sequence[str], cache: dict[str, Tensor] | None = None) -> Tensor:
    """Sentence embeddings (len(prompts)×D, on the encoder's device) of prompts from a `DegradationEncoder`'s
    open_clip text tower, memoised in `cache` when given."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"`prompts` must be a sequence of strings; got {type(prompts).__name__}.")
    cache = {} if cache is None else cache
    missing = sorted({p for p in prompts if p not in cache})
    if missing:
        for p, e in zip(missing, encoder.encode_text(missing).float()):
            cache[p] = e
    return torch.stack([cache[p] for p in prompts])


def swap_prompts(prompts: Sequence[str]) -> list[str]:
    """Each image given another image's prompt: the next one (cyclically) whose prompt differs from its own; its
    own when every prompt is the same."""
    prompts = list(prompts)
    n = len(prompts)
    out = []
    for i, p in enumerate(prompts):
        other = next((prompts[(i + k) % n] for k in range(1, n) if prompts[(i + k) % n] != p), p)
        out.append(other)
    return out


def with_bin(prompt: str, name: str, bin_index: int | None) -> str:
    """`prompt` with the phrase of degradation type `name` set to `bin_index` (None removes it)."""
    bins = vocabulary.labels_to_bins(vocabulary.text_to_labels(prompt))
    vocabulary.type_index(name)
    if bin_index is not None and not 0 <= bin_index < vocabulary.NUM_BINS:
        raise ValueError(f"`bin_index` must be None or in [0, {vocabulary.NUM_BINS}); got {bin_index!r}.")
    bins[name] = bin_index
    return vocabulary.labels_to_text(bins)


__all__ = [
    "CLIPSR",
    "CLIPSROutput",
    "PromptPrediction",
    "PromptPredictor",
    "ResidualTIFBlock",
    "TIFBlock",
    "TextAffine",
    "TextFusion",
    "embed_prompts",
    "labels_to_classes",
    "prediction_loss",
    "swap_prompts",
    "with_bin",
]
