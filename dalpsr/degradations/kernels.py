"""Blur kernels of the Real-ESRGAN family, sampled with an explicit `torch.Generator`.

Kernel formulas follow Real-ESRGAN (Wang et al., 2021): bivariate Gaussian, generalized Gaussian
exp(-0.5 (xᵀΣ⁻¹x)^β), plateau 1 / (1 + (xᵀΣ⁻¹x)^β), and the circular low-pass (sinc) kernel
ω J₁(ω r) / (2π r). Sampling rules carried over: iso kernels use one sigma; aniso kernels draw both axis
sigmas from the same range and a rotation; β is drawn from [β_low, 1) or [1, β_high] with equal odds;
the sinc cutoff is drawn from [π/3, π] for kernels smaller than 13 and [π/5, π] otherwise. Written here
in torch (float64) rather than numpy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from dalpsr.degradations.config import KernelConfig


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One float uniformly drawn from [low, high] with `generator`."""
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return low + (high - low) * u


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """One integer uniformly drawn from [low, high] (inclusive) with `generator`."""
    return int(torch.randint(int(low), int(high) + 1, (1,), generator=generator).item())


def choice(generator: torch.Generator, items, probs=None):
    """One item drawn with probabilities `probs` (uniform when None) using `generator`."""
    items = list(items)
    if probs is None:
        probs = [1.0 / len(items)] * len(items)
    u = uniform(generator, 0.0, 1.0)
    acc = 0.0
    last = max(i for i, p in enumerate(probs) if p > 0)
    for i, p in enumerate(probs):
        acc += p
        if p > 0 and (u < acc or i == last):
            return items[i]
    raise AssertionError("unreachable: probabilities validated to sum to 1")


@dataclass
class KernelParams:
    """Parameters of one applied kernel (JSON-ready).

    Attributes:
        kind: a Real-ESRGAN kernel type, or "sinc".
        size: kernel size before padding.
        sigma_x, sigma_y, rotation, beta: Gaussian-family parameters (None for sinc; beta None for plain Gaussians).
        omega_c: sinc cutoff in radians per pixel (None otherwise).
        effective_sigma: equivalent Gaussian sigma in pixels (see `effective_sigma`).
        l2_norm: ‖k‖₂, the factor by which the kernel scales the std of white noise.
    """

    kind: str
    size: int
    sigma_x: float | None = None
    sigma_y: float | None = None
    rotation: float | None = None
    beta: float | None = None
    omega_c: float | None = None
    effective_sigma: float = 0.0
    l2_norm: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def gaussian_family_kernel(
    kind: str, size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float | None = None
) -> torch.Tensor:
    """size×size kernel (float64, sums to 1) of type `kind` ("iso", "aniso", "generalized_*", "plateau_*")."""
    c, s = math.cos(rotation), math.sin(rotation)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rot.T
    inv = torch.linalg.inv(cov)
    xx, yy = _grid(size)
    quad = inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy
    if kind.startswith("generalized"):
        k = torch.exp(-0.5 * quad.pow(beta))
    elif kind.startswith("plateau"):
        k = 1.0 / (1.0 + quad.pow(beta))
    else:
        k = torch.exp(-0.5 * quad)
    return k / k.sum()


def sinc_kernel(size: int, omega_c: float) -> torch.Tensor:
    """size×size circular low-pass kernel (float64, sums to 1) with cutoff `omega_c` rad/pixel."""
    xx, yy = _grid(size)
    r = torch.sqrt(xx * xx + yy * yy)
    safe = torch.where(r > 0, r, torch.ones_like(r))
    k = omega_c * torch.special.bessel_j1(omega_c * safe) / (2 * math.pi * safe)
    k = torch.where(r > 0, k, torch.full_like(r, omega_c**2 / (4 * math.pi)))
    return k / k.sum()


def effective_sigma(kernel: torch.Tensor, kind: str, omega_c: float | None = None) -> float:
    """Equivalent Gaussian sigma of an applied kernel, in pixels.

    Rule: for the (non-negative) Gaussian family it is the RMS spread per axis of the discrete kernel as
    applied, sqrt(Σ k·(x² + y²) / 2), so truncation by a small kernel size is accounted for. For a sinc
    kernel (signed, second moment not meaningful) it is the sigma of the Gaussian whose frequency
    response falls to one half at the sinc cutoff: sqrt(2 ln 2) / ω_c.
    """
    if kind == "sinc":
        return math.sqrt(2 * math.log(2)) / float(omega_c)
    xx, yy = _grid(kernel.shape[-1])
    return math.sqrt(float((kernel * (xx * xx + yy * yy)).sum()) / 2)


def sample_kernel(cfg: KernelConfig, generator: torch.Generator) -> tuple[KernelParams, torch.Tensor]:
    """Draw one blur kernel (sinc with probability `cfg.sinc_prob`, else a Gaussian-family kernel).

    Returns:
        (params, kernel): kernel is size×size float32 summing to 1.
    """
    size = choice(generator, cfg.sizes)
    if uniform(generator, 0.0, 1.0) < cfg.sinc_prob:
        omega_c = uniform(generator, math.pi / 3, math.pi) if size < 13 else uniform(generator, math.pi / 5, math.pi)
        k = sinc_kernel(size, omega_c)
        params = KernelParams("sinc", size, omega_c=omega_c)
    else:
        kind = choice(generator, cfg.kernel_types, cfg.kernel_probs)
        sigma_x = uniform(generator, *cfg.sigma_range)
        if kind.endswith("iso") and not kind.endswith("aniso"):
            sigma_y, rotation = sigma_x, 0.0
        else:
            sigma_y = uniform(generator, *cfg.sigma_range)
            rotation = uniform(generator, *cfg.rotation_range)
        beta = None
        if kind.startswith(("generalized", "plateau")):
            lo, hi = cfg.betag_range if kind.startswith("generalized") else cfg.betap_range
            beta = uniform(generator, lo, 1.0) if uniform(generator, 0.0, 1.0) < 0.5 else uniform(generator, 1.0, hi)
            beta = min(max(beta, lo), hi)
        k = gaussian_family_kernel(kind, size, sigma_x, sigma_y, rotation, beta)
        params = KernelParams(kind, size, sigma_x, sigma_y, rotation, beta)
    params.effective_sigma = effective_sigma(k, params.kind, params.omega_c)
    params.l2_norm = float(k.pow(2).sum().sqrt())
    return params, k.float()


def sample_sinc(sizes, omega_range, generator: torch.Generator) -> tuple[KernelParams, torch.Tensor]:
    """Draw the final-step sinc kernel: size from `sizes`, cutoff uniform in `omega_range`."""
    size = choice(generator, sizes)
    omega_c = uniform(generator, *omega_range)
    k = sinc_kernel(size, omega_c)
    params = KernelParams("sinc", size, omega_c=omega_c, effective_sigma=effective_sigma(k, "sinc", omega_c))
    params.l2_norm = float(k.pow(2).sum().sqrt())
    return params, k.float()


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a k×k kernel to size×size (centred)."""
    p = (size - kernel.shape[-1]) // 2
    if p < 0:
        raise ValueError(f"`size` {size} is smaller than the kernel ({kernel.shape[-1]}).")
    return torch.nn.functional.pad(kernel, (p, p, p, p))
