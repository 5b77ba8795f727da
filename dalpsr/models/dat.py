"""DAT: Dual Aggregation Transformer for image super-resolution.

Adapted from Chen et al., "Dual Aggregation Transformer for Image Super-Resolution" (ICCV 2023),
https://github.com/zhengchen1999/DAT (`basicsr/archs/dat_arch.py`). The architecture, the
hyperparameters of the released models and the state-dict key names are the paper's, so the official
checkpoints (`{"params": ...}`) load strictly into `DAT`. What differs from the reference code:

- `DAT` is a diffusers `ModelMixin` + `ConfigMixin`; `act_layer` / `norm_layer` are fixed to GELU /
  LayerNorm (the only values ever used) so the config stays JSON; `use_chk` switches on diffusers'
  gradient checkpointing (`enable_gradient_checkpointing`), per block.
- Fewer copies in the window attention (in-place bias/mask addition, windows partitioned once for q, k
  and v); shift masks for input sizes other than `img_size` are cached per size instead of being rebuilt
  on every forward.
- `forward` takes an optional `pre_group` hook that may rewrite the token sequence before each residual
  group: the extension point for degradation-feature fusion (see `DAT.forward_features`).
- `tiled_forward` / `DAT.super_resolve` run large inputs in overlapping tiles with linear blending (the
  shared engine `dalpsr.tiling.tiled_map`), optionally under fp16/bf16 autocast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from dalpsr.tiling import tiled_map

PreGroupHook = Callable[[int, Tensor, tuple[int, int]], Tensor]
"""`hook(group_index, tokens, (height, width)) -> tokens`, tokens of shape (B, H*W, C)."""

_RGB_MEAN = (0.4488, 0.4371, 0.4040)
_MASK_VALUE = -100.0

DAT_PRESETS: dict[str, dict] = {
    "dat": {
        "embed_dim": 180,
        "depth": [6, 6, 6, 6, 6, 6],
        "num_heads": [6, 6, 6, 6, 6, 6],
        "split_size": [8, 32],
        "expansion_factor": 4.0,
        "resi_connection": "1conv",
        "upsampler": "pixelshuffle",
    },
    "dat_s": {
        "embed_dim": 180,
        "depth": [6, 6, 6, 6, 6, 6],
        "num_heads": [6, 6, 6, 6, 6, 6],
        "split_size": [8, 16],
        "expansion_factor": 2.0,
        "resi_connection": "1conv",
        "upsampler": "pixelshuffle",
    },
    "dat_2": {
        "embed_dim": 180,
        "depth": [6, 6, 6, 6, 6, 6],
        "num_heads": [6, 6, 6, 6, 6, 6],
        "split_size": [8, 32],
        "expansion_factor": 2.0,
        "resi_connection": "1conv",
        "upsampler": "pixelshuffle",
    },
    "dat_light": {
        "embed_dim": 60,
        "depth": [18],
        "num_heads": [6],
        "split_size": [8, 32],
        "expansion_factor": 2.0,
        "resi_connection": "3conv",
        "upsampler": "pixelshuffledirect",
    },
}
"""Architectures of the released models (`options/Test/test_DAT*_x{2,3,4}.yml`); all use img_size 64."""

_PRESET_ALIASES = {"dat-s": "dat_s", "dat-2": "dat_2", "dat-light": "dat_light"}


def _tokens_to_image(x: Tensor, h: int, w: int) -> Tensor:
    # (B, H*W, C) -> (B, C, H, W)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def _image_to_tokens(x: Tensor) -> Tensor:
    # (B, C, H, W) -> (B, H*W, C)
    return x.flatten(2).transpose(1, 2)


def _is_shifted(group_index: int, block_index: int) -> bool:
    """Which spatial blocks use shifted windows (blocks 2, 6, 10.. in even groups, 0, 4, 8.. in odd ones)."""
    if group_index % 2 == 0:
        return block_index > 0 and (block_index - 2) % 4 == 0
    return block_index % 4 == 0


def _window_partition(x: Tensor, wh: int, ww: int) -> Tensor:
    # (..., H, W, C) -> (..., nW, wh*ww, C), windows in row-major order
    *lead, h, w, c = x.shape
    x = x.reshape(*lead, h // wh, wh, w // ww, ww, c).transpose(-4, -3)
    return x.reshape(*lead, (h // wh) * (w // ww), wh * ww, c)


def _window_merge(x: Tensor, wh: int, ww: int, h: int, w: int) -> Tensor:
    # (..., nW, wh*ww, C) -> (..., H, W, C)
    *lead, _, _, c = x.shape
    x = x.reshape(*lead, h // wh, w // ww, wh, ww, c).transpose(-4, -3)
    return x.reshape(*lead, h, w, c)


def shift_window_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> Tensor:
    """Additive mask (nW, N, N) that keeps shifted windows from attending across the wrap-around seam."""

    def bands(size: int, win: int, sh: int) -> Tensor:
        labels = torch.zeros(size, dtype=torch.long)
        labels[size - win :] = 1
        labels[size - sh :] = 2
        return labels

    rows = bands(height, window[0], shift[0])
    cols = bands(width, window[1], shift[1])
    regions = (rows[:, None] * 3 + cols[None, :])[..., None]  # H, W, 1
    regions = _window_partition(regions, *window).squeeze(-1)  # nW, N
    differ = regions[:, None, :] != regions[:, :, None]
    return torch.zeros(differ.shape).masked_fill(differ, _MASK_VALUE)


def pad_to_window(fn: Callable[[Tensor], Tensor], image: Tensor, scale: int, window: int) -> Tensor:
    """`fn(image)` for an image shorter than the attention window on a side: padded on both ends of that side to
    `window` by reflection (replication where the side is too short to reflect), run, and the output cropped back to
    `H*scale × W*scale`.

    DAT zero-pads its windows internally (as the official code) and its convolutions zero-pad the borders, which bend
    the outermost ~3 input pixels; on an input of a few pixels that is all of it (a 1×1 (200, 10, 10) came out about
    (117, 99, 87)). Centred in a padded window, the image is away from both.
    """
    h, w = image.shape[-2:]
    if h >= window and w >= window:
        return fn(image)
    x, box = image, []
    for dim, size in ((-1, w), (-2, h)):
        total = max(0, window - size)
        before, after = total // 2, total - total // 2
        if total:
            sides = (before, after, 0, 0) if dim == -1 else (0, 0, before, after)
            x = F.pad(x, sides, mode="reflect" if after < size else "replicate")
        box.append(slice(before * scale, (before + size) * scale))
    return fn(x)[..., box[1], box[0]]


class _DropPath(nn.Module):
    """Stochastic depth on the residual branch (identity in eval mode)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)


