"""Degradation operations on B×3×H×W float tensors in [0, 1] (CPU or CUDA).

Every random draw takes a CPU `torch.Generator`, one per image, so a batch gives the same result as its
images one by one. Noise is drawn on the CPU and moved to the tensor's device.

JPEG: `jpeg_torch` is a block-DCT codec written in torch (no entropy coding, which is lossless): 8-bit
rounding, JFIF YCbCr, 4:2:0 chroma averaging, 8×8 orthonormal DCT, quantisation with the IJG (libjpeg)
tables scaled by quality exactly as libjpeg does, dequantisation, bilinear chroma upsampling, rounding.
It is batched and runs on any device; its output stays close to Pillow/libjpeg at the same quality
(checked in the tests). `jpeg_pillow` runs the real libjpeg through Pillow, one image at a time on CPU.
Real-ESRGAN uses DiffJPEG (a differentiable torch codec) for the same role; this one is not
differentiable (hard rounding) and uses libjpeg's integer quality→table mapping.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# IJG standard tables (ITU-T T.81 Annex K), row-major in natural (not zig-zag) order.
_LUMA_TABLE = [
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
]
_CHROMA_TABLE = [
    [17, 18, 24, 47, 99, 99, 99, 99],
    [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99],
    [47, 66, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99],
]


_RGB_TO_YCC = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float64
)
_YCC_TO_RGB = torch.tensor([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], dtype=torch.float64)


def quality_scaling(quality: int) -> int:
    """libjpeg's percentage scaling of the base tables for `quality` in [1, 100]."""
    quality = int(min(max(int(quality), 1), 100))
    return 5000 // quality if quality < 50 else 200 - 2 * quality


