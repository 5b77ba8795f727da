"""Restoration prompt decoder: degradation tokens → one logit per (degradation type, severity bin).

After the restoration prompt alignment decoder of DaLPSR: queries are the vocabulary's candidate
degradation phrases ("Deblur with sigma 0.50~0.75", ...) embedded once by the CLIP text tower; N layers of
cross-attention to the image's fine-grained degradation tokens plus an FFN turn each query into one logit.
Differences: pre-norm layers with a learned per-candidate query offset; the candidate embeddings are a
saved buffer, so inference needs no text tower; decoding reports a type when its bins' probabilities
sum to a threshold (the bins of a type exclude each other, so their sum estimates "present"; a model unsure
between neighbouring bins still reports the type) and then names its most probable bin, else "none".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from dalpsr.degradations import vocabulary


@dataclass
class DegradationPrediction:
    """Output of `RestorationPromptDecoder.decode` for a batch of B images.

    Attributes:
        prompts: degradation prompt text per image ("" when nothing is detected).
        bins: per image, {type name: chosen bin index or None}.
        labels: B×NUM_TYPES×NUM_BINS multi-hot tensor of the chosen bins.
        probabilities: B×NUM_TYPES×NUM_BINS sigmoid probabilities.
        logits: B×NUM_TYPES×NUM_BINS raw logits.
        evidence: per image, {type name: what decided its line} for the types set by `with_evidence` (the
            others come from the learned estimator).
    """

    prompts: list[str]
    bins: list[dict[str, int | None]]
    labels: torch.Tensor
    probabilities: torch.Tensor
    logits: torch.Tensor
    evidence: list[dict[str, str]] | None = None

    def with_evidence(self, index: int, name: str, value: float | None, evidence: str) -> DegradationPrediction:
        """A copy whose type `name` of image `index` is set from a label `value` read elsewhere (e.g. a JPEG
        quality from the file's tables) instead of the estimator; `evidence` says where it was read."""
        t = vocabulary.type_index(name)
        b = vocabulary.value_to_bin(name, value)
        labels = self.labels.clone()
        labels[index, t] = 0.0
        if b is not None:
            labels[index, t, b] = 1.0
        bins = [dict(item) for item in self.bins]
        bins[index][name] = b
        prompts = list(self.prompts)
        prompts[index] = vocabulary.labels_to_text(labels[index])
        found = [dict(item) for item in self.evidence] if self.evidence else [{} for _ in self.prompts]
        found[index][name] = evidence
        return replace(self, prompts=prompts, bins=bins, labels=labels, evidence=found)

    def report(self, index: int = 0) -> dict:
        """JSON-ready report of image `index`: per type the bin, its text, the estimator's bin probabilities, and
        the evidence the line comes from (`source` "file" or "estimator", `evidence` in words)."""
        types = {}
        found = self.evidence[index] if self.evidence else {}
        for t, dtype in enumerate(vocabulary.TYPES):
            b = self.bins[index][dtype.name]
            probabilities = [round(float(p), 4) for p in self.probabilities[index, t]]
            estimated = f"learned estimator: summed bin probability {sum(probabilities):.2f}"
            types[dtype.name] = {
                "bin": b,
                "text": dtype.phrase(b) if b is not None else "none",
                "probabilities": probabilities,
                "source": "file" if dtype.name in found else "estimator",
                "evidence": found.get(dtype.name, estimated),
            }
        return {"prompt": self.prompts[index], "types": types}


class CrossAttentionLayer(nn.Module):
    """Pre-norm cross-attention (queries → degradation tokens) followed by a pre-norm FFN."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(tokens)
        queries = queries + self.attn(self.norm_q(queries), kv, kv, need_weights=False)[0]
        return queries + self.ffn(self.norm_ffn(queries))


class RestorationPromptDecoder(ModelMixin, ConfigMixin):
    """Cross-attention decoder from degradation tokens to per-(type, bin) logits.

    Args:
        embed_dim: D, the CLIP embedding size (text embeddings and degradation tokens).
        hidden_dim: width of the decoder layers.
        num_layers: number of cross-attention + FFN layers.
        num_heads: attention heads.
        mlp_ratio: FFN hidden size / `hidden_dim`.
        dropout: dropout in attention and FFN.
        threshold: default decision threshold of `decode` on the summed bin probabilities of a type.
        candidate_phrases: the vocabulary the decoder was trained on; None takes the current
            `CANDIDATE_PHRASES`. A saved decoder whose phrases differ from the installed vocabulary refuses to load.
    """

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 512,
        hidden_dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        threshold: float = 0.5,
        candidate_phrases: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        phrases = list(vocabulary.CANDIDATE_PHRASES)
        if candidate_phrases is not None and list(candidate_phrases) != phrases:
            raise ValueError(
                f"`candidate_phrases` {list(candidate_phrases)} differ from the installed vocabulary {phrases}; "
                "this decoder was trained on another degradation vocabulary."
            )
        self.register_to_config(candidate_phrases=phrases)
        if hidden_dim % num_heads:
            raise ValueError(f"`hidden_dim` ({hidden_dim}) must be divisible by `num_heads` ({num_heads}).")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1); got {threshold}.")
        n = len(phrases)
        self.register_buffer("candidate_embeds", torch.zeros(n, embed_dim))
        self.query_proj = nn.Linear(embed_dim, hidden_dim)
        # learned per-candidate queries start random, as DETR's; they keep the queries distinct even when the
        # text embeddings are nearly equal (a text tower trained from scratch). A zero start learned as well in a
        # 1200-step ablation on the `balanced` data, so this is a choice, not a fix.
        self.query_offset = nn.Parameter(torch.randn(n, hidden_dim))
        self.token_proj = nn.Linear(embed_dim, hidden_dim)
        self.layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, 1)

    @torch.no_grad()
    def set_candidate_embeddings(self, embeds: torch.Tensor) -> None:
        """Store the CLIP text embeddings of `CANDIDATE_PHRASES` (NUM_TYPES·NUM_BINS × D, in that order)."""
        expected = tuple(self.candidate_embeds.shape)
        if not isinstance(embeds, torch.Tensor) or tuple(embeds.shape) != expected:
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"`embeds` must have shape {expected} (one row per candidate phrase); got {got}.")
        self.candidate_embeds.copy_(F.normalize(embeds.float(), dim=-1))

    @torch.no_grad()
    def encode_candidates(self, degradation_encoder) -> None:
        """Embed `CANDIDATE_PHRASES` once with the encoder's CLIP text tower and store them."""
        embeds = degradation_encoder.encode_text(list(self.config.candidate_phrases), normalize=True)
        self.set_candidate_embeddings(embeds.to(self.candidate_embeds.device))

    def forward(self, degradation_tokens: torch.Tensor) -> torch.Tensor:
        """Logits B×NUM_TYPES×NUM_BINS from degradation tokens B×K×D."""
        d = self.config.embed_dim
        if (
            not isinstance(degradation_tokens, torch.Tensor)
            or degradation_tokens.ndim != 3
            or degradation_tokens.shape[-1] != d
        ):
            got = (
                tuple(degradation_tokens.shape)
                if isinstance(degradation_tokens, torch.Tensor)
                else type(degradation_tokens).__name__
            )
            raise ValueError(f"`degradation_tokens` must be B×K×{d}; got {got}.")
        if not bool(self.candidate_embeds.abs().sum() > 0):
            raise ValueError(
                "The candidate phrase embeddings are not set: call `encode_candidates(degradation_encoder)` "
                "(or `set_candidate_embeddings`) before use."
            )
        b = degradation_tokens.shape[0]
        tokens = self.token_proj(degradation_tokens.to(self.dtype))
        queries = (self.query_proj(self.candidate_embeds.to(self.dtype)) + self.query_offset).expand(b, -1, -1)
        for layer in self.layers:
            queries = layer(queries, tokens)
        logits = self.head(self.norm_out(queries)).squeeze(-1)  # B×(T·Bn)
        return logits.view(b, *vocabulary.LABEL_SHAPE)

    @torch.no_grad()
    def decode(self, features, threshold: float | None = None) -> DegradationPrediction:
        """Per image: per type the chosen bin or none, the prompt text and the probabilities.

        Args:
            features: `DegradationFeatures` from `DegradationEncoder` or degradation tokens B×K×D.
            threshold: a type is reported when the probabilities of its bins sum to at least this (default:
                config `threshold`).
        """
        tokens = getattr(features, "degradation_tokens", features)
        threshold = self.config.threshold if threshold is None else float(threshold)
        logits = self(tokens).float()
        probs = torch.sigmoid(logits)
        return prediction_from_probabilities(probs, threshold, logits)


def prediction_from_probabilities(
    probabilities: torch.Tensor, threshold: float = 0.5, logits: torch.Tensor | None = None
) -> DegradationPrediction:
    """Decode B×NUM_TYPES×NUM_BINS probabilities: per type the argmax bin if the bins sum to `threshold`."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"`threshold` must be in (0, 1); got {threshold}.")
    index = probabilities.argmax(dim=-1)
    labels = torch.zeros_like(probabilities)
    present = probabilities.sum(dim=-1) >= threshold
    labels.scatter_(-1, index.unsqueeze(-1), present.unsqueeze(-1).to(labels.dtype))
    labels = labels.cpu()
    return DegradationPrediction(
        prompts=vocabulary.batch_labels_to_text(labels),
        bins=[vocabulary.labels_to_bins(lab) for lab in labels],
        labels=labels,
        probabilities=probabilities.cpu(),
        logits=(logits if logits is not None else torch.logit(probabilities.clamp(1e-6, 1 - 1e-6))).cpu(),
    )


def _classes(labels: torch.Tensor) -> torch.Tensor:
    """B×T×Bn multi-hot → B×T class ids: 0 = absent, 1 + bin otherwise."""
    labels = torch.as_tensor(labels).float()
    if labels.ndim != 3 or tuple(labels.shape[1:]) != vocabulary.LABEL_SHAPE:
        raise ValueError(f"labels must be B×{vocabulary.NUM_TYPES}×{vocabulary.NUM_BINS}; got {tuple(labels.shape)}.")
    return torch.where(labels.amax(-1) > 0.5, labels.argmax(-1) + 1, torch.zeros_like(labels[..., 0], dtype=torch.long))


def degradation_metrics(predicted: torch.Tensor, target: torch.Tensor) -> dict:
    """Per-type detection accuracy/precision/recall/F1, bin accuracy, mean absolute bin error, confusion matrix.

    Args:
        predicted: B×NUM_TYPES×NUM_BINS multi-hot predictions (e.g. `DegradationPrediction.labels`).
        target: B×NUM_TYPES×NUM_BINS multi-hot ground truth.

    Returns:
        {"n": B, "types": {name: {...}}, "mean": {...}}. Per type: `bin_accuracy` is exact agreement over the
        classes (none, bin 0, ..., bin Bn-1); `bin_mae` averages |bin error| where both say present (None if
        never); `confusion` rows are true classes, columns predicted ones, in that class order;
        `majority_*` are the scores of always answering the most frequent true class.
    """
    p, t = _classes(predicted), _classes(target)
    if p.shape != t.shape:
        raise ValueError(f"`predicted` and `target` differ in shape: {tuple(p.shape)} vs {tuple(t.shape)}.")
    n_classes = vocabulary.NUM_BINS + 1
    out: dict = {
        "n": int(t.shape[0]),
        "classes": ["none"] + [f"bin{b}" for b in range(vocabulary.NUM_BINS)],
        "types": {},
    }
    for i, name in enumerate(vocabulary.TYPE_NAMES):
        pi, ti = p[:, i], t[:, i]
        conf = torch.bincount(ti * n_classes + pi, minlength=n_classes**2).view(n_classes, n_classes)
        pd, td = pi > 0, ti > 0
        tp, fp, fn = int((pd & td).sum()), int((pd & ~td).sum()), int((~pd & td).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        both = pd & td
        counts = torch.bincount(ti, minlength=n_classes)
        majority = int(counts.argmax())
        out["types"][name] = {
            "detection_accuracy": float((pd == td).float().mean()),
            "detection_precision": precision,
            "detection_recall": recall,
            "detection_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "bin_accuracy": float((pi == ti).float().mean()),
            "bin_mae": float((pi[both] - ti[both]).abs().float().mean()) if bool(both.any()) else None,
            "majority_class": out["classes"][majority],
            "majority_bin_accuracy": float(counts[majority]) / max(1, int(t.shape[0])),
            "majority_detection_accuracy": float(max(int(td.sum()), int((~td).sum()))) / max(1, int(t.shape[0])),
            "confusion": conf.tolist(),
        }
    keys = (
        "detection_accuracy",
        "detection_f1",
        "bin_accuracy",
        "majority_bin_accuracy",
        "majority_detection_accuracy",
    )
    out["mean"] = {k: sum(v[k] for v in out["types"].values()) / vocabulary.NUM_TYPES for k in keys}
    return out


def grid_crops(image, size: tuple[int, int], max_crops: int):
    """Up to `max_crops` crops of `size` from a 3×H×W image, spread evenly over it (n×n grid, overlapping
    when the image is not a multiple of `size`); the image itself when it is not larger than `size`."""
    if not isinstance(max_crops, int) or max_crops < 1:
        raise ValueError(f"`max_crops` must be a positive int; got {max_crops!r}.")
    _, h, w = image.shape
    th, tw = size
    if h <= th and w <= tw:
        return image.unsqueeze(0)
    per_side = max(1, math.isqrt(max_crops))
    rows = min(per_side, math.ceil(h / th)) if h > th else 1
    cols = min(per_side, math.ceil(w / tw)) if w > tw else 1
    tops = torch.linspace(0, max(0, h - th), rows).round().long().tolist()
    lefts = torch.linspace(0, max(0, w - tw), cols).round().long().tolist()
    return torch.stack([image[:, t : t + min(th, h), left : left + min(tw, w)] for t in tops for left in lefts])


def describe_image(encoder, decoder, image, max_crops: int = 16, threshold: float | None = None, jpeg=None):
    """`DegradationPrediction` of one 3×H×W image in [0, 1]: bin probabilities averaged over a grid of crops.

    An encoder with `resize_mode="crop"` sees one centre crop of its input size; a larger image is read
    through up to `max_crops` crops instead, so the report covers the whole image rather than its centre.
    `jpeg`, the `JpegQuality` read from the file's tables (`dalpsr.degradations.jpeg_tables`), decides the jpeg
    line when given: what the file says comes before the estimate.
    """
    threshold = decoder.config.threshold if threshold is None else float(threshold)
    crops = image.unsqueeze(0)
    if encoder.config.resize_mode == "crop":
        crops = grid_crops(image, encoder.image_size, max_crops)
    with torch.no_grad():
        logits = decoder(encoder.encode_images(crops.to(encoder.device)).degradation_tokens).float()
    prediction = prediction_from_probabilities(torch.sigmoid(logits).mean(0, keepdim=True), threshold)
    if jpeg is not None:
        prediction = prediction.with_evidence(0, "jpeg", jpeg.quality, jpeg.describe())
    return prediction