class _ToTokens(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _image_to_tokens(x)


class SpatialGate(nn.Module):
    """SGFN gate: second half of the channels, normalised and depth-wise convolved, gates the first half."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        x2 = _image_to_tokens(self.conv(_tokens_to_image(self.norm(x2), h, w)))
        return x1 * x2


class SGFN(nn.Module):
    """Spatial-gate feed-forward network."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.sg = SpatialGate(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        x = self.drop(self.sg(x, h, w))
        return self.drop(self.fc2(x))


class DynamicPosBias(nn.Module):
    """MLP from a relative offset (dy, dx) to one bias per head."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.pos_dim = dim // 4
        self.pos_proj = nn.Linear(2, self.pos_dim)
        self.pos1 = nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(), nn.Linear(self.pos_dim, self.pos_dim))
        self.pos2 = nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(), nn.Linear(self.pos_dim, self.pos_dim))
        self.pos3 = nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(), nn.Linear(self.pos_dim, num_heads))

    def forward(self, offsets: Tensor) -> Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (wh, ww) windows with a dynamic relative-position bias.

    Args:
        dim: channels of this branch.
        num_heads: heads of this branch.
        window: window (height, width).
        qk_scale: overrides `head_dim ** -0.5`.
        attn_drop: attention dropout.
    """

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int], qk_scale: float | None, attn_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        wh, ww = window
        self.pos = DynamicPosBias(dim // 4, num_heads)
        dy, dx = torch.meshgrid(torch.arange(1 - wh, wh), torch.arange(1 - ww, ww), indexing="ij")
        self.register_buffer("rpe_biases", torch.stack([dy.flatten(), dx.flatten()], dim=1).float())
        ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        index = (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)
        self.register_buffer("relative_position_index", index)

    def position_bias(self) -> Tensor:
        """(heads, N, N) bias, N = wh * ww."""
        n = self.window[0] * self.window[1]
        table = self.pos(self.rpe_biases)  # (2wh-1)(2ww-1), heads
        return table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, qkv: Tensor, mask: Tensor | None = None) -> Tensor:
        """qkv: (3, B, H, W, C) with H, W multiples of the window; mask: (nW, N, N) or None -> (B, H, W, C)."""
        _, b, h, w, c = qkv.shape
        wh, ww = self.window
        windows = _window_partition(qkv, wh, ww)  # 3, B, nW, N, C
        n_win, n = windows.shape[2], windows.shape[3]
        windows = windows.reshape(3, b, n_win, n, self.num_heads, c // self.num_heads).transpose(3, 4)
        q, k, v = windows.unbind(0)  # B, nW, heads, N, d
        attn = (q * self.scale) @ k.transpose(-2, -1)  # B, nW, heads, N, N
        attn += self.position_bias()
        if mask is not None:
            attn += mask[:, None]
        attn = F.dropout(attn.softmax(dim=-1), self.attn_drop, self.training)
        out = attn @ v  # B, nW, heads, N, d
        out = out.transpose(2, 3).reshape(b, n_win, n, c)
        return _window_merge(out, wh, ww, h, w)


class _AdaptiveInteraction(nn.Module):
    """Shared parts of both attention kinds: the conv branch and the two interaction maps (AIM)."""

    def _build_interaction(self, dim: int) -> None:
        self.dwconv = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.BatchNorm2d(dim), nn.GELU())
        self.channel_interaction = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, dim // 8, 1),
            nn.BatchNorm2d(dim // 8),
            nn.GELU(),
            nn.Conv2d(dim // 8, dim, 1),
        )
        self.spatial_interaction = nn.Sequential(
            nn.Conv2d(dim, dim // 16, 1), nn.BatchNorm2d(dim // 16), nn.GELU(), nn.Conv2d(dim // 16, 1, 1)
        )


class AdaptiveSpatialAttention(_AdaptiveInteraction):
    """Dual spatial window attention (two rectangular window orientations on two channel halves) + AIM.

    Args:
        dim: channels.
        num_heads: heads (split evenly over the two branches).
        reso: `img_size`; the shift masks for that size are stored as buffers, as in the official model.
        split_size: window (height, width) of the first branch; the second uses it transposed.
        qkv_bias: bias in the qkv projection.
        qk_scale: overrides `head_dim ** -0.5`.
        drop: output dropout.
        attn_drop: attention dropout.
        shifted: shift the windows by half a window.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        reso: int,
        split_size: tuple[int, int],
        qkv_bias: bool,
        qk_scale: float | None,
        drop: float,
        attn_drop: float,
        shifted: bool,
    ):
        super().__init__()
        s0, s1 = split_size
        self.split_size = (s0, s1)
        self.shifted = shifted
        self.reso = reso
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.attns = nn.ModuleList(
            [
                WindowAttention(dim // 2, num_heads // 2, (s0, s1), qk_scale, attn_drop),
                WindowAttention(dim // 2, num_heads // 2, (s1, s0), qk_scale, attn_drop),
            ]
        )
        if shifted:
            mask_0, mask_1 = self._masks(reso, reso)
            self.register_buffer("attn_mask_0", mask_0)
            self.register_buffer("attn_mask_1", mask_1)
        else:
            self.attn_mask_0 = None
            self.attn_mask_1 = None
        self._mask_cache: tuple[tuple, tuple[Tensor, Tensor]] | None = None
        self._build_interaction(dim)

    def _masks(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        s0, s1 = self.split_size
        return (
            shift_window_mask(h, w, (s0, s1), (s0 // 2, s1 // 2)),
            shift_window_mask(h, w, (s1, s0), (s1 // 2, s0 // 2)),
        )

    def _masks_for(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if h == self.reso and w == self.reso:
            return self.attn_mask_0, self.attn_mask_1
        key = (h, w, device)
        if self._mask_cache is None or self._mask_cache[0] != key:
            m0, m1 = self._masks(h, w)
            self._mask_cache = (key, (m0.to(device), m1.to(device)))
        return self._mask_cache[1]

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        half = c // 2
        s0, s1 = self.split_size
        qkv = self.qkv(x)  # B, L, 3C
        v = _tokens_to_image(qkv[..., 2 * c :], h, w)
        step = max(s0, s1)
        pad_h, pad_w = (-h) % step, (-w) % step
        qkv = qkv.view(b, h, w, 3, c).permute(3, 0, 1, 2, 4)  # 3, B, H, W, C
        if pad_h or pad_w:
            qkv = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        qkv_0, qkv_1 = qkv[..., :half], qkv[..., half:]
        if self.shifted:
            mask_0, mask_1 = self._masks_for(hp, wp, x.device)
            qkv_0 = torch.roll(qkv_0, shifts=(-(s0 // 2), -(s1 // 2)), dims=(2, 3))
            qkv_1 = torch.roll(qkv_1, shifts=(-(s1 // 2), -(s0 // 2)), dims=(2, 3))
            x0 = torch.roll(self.attns[0](qkv_0, mask_0), shifts=(s0 // 2, s1 // 2), dims=(1, 2))
            x1 = torch.roll(self.attns[1](qkv_1, mask_1), shifts=(s1 // 2, s0 // 2), dims=(1, 2))
        else:
            x0 = self.attns[0](qkv_0)
            x1 = self.attns[1](qkv_1)
        attended = torch.cat([x0[:, :h, :w], x1[:, :h, :w]], dim=-1).reshape(b, n, c)

        conv_x = self.dwconv(v)  # B, C, H, W
        channel_map = self.channel_interaction(conv_x).view(b, 1, c)
        spatial_map = self.spatial_interaction(_tokens_to_image(attended, h, w))  # B, 1, H, W
        attended = attended * torch.sigmoid(channel_map)
        conv_x = _image_to_tokens(torch.sigmoid(spatial_map) * conv_x)
        return self.proj_drop(self.proj(attended + conv_x))


class AdaptiveChannelAttention(_AdaptiveInteraction):
    """Transposed (channel-wise) self-attention with a learnable temperature + AIM.

    Args:
        dim: channels.
        num_heads: heads.
        qkv_bias: bias in the qkv projection.
        attn_drop: attention dropout.
        proj_drop: output dropout.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._build_interaction(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)  # B, heads, d, N
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1))
        attended = (attn @ v).reshape(b, c, n)  # B, C, N

        conv_x = self.dwconv(v.reshape(b, c, h, w))
        channel_map = self.channel_interaction(attended.view(b, c, h, w))  # B, C, 1, 1
        spatial_map = self.spatial_interaction(conv_x).view(b, n, 1)
        attended = attended.transpose(1, 2) * torch.sigmoid(spatial_map)
        conv_x = _image_to_tokens(conv_x * torch.sigmoid(channel_map))
        return self.proj_drop(self.proj(attended + conv_x))


