"""dalpsr.degradations.wiener against a NumPy FFT reference; Gaussian8 / DIV2KRK-style kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dalpsr.degradations import ops
from dalpsr.degradations.gaussian8 import blur_downsample, div2krk_kernel, gaussian8_kernels, gaussian8_sigmas
from dalpsr.degradations.kernels import effective_sigma, gaussian_family_kernel
from dalpsr.degradations.wiener import edge_taper, wiener_deconvolve

pytestmark = pytest.mark.usefixtures("one_thread")


def np_otf(k: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    grid = np.zeros(shape)
    grid[: k.shape[0], : k.shape[1]] = k
    return np.fft.fft2(np.roll(grid, (-(k.shape[0] // 2), -(k.shape[1] // 2)), axis=(0, 1)))


def np_wiener(y: np.ndarray, k: np.ndarray, nsr: float, pad: int | None, taper: bool = True) -> np.ndarray:
    """Reference for one H×W channel: reflect pad, MATLAB-rule edge taper, full complex FFT, crop."""
    h, w = y.shape
    p = 0
    if pad is not None:
        p = pad
        y = np.pad(y, p, mode="reflect")
        if taper:
            alphas = []
            for proj, n in ((k.sum(1), y.shape[0]), (k.sum(0), y.shape[1])):
                q = np.zeros(n)
                q[: len(proj)] = proj
                ac = np.real(np.fft.ifft(np.abs(np.fft.fft(q)) ** 2))
                alphas.append(1 - ac / ac.max())
            alpha = np.outer(*alphas)
            blurred = np.real(np.fft.ifft2(np.fft.fft2(y) * np_otf(k, y.shape)))
            y = alpha * y + (1 - alpha) * blurred
    otf = np_otf(k, y.shape)
    x = np.real(np.fft.ifft2(np.conj(otf) * np.fft.fft2(y) / (np.abs(otf) ** 2 + nsr)))
    return x[p : p + h, p : p + w]


def photo(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A natural image crop (scikit-image's bundled astronaut), 1×3×h×w float64 in [0, 1]."""
    from skimage import data

    img = data.astronaut()[100 + seed : 100 + seed + h, 150 : 150 + w]
    return torch.from_numpy(img.copy()).permute(2, 0, 1)[None].double() / 255.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / (a - b).pow(2).mean()))


@pytest.mark.parametrize("padding", ["reflect", "none"])
def test_delta_kernel_with_vanishing_nsr_is_identity(padding):
    x = torch.rand(2, 3, 37, 29, dtype=torch.float64)
    delta = torch.zeros(5, 5, dtype=torch.float64)
    delta[2, 2] = 1
    out = wiener_deconvolve(x, delta, 1e-10, padding=padding)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=0, atol=1e-8)


@pytest.mark.parametrize("size", [(33, 47), (40, 40), (25, 31)])
def test_matches_numpy_fft_reference(size):
    x = photo(*size)
    k = gaussian_family_kernel("aniso", 9, 1.7, 0.8, 0.6)
    blurred = ops.filter2d(x, k[None])
    for pad, padding in ((None, "none"), (9, "reflect"), (4, "reflect")):
        out = wiener_deconvolve(blurred, k, 3e-3, padding=padding, pad=pad)
        for c in range(3):
            ref = np_wiener(blurred[0, c].numpy(), k.numpy(), 3e-3, pad)
            np.testing.assert_allclose(out[0, c].numpy(), ref, atol=1e-9)


def test_recovers_known_blur_far_above_blurred_psnr_without_seams():
    x = photo(96, 80)
    k = gaussian_family_kernel("iso", 21, 2.0, 2.0, 0.0)
    blurred = ops.filter2d(x, k[None])  # reflect-padded blur, as the degradation presets make it
    out = wiener_deconvolve(blurred, k, 1e-6)
    blurred_psnr, out_psnr = psnr(blurred, x), psnr(out, x)
    assert out_psnr > blurred_psnr + 8, (blurred_psnr, out_psnr)

    # no wrap-around seam: the 4-pixel frame is restored about as well as the interior; a plain periodic FFT
    # deconvolution of the same image is not
    def frame_and_inner(y):
        err = (y - x).pow(2)[0].mean(0)
        frame = torch.ones_like(err, dtype=torch.bool)
        frame[4:-4, 4:-4] = False
        return float(-10 * torch.log10(err[frame].mean())), float(-10 * torch.log10(err[~frame].mean()))

    frame, inner = frame_and_inner(out)
    assert frame > inner - 6, (frame, inner)
    periodic_frame, _ = frame_and_inner(wiener_deconvolve(blurred, k, 1e-6, padding="none"))
    assert periodic_frame < frame - 10, (periodic_frame, frame)
    # at this low NSR reflect padding alone still leaves a seam; the edge taper removes it
    untapered_frame, _ = frame_and_inner(wiener_deconvolve(blurred, k, 1e-6, taper=False))
    assert untapered_frame < frame - 5, (untapered_frame, frame)


