"""Degradation-feature fusion for DAT: `FusionBlock` and the `DATRestorer` regression SR model.

Adapted from SRCLIP's RealDAT (Bao et al., DePLSR, github.com/XuBao12/DePLSR:
`basicsr/archs/dat_arch.py` `RealDAT`, `basicsr/archs/fusion_blocks.py` `FusionBlock`). As there:
- one fusion block before each residual group of DAT (or before the groups listed in `fusion_layers`);
- the CLIP content embedding (1 token) and the fine-grained degradation tokens (K tokens) are L2-normalised
  and mapped to DAT's width by ONE shared `Linear(D, C) → ReLU → Linear(C, C) → ReLU`;
- in a block, the content token and the degradation tokens each cross-attend to the image tokens, every
  (content, degradation) pair is concatenated into a 2C key/value token, the image tokens cross-attend to
  those pairs, then an MLP; the updated content/degradation tokens feed the next block.

What differs:
- The content/degradation tokens keep a residual connection around their attention to the image (RealDAT
  replaces them by the attention output, so after the first block the encoder's features reach the image
  tokens only through attention weights).
- Both residual branches add to the un-normalised image tokens (RealDAT adds them to the normalised ones)
  and their output layers start at zero, so a fresh block is the identity and `DATRestorer.from_dat`
  reproduces the plain DAT it was built from exactly, until fine-tuned.
- The features come from one pass of the shared `DegradationEncoder` (any embedding width D, any K); the
  LR is brought to the encoder's resolution by the encoder's own `preprocess` (RealDAT stretches it
  bilinearly to 224²), so the prompt decoder and the restorer can share that pass.
- The DAT is `dalpsr.models.dat.DAT` under `dat.` (official key names), driven through its `pre_group`
  hook; attention uses `F.scaled_dot_product_attention`; separate q/k/v projections.
- Tiled inference computes the conditioning once on the whole image and reuses it for every tile.

`fusion="tif"` puts CLIP-SR's text-image fusion block instead (`dalpsr.models.clip_sr.ResidualTIFBlock`, zero-
initialised): the conditioning is then a B×D sentence embedding of a prompt from the shared text tower
(`dalpsr.models.clip_sr.embed_prompts`), so text and degradation features can steer the same backbone.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from dalpsr.models.cdsr import DQABlock, embedding_compressor
from dalpsr.models.clip_sr import ResidualTIFBlock
from dalpsr.models.dat import DAT, PreGroupHook, _DropPath, pad_to_window, tiled_forward
from dalpsr.models.degradation_encoder import DegradationEncoder, DegradationFeatures

logger = logging.getLogger(__name__)

FUSION_TYPES = ("srclip", "dqa", "tif", None)
FEATURE_SOURCES = ("clip", "lpe")
_DAT_ARGS = tuple(n for n in inspect.signature(DAT.__init__).parameters if n != "self")


class FeatureProjection(nn.Sequential):
    """The shared `Linear(D, C) → ReLU → Linear(C, C) → ReLU` map from encoder width D to DAT width C."""

    def __init__(self, context_dim: int, dim: int):
        super().__init__(nn.Linear(context_dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())


class FusionAttention(nn.Module):
    """Multi-head cross-attention: `queries` (B, Nq, q_dim) attend to `context` (B, Nk, kv_dim).

    Args:
        q_dim: query token width.
        kv_dim: context token width.
        inner_dim: query/key width (split over the heads).
        out_dim: value and output width (split over the heads).
        num_heads: heads.
        qkv_bias: bias in the q/k/v projections.
        attn_drop: attention dropout.
        proj_drop: output dropout.
    """

    def __init__(
        self,
        q_dim: int,
        kv_dim: int,
        inner_dim: int,
        out_dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.to_q = nn.Linear(q_dim, inner_dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, out_dim, bias=qkv_bias)
        self.to_out = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        b, nq, _ = queries.shape
        nk = context.shape[1]
        h = self.num_heads
        q = self.to_q(queries).view(b, nq, h, -1).transpose(1, 2)  # B, h, Nq, d
        k = self.to_k(context).view(b, nk, h, -1).transpose(1, 2)  # B, h, Nk, d
        v = self.to_v(context).view(b, nk, h, -1).transpose(1, 2)  # B, h, Nk, dv
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, nq, -1)  # B, Nq, out_dim
        return self.proj_drop(self.to_out(out))


class FusionBlock(nn.Module):
    """Image tokens fuse the content token(s) and the degradation tokens (RealDAT fusion block, zero-init).

    Args:
        dim: token width C (DAT's `embed_dim`).
        num_heads: heads of all three attentions.
        attn_ratio: query/key width of the image→pairs attention, as a fraction of C.
        mlp_ratio: MLP hidden width / C.
        qkv_bias: bias in the q/k/v projections.
        drop: dropout after projections.
        attn_drop: attention dropout.
        drop_path: stochastic depth of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        attn_ratio: float = 1.0,
        mlp_ratio: float = 1.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_content = nn.LayerNorm(dim)
        self.norm_degradation = nn.LayerNorm(dim)
        self.content_attn = FusionAttention(dim, dim, dim, dim, num_heads, qkv_bias, attn_drop, drop)
        self.degradation_attn = FusionAttention(dim, dim, dim, dim, num_heads, qkv_bias, attn_drop, drop)
        self.fuse_attn = FusionAttention(dim, 2 * dim, int(dim * attn_ratio), dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim))
        self.drop_path = _DropPath(drop_path)
        self.reset_output()

    @torch.no_grad()
    def reset_output(self) -> None:
        """Zero both residual branches' output layers: the block becomes the identity on the image tokens."""
        for layer in (self.fuse_attn.to_out, self.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, content: Tensor, degradation: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, C), content (B, Ni, C), degradation (B, Nd, C) -> (x, content, degradation) for the next block."""
        xn = self.norm_x(x)
        content = content + self.content_attn(self.norm_content(content), xn)  # B, Ni, C
        degradation = degradation + self.degradation_attn(self.norm_degradation(degradation), xn)  # B, Nd, C
        ni, nd = content.shape[1], degradation.shape[1]
        pairs = torch.cat(
            [content[:, :, None].expand(-1, -1, nd, -1), degradation[:, None].expand(-1, ni, -1, -1)], dim=-1
        ).flatten(1, 2)  # B, Ni*Nd, 2C
        x = x + self.drop_path(self.fuse_attn(xn, pairs))
        x = x + self.drop_path(self.mlp(self.norm_mlp(x)))
        return x, content, degradation


class DATRestorer(ModelMixin, ConfigMixin):
    """DAT with degradation-feature fusion blocks before its residual groups (SRCLIP RealDAT style).

    Input and output: images in [0, 1], (B, 3, H, W) -> (B, 3, H*scale, W*scale) (not clamped). The
    conditioning is a `DegradationFeatures` from one `DegradationEncoder` pass over the same LR images:
    its `content_embeds` (B×D) and `degradation_tokens` (B×K×D).

    Args:
        dat_config: `DAT` constructor arguments; None: DAT-light ×4 (`DAT.preset_config("dat_light", 4)`).
        context_dim: D, the encoder's embedding width.
        fusion_layers: residual groups that get a fusion block before them; None: all; []: none (plain DAT).
        fusion_num_heads: heads of the fusion attentions (must divide `embed_dim` and its `attn_ratio` part).
        fusion_mlp_ratio: fusion MLP hidden width / `embed_dim`.
        fusion_attn_ratio: query/key width of the image→pairs attention / `embed_dim`.
        fusion_drop_rate: dropout in the fusion blocks.
        fusion_attn_drop_rate: attention dropout in the fusion blocks.
        fusion_drop_path_rate: stochastic depth of the fusion blocks.
        normalize_features: L2-normalise the content embedding and degradation tokens first (as RealDAT).
        fusion: "srclip" (the fusion blocks above), "dqa" (CDSR's Domain Query Attention blocks,
            `dalpsr.models.cdsr.DQABlock`, zero-initialised), "tif" (CLIP-SR text-image fusion blocks fed by a
            B×D prompt embedding, `dalpsr.models.clip_sr.ResidualTIFBlock`, zero-initialised) or None (no fusion:
            plain DAT, whatever `fusion_layers` says).
        feature_source: what feeds the fusion: "clip" (a `DegradationFeatures` of the shared `DegradationEncoder`;
            for "dqa" its L2-normalised content and degradation embeddings concatenated, 2·D wide) or "lpe" (the
            B×D embedding of a `dalpsr.models.cdsr.LightweightPatchEncoder`; "dqa" only).
        dqa_hidden_dim: width of the DQA embedding compressor and of each block's embedding map.
        dqa_compress_layers: Linear → PReLU layers of the DQA embedding compressor (CDSR: 4).
        dqa_kernel_size: DQA kernel edge.
        dqa_reduction: DQA channel-attention ratio.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        dat_config: dict | None = None,
        context_dim: int = 512,
        fusion_layers: Sequence[int] | None = None,
        fusion_num_heads: int = 6,
        fusion_mlp_ratio: float = 1.0,
        fusion_attn_ratio: float = 1.0,
        fusion_drop_rate: float = 0.0,
        fusion_attn_drop_rate: float = 0.0,
        fusion_drop_path_rate: float = 0.0,
        normalize_features: bool = True,
        fusion: str | None = "srclip",
        feature_source: str = "clip",
        dqa_hidden_dim: int = 128,
        dqa_compress_layers: int = 4,
        dqa_kernel_size: int = 3,
        dqa_reduction: int = 2,
    ):
        super().__init__()
        if fusion not in FUSION_TYPES:
            raise ValueError(f"`fusion` must be one of {FUSION_TYPES}; got {fusion!r}.")
        if feature_source not in FEATURE_SOURCES:
            raise ValueError(f"`feature_source` must be one of {FEATURE_SOURCES}; got {feature_source!r}.")
        if fusion == "srclip" and feature_source != "clip":
            raise ValueError(
                f"`feature_source`={feature_source!r} needs `fusion='dqa'`: SRCLIP fusion reads the CLIP encoder's "
                "content embedding and degradation tokens."
            )
        if dat_config is None:
            dat_config = DAT.preset_config("dat_light", 4)
        if not isinstance(dat_config, dict):
            raise TypeError(f"`dat_config` must be a dict of DAT arguments or None; got {type(dat_config).__name__}.")
        unknown = sorted(set(dat_config) - set(_DAT_ARGS))
        if unknown:
            raise ValueError(f"`dat_config` has unknown DAT arguments {unknown}; allowed: {list(_DAT_ARGS)}.")
        if not isinstance(context_dim, int) or context_dim < 1:
            raise ValueError(f"`context_dim` must be a positive int; got {context_dim!r}.")
        self.dat = DAT(**dat_config)
        dim, groups = self.dat.config.embed_dim, len(self.dat.layers)
        layers = list(range(groups)) if fusion_layers is None else list(fusion_layers)
        if fusion is None:
            layers = []
        if any(not isinstance(i, int) or not 0 <= i < groups for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(
                f"`fusion_layers` must be distinct residual-group indices in [0, {groups}); got {fusion_layers!r}."
            )
        inner = int(dim * fusion_attn_ratio)
        if (
            layers
            and fusion == "srclip"
            and (fusion_num_heads < 1 or dim % fusion_num_heads or inner < 1 or inner % fusion_num_heads)
        ):
            raise ValueError(
                f"`fusion_num_heads`={fusion_num_heads} must divide embed_dim={dim} and "
                f"embed_dim*fusion_attn_ratio={inner}."
            )
        self.fusion_groups = sorted(layers)
        if fusion == "tif":
            if feature_source != "clip":
                raise ValueError(
                    f"`feature_source` must be 'clip' (the text tower) for fusion='tif'; got {feature_source!r}."
                )
            self.feature_proj = self.dqa_compress = None
            self.fusion_blocks = nn.ModuleDict({str(i): ResidualTIFBlock(dim, context_dim) for i in layers})
            return
        if fusion == "dqa":
            self.feature_proj = None
            self.dqa_compress = None
            if layers:
                width = 2 * context_dim if feature_source == "clip" else context_dim
                self.dqa_compress = embedding_compressor(width, dqa_hidden_dim, dqa_compress_layers)
            self.fusion_blocks = nn.ModuleDict(
                {
                    str(i): DQABlock(
                        dim, dqa_hidden_dim, dqa_hidden_dim, dqa_kernel_size, dqa_reduction, zero_init=True
                    )
                    for i in self.fusion_groups
                }
            )
            return
        self.dqa_compress = None
        self.feature_proj = FeatureProjection(context_dim, dim) if layers else None
        self.fusion_blocks = nn.ModuleDict(
            {
                str(i): FusionBlock(
                    dim,
                    fusion_num_heads,
                    fusion_attn_ratio,
                    fusion_mlp_ratio,
                    True,
                    fusion_drop_rate,
                    fusion_attn_drop_rate,
                    fusion_drop_path_rate,
                )
                for i in self.fusion_groups
            }
        )

    # ------------------------------------------------------------------------------------------- set-up
    @classmethod
    def from_dat(cls, dat: DAT | str | os.PathLike, context_dim: int = 512, **kwargs) -> DATRestorer:
        """A restorer whose DAT is `dat` (weights copied) and whose fresh fusion blocks are the identity.

        Args:
            dat: a `DAT` or a DAT folder (`DAT.from_pretrained`); official checkpoint files load with
                `dalpsr.loaders.load_dat_checkpoint`.
            context_dim: the encoder's embedding width D.
            kwargs: other `__init__` arguments (fusion settings).
        """
        if not isinstance(dat, DAT):
            dat = DAT.from_pretrained(dat)
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dat.config.items() if k in _DAT_ARGS}
        restorer = cls(dat_config=config, context_dim=context_dim, **kwargs)
        restorer.dat.load_state_dict(dat.state_dict(), strict=True)
        return restorer

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DATRestorer:
        """`ModelMixin.from_pretrained`, accepting weight files saved without DAT's `attn_mask_*` buffers.

        Those shifted-window masks are fixed functions of `img_size`, rebuilt when the model is built, and 34 MB
        in float32 for DAT-light; the shipped weights leave them out. diffusers would report them as "newly
        initialized" weights to train, so its warning is silenced here and any other missing tensor is reported.
        """
        from diffusers.utils import logging as diffusers_logging
        from safetensors import safe_open

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        path = Path(pretrained_model_name_or_path) / kwargs.get("subfolder", "")
        stored: set[str] = set()
        for file in path.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                stored.update(f.keys())
        missing = [k for k in model.state_dict() if k not in stored and ".attn_mask_" not in k]
        if stored and missing:
            logger.warning(f"{path}: these weights are missing and keep their initial values: {missing}")
        return model

    @property
    def scale(self) -> int:
        return self.dat.config.upscale

    @property
    def needs_features(self) -> bool:
        """Whether forward needs degradation features (False for a restorer without fusion blocks)."""
        return bool(self.fusion_groups)

    @property
    def tile_multiple(self) -> int:
        """DAT pads its attention windows to multiples of this edge: tiles of multiples of it waste no compute."""
        return max(self.dat.config.split_size)

    @property
    def tile_square(self) -> bool:
        """False: any tile shape runs."""
        return False

    # ------------------------------------------------------------------------------------- conditioning
    def project_features(self, features: DegradationFeatures, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Normalised, projected (content (B, 1, C), degradation (B, K, C)) tokens; computed once per image.

        Args:
            features: output of `DegradationEncoder`.
            batch_size: expand single-image features to this batch size (None: keep).
        """
        if self.feature_proj is None:
            raise ValueError(
                "This restorer has no SRCLIP fusion blocks (`fusion_layers` is empty, or `fusion` is not 'srclip')."
            )
        content = getattr(features, "content_embeds", None)
        degradation = getattr(features, "degradation_tokens", None)
        if not isinstance(content, Tensor) or not isinstance(degradation, Tensor):
            raise TypeError(
                f"`features` must be a DegradationFeatures with `content_embeds` and `degradation_tokens`; "
                f"got {type(features).__name__}."
            )
        d = self.config.context_dim
        if content.ndim != 2 or degradation.ndim != 3 or content.shape[-1] != d or degradation.shape[-1] != d:
            raise ValueError(
                f"`features` must have content_embeds B×{d} and degradation_tokens B×K×{d} (context_dim); got "
                f"{tuple(content.shape)} and {tuple(degradation.shape)}."
            )
        if content.shape[0] != degradation.shape[0]:
            raise ValueError(
                f"`features` batch sizes differ: {content.shape[0]} content vs {degradation.shape[0]} degradation."
            )
        weight = self.feature_proj[0].weight
        content = content[:, None].to(weight.device, weight.dtype)
        degradation = degradation.to(weight.device, weight.dtype)
        if self.config.normalize_features:
            content, degradation = F.normalize(content, dim=-1), F.normalize(degradation, dim=-1)
        content, degradation = self.feature_proj(content), self.feature_proj(degradation)
        if batch_size is not None and content.shape[0] != batch_size:
            if content.shape[0] != 1:
                raise ValueError(f"`features` are for {content.shape[0]} images but `lr` has {batch_size}.")
            content = content.expand(batch_size, -1, -1)
            degradation = degradation.expand(batch_size, -1, -1)
        return content, degradation

    def dqa_embedding(self, features: DegradationFeatures | Tensor, batch_size: int | None = None) -> Tensor:
        """The compressed DQA embedding (B, dqa_hidden_dim) from CLIP features or an LPE embedding.

        Args:
            features: a `DegradationFeatures` (`feature_source="clip"`) or a B×D LPE embedding ("lpe").
            batch_size: expand single-image features to this batch size (None: keep).
        """
        if self.dqa_compress is None:
            raise ValueError("This restorer has no DQA blocks (`fusion` is not 'dqa' or `fusion_layers` is empty).")
        d = self.config.context_dim
        if self.config.feature_source == "lpe":
            if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[1] != d:
                got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
                raise ValueError(
                    f"`features` must be an LPE embedding B×{d} (context_dim) for feature_source='lpe'; got {got}."
                )
            embedding = features
        else:
            content = getattr(features, "content_embeds", None)
            degradation = getattr(features, "degradation_embeds", None)
            if not isinstance(content, Tensor) or not isinstance(degradation, Tensor):
                raise TypeError(
                    "`features` must be a DegradationFeatures for feature_source='clip'; got "
                    f"{type(features).__name__}."
                )
            if content.ndim != 2 or content.shape != degradation.shape or content.shape[-1] != d:
                raise ValueError(
                    f"`features` must have content_embeds and degradation_embeds B×{d} (context_dim); got "
                    f"{tuple(content.shape)} and {tuple(degradation.shape)}."
                )
            embedding = torch.cat([F.normalize(content, dim=-1), F.normalize(degradation, dim=-1)], dim=-1)
        weight = self.dqa_compress[0].weight
        embedding = self.dqa_compress(embedding.to(weight.device, weight.dtype))
        if batch_size is not None and embedding.shape[0] != batch_size:
            if embedding.shape[0] != 1:
                raise ValueError(f"`features` are for {embedding.shape[0]} images but `lr` has {batch_size}.")
            embedding = embedding.expand(batch_size, -1)
        return embedding

    def _fusion_hook(self, *cond: Tensor) -> PreGroupHook:
        if self.config.fusion in ("dqa", "tif"):
            (embedding,) = cond

            def dqa_hook(group: int, tokens: Tensor, size: tuple[int, int]) -> Tensor:
                if str(group) not in self.fusion_blocks:
                    return tokens
                b, n, c = tokens.shape
                x = tokens.transpose(1, 2).reshape(b, c, *size)  # B, C, H, W
                return self.fusion_blocks[str(group)](x, embedding).flatten(2).transpose(1, 2)

            return dqa_hook
        content, degradation = cond
        state = {"content": content, "degradation": degradation}

        def hook(group: int, tokens: Tensor, size: tuple[int, int]) -> Tensor:
            block = self.fusion_blocks[str(group)] if str(group) in self.fusion_blocks else None
            if block is None:
                return tokens
            tokens, state["content"], state["degradation"] = block(tokens, state["content"], state["degradation"])
            return tokens

        return hook

    def _conditioning(
        self, lr: Tensor, features: DegradationFeatures | None, encoder: DegradationEncoder | None
    ) -> tuple[Tensor, ...] | None:
        if not self.needs_features:
            return None
        if self.config.fusion == "tif":
            d = self.config.context_dim
            if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[1] != d:
                got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
                raise ValueError(
                    f"`features` must be prompt embeddings B×{d} (context_dim) for fusion='tif' "
                    f"(dalpsr.models.clip_sr.embed_prompts); got {got}."
                )
            weight = self.fusion_blocks[str(self.fusion_groups[0])].conv1.weight
            return (features.to(weight.device, weight.dtype).expand(lr.shape[0], -1),)
        if features is None:
            if encoder is None:
                raise ValueError(
                    "`features` is None and no `encoder` was given: this restorer has fusion blocks and needs "
                    "DegradationFeatures of `lr` (pass `features=encoder(encoder.preprocess(lr))` or `encoder=`)."
                )
            with torch.no_grad():
                features = encoder.encode_images(lr.float().clamp(0, 1))
        if self.config.fusion == "dqa":
            return (self.dqa_embedding(features, batch_size=lr.shape[0]),)
        return self.project_features(features, batch_size=lr.shape[0])

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        lr: Tensor,
        features: DegradationFeatures | None = None,
        encoder: DegradationEncoder | None = None,
    ) -> Tensor:
        """Super-resolve LR images.

        Args:
            lr: (B, 3, H, W) in [0, 1].
            features: `DegradationFeatures` of `lr` (one encoder pass shared with other consumers), batch B or 1;
                ignored when the restorer has no fusion blocks.
            encoder: used to compute `features` when they are None (no gradient through it).

        Returns:
            (B, 3, H*scale, W*scale), unclamped.
        """
        cond = self._conditioning(lr, features, encoder)
        return self.dat(lr, None if cond is None else self._fusion_hook(*cond))

    @torch.no_grad()
    def super_resolve(
        self,
        lr: Tensor,
        features: DegradationFeatures | None = None,
        encoder: DegradationEncoder | None = None,
        tile_size: int | tuple[int, int] | None = None,
        tile_overlap: int = 16,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Inference: the conditioning is computed once on the whole images, then DAT runs in overlapping tiles
        (linear blending, see `dalpsr.models.dat.tiled_forward`), optionally under fp16/bf16 autocast.

        Args:
            lr: (B, 3, H, W) in [0, 1], on the model's device.
            features: see `forward`.
            encoder: see `forward`.
            tile_size: input tile edge or (height, width); None runs whole images.
            tile_overlap: input pixels over which neighbouring tiles are blended.
            dtype: `torch.float16` / `torch.bfloat16` autocast, None for the input dtype.

        Returns:
            (B, 3, H*scale, W*scale) in `lr`'s dtype, unclamped. Inputs smaller than DAT's attention window are
            padded to it and the output cropped (`dalpsr.models.dat.pad_to_window`).
        """
        cond = self._conditioning(lr, features, encoder)  # on the unpadded images

        def run(tile: Tensor) -> Tensor:
            return self.dat(tile) if cond is None else self.dat(tile, self._fusion_hook(*cond))

        window = max(self.dat.config.split_size)
        return pad_to_window(
            lambda x: tiled_forward(run, x, self.scale, tile_size, tile_overlap, dtype), lr, self.scale, window
        )


__all__ = ["DATRestorer", "FeatureProjection", "FusionAttention", "FusionBlock"]