class DATB(nn.Module):
    """Dual aggregation Transformer block: spatial attention on even blocks, channel attention on odd ones."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        reso: int,
        split_size: tuple[int, int],
        expansion_factor: float,
        qkv_bias: bool,
        qk_scale: float | None,
        drop: float,
        attn_drop: float,
        drop_path: float,
        group_index: int,
        block_index: int,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if block_index % 2 == 0:
            self.attn = AdaptiveSpatialAttention(
                dim,
                num_heads,
                reso,
                split_size,
                qkv_bias,
                qk_scale,
                drop,
                attn_drop,
                shifted=_is_shifted(group_index, block_index),
            )
        else:
            self.attn = AdaptiveChannelAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = _DropPath(drop_path)
        self.ffn = SGFN(dim, int(dim * expansion_factor))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.ffn(self.norm2(x), h, w))


def _residual_conv(dim: int, resi_connection: str) -> nn.Module:
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(
        nn.Conv2d(dim, dim // 4, 3, 1, 1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(dim // 4, dim, 3, 1, 1),
    )


class ResidualGroup(nn.Module):
    """`depth` DATBs and a conv, wrapped in a residual connection."""

    def __init__(self, blocks: list[DATB], dim: int, resi_connection: str):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.conv = _residual_conv(dim, resi_connection)
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        res = x
        for blk in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(blk, x, h, w)
            else:
                x = blk(x, h, w)
        return res + _image_to_tokens(self.conv(_tokens_to_image(x, h, w)))


def _pixelshuffle_upsample(scale: int, num_feat: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    if scale == 3:
        layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
    else:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


def _as_pair(value, name: str) -> list[int]:
    if isinstance(value, int):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"`{name}` must be an int or two ints, got {value!r}.")
    if min(value) < 2:
        raise ValueError(f"`{name}` values must be >= 2, got {value!r}.")
    return list(value)


class DAT(ModelMixin, ConfigMixin):
    """Dual Aggregation Transformer (DAT, DAT-S, DAT-2, DAT-light), state-dict compatible with the official
    checkpoints. Input and output are images in [0, 1], (B, C, H, W) -> (B, C, H*upscale, W*upscale), any
    H, W >= 1 (windows are padded internally).

    Args:
        img_size: training patch size; shift masks for this size are stored in the state dict.
        in_chans: image channels (3: RGB mean is subtracted, else nothing).
        embed_dim: feature channels.
        split_size: window (height, width) of the first spatial branch (the second uses it transposed).
        depth: blocks per residual group.
        num_heads: heads per residual group.
        expansion_factor: FFN hidden size / `embed_dim`.
        qkv_bias: bias in the qkv projections.
        qk_scale: overrides `head_dim ** -0.5` in window attention.
        drop_rate: dropout after projections.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, linearly increasing to this value over all blocks.
        use_chk: gradient checkpointing per block (also switched by `enable_gradient_checkpointing`).
        upscale: scale factor (1, powers of 2, or 3 for `pixelshuffle`; any for `pixelshuffledirect`).
        img_range: input scale applied after mean subtraction (1.0 or 255.0).
        resi_connection: `"1conv"` or `"3conv"`.
        upsampler: `"pixelshuffle"` (classical) or `"pixelshuffledirect"` (lightweight).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        img_size: int = 64,
        in_chans: int = 3,
        embed_dim: int = 180,
        split_size: list[int] | tuple[int, int] = (2, 4),
        depth: list[int] | tuple[int, ...] = (2, 2, 2, 2),
        num_heads: list[int] | tuple[int, ...] = (2, 2, 2, 2),
        expansion_factor: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        use_chk: bool = False,
        upscale: int = 2,
        img_range: float = 1.0,
        resi_connection: str = "1conv",
        upsampler: str = "pixelshuffle",
    ):
        super().__init__()
        split = _as_pair(split_size, "split_size")
        depth, num_heads = list(depth), list(num_heads)
        if not depth or len(depth) != len(num_heads) or min(depth) < 1:
            raise ValueError(
                f"`depth` and `num_heads` must be non-empty lists of equal length with depths >= 1, "
                f"got depth={depth!r}, num_heads={num_heads!r}."
            )
        for heads in num_heads:
            if heads < 2 or heads % 2 or embed_dim % heads:
                raise ValueError(
                    f"`num_heads` entries must be even, >= 2 and divide `embed_dim`={embed_dim}, got {num_heads!r}."
                )
        if img_size < 1 or img_size % max(split):
            raise ValueError(f"`img_size` must be a positive multiple of max(split_size), got {img_size}.")
        if resi_connection not in ("1conv", "3conv"):
            raise ValueError(f"`resi_connection` must be '1conv' or '3conv', got {resi_connection!r}.")
        if upsampler not in ("pixelshuffle", "pixelshuffledirect"):
            raise ValueError(f"`upsampler` must be 'pixelshuffle' or 'pixelshuffledirect', got {upsampler!r}.")
        if upscale < 1 or (upsampler == "pixelshuffle" and upscale != 3 and upscale & (upscale - 1)):
            raise ValueError(f"`upscale` must be 1, a power of 2 or 3 for upsampler {upsampler!r}, got {upscale}.")

        mean = _RGB_MEAN if in_chans == 3 else (0.0,)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.img_range = img_range
        self.upsampler = upsampler

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.before_RG = nn.Sequential(_ToTokens(), nn.LayerNorm(embed_dim))
        rates = torch.linspace(0, drop_path_rate, sum(depth)).tolist()
        self.layers = nn.ModuleList()
        start = 0
        for g, (d, heads) in enumerate(zip(depth, num_heads)):
            blocks = [
                DATB(
                    embed_dim,
                    heads,
                    img_size,
                    (split[0], split[1]),
                    expansion_factor,
                    qkv_bias,
                    qk_scale,
                    drop_rate,
                    attn_drop_rate,
                    rates[start + i],
                    group_index=g,
                    block_index=i,
                )
                for i in range(d)
            ]
            start += d
            self.layers.append(ResidualGroup(blocks, embed_dim, resi_connection))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _residual_conv(embed_dim, resi_connection)

        if upsampler == "pixelshuffle":
            num_feat = 64
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True)
            )
            self.upsample = _pixelshuffle_upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        else:
            self.upsample = nn.Sequential(
                nn.Conv2d(embed_dim, upscale**2 * in_chans, 3, 1, 1), nn.PixelShuffle(upscale)
            )
        self.apply(self._init_weights)
        if use_chk:
            self.enable_gradient_checkpointing()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def preset_config(cls, name: str, scale: int = 4) -> dict:
        """Config of a released model: `name` in `dat`, `dat_s`, `dat_2`, `dat_light`; `scale` in 2, 3, 4."""
        key = _PRESET_ALIASES.get(name.lower(), name.lower())
        if key not in DAT_PRESETS:
            raise ValueError(f"`name` must be one of {sorted(DAT_PRESETS)}, got {name!r}.")
        if scale not in (2, 3, 4):
            raise ValueError(f"`scale` must be 2, 3 or 4 for the released models, got {scale!r}.")
        preset = {k: list(v) if isinstance(v, list) else v for k, v in DAT_PRESETS[key].items()}
        return {"img_size": 64, "in_chans": 3, "qkv_bias": True, "img_range": 1.0, "upscale": scale, **preset}

    @classmethod
    def from_preset(cls, name: str, scale: int = 4, **overrides) -> DAT:
        """Randomly initialised model with a released architecture, e.g. `DAT.from_preset("dat_light", 4)`."""
        return cls(**{**cls.preset_config(name, scale), **overrides})

    @property
    def scale(self) -> int:
        return self.config.upscale

    def forward_features(self, x: Tensor, pre_group: PreGroupHook | None = None) -> Tensor:
        """Deep features (B, C, H, W) -> (B, C, H, W).

        Args:
            x: shallow features from `conv_first`.
            pre_group: optional `hook(group_index, tokens, (H, W)) -> tokens` called before every residual
                group on the (B, H*W, C) token sequence; fusion blocks plug in here. With None the model
                is exactly the official DAT.
        """
        h, w = x.shape[-2:]
        tokens = self.before_RG(x)
        for i, layer in enumerate(self.layers):
            if pre_group is not None:
                tokens = pre_group(i, tokens, (h, w))
            tokens = layer(tokens, h, w)
        return _tokens_to_image(self.norm(tokens), h, w)

    def forward(self, x: Tensor, pre_group: PreGroupHook | None = None) -> Tensor:
        """Super-resolve (B, in_chans, H, W) in [0, 1] to (B, in_chans, H*upscale, W*upscale).

        Args:
            x: input images.
            pre_group: see `forward_features`.
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"`x` must have shape (B, {self.config.in_chans}, H, W), got {tuple(x.shape)}.")
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x, pre_group)) + x
        if self.upsampler == "pixelshuffle":
            x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        else:
            x = self.upsample(x)
        return x / self.img_range + mean

    @torch.no_grad()
    def super_resolve(
        self,
        image: Tensor,
        tile_size: int | tuple[int, int] | None = None,
        tile_overlap: int = 16,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Inference helper: optional tiling and fp16/bf16 autocast (see `tiled_forward`); inputs smaller than the
        attention window are padded to it and the output cropped (`pad_to_window`)."""
        window = max(self.config.split_size)
        return pad_to_window(
            lambda x: tiled_forward(self, x, self.scale, tile_size, tile_overlap, dtype), image, self.scale, window
        )


