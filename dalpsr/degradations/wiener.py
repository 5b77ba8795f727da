"""Differentiable Wiener deconvolution, solved in closed form in the Fourier domain.

For an image y = k ⊛ x + n the estimate is

    X̂ = conj(K) · Y / (|K|² + λ · Σⱼ |Gⱼ|²)

with K, Y, Gⱼ the 2-D DFTs of the kernel, the image and optional regularisation filters gⱼ (none: Σⱼ|Gⱼ|² = 1,
the classical Wiener filter with a constant noise-to-signal ratio λ). With learned gⱼ and λ this is the Wiener
layer of PL-IDENet (Khan et al., IEEE TIP 2024), itself the learnable Wiener filter of Kokkinos & Lefkimmiatis.

Boundaries: the DFT treats the image as periodic, so a plain FFT deconvolution rings along seams where the
left/right and top/bottom edges meet. Here the image is first padded by `pad` pixels per side (default: the
kernel size; reflect padding, replicate where the image is too small to reflect), then edge-tapered (MATLAB
`edgetaper` rule: blend towards the circularly blurred padded image with weights 1 − the normalised
autocorrelation of the kernel's row/column projections, so the periodic extension is smooth), deconvolved,
and cropped back to H×W. The kernel is centred at the origin of the padded grid (no shift of the result).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PADDINGS = ("reflect", "none")


def _check_kernel(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """B×1×k×k or B×C×k×k kernel from k×k, B×k×k, B×1×k×k or B×C×k×k."""
    b, c = image.shape[:2]
    if kernel.ndim == 2:
        kernel = kernel.expand(b, 1, *kernel.shape)
    elif kernel.ndim == 3:
        kernel = kernel.unsqueeze(1)
    if kernel.ndim != 4 or kernel.shape[0] != b or kernel.shape[1] not in (1, c):
        raise ValueError(
            f"`kernel` must be k×k, B×k×k, B×1×k×k or B×C×k×k with B={b}, C={c}; got {tuple(kernel.shape)}."
        )
    if kernel.shape[-2] % 2 == 0 or kernel.shape[-1] % 2 == 0:
        raise ValueError(f"`kernel` must have odd height and width; got {tuple(kernel.shape[-2:])}.")
    return kernel.to(image.dtype)


def kernel_otf(kernel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """DFT (rfft2) of a centred ...×kh×kw kernel zero-padded to `size`, its centre moved to the origin."""
    kh, kw = kernel.shape[-2:]
    h, w = size
    if kh > h or kw > w:
        raise ValueError(f"`kernel` {kh}×{kw} is larger than the padded image {h}×{w}.")
    grid = kernel.new_zeros((*kernel.shape[:-2], h, w))
    grid[..., :kh, :kw] = kernel
    grid = torch.roll(grid, shifts=(-(kh // 2), -(kw // 2)), dims=(-2, -1))
    return torch.fft.rfft2(grid)


def regularizer_power(filters: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Σⱼ |Gⱼ|² (h×(w//2+1), real) of F×fh×fw (or F×1×fh×fw) regularisation filters on an h×w grid."""
    if filters.ndim == 4:
        filters = filters.flatten(0, 1)
    if filters.ndim != 3 or filters.shape[-1] % 2 == 0 or filters.shape[-2] % 2 == 0:
        raise ValueError(f"`regularizer` must be F×s×s (or F×1×s×s) with odd s; got {tuple(filters.shape)}.")
    return kernel_otf(filters, size).abs().pow(2).sum(0)


def _pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    return F.pad(x, (pad, pad, pad, pad), mode=mode)


def _taper_profile(projection: torch.Tensor, n: int) -> torch.Tensor:
    """1 − normalised circular autocorrelation (length n) of B×C×k kernel projections: 0 at the seam."""
    spectrum = torch.fft.rfft(projection, n=n)
    autocorr = torch.fft.irfft(spectrum.abs().pow(2), n=n)
    return 1.0 - autocorr / autocorr.amax(dim=-1, keepdim=True).clamp_min(1e-12)


