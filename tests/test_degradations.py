"""Degradation synthesis: determinism, ranges, what each operation does, labels and text."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dalpsr.degradations import ops, vocabulary
from dalpsr.degradations.config import PRESETS, DegradationConfig, KernelConfig, preset
from dalpsr.degradations.kernels import gaussian_family_kernel, sample_kernel
from dalpsr.degradations.pipeline import degrade, degrade_image, label_values, sample_params


def _photo(size: int = 96) -> torch.Tensor:
    skdata = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).float() / 255.0
    return img[:, 100 : 100 + size, 150 : 150 + size].contiguous()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    x = _photo(96)
    return torch.stack([x, x.flip(-1), x.flip(-2), x.transpose(-1, -2)])


# ---------------------------------------------------------------- vocabulary


def test_vocabulary_layout_and_phrases():
    assert vocabulary.TYPE_NAMES == ("blur", "noise", "jpeg", "downscale")
    assert vocabulary.LABEL_SHAPE == (4, 4)
    assert len(vocabulary.CANDIDATE_PHRASES) == 16
    assert vocabulary.CANDIDATE_PHRASES[2] == "Deblur with sigma 0.50~0.75"
    assert vocabulary.CANDIDATE_PHRASES[9] == "Dejpeg with quality 50~69"
    text = vocabulary.labels_to_text({"blur": 2, "noise": 1, "jpeg": 1})
    assert text == "Deblur with sigma 0.50~0.75, Denoise with sigma 0.25~0.50, Dejpeg with quality 50~69"


def test_text_round_trip_every_label_set():
    rng = np.random.default_rng(0)
    for _ in range(200):
        bins = {n: (None if rng.random() < 0.3 else int(rng.integers(0, 4))) for n in vocabulary.TYPE_NAMES}
        labels = vocabulary.labels_to_text(bins)
        parsed = vocabulary.text_to_labels(labels)
        assert vocabulary.labels_to_bins(parsed) == bins
        assert torch.equal(vocabulary.text_to_labels(vocabulary.labels_to_text(parsed)), parsed)


def test_text_parsing_is_tolerant_and_strict():
    a = vocabulary.text_to_labels("Dejpeg with quality 50~69, Deblur with sigma 0.50~0.75")
    b = vocabulary.text_to_labels("  deblur   with sigma 0.5 ~ 0.75 ;DEJPEG with quality 50~69. ")
    assert torch.equal(a, b)
    assert vocabulary.text_to_labels("").sum() == 0
    for bad in ["Deblur with sigma 0.10~0.30", "Sharpen with sigma 0.00~0.25", "Deblur with quality 50~69", "blur"]:
        with pytest.raises(ValueError, match="unparseable"):
            vocabulary.text_to_labels(bad)
    with pytest.raises(ValueError, match="two different bins"):
        vocabulary.text_to_labels("Deblur with sigma 0.00~0.25, Deblur with sigma 0.75~1.00")
    with pytest.raises(ValueError, match="several bins"):
        vocabulary.labels_to_text(torch.ones(4, 4))


def test_value_to_bin_edges():
    assert vocabulary.value_to_bin("blur", 0.0) is None
    assert vocabulary.value_to_bin("blur", 0.01) == 0
    assert vocabulary.value_to_bin("blur", 0.25) == 1
    assert vocabulary.value_to_bin("blur", 1.0) == 3
    assert vocabulary.value_to_bin("jpeg", 20) == 0
    assert vocabulary.value_to_bin("jpeg", 69) == 1
    assert vocabulary.value_to_bin("jpeg", 95) == 3
    assert vocabulary.value_to_bin("jpeg", None) is None


# ---------------------------------------------------------------- config


def test_presets_and_config_round_trip():
    for name in PRESETS:
        cfg = preset(name)
        assert DegradationConfig.from_dict(cfg.to_dict()) == cfg
    d = DegradationConfig()
    assert d.stage1.kernel.kernel_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert d.stage1.kernel.sizes == (7, 9, 11, 13, 15, 17, 19, 21)
    assert d.stage2.kernel.sigma_range == (0.2, 1.5) and d.stage2.blur_prob == 0.8
    assert d.stage2.resize_probs == (0.3, 0.4, 0.3) and d.final.sinc_prob == 0.8
    assert preset("setting1", scale=2).stage1.kernel.sigma_range == (0.2, 2.0)
    with pytest.raises(ValueError, match="`name`"):
        preset("nope")
    with pytest.raises(ValueError, match="stage1.kernel.kernel_probs"):
        DegradationConfig(stage1=preset().stage1.__class__(kernel=KernelConfig(kernel_probs=(1.0,))))
    with pytest.raises(ValueError, match="jpeg_backend"):
        DegradationConfig(jpeg_backend="cv2")
    with pytest.raises(ValueError, match="unknown"):
        DegradationConfig.from_dict({"bogus": 1})


# ---------------------------------------------------------------- determinism and batching


def test_seeded_determinism_and_batch_equals_single(batch):
    seeds = [11, 12, 13, 14]
    a = degrade(batch, "realesrgan", seeds=seeds)
    b = degrade(batch, "realesrgan", seeds=seeds)
    assert torch.equal(a.lr, b.lr) and a.prompts == b.prompts
    singles = [
        degrade_image(batch[i], "realesrgan", generator=torch.Generator().manual_seed(s)) for i, s in enumerate(seeds)
    ]
    assert torch.equal(torch.stack([s.lr for s in singles]), a.lr)
    assert [s.prompt for s in singles] == a.prompts
    assert [s.params for s in singles] == a.params
    c = degrade(batch, "realesrgan", seeds=[1, 2, 3, 4])
    assert not torch.equal(c.lr, a.lr)
    g = degrade(batch, "realesrgan", generator=torch.Generator().manual_seed(5))
    assert torch.equal(degrade(batch, "realesrgan", seeds=g.seeds).lr, g.lr)
    assert a.lr.shape == (4, 3, 24, 24)
    assert torch.equal(a.lr, torch.round(a.lr * 255) / 255)


def test_no_global_random_state_used(batch):
    torch.manual_seed(0)
    a = degrade(batch[:1], "realesrgan", seeds=[3])
    torch.manual_seed(1)
    np.random.seed(1)
    b = degrade(batch[:1], "realesrgan", seeds=[3])
    assert torch.equal(a.lr, b.lr)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_run_and_torch_backend(batch, name):
    out = degrade(batch[:2], preset(name, jpeg_backend="torch"), seeds=[0, 1])
    assert out.lr.shape == (2, 3, 24, 24) and out.labels.shape == (2, 4, 4)
    assert all(out.lr.isfinite().all() for _ in [0]) and 0 <= out.lr.min() and out.lr.max() <= 1
    if name == "bicubic":
        ref = ops.resize(batch[:2], (24, 24), "bicubic_antialias")
        assert torch.allclose(out.lr, ref.clamp(0, 1), atol=0.6 / 255)
        assert out.prompts == ["", ""]


def test_odd_and_tiny_sizes():
    g = torch.Generator().manual_seed(0)
    for h, w in [(4, 4), (5, 7), (9, 13), (37, 23)]:
        x = torch.rand(2, 3, h, w, generator=g)
        out = degrade(x, "realesrgan", seeds=[h, w])
        assert out.lr.shape == (2, 3, h // 4, w // 4)
        single = degrade_image(x[1], "realesrgan", generator=torch.Generator().manual_seed(w))
        assert torch.equal(single.lr, out.lr[1])
    with pytest.raises(ValueError, match="at least `scale`"):
        degrade(torch.rand(1, 3, 3, 8), seeds=[0])


def test_input_validation():
    with pytest.raises(ValueError, match="`hr`"):
        degrade(torch.rand(3, 8, 8), seeds=[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        degrade(torch.full((1, 3, 8, 8), 2.0), seeds=[0])
    with pytest.raises(TypeError, match="`generator`"):
        degrade(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="`seeds`"):
        degrade(torch.rand(2, 3, 8, 8), seeds=[0])


# ---------------------------------------------------------------- sampled parameters


def test_every_sampled_parameter_in_range():
    cfg = preset("realesrgan")
    kinds, orders = set(), set()
    for seed in range(300):
        p, kernels = sample_params(cfg, torch.Generator().manual_seed(seed), (256, 256), 4)
        for st, sc in ((p.stage1, cfg.stage1), (p.stage2, cfg.stage2)):
            if st.blur:
                kc = sc.kernel
                assert st.blur.size in kc.sizes
                kinds.add(st.blur.kind)
                if st.blur.kind == "sinc":
                    lo = math.pi / 3 if st.blur.size < 13 else math.pi / 5
                    assert lo <= st.blur.omega_c <= math.pi
                else:
                    assert kc.sigma_range[0] <= st.blur.sigma_x <= kc.sigma_range[1]
                    assert kc.sigma_range[0] <= st.blur.sigma_y <= kc.sigma_range[1]
                    if st.blur.kind.startswith("generalized"):
                        assert kc.betag_range[0] <= st.blur.beta <= kc.betag_range[1]
                    if st.blur.kind.startswith("plateau"):
                        assert kc.betap_range[0] <= st.blur.beta <= kc.betap_range[1]
            lo, hi = sc.resize_range
            assert {"up": 1 <= st.resize_scale <= hi, "down": lo <= st.resize_scale <= 1, "keep": st.resize_scale == 1}[
                st.resize_direction
            ]
            assert st.resize_mode in sc.resize_modes
            assert st.noise_kind in ("gaussian", "poisson")
            if st.noise_kind == "gaussian":
                assert sc.noise_range[0] <= st.noise_sigma <= sc.noise_range[1]
            else:
                assert sc.poisson_scale_range[0] <= st.poisson_scale <= sc.poisson_scale_range[1]
            assert sc.jpeg_range[0] <= st.jpeg_quality <= sc.jpeg_range[1]
        assert p.stage1.blur is not None
        assert p.final.jpeg_quality is not None and 30 <= p.final.jpeg_quality <= 95
        if p.final.sinc:
            assert math.pi / 3 <= p.final.sinc.omega_c <= math.pi
        orders.add(p.final.order)
        for k in kernels.values():
            assert k.shape == (21, 21) and abs(float(k.sum()) - 1) < 1e-5
    assert kinds == set(cfg.stage1.kernel.kernel_types) | {"sinc"}
    assert orders == {"resize_first", "jpeg_first"}


# ---------------------------------------------------------------- what each operation does


@pytest.mark.parametrize("sigma", [5.0, 15.0, 30.0])
def test_gaussian_noise_std_matches_sigma(sigma):
    flat = torch.full((1, 3, 128, 128), 0.5)
    out = ops.add_gaussian_noise(flat, sigma, gray=False, generator=torch.Generator().manual_seed(0))
    assert abs(float((out - flat).std()) * 255 - sigma) < 0.03 * sigma
    gray = ops.add_gaussian_noise(flat, sigma, gray=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_poisson_noise_matches_equivalent_sigma():
    flat = torch.full((1, 3, 128, 128), 0.5)
    out, sigma_eq = ops.add_poisson_noise(flat, 2.0, gray=False, generator=torch.Generator().manual_seed(0))
    measured = float((out - flat).std()) * 255
    assert abs(measured - sigma_eq) < 0.05 * sigma_eq
    assert abs(sigma_eq - 255 * 2.0 * math.sqrt(0.5 / 256)) < 0.2


def test_blur_lowers_high_frequency_energy_monotonically():
    x = _photo(96)[None]

    def hf_energy(img):
        spec = torch.fft.fft2(img).abs() ** 2
        f = torch.fft.fftfreq(img.shape[-1])
        mask = (f[:, None].abs() > 0.25) | (f[None, :].abs() > 0.25)
        return float(spec[..., mask].sum())

    energies = []
    for sigma in [0.3, 0.6, 1.0, 1.5, 2.0, 3.0]:
        k = gaussian_family_kernel("iso", 21, sigma, sigma, 0.0).float()[None]
        energies.append(hf_energy(ops.filter2d(x, k)))
    assert all(a > b for a, b in zip(energies, energies[1:]))
    aniso = gaussian_family_kernel("aniso", 21, 2.0, 0.5, 0.3).float()[None]
    assert hf_energy(ops.filter2d(x, aniso)) < hf_energy(x)


def test_effective_sigma_of_kernels():
    g = torch.Generator().manual_seed(0)
    p, k = sample_kernel(KernelConfig(kernel_types=("iso",), kernel_probs=(1.0,), sizes=(21,), sinc_prob=0.0), g)
    assert abs(p.effective_sigma - p.sigma_x) < 0.02 * p.sigma_x + 0.01
    assert abs(p.l2_norm - float(k.pow(2).sum().sqrt())) < 1e-6


def _pillow_quality(img: torch.Tensor, quality: int) -> int:
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buf.getvalue())) as f:
        return ops.estimate_jpeg_quality(f.quantization[0])


def test_jpeg_quality_recoverable_from_saved_file_tables():
    x = _photo(64)
    for seed in range(12):
        out = degrade(x[None], "realesrgan", seeds=[seed])
        q = out.params[0].final.jpeg_quality
        estimated = _pillow_quality(out.lr[0], q)
        assert estimated == q
        steps = [out.params[0].stage1.jpeg_quality, out.params[0].stage2.jpeg_quality, q]
        assert out.values[0]["jpeg"] == min(steps)
        assert vocabulary.value_to_bin("jpeg", min(steps)) == int(out.labels[0, 2].argmax())


def test_torch_jpeg_matches_libjpeg_within_the_bin():
    x = _photo(96)[None]
    probes = [35, 60, 80, 95]
    for q in [32, 55, 75, 93]:
        ours = ops.jpeg_torch(x, [q])
        lib = ops.jpeg_pillow(x, [q])
        psnr = -10 * math.log10(float(((ours - lib) ** 2).mean()))
        assert psnr > 38
        errs = [float(((ours - ops.jpeg_pillow(x, [p])) ** 2).mean()) for p in probes]
        nearest = probes[int(np.argmin(errs))]
        assert vocabulary.value_to_bin("jpeg", nearest) == vocabulary.value_to_bin("jpeg", q)
    assert torch.equal(ops.jpeg_torch(x.repeat(2, 1, 1, 1), [40, 90])[1], ops.jpeg_torch(x, [90])[0])


# ---------------------------------------------------------------- label rule


def test_label_rule_combines_both_stages():
    cfg = preset("realesrgan")
    p, _ = sample_params(cfg, torch.Generator().manual_seed(3), (256, 256), 4)
    p.stage1.blur.effective_sigma, p.stage1.resize_scale, p.stage1.size = 1.2, 0.5, (128, 128)
    p.stage2.blur = sample_kernel(cfg.stage2.kernel, torch.Generator().manual_seed(0))[0]
    p.stage2.blur.effective_sigma, p.stage2.blur.l2_norm = 0.45, 0.5
    p.stage2.size = (48, 48)
    p.stage1.noise_equivalent_sigma, p.stage2.noise_equivalent_sigma = 20.0, 9.0
    p.stage1.jpeg_quality, p.stage2.jpeg_quality, p.final.jpeg_quality = 80, 45, 90
    v = label_values(p)
    assert v["blur"] == pytest.approx(math.sqrt(1.2**2 + (0.45 / 0.5) ** 2) / 3.0)
    assert v["noise"] == pytest.approx(math.sqrt((20 * 0.5) ** 2 + 9**2) / 30.0)
    assert v["jpeg"] == 45
    assert v["downscale"] == pytest.approx(1 - 48 / 64)
    p.stage2.blur = None
    assert label_values(p)["noise"] == pytest.approx(math.sqrt(20**2 + 9**2) / 30.0)
    labels = vocabulary.values_to_labels(label_values(p))
    assert vocabulary.labels_to_text(labels).startswith("Deblur with sigma 0.25~0.50, Denoise with sigma 0.50~0.75")


def test_setting2_labels_follow_noise_and_blur():
    x = _photo(96)
    out = degrade(x[None].repeat(6, 1, 1, 1), "setting2", seeds=range(6))
    for p, v, lab in zip(out.params, out.values, out.labels):
        assert p.stage2.noise_kind == "gaussian" and 0 <= p.stage2.noise_sigma <= 25
        assert v["noise"] == pytest.approx(p.stage2.noise_sigma / 30.0)
        assert v["jpeg"] is None and lab[2].sum() == 0 and v["downscale"] == 0
        assert v["blur"] == pytest.approx(min(p.stage1.blur.effective_sigma / 3.0, 1.0))


def test_balanced_preset_one_cause_per_label_and_balanced_presence():
    x = _photo(64)
    out = degrade(x[None].repeat(64, 1, 1, 1), "balanced", scale=1, seeds=range(64))
    assert out.lr.shape == (64, 3, 64, 64)
    for p, v in zip(out.params, out.values):
        assert p.stage2.blur is None and p.stage2.jpeg_quality is None and p.stage1.noise_kind is None
        blur = p.stage1.blur.effective_sigma / 3.0 if p.stage1.blur else 0.0
        assert v["blur"] == pytest.approx(min(blur, 1.0))
        assert v["noise"] == pytest.approx(p.stage2.noise_sigma / 30.0 if p.stage2.noise_kind else 0.0)
        assert v["jpeg"] == p.final.jpeg_quality
        assert v["downscale"] == pytest.approx(1 - p.stage2.size[0] / 64, abs=1 / 64)
    present = out.labels.amax(-1).mean(0)  # fraction of images showing each type
    assert bool((present > 0.3).all()) and bool((present < 0.7).all()), present


@pytest.mark.gpu
def test_cuda_batch_matches_single():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = _photo(96)[None].repeat(3, 1, 1, 1).cuda()
    out = degrade(x, "realesrgan", seeds=[0, 1, 2])
    assert out.lr.is_cuda
    single = degrade_image(x[1], "realesrgan", generator=torch.Generator().manual_seed(1))
    assert torch.equal(single.lr, out.lr[1])