@torch.no_grad()
def tiled_forward(
    fn: Callable[[Tensor], Tensor],
    image: Tensor,
    scale: int,
    tile_size: int | tuple[int, int] | None = 128,
    tile_overlap: int = 16,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Run an SR model over overlapping tiles and blend them with linear cross-fades (`dalpsr.tiling.tiled_map`,
    blend "linear").

    Args:
        fn: model or closure mapping (B, C, h, w) -> (B, C, h*scale, w*scale).
        image: (B, C, H, W) input.
        scale: the model's scale factor.
        tile_size: input tile edge or (height, width); None (or >= the image) runs the whole image at once.
        tile_overlap: input pixels over which neighbouring tiles are blended, at most half a tile edge; the
            outer quarter on each side is dropped and the middle half cross-faded linearly, so a model whose
            receptive field reaches less than `tile_overlap / 4` pixels gives exactly the untiled result.
        dtype: `torch.float16` / `torch.bfloat16` to run under autocast, None for the input's dtype.

    Returns:
        (B, C, H*scale, W*scale) float tensor in the input's dtype.
    """
    if not isinstance(image, Tensor) or image.ndim != 4 or not image.is_floating_point():
        raise ValueError(
            f"`image` must be a float (B, C, H, W) tensor, got {getattr(image, 'shape', type(image))} "
            f"of {getattr(image, 'dtype', None)}."
        )
    if dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"`dtype` must be None, torch.float16 or torch.bfloat16, got {dtype!r}.")

    def run(x: Tensor) -> Tensor:
        context = torch.autocast(image.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with context:
            return fn(x).to(image.dtype)

    if tile_size is None:
        return run(image)
    return tiled_map(run, image, tile_size=tile_size, tile_overlap=tile_overlap, scale=scale, blend="linear")


__all__ = ["DAT", "DAT_PRESETS", "PreGroupHook", "pad_to_window", "shift_window_mask", "tiled_forward"]