def quantization_tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(luma, chroma) 8×8 quantisation tables libjpeg uses for `quality` (baseline, clamped to [1, 255])."""
    s = quality_scaling(quality)
    luma = torch.tensor(_LUMA_TABLE, dtype=torch.float64)
    chroma = torch.tensor(_CHROMA_TABLE, dtype=torch.float64)
    return (
        torch.clamp(torch.floor((luma * s + 50) / 100), 1, 255),
        torch.clamp(torch.floor((chroma * s + 50) / 100), 1, 255),
    )


def estimate_jpeg_quality(luma_table) -> int:
    """The IJG quality whose luma table is closest to `luma_table` (64 values in natural order)."""
    target = torch.as_tensor(list(luma_table), dtype=torch.float64).reshape(8, 8)
    errors = [float((quantization_tables(q)[0] - target).abs().sum()) for q in range(1, 101)]
    return int(np.argmin(errors)) + 1


def _reflect_or_replicate(x: torch.Tensor, pad: int) -> torch.Tensor:
    if pad == 0:
        return x
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    return F.pad(x, (pad, pad, pad, pad), mode=mode)


def filter2d(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image with its own kernel (reflect padding; replicate for images smaller than it).

    Args:
        x: B×C×H×W.
        kernels: B×k×k (k odd), one kernel per image, applied to every channel.
    """
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    if kernels.shape != (b, k, k) or k % 2 == 0:
        raise ValueError(f"`kernels` must be B×k×k with odd k and B={b}; got {tuple(kernels.shape)}.")
    xp = _reflect_or_replicate(x, k // 2)
    weight = kernels.to(x).repeat_interleave(c, dim=0).unsqueeze(1)  # (B·C)×1×k×k
    out = F.conv2d(xp.reshape(1, b * c, *xp.shape[-2:]), weight, groups=b * c)
    return out.reshape(b, c, h, w)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize B×C×H×W to `size` (h, w); "bicubic_antialias" is MATLAB-like antialiased bicubic.

    "area", "bilinear" and "bicubic" are `F.interpolate` without antialiasing, as in Real-ESRGAN.
    """
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    if mode == "bicubic_antialias":
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    raise ValueError(f"`mode` must be one of area, bilinear, bicubic, bicubic_antialias; got {mode!r}.")


def _gray(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def add_gaussian_noise(x: torch.Tensor, sigma: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Add N(0, (sigma/255)²) noise to one image (1×C×H×W), the same in every channel when `gray`; clip."""
    _, c, h, w = x.shape
    noise = torch.randn((1, 1 if gray else c, h, w), generator=generator, dtype=torch.float32)
    noise = noise.to(x.device, x.dtype) * (sigma / 255.0)
    return torch.clamp(x + noise, 0.0, 1.0)


POISSON_LEVELS = 256.0


def add_poisson_noise(
    x: torch.Tensor, scale: float, gray: bool, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    """Add scaled Poisson (shot) noise to one image (1×C×H×W); clip to [0, 1].

    The image is rounded to 8 bits, photon counts are x·256, and the noise (Poisson(x·256)/256 − x) is
    multiplied by `scale`; with `gray` the noise is computed on the luma and shared by the channels.
    Real-ESRGAN takes the number of levels from the count of distinct 8-bit values (256 for nearly every
    photo, but 1 for a flat image); a fixed 256 gives `scale` one meaning on every image.

    Returns:
        (noisy image, equivalent Gaussian sigma in 0–255 units: 255·scale·sqrt(mean(x)/256)).
    """
    base = _gray(x) if gray else x
    base = torch.clamp(torch.round(base * 255.0), 0, 255) / 255.0
    rate = (base * POISSON_LEVELS).detach().to("cpu", torch.float32)
    counts = torch.poisson(rate, generator=generator)
    noise = (counts / POISSON_LEVELS).to(x.device, x.dtype) - base
    sigma_eq = 255.0 * scale * math.sqrt(max(float(base.mean()), 0.0) / POISSON_LEVELS)
    return torch.clamp(x + noise * scale, 0.0, 1.0), sigma_eq


def _dct_basis(device, dtype) -> torch.Tensor:
    # 64×64 orthonormal 2-D DCT-II on row-major flattened 8×8 blocks: coeff = block @ basis.T
    n = torch.arange(8, dtype=torch.float64)
    m = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return torch.kron(m, m).to(device, dtype)


def _quantize_planes(planes: torch.Tensor, tables: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    # planes: B×C×H×W (multiples of 8), level-shifted; tables: B×C×64 (row-major 8×8)
    b, c, h, w = planes.shape
    blocks = planes.reshape(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(b, c, -1, 64)
    coeff = blocks @ basis.T
    t = tables[:, :, None, :]
    rec = (torch.round(coeff / t) * t) @ basis
    return rec.reshape(b, c, h // 8, w // 8, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def jpeg_torch(x: torch.Tensor, qualities) -> torch.Tensor:
    """JPEG-compress and decode B×3×H×W images, each at its own integer quality (see module docstring)."""
    b, _, h, w = x.shape
    qualities = [int(q) for q in qualities]
    if len(qualities) != b:
        raise ValueError(f"`qualities` must have one entry per image ({b}); got {len(qualities)}.")
    dtype = torch.float32
    dev = x.device
    rgb = torch.clamp(torch.round(x.to(dtype) * 255.0), 0, 255)
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        rgb = F.pad(rgb, (0, pw, 0, ph), mode="replicate")
    # JFIF RGB -> YCbCr, level-shifted by -128 (so Cb/Cr have no offset)
    ycc = torch.einsum("ij,bjhw->bihw", _RGB_TO_YCC.to(dev, dtype), rgb)
    ycc[:, 0] -= 128.0
    chroma = F.avg_pool2d(ycc[:, 1:], 2)
    tables = [quantization_tables(q) for q in qualities]
    luma_t = torch.stack([t[0].flatten() for t in tables]).to(dev, dtype)[:, None]
    chroma_t = torch.stack([t[1].flatten() for t in tables]).to(dev, dtype)[:, None].expand(-1, 2, -1)
    basis = _dct_basis(dev, dtype)
    y = _quantize_planes(ycc[:, :1], luma_t, basis)
    chroma = _quantize_planes(chroma, chroma_t, basis)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    ycc = torch.cat([y + 128.0, chroma], dim=1)
    out = torch.einsum("ij,bjhw->bihw", _YCC_TO_RGB.to(dev, dtype), ycc)
    out = torch.clamp(torch.round(out[:, :, :h, :w]), 0, 255) / 255.0
    return out.to(x.dtype)


def jpeg_pillow(x: torch.Tensor, qualities) -> torch.Tensor:
    """JPEG round trip through Pillow/libjpeg (4:2:0), one image at a time on CPU."""
    qualities = [int(q) for q in qualities]
    if len(qualities) != x.shape[0]:
        raise ValueError(f"`qualities` must have one entry per image ({x.shape[0]}); got {len(qualities)}.")
    outs = []
    for img, q in zip(x, qualities):
        arr = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=q, subsampling="4:2:0")
        buf.seek(0)
        with Image.open(buf) as dec:
            out = np.asarray(dec.convert("RGB"), dtype=np.float32) / 255.0
        outs.append(torch.from_numpy(out).permute(2, 0, 1))
    return torch.stack(outs).to(x.device, x.dtype)


def jpeg(x: torch.Tensor, qualities, backend: str = "auto") -> torch.Tensor:
    """JPEG round trip with the chosen backend: "torch", "pillow", or "auto" (Pillow on CPU, else torch)."""
    if backend == "auto":
        backend = "pillow" if x.device.type == "cpu" else "torch"
    if backend == "torch":
        return jpeg_torch(x, qualities)
    if backend == "pillow":
        return jpeg_pillow(x, qualities)
    raise ValueError(f"`backend` must be 'auto', 'torch' or 'pillow'; got {backend!r}.")
