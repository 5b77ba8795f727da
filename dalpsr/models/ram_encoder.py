"""`RAMImageEncoder`: the RAM / DAPE Swin-L image encoder that feeds SeeSR's image cross-attention.

RAM (Zhang et al., "Recognize Anything: A Strong Image Tagging Model", 2023, github.com/xinyu1205/recognize-anything)
encodes a 384 px image with the original Swin-L (embed 192, depths 2-2-18-2, heads 6-12-24-48, window 12),
prepends the mean of the 144 output tokens and projects the 145 tokens with `image_proj` (1536 → 512). SeeSR
(Wu et al., CVPR 2024, github.com/cswry/SeeSR) fine-tunes that Swin with LoRA (DAPE: loralib `MergedLinear`, r=8,
alpha=1, on the q and v slices of every `qkv`) and feeds the 145 × 512 embeddings of the LR image to the
`image_attentions` of its UNet and ControlNet.

Here the Swin is timm's `SwinTransformer` (the `swin_large_patch4_window12_384` architecture); RAM checkpoints
are converted with timm's filter for original-Swin keys and DAPE is merged into the `qkv` weights
(`dalpsr.loaders.seesr`). Differences: no tagging head (the MLLM caption replaces RAM's tags); `encode` takes
RGB in [0, 1] at any size and resizes it bilinearly without antialiasing to the input size, as SeeSR's
torchvision-0.15 `Resize` does on tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RAMImageEncoder(ModelMixin, ConfigMixin):
    r"""Swin image encoder + mean token + linear projection (RAM's `visual_encoder` and `image_proj`).

    Args:
        image_size: input size in pixels (square); 384 for RAM.
        patch_size: Swin patch size.
        embed_dim: Swin width of the first stage (192 for Swin-L).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window.
        mlp_ratio: Swin MLP expansion.
        projection_dim: width of the output embeddings (512: SeeSR's `image_cross_attention_dim`).
        image_mean: per-channel normalisation mean (ImageNet).
        image_std: per-channel normalisation std (ImageNet).
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 384,
        patch_size: int = 4,
        embed_dim: int = 192,
        depths: tuple[int, ...] = (2, 2, 18, 2),
        num_heads: tuple[int, ...] = (6, 12, 24, 48),
        window_size: int = 12,
        mlp_ratio: float = 4.0,
        projection_dim: int = 512,
        image_mean: tuple[float, float, float] = IMAGENET_MEAN,
        image_std: tuple[float, float, float] = IMAGENET_STD,
    ):
        super().__init__()
        from timm.models.swin_transformer import SwinTransformer

        if len(depths) != len(num_heads):
            raise ValueError(f"`depths` {depths} and `num_heads` {num_heads} must have the same length.")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"`image_mean` and `image_std` need 3 values; got {image_mean}, {image_std}.")
        self.visual_encoder = SwinTransformer(
            img_size=image_size,
            patch_size=patch_size,
            in_chans=3,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_path_rate=0.0,
        )
        self.image_proj = nn.Linear(self.visual_encoder.num_features, projection_dim)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> RAMImageEncoder:
        """diffusers' `from_pretrained`, always with `low_cpu_mem_usage=False`.

        timm's Swin computes its attention masks and relative-position indices as non-persistent buffers in
        `__init__`; an empty-weights (meta) init would leave them unset, as no checkpoint holds them.
        """
        kwargs["low_cpu_mem_usage"] = False
        kwargs.pop("device_map", None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def num_tokens(self) -> int:
        """Output tokens per image: the final Swin grid plus the mean token (145 for RAM)."""
        grid = self.config.image_size // self.config.patch_size // 2 ** (len(self.config.depths) - 1)
        return grid * grid + 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Embed normalised images.

        Args:
            pixel_values: B×3×S×S, normalised with `image_mean` / `image_std`, S = `image_size`.

        Returns:
            B × num_tokens × projection_dim: the projected mean token followed by the projected Swin tokens.
        """
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"`pixel_values` must have shape (B, 3, {size}, {size}); got {tuple(pixel_values.shape)}.")
        features = self.visual_encoder.forward_features(pixel_values)  # B×h×w×C (timm: channels last)
        tokens = features.flatten(1, 2)  # B×L×C
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # B×(1+L)×C
        return self.image_proj(tokens)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] (B×3×H×W, any size) → resized to `image_size` and normalised, in the encoder's dtype."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"`images` must be a B×3×H×W tensor in [0, 1]; got {shape}.")
        size = self.config.image_size
        x = images.to(device=self.device, dtype=torch.float32)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        mean = torch.tensor(self.config.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings for SeeSR's image cross-attention from RGB images in [0, 1] (B×3×H×W, any size)."""
        return self(self.preprocess(images))