def edge_taper(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Blend B×C×H×W `x` towards its circular blur by the B×(1|C)×k×k `kernel` near the frame (MATLAB rule)."""
    h, w = x.shape[-2:]
    rows = _taper_profile(kernel.sum(-1), h)  # B×C×H
    cols = _taper_profile(kernel.sum(-2), w)  # B×C×W
    alpha = rows.unsqueeze(-1) * cols.unsqueeze(-2)
    blurred = torch.fft.irfft2(torch.fft.rfft2(x) * kernel_otf(kernel, (h, w)), s=(h, w))
    return alpha * x + (1.0 - alpha) * blurred


def wiener_deconvolve(
    image: torch.Tensor,
    kernel: torch.Tensor,
    nsr: float | torch.Tensor = 1e-2,
    *,
    regularizer: torch.Tensor | None = None,
    padding: str = "reflect",
    pad: int | None = None,
    taper: bool = True,
) -> torch.Tensor:
    """Wiener-deconvolve `image` blurred by `kernel` (differentiable in all tensor arguments).

    Args:
        image: B×C×H×W float tensor.
        kernel: k×k (shared), B×k×k or B×1×k×k (per image, every channel) or B×C×k×k (per channel); odd k.
            It should sum to 1; it is used as given.
        nsr: λ, the noise-to-signal ratio weighting the regulariser: a float, a B tensor (one per image) or a
            B×N tensor (N values per image; the result is then B×N×C×H×W, one deconvolution per value).
        regularizer: F×s×s filters gⱼ whose power spectra Σⱼ|Gⱼ|² replace the constant 1 in the denominator.
        padding: "reflect" (pad, edge-taper, crop; see the module docstring) or "none" (plain periodic FFT).
        pad: pixels of padding per side (default: the kernel size); ignored with padding="none".
        taper: edge-taper the padded image (only with padding="reflect").

    Returns:
        B×C×H×W (or B×N×C×H×W) deconvolved image(s).
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or not image.is_floating_point():
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"`image` must be a float B×C×H×W tensor; got {shape}.")
    if not isinstance(kernel, torch.Tensor):
        raise TypeError(f"`kernel` must be a torch.Tensor; got {type(kernel).__name__}.")
    if padding not in PADDINGS:
        raise ValueError(f"`padding` must be one of {PADDINGS}; got {padding!r}.")
    kernel = _check_kernel(image, kernel)
    b, c, h, w = image.shape
    lam = torch.as_tensor(nsr, dtype=image.dtype, device=image.device)
    if lam.ndim > 2 or (lam.ndim >= 1 and lam.shape[0] != b) or bool((lam < 0).any()):
        raise ValueError(f"`nsr` must be >= 0: a float, a B={b} tensor or a B×N tensor; got shape {tuple(lam.shape)}.")
    p = 0
    x = image
    if padding == "reflect":
        p = max(kernel.shape[-2:]) if pad is None else int(pad)
        if p < 0:
            raise ValueError(f"`pad` must be >= 0; got {pad}.")
        x = _pad(image, p)
        if taper:
            x = edge_taper(x, kernel)
    size = tuple(x.shape[-2:])
    otf = kernel_otf(kernel, size)  # B×(1|C)×h×(w//2+1)
    reg = 1.0 if regularizer is None else regularizer_power(regularizer.to(image.dtype), size)
    num = otf.conj() * torch.fft.rfft2(x)
    power = otf.abs().pow(2)
    if lam.ndim == 2:  # one result per value: B×N×C×h×w
        num, power = num.unsqueeze(1), power.unsqueeze(1)
        lam = lam[:, :, None, None, None]
    elif lam.ndim == 1:
        lam = lam[:, None, None, None]
    out = torch.fft.irfft2(num / (power + lam * reg), s=size)
    return out[..., p : p + h, p : p + w]
