"""Colour correction of a diffusion output against its (upsampled) low-resolution input.

Diffusion SR drifts in colour; the Real-SR pipelines (StableSR, SeeSR, PASD) correct it after decoding:
- `wavelet`: keep the high-frequency detail of the output and take the low-frequency band from the reference,
  using an à-trous wavelet decomposition (5 levels of a dilated 3×3 binomial blur), as in StableSR.
- `adain`: match each channel's mean and standard deviation to the reference (adaptive instance norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIX_MODES = ("wavelet", "adain", "none")
BAND_VALUES = 2**20
"""Values (batch × channels × rows × width) per band of the wavelet fix, which bounds its temporaries: a dilated
convolution on the CPU unfolds its input (9×), about twelve band-sized buffers at once (measured, 2000×1500)."""

# 3×3 binomial kernel (outer product of [1, 2, 1] / 4).
_BINOMIAL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0


def _dilated_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    # x: B×C×H×W; replicate padding keeps borders from darkening.
    channels = x.shape[1]
    kernel = _BINOMIAL.to(device=x.device, dtype=x.dtype).expand(channels, 1, 3, 3)
    pad = dilation
    mode = "replicate" if min(x.shape[-2:]) > 1 else "constant"
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(x, kernel, groups=channels, dilation=dilation)


def wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Split B×C×H×W into (high-frequency, low-frequency) bands; `high + low == x` exactly."""
    low = x
    for i in range(levels):
        low = _dilated_blur(low, 2**i)
    return x - low, low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Replace the low-frequency band of `image` with that of `reference` (both B×3×H×W, same size)."""
    high, _ = wavelet_split(image, levels)
    _, ref_low = wavelet_split(reference, levels)
    return high + ref_low


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match per-channel mean and std of `image` to `reference` (B×C×H×W each; sizes may differ)."""
    mean = image.mean(dim=(-2, -1), keepdim=True)
    std = image.std(dim=(-2, -1), keepdim=True) + eps
    ref_mean = reference.mean(dim=(-2, -1), keepdim=True)
    ref_std = reference.std(dim=(-2, -1), keepdim=True)
    return (image - mean) / std * ref_std + ref_mean


def apply_color_fix(image: torch.Tensor, reference: torch.Tensor, mode: str) -> torch.Tensor:
    """Colour-correct `image` (B×3×H×W in [0, 1]) against `reference` with `mode` in COLOR_FIX_MODES."""
    if mode not in COLOR_FIX_MODES:
        raise ValueError(f"`color_fix` must be one of {COLOR_FIX_MODES}; got {mode!r}.")
    if mode == "none":
        return image
    if image.shape != reference.shape:
        raise ValueError(
            f"`reference` must have the shape of `image` {tuple(image.shape)}; got {tuple(reference.shape)}."
        )
    if mode == "adain":
        return adain_color_fix(image.float(), reference.float()).clamp(0.0, 1.0).to(image.dtype)
    # Wavelet in bands of rows, each read with the 2^5 - 1 = 31 rows the five dilated blurs reach on either side:
    # the same result, without five float32 copies of a whole large output at once.
    halo = 2**5 - 1
    height = image.shape[-2]
    rows = max(4 * halo, BAND_VALUES // max(1, image[..., :1, :].numel()))
    out = torch.empty_like(image)
    for top in range(0, height, rows):
        lo, hi = max(0, top - halo), min(height, top + rows + halo)
        fixed = wavelet_color_fix(image[..., lo:hi, :].float(), reference[..., lo:hi, :].float())
        out[..., top : top + rows, :] = fixed[..., top - lo : top - lo + rows, :].clamp(0.0, 1.0)
    return out
