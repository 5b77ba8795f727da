"""PL-IDENet: shapes, kernel estimator, Wiener layer in closed form, implicit kernel loss, save/load."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch

from dalpsr.degradations import ops
from dalpsr.degradations.kernels import gaussian_family_kernel
from dalpsr.degradations.wiener import wiener_deconvolve
from dalpsr.models.pl_idenet import (
    PLIDENet,
    WienerLayer,
    blur_fft,
    dct_atoms,
    gaussian_kernel_from_params,
    kernel_loss,
    kernel_moments,
    kernel_picture,
    kernel_sigma,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "scale": 2,
    "kernel_size": 7,
    "estimator_channels": 8,
    "upsample_channels": 8,
    "wiener_filter_size": 3,
    "wiener_num_nsr": 2,
    "embed_dim": 16,
    "depths": [2, 1],
    "num_heads": [2, 2],
    "window_size": 4,
    "mlp_ratio": 2.0,
    "drop_path_rate": 0.0,
    "prompt_len": 8,
    "prompt_dim": 4,
    "prompt_scale_factors": [1, 2],
    "prompt_num_heads": [1, 2],
}


def tiny(seed: int = 0, **overrides) -> PLIDENet:
    torch.manual_seed(seed)
    return PLIDENet(**{**TINY, **overrides}).eval()


def test_paper_defaults_and_shapes():
    defaults = {k: v.default for k, v in inspect.signature(PLIDENet.__init__).parameters.items() if k != "self"}
    assert defaults["kernel_size"] == 21 and defaults["embed_dim"] == 96 and defaults["window_size"] == 8
    assert tuple(defaults["depths"]) == (4, 4, 4, 4) and tuple(defaults["prompt_num_heads"]) == (1, 2, 4, 8)
    assert defaults["prompt_len"] == 128 and defaults["wiener_filter_size"] == 5 and defaults["wiener_num_nsr"] == 4

    model = tiny()
    with torch.no_grad():
        for h, w in ((8, 8), (11, 9), (13, 17)):
            out = model(torch.rand(2, 3, h, w))
            assert out.sample.shape == (2, 3, 2 * h, 2 * w) and out.deconvolved.shape == (2, 3, 2 * h, 2 * w)
            assert out.kernel.shape == (2, 7, 7) and float(out.kernel.min()) >= 0
            torch.testing.assert_close(out.kernel.sum((1, 2)), torch.ones(2))
        x4 = tiny(scale=4)
        assert x4(torch.rand(1, 3, 9, 10)).sample.shape == (1, 3, 36, 40)
        assert tiny(scale=3)(torch.rand(1, 3, 8, 8)).sample.shape == (1, 3, 24, 24)
        # with the bicubic skip and a zeroed upsampler the Wiener layer sees the bicubic-upsampled LR
        # (and the body starts as the identity); the estimator starts at the Gaussian of `kernel_init_sigma`
        skip = tiny(bicubic_skip=True, kernel_init_sigma=1.0)
        torch.nn.init.zeros_(skip.upsampler[-1].weight)
        lr = torch.rand(1, 3, 9, 8)
        bicubic = torch.nn.functional.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False)
        out = skip(lr)
        torch.testing.assert_close(out.deconvolved, skip.wiener(bicubic, out.kernel))
        torch.testing.assert_close(out.sample, out.deconvolved, rtol=0, atol=1e-6)
        assert float(kernel_sigma(out.kernel)[0]) == pytest.approx(1.0, abs=0.1)


def test_shipped_tiny_config_builds():
    run = json.loads((ROOT / "configs" / "train_pl_idenet_tiny.json").read_text())
    model = PLIDENet(**run["model"])
    assert model.config.scale == run["data"]["scale"] == 4 and model.config.kernel_size == 21
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_wiener_layer_closed_form():
    layer = WienerLayer(3, 2, (1e-3, 1e-1))
    reg = layer.regularizer()
    # zero-mean filters of norm = their scale, started from the 8 non-DC DCT atoms
    assert reg.shape == (8, 3, 3)
    torch.testing.assert_close(reg.sum((1, 2)), torch.zeros(8), rtol=0, atol=1e-6)
    torch.testing.assert_close(reg.flatten(1).norm(dim=1), torch.full((8,), 0.1))
    atoms = dct_atoms(3).flatten(1)
    torch.testing.assert_close(atoms @ atoms.T, torch.eye(8), rtol=0, atol=1e-6)

    image = torch.rand(2, 3, 20, 18)
    kernel = torch.stack([gaussian_family_kernel("iso", 5, s, s, 0.0).float() for s in (0.6, 1.3)])
    with torch.no_grad():
        layer.mix.copy_(torch.tensor([0.3, 0.7]))
        out = layer(image, kernel)
    # the learned mix of one closed-form deconvolution per learned NSR value (reflect pad + taper + crop)
    expected = sum(
        m * wiener_deconvolve(image, kernel, float(v), regularizer=reg)
        for m, v in zip((0.3, 0.7), layer.log_nsr.detach().exp())
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # against the explicit Fourier formula on a periodic image (no padding): X = conj(K) Y / (|K|² + λ Σ|G|²)
    k = kernel[0]
    grid = torch.zeros(20, 18)
    grid[:5, :5] = k
    otf = torch.fft.fft2(torch.roll(grid, (-2, -2), (0, 1)))
    gpow = sum(
        torch.fft.fft2(torch.roll(torch.nn.functional.pad(g, (0, 15, 0, 17)), (-1, -1), (0, 1))).abs() ** 2
        for g in reg.detach()
    )
    lam = 1e-2
    manual = torch.fft.ifft2(otf.conj() * torch.fft.fft2(image[0]) / (otf.abs() ** 2 + lam * gpow)).real
    op = wiener_deconvolve(image[:1], k, lam, regularizer=reg.detach(), padding="none")[0]
    torch.testing.assert_close(op, manual, rtol=1e-4, atol=1e-4)


def test_kernel_loss_and_sigma():
    torch.manual_seed(0)
    hr = ops.filter2d(
        torch.rand(2, 3, 32, 32), gaussian_family_kernel("iso", 5, 1.0, 1.0, 0.0)[None].float().expand(2, -1, -1)
    )
    true = torch.stack([gaussian_family_kernel("iso", 21, s, s, 0.0).float() for s in (1.0, 2.5)])
    lr = ops.resize(ops.filter2d(hr, true), (8, 8), "bicubic_antialias")
    assert float(kernel_loss(hr, true, lr)) < 1e-6
    wrong = true.flip(0)
    assert float(kernel_loss(hr, wrong, lr)) > 1e-3
    torch.testing.assert_close(kernel_sigma(true), torch.tensor([1.0, 2.5]), rtol=0, atol=0.02)
    shifted = torch.roll(true, 2, dims=-1)  # σ is measured about the centre of mass
    torch.testing.assert_close(kernel_sigma(shifted), kernel_sigma(true), rtol=0, atol=0.05)


def test_detached_kernel_trains_estimator_only_through_kernel_loss():
    model = tiny().train()
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16)
    out = model(lr)
    (out.sample - hr).abs().mean().backward()
    assert all(p.grad is None for p in model.estimator.parameters())
    assert model.kernel_embedding[0].weight.grad.abs().sum() > 0 and model.wiener.log_nsr.grad.abs().sum() > 0
    model.zero_grad()
    kernel_loss(hr, model(lr).kernel, lr).backward()
    assert model.estimator.head[-1].weight.grad.abs().sum() > 0
    joint = tiny(detach_kernel=False).train()
    (joint(lr).sample - hr).abs().mean().backward()
    assert joint.estimator.head[-1].weight.grad.abs().sum() > 0


def test_save_load_round_trip(tmp_path):
    model = tiny(seed=3)
    lr = torch.rand(1, 3, 10, 12)
    with torch.no_grad():
        ref = model(lr)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = PLIDENet.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.depths == TINY["depths"]
    with torch.no_grad():
        out = loaded(lr, return_dict=False)
    for a, b in zip(out, (ref.sample, ref.kernel, ref.deconvolved)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="`scale`"):
        PLIDENet(**{**TINY, "scale": 5})
    with pytest.raises(ValueError, match="`kernel_size`"):
        PLIDENet(**{**TINY, "kernel_size": 8})
    with pytest.raises(ValueError, match="`num_heads`"):
        PLIDENet(**{**TINY, "num_heads": [2]})
    with pytest.raises(ValueError, match="`prompt_num_heads`"):
        PLIDENet(**{**TINY, "prompt_num_heads": [3, 2]})
    with pytest.raises(ValueError, match="`lr`"):
        tiny()(torch.rand(1, 3, 6, 8))
    with pytest.raises(ValueError, match="`kernel_parameterization`"):
        PLIDENet(**{**TINY, "kernel_parameterization": "sinc"})
    with pytest.raises(ValueError, match="`kernel_min_sigma`"):
        PLIDENet(**{**TINY, "kernel_min_sigma": 0.0})
    with pytest.raises(ValueError, match="`kernel_init_sigma`"):
        PLIDENet(**{**TINY, "kernel_parameterization": "gaussian", "kernel_init_sigma": 0.1})


def test_kernel_moments_and_description():
    k = gaussian_family_kernel("aniso", 21, 3.0, 1.0, math.radians(30)).float()
    m = kernel_moments(k)
    assert m["sigma_major"] == pytest.approx(3.0, abs=0.05) and m["sigma_minor"] == pytest.approx(1.0, abs=0.02)
    assert m["angle_deg"] == pytest.approx(30.0, abs=0.5)
    assert m["sigma"] == pytest.approx(float(kernel_sigma(k[None])[0]), abs=1e-5)
    iso = kernel_moments(gaussian_family_kernel("iso", 21, 2.0, 2.0, 0.0))
    assert iso["sigma_major"] == pytest.approx(iso["sigma_minor"], abs=1e-6)

    picture = kernel_picture(k, zoom=3)
    assert picture.shape == (63, 63) and picture.dtype.name == "uint8" and picture.max() == 255

    model = tiny(kernel_init_sigma=1.5)
    image = torch.rand(3, 12, 10)
    report = model.describe_kernel(image)
    assert report["scale"] == 2 and report["kernel"].shape == (7, 7)
    with torch.no_grad():
        torch.testing.assert_close(report["kernel"], model.estimate_kernel(image[None])[0])
    # a larger image: the mean kernel of a grid of crops of `crop_size`
    from dalpsr.models.prompt_decoder import grid_crops

    big = torch.rand(3, 40, 33)
    crops = grid_crops(big, (16, 16), 4)
    assert crops.shape == (4, 3, 16, 16)
    with torch.no_grad():
        expected = model.estimate_kernel(crops).mean(0)
    torch.testing.assert_close(model.describe_kernel(big, crop_size=16, max_crops=4)["kernel"], expected)
    with pytest.raises(ValueError, match="`crop_size`"):
        model.describe_kernel(big, crop_size=4)
    assert report["sigma"] == pytest.approx(float(kernel_sigma(report["kernel"][None])[0]), abs=1e-4)
    with pytest.raises(ValueError, match="`image`"):
        model.describe_kernel(torch.rand(1, 3, 12, 10))
    with pytest.raises(ValueError, match="h, w >= 8"):
        model.describe_kernel(torch.rand(3, 6, 10))


def test_blur_fft_is_filter2d():
    torch.manual_seed(0)
    for (h, w), k in (((30, 33), 7), ((24, 24), 21), ((9, 13), 21)):  # the last pads by replication, as filter2d
        x = torch.rand(2, 3, h, w)
        kernels = torch.rand(2, k, k)
        kernels = kernels / kernels.sum((1, 2), keepdim=True)
        torch.testing.assert_close(blur_fft(x, kernels), ops.filter2d(x, kernels), rtol=0, atol=2e-6)
    asym = torch.zeros(1, 5, 5)
    asym[0, 1, 3] = 1.0  # not symmetric: catches a flipped kernel
    x = torch.rand(1, 1, 12, 12)
    torch.testing.assert_close(blur_fft(x, asym), ops.filter2d(x, asym), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="`kernels`"):
        blur_fft(x, torch.rand(1, 4, 4))


def test_gaussian_head_kernels():
    # a known covariance R·diag(σ1², σ2²)·Rᵀ − floor² through its Cholesky factor gives that anisotropic Gaussian
    s1, s2, theta, floor = 3.0, 1.2, math.radians(30), 0.2
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([s1 * s1, s2 * s2], dtype=torch.float64)) @ rot.T
    chol = torch.linalg.cholesky(cov - floor * floor * torch.eye(2, dtype=torch.float64))
    params = torch.tensor([[chol[0, 0].log(), chol[1, 0], chol[1, 1].log()]], dtype=torch.float64)
    kernel = gaussian_kernel_from_params(params, 21, floor)[0]
    torch.testing.assert_close(kernel, gaussian_family_kernel("aniso", 21, s1, s2, theta), rtol=0, atol=1e-12)
    # any parameters give a kernel; σ never drops below the floor
    tiny_kernel = gaussian_kernel_from_params(torch.full((1, 3), -20.0), 21, floor)
    assert float(tiny_kernel.sum()) == pytest.approx(1.0) and float(kernel_sigma(tiny_kernel)[0]) > 0.15

    model = tiny(kernel_parameterization="gaussian", kernel_init_sigma=1.5)
    assert model.estimator.head[-1].out_channels == 3
    with torch.no_grad():
        k = model(torch.rand(2, 3, 9, 10)).kernel
    assert k.shape == (2, 7, 7) and float(k.min()) >= 0
    torch.testing.assert_close(k.sum((1, 2)), torch.ones(2))
    torch.nn.init.zeros_(model.estimator.head[-1].weight)  # the bias alone: the isotropic init kernel
    with torch.no_grad():
        k = model.estimate_kernel(torch.rand(1, 3, 9, 10))
    torch.testing.assert_close(k[0], gaussian_family_kernel("iso", 7, 1.5, 1.5, 0.0).float(), rtol=0, atol=1e-6)


def test_estimator_normalization_and_kernel_only():
    model = tiny(kernel_parameterization="gaussian", estimator_normalization=True)
    assert isinstance(model.estimator.head[2], torch.nn.BatchNorm2d)
    model.train()
    lr = torch.rand(4, 3, 12, 12) * 0.5 + 0.2
    model(lr)  # batch statistics move the running ones
    assert float(model.estimator.head[2].running_var.sub(1).abs().max()) > 0
    model.eval()
    with torch.no_grad():
        # standardised input: the estimate ignores brightness and contrast
        torch.testing.assert_close(model.estimate_kernel(lr), model.estimate_kernel(0.5 * lr + 0.1), rtol=0, atol=1e-5)
        full = model(lr)
        only = model(lr, kernel_only=True)
    assert only.sample is None and only.deconvolved is None
    torch.testing.assert_close(only.kernel, full.kernel, rtol=0, atol=0)
    # the estimator keeps PyTorch's default conv init (the trunc-normal 0.02 init is the restorer's)
    w = model.estimator.enc1[0].weight.detach()
    bound = 1 / math.sqrt(w[0].numel())
    assert float(w.abs().max()) > 0.1 and float(w.abs().max()) <= bound
