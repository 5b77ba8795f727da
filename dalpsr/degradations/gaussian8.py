"""Blind-SR evaluation kernels: Gaussian8 (Setting 1) and DIV2KRK-style anisotropic kernels (Setting 2).

Gaussian8 follows IKC (Gu et al., CVPR 2019) as DAN and PL-IDENet use it: 8 isotropic Gaussian kernels of size
21 with σ evenly spaced over [1.8, 3.2] for ×4 ([0.80, 1.60] for ×2, [1.35, 2.40] for ×3); the HR image is
blurred and bicubic-downsampled. DIV2KRK (KernelGAN, Bell-Kligler et al., NeurIPS 2019) kernels, as regenerated
by FKP (Liang et al., CVPR 2021): anisotropic Gaussians with eigen-variances λ₁, λ₂ ~ U(0.175·s, min(2.5·s, 10)),
rotation θ ~ U(0, π), multiplicative noise U(−0.25, 0.25) per tap, size min(4·s + 3, 21), normalised to sum 1.
Differences: the LR is made the way this project's "setting1"/"setting2" presets make it (reflect-padded blur,
then antialiased bicubic downsampling, 8-bit rounding), where DIV2KRK subsamples the blurred image directly with
a sub-pixel-shifted kernel; kernels are centred (no sub-pixel shift) and drawn from an explicit generator.
"""

from __future__ import annotations

import math

import torch

from dalpsr.degradations import ops
from dalpsr.degradations.kernels import gaussian_family_kernel, pad_kernel, uniform

GAUSSIAN8_RANGES = {2: (0.8, 1.6), 3: (1.35, 2.4), 4: (1.8, 3.2)}
KERNEL_SIZE = 21


def _check_scale(scale: int) -> int:
    if scale not in GAUSSIAN8_RANGES:
        raise ValueError(f"`scale` must be one of {sorted(GAUSSIAN8_RANGES)}; got {scale!r}.")
    return scale


def gaussian8_sigmas(scale: int = 4) -> list[float]:
    """The 8 kernel widths σ of Gaussian8 for `scale` (2, 3 or 4)."""
    lo, hi = GAUSSIAN8_RANGES[_check_scale(scale)]
    return [lo + (hi - lo) * i / 7 for i in range(8)]


def gaussian8_kernels(scale: int = 4, size: int = KERNEL_SIZE) -> torch.Tensor:
    """8×size×size float32 isotropic Gaussian kernels (each sums to 1), widest last."""
    return torch.stack([gaussian_family_kernel("iso", size, s, s, 0.0) for s in gaussian8_sigmas(scale)]).float()


def div2krk_kernel(generator: torch.Generator, scale: int = 4, size: int = KERNEL_SIZE) -> tuple[dict, torch.Tensor]:
    """One DIV2KRK-style kernel: (params with axis sigmas and rotation, size×size float32 kernel summing to 1)."""
    _check_scale(scale)
    lo, hi = 0.175 * scale, min(2.5 * scale, 10.0)
    var1, var2 = uniform(generator, lo, hi), uniform(generator, lo, hi)
    theta = uniform(generator, 0.0, math.pi)
    k = gaussian_family_kernel("aniso", min(4 * scale + 3, size), math.sqrt(var1), math.sqrt(var2), theta)
    noise = torch.rand(k.shape, generator=generator, dtype=torch.float64) * 0.5 - 0.25
    k = (k * (1.0 + noise)).clamp_min(0)
    k = pad_kernel(k / k.sum(), size)
    params = {"sigma_x": math.sqrt(var1), "sigma_y": math.sqrt(var2), "rotation": theta, "size": size}
    return params, k.float()


def blur_downsample(hr: torch.Tensor, kernels: torch.Tensor, scale: int) -> torch.Tensor:
    """B×3×H×W HR in [0, 1] → B×3×(H//s)×(W//s) LR: blur by each image's B×k×k kernel, antialiased bicubic, 8 bits."""
    b, _, h, w = hr.shape
    if kernels.ndim == 2:
        kernels = kernels.expand(b, *kernels.shape)
    lr = ops.resize(ops.filter2d(hr, kernels), (h // scale, w // scale), "bicubic_antialias")
    return torch.clamp(torch.round(lr * 255.0), 0, 255) / 255.0