def test_batched_per_image_kernels_equal_one_by_one():
    x = torch.cat([photo(31, 27, s) for s in range(3)])
    kernels = torch.stack(
        [gaussian_family_kernel("aniso", 11, sx, sy, r) for sx, sy, r in ((0.5, 0.5, 0), (2, 1, 0.3), (1.2, 3, 2))]
    )
    y = ops.filter2d(x, kernels)
    nsr = torch.tensor([1e-3, 1e-2, 3e-2], dtype=torch.float64)
    out = wiener_deconvolve(y, kernels, nsr)
    for i in range(3):
        one = wiener_deconvolve(y[i : i + 1], kernels[i], float(nsr[i]))
        torch.testing.assert_close(out[i : i + 1], one, rtol=0, atol=1e-12)
    # several NSR values per image: one result per value, each the single-value result
    multi = wiener_deconvolve(y, kernels, torch.tensor([[1e-3, 1e-1]] * 3, dtype=torch.float64))
    assert multi.shape == (3, 2, 3, 31, 27)
    torch.testing.assert_close(multi[:, 0], wiener_deconvolve(y, kernels, 1e-3), rtol=0, atol=1e-12)


def test_regularizer_filters_and_gradients():
    x = photo(20, 18)
    k = gaussian_family_kernel("iso", 7, 1.0, 1.0, 0.0)
    y = ops.filter2d(x, k[None])
    identity = torch.zeros(1, 3, 3, dtype=torch.float64)
    identity[0, 1, 1] = 1
    # a single delta regulariser filter is the constant-NSR Wiener filter
    torch.testing.assert_close(
        wiener_deconvolve(y, k, 1e-2, regularizer=identity), wiener_deconvolve(y, k, 1e-2), rtol=0, atol=1e-12
    )
    kernel = k[None].clone().requires_grad_(True)
    nsr = torch.tensor([1e-2], dtype=torch.float64, requires_grad=True)
    filters = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    small = y[..., :9, :8].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: wiener_deconvolve(a, b, c, regularizer=d, pad=4), (small, kernel, nsr, filters)
    )


def test_edge_taper_keeps_interior_and_smooths_frame():
    x = torch.rand(1, 1, 40, 40, dtype=torch.float64)
    k = gaussian_family_kernel("iso", 5, 1.0, 1.0, 0.0)[None, None]
    out = edge_taper(x, k)
    torch.testing.assert_close(out[..., 5:-5, 5:-5], x[..., 5:-5, 5:-5])
    assert not torch.allclose(out[..., 0, :], x[..., 0, :])


def test_bad_input_names_the_argument():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="`kernel`"):
        wiener_deconvolve(x, torch.ones(3, 5, 5) / 25)
    with pytest.raises(ValueError, match="`kernel`"):
        wiener_deconvolve(x, torch.ones(4, 4) / 16)
    with pytest.raises(ValueError, match="`nsr`"):
        wiener_deconvolve(x, torch.ones(5, 5) / 25, torch.ones(3))
    with pytest.raises(ValueError, match="`padding`"):
        wiener_deconvolve(x, torch.ones(5, 5) / 25, padding="circular")
    with pytest.raises(ValueError, match="`image`"):
        wiener_deconvolve(x[0], torch.ones(5, 5) / 25)


def test_gaussian8_and_div2krk_kernels():
    assert gaussian8_sigmas(4) == pytest.approx([1.8 + 0.2 * i for i in range(8)])
    assert gaussian8_sigmas(2)[0] == pytest.approx(0.8) and gaussian8_sigmas(3)[-1] == pytest.approx(2.4)
    kernels = gaussian8_kernels(4)
    assert kernels.shape == (8, 21, 21)
    torch.testing.assert_close(kernels.sum((1, 2)), torch.ones(8))
    measured = [effective_sigma(k.double(), "iso") for k in kernels]
    assert measured == pytest.approx(gaussian8_sigmas(4), abs=0.05)
    with pytest.raises(ValueError, match="`scale`"):
        gaussian8_sigmas(5)

    g = torch.Generator().manual_seed(0)
    params, k = div2krk_kernel(g, 4)
    assert k.shape == (21, 21) and float(k.min()) >= 0 and float(k.sum()) == pytest.approx(1, abs=1e-5)
    assert math.sqrt(0.7) <= params["sigma_x"] <= math.sqrt(10) and 0 <= params["rotation"] <= math.pi
    p2, k2 = div2krk_kernel(torch.Generator().manual_seed(0), 4)
    assert p2 == params and torch.equal(k, k2)

    hr = photo(48, 40).float()
    lr = blur_downsample(hr.expand(2, -1, -1, -1), torch.stack([kernels[0], k]), 4)
    assert lr.shape == (2, 3, 12, 10)
    assert torch.equal(lr * 255, torch.round(lr * 255))
