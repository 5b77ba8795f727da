"""Second-order degradation synthesis (after Real-ESRGAN) returning the LR, applied parameters and labels.

Adapted from Real-ESRGAN (Wang et al., ICCVW 2021): stage 1 and stage 2 each blur → resize → noise →
JPEG; the final step is (resize to the output size + sinc) and JPEG in random order; the result is
rounded to 8 bits. Differences: every choice is drawn per image from that image's own generator
(Real-ESRGAN shares some across a batch), so a batch equals its images one by one; sizes may differ
between images mid-pipeline, so each operation runs batched over the images that share a shape.

Label rule (combined effect of both stages; values are binned by `vocabulary`):
- blur: σ_blur = sqrt(σ₁² + (σ₂ / s₁)²) in HR pixels, where σᵢ is the effective sigma of the stage-i
  kernel as applied (`kernels.effective_sigma`, 0 without blur) and s₁ the stage-1 resize factor (the
  stage-2 kernel acts on the stage-1-resized image). The final sinc acts at the output resolution,
  at or below its Nyquist band, and counts as ringing, not blur. Value: σ_blur / BLUR_SIGMA_MAX.
- noise: σ_noise = sqrt((σ₁·g)² + σ₂²) in 0–255 units, where σᵢ is the stage-i Gaussian sigma or the
  Poisson equivalent sigma measured on the image it was added to, and g = ‖k₂‖₂ (how much the stage-2
  blur scales white noise; 1 without it). Resizing and JPEG are not counted. Value: σ_noise / NOISE_SIGMA_MAX.
- jpeg: the lowest quality among all JPEG steps applied (none → absent).
- downscale: 1 − min(1, smallest intermediate size / output size), the resolution lost beyond the
  output scale; 0 (absent) when no intermediate image was smaller than the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from dalpsr.degradations import ops, vocabulary
from dalpsr.degradations.config import DegradationConfig, StageConfig, preset
from dalpsr.degradations.kernels import KernelParams, choice, pad_kernel, randint, sample_kernel, sample_sinc, uniform


@dataclass
class StageParams:
    """What one stage applied (JSON-ready). Noise sigmas are in 0–255 units."""

    blur: KernelParams | None
    resize_direction: str
    resize_scale: float
    resize_mode: str
    size: tuple[int, int]
    noise_kind: str | None
    noise_sigma: float | None
    poisson_scale: float | None
    noise_gray: bool
    noise_equivalent_sigma: float
    jpeg_quality: int | None


@dataclass
class FinalParams:
    """What the final step applied; `order` is "resize_first" or "jpeg_first"."""

    order: str
    resize_mode: str
    sinc: KernelParams | None
    jpeg_quality: int | None


@dataclass
class DegradationParams:
    """Everything applied to one image, per stage, plus sizes (h, w) and the SR scale."""

    scale: int
    hr_size: tuple[int, int]
    lr_size: tuple[int, int]
    stage1: StageParams
    stage2: StageParams | None
    final: FinalParams

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DegradationResult:
    """Output of `degrade`.

    Attributes:
        lr: B×3×h×w in [0, 1], 8-bit levels.
        params: the parameters applied to each image.
        values: label values per image (see module docstring), keyed by type name.
        labels: B×NUM_TYPES×NUM_BINS multi-hot labels.
        prompts: degradation prompt text per image.
        seeds: the seed of each image's generator when derived by `degrade`, else None.
    """

    lr: torch.Tensor
    params: list[DegradationParams]
    values: list[dict[str, float | None]]
    labels: torch.Tensor
    prompts: list[str]
    seeds: list[int] | None = None


def label_values(params: DegradationParams) -> dict[str, float | None]:
    """Label values for one image under the rule in the module docstring."""
    s1, s2 = params.stage1, params.stage2
    sigma1 = s1.blur.effective_sigma if s1.blur else 0.0
    sigma2 = s2.blur.effective_sigma / s1.resize_scale if (s2 and s2.blur) else 0.0
    blur = math.sqrt(sigma1**2 + sigma2**2) / vocabulary.BLUR_SIGMA_MAX
    gain = s2.blur.l2_norm if (s2 and s2.blur) else 1.0
    n2 = s2.noise_equivalent_sigma if s2 else 0.0
    noise = math.sqrt((s1.noise_equivalent_sigma * gain) ** 2 + n2**2) / vocabulary.NOISE_SIGMA_MAX
    qualities = [q for q in (s1.jpeg_quality, s2.jpeg_quality if s2 else None, params.final.jpeg_quality) if q]
    lr_h, lr_w = params.lr_size
    ratios = [min(s.size[0] / lr_h, s.size[1] / lr_w) for s in (s1, s2) if s is not None]
    downscale = 1.0 - min([1.0, *ratios])
    return {
        "blur": min(blur, 1.0),
        "noise": min(noise, 1.0),
        "jpeg": float(min(qualities)) if qualities else None,
        "downscale": downscale,
    }


def _sample_stage(
    cfg: StageConfig, g: torch.Generator, in_size: tuple[int, int], ref_size: tuple[int, int]
) -> tuple[StageParams, torch.Tensor | None]:
    kernel = None
    blur = None
    if uniform(g, 0.0, 1.0) < cfg.blur_prob:
        blur, kernel = sample_kernel(cfg.kernel, g)
    direction = choice(g, ("up", "down", "keep"), cfg.resize_probs)
    lo, hi = cfg.resize_range
    scale = uniform(g, 1.0, hi) if direction == "up" else uniform(g, lo, 1.0) if direction == "down" else 1.0
    mode = choice(g, cfg.resize_modes)
    size = (max(1, int(ref_size[0] * scale)), max(1, int(ref_size[1] * scale)))
    kind = sigma = pscale = None
    gray = False
    if uniform(g, 0.0, 1.0) < cfg.noise_prob:
        if uniform(g, 0.0, 1.0) < cfg.gaussian_noise_prob:
            kind, sigma = "gaussian", uniform(g, *cfg.noise_range)
        else:
            kind, pscale = "poisson", uniform(g, *cfg.poisson_scale_range)
        gray = uniform(g, 0.0, 1.0) < cfg.gray_noise_prob
    quality = randint(g, *cfg.jpeg_range) if uniform(g, 0.0, 1.0) < cfg.jpeg_prob else None
    params = StageParams(blur, direction, scale, mode, size, kind, sigma, pscale, gray, sigma or 0.0, quality)
    return params, kernel


def sample_params(
    config: DegradationConfig, generator: torch.Generator, hr_size: tuple[int, int], scale: int
) -> tuple[DegradationParams, dict[str, torch.Tensor]]:
    """Draw every parameter for one image (noise values themselves are drawn when applied).

    Returns:
        (params, kernels): kernels holds the padded float32 kernels under "stage1", "stage2", "sinc".
    """
    h, w = hr_size
    lr_size = (h // scale, w // scale)
    size = config.max_kernel_size
    kernels: dict[str, torch.Tensor] = {}
    stage1, k1 = _sample_stage(config.stage1, generator, hr_size, hr_size)
    if k1 is not None:
        kernels["stage1"] = pad_kernel(k1, size)
    stage2 = None
    if config.stage2 is not None:
        stage2, k2 = _sample_stage(config.stage2, generator, stage1.size, lr_size)
        if k2 is not None:
            kernels["stage2"] = pad_kernel(k2, size)
    fc = config.final
    order = "resize_first" if uniform(generator, 0.0, 1.0) < fc.resize_first_prob else "jpeg_first"
    mode = choice(generator, fc.resize_modes)
    sinc = None
    if uniform(generator, 0.0, 1.0) < fc.sinc_prob:
        sinc, ks = sample_sinc(fc.sinc_sizes, fc.sinc_omega_range, generator)
        kernels["sinc"] = pad_kernel(ks, size)
    quality = randint(generator, *fc.jpeg_range) if uniform(generator, 0.0, 1.0) < fc.jpeg_prob else None
    final = FinalParams(order, mode, sinc, quality)
    return DegradationParams(scale, (h, w), lr_size, stage1, stage2, final), kernels


def _grouped(images: list[torch.Tensor], members: Sequence[int], fn: Callable, key: Callable | None = None) -> None:
    """Apply `fn(batch, indices)` to the images in `members`, batched over those sharing shape and key."""
    groups: dict[tuple, list[int]] = {}
    for i in members:
        groups.setdefault((tuple(images[i].shape), key(i) if key else None), []).append(i)
    for idx in groups.values():
        out = fn(torch.cat([images[i] for i in idx]), idx)
        for j, i in enumerate(idx):
            images[i] = out[j : j + 1]


def _apply_stage(
    images: list[torch.Tensor],
    stages: list[StageParams],
    kernels: list[torch.Tensor | None],
    generators: list[torch.Generator],
    backend: str,
) -> None:
    n = range(len(images))
    _grouped(
        images,
        [i for i in n if kernels[i] is not None],
        lambda x, m: ops.filter2d(x, torch.stack([kernels[i] for i in m])),
    )
    _grouped(images, list(n), lambda x, m: ops.resize(x, stages[m[0]].size, stages[m[0]].resize_mode),
             key=lambda i: (stages[i].size, stages[i].resize_mode))  # fmt: skip
    for i in n:
        st = stages[i]
        if st.noise_kind == "gaussian":
            images[i] = ops.add_gaussian_noise(images[i], st.noise_sigma, st.noise_gray, generators[i])
        elif st.noise_kind == "poisson":
            images[i], st.noise_equivalent_sigma = ops.add_poisson_noise(
                images[i], st.poisson_scale, st.noise_gray, generators[i]
            )
    _grouped(
        images,
        [i for i in n if stages[i].jpeg_quality],
        lambda x, m: ops.jpeg(x, [stages[i].jpeg_quality for i in m], backend),
    )


def make_generators(
    batch_size: int,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seeds: Sequence[int] | None = None,
) -> tuple[list[torch.Generator], list[int] | None]:
    """One CPU generator per image.

    A list of generators is used as given; `seeds` seed fresh generators; a single generator draws one
    seed per image (returned), so `degrade(batch, generator=g)` equals `degrade_image` on each image with
    `torch.Generator().manual_seed(seed_i)`.
    """
    if seeds is not None:
        seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
        if len(seeds) != batch_size:
            raise ValueError(f"`seeds` must have one seed per image ({batch_size}); got {len(seeds)}.")
        return [torch.Generator().manual_seed(s) for s in seeds], seeds
    if isinstance(generator, torch.Generator):
        derived = torch.randint(0, 2**62, (batch_size,), generator=generator).tolist()
        return [torch.Generator().manual_seed(s) for s in derived], derived
    if isinstance(generator, Sequence) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != batch_size:
            raise ValueError(
                f"`generator` list must have one generator per image ({batch_size}); got {len(generator)}."
            )
        return list(generator), None
    raise TypeError(
        "`generator` must be a torch.Generator or a list of one per image, or `seeds` a list of ints; "
        f"got generator={type(generator).__name__}, seeds={seeds!r}."
    )


def degrade(
    hr: torch.Tensor,
    config: DegradationConfig | str | None = None,
    *,
    scale: int = 4,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seeds: Sequence[int] | None = None,
) -> DegradationResult:
    """Synthesise LR images from HR images with random second-order degradations.

    Args:
        hr: B×3×H×W float tensor in [0, 1] (CPU or CUDA); H and W at least `scale`.
        config: a `DegradationConfig`, a preset name, or None for "realesrgan".
        scale: SR scale; the LR is (H // scale) × (W // scale).
        generator: a CPU `torch.Generator` (per-image seeds are drawn from it) or one per image.
        seeds: alternatively, one integer seed per image.

    Returns:
        `DegradationResult` with the LR batch, applied parameters, label values, labels and prompt text.
    """
    if config is None or isinstance(config, str):
        config = preset(config or "realesrgan", scale=scale)
    if not isinstance(config, DegradationConfig):
        raise TypeError(f"`config` must be a DegradationConfig or a preset name; got {type(config).__name__}.")
    if not isinstance(hr, torch.Tensor) or hr.ndim != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
        shape = tuple(hr.shape) if isinstance(hr, torch.Tensor) else type(hr).__name__
        raise ValueError(f"`hr` must be a float B×3×H×W tensor in [0, 1]; got {shape}.")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"`scale` must be a positive integer; got {scale!r}.")
    b, _, h, w = hr.shape
    if h < scale or w < scale:
        raise ValueError(f"`hr` must be at least `scale`={scale} pixels on each side; got {h}×{w}.")
    lo, hi = float(hr.min()), float(hr.max())
    if lo < 0.0 or hi > 1.0 or lo != lo or hi != hi:
        raise ValueError(f"`hr` values must lie in [0, 1]; got range [{lo:.4g}, {hi:.4g}].")
    generators, used_seeds = make_generators(b, generator, seeds)
    if any(g.device.type != "cpu" for g in generators):
        raise ValueError("`generator` must be CPU generator(s); noise is drawn on the CPU and moved to the device.")
    sampled = [sample_params(config, g, (h, w), scale) for g in generators]
    params = [p for p, _ in sampled]
    kernels = [k for _, k in sampled]
    backend = config.jpeg_backend
    images = [hr[i : i + 1].float() for i in range(b)]

    _apply_stage(images, [p.stage1 for p in params], [k.get("stage1") for k in kernels], generators, backend)
    if config.stage2 is not None:
        _apply_stage(images, [p.stage2 for p in params], [k.get("stage2") for k in kernels], generators, backend)

    lr_size = (h // scale, w // scale)
    final = [p.final for p in params]
    jpeg_first = [i for i in range(b) if final[i].order == "jpeg_first" and final[i].jpeg_quality]
    resize_first = [i for i in range(b) if final[i].order == "resize_first" and final[i].jpeg_quality]
    _grouped(images, jpeg_first, lambda x, m: ops.jpeg(x, [final[i].jpeg_quality for i in m], backend))
    _grouped(images, list(range(b)), lambda x, m: ops.resize(x, lr_size, final[m[0]].resize_mode),
             key=lambda i: final[i].resize_mode)  # fmt: skip
    _grouped(
        images,
        [i for i in range(b) if "sinc" in kernels[i]],
        lambda x, m: ops.filter2d(x, torch.stack([kernels[i]["sinc"] for i in m])),
    )
    _grouped(images, resize_first, lambda x, m: ops.jpeg(x, [final[i].jpeg_quality for i in m], backend))

    lr = torch.clamp(torch.round(torch.cat(images) * 255.0), 0, 255) / 255.0
    values = [label_values(p) for p in params]
    labels = torch.stack([vocabulary.values_to_labels(v) for v in values])
    prompts = [vocabulary.labels_to_text(lab) for lab in labels]
    return DegradationResult(lr.to(hr.dtype), params, values, labels, prompts, used_seeds)


@dataclass
class DegradedImage:
    """Output of `degrade_image`: one LR (3×h×w) with its parameters, label values, labels and prompt."""

    lr: torch.Tensor
    params: DegradationParams
    values: dict[str, float | None]
    labels: torch.Tensor
    prompt: str


def degrade_image(
    hr: torch.Tensor,
    config: DegradationConfig | str | None = None,
    *,
    scale: int = 4,
    generator: torch.Generator,
) -> DegradedImage:
    """Per-image path: degrade one 3×H×W image using `generator` directly as its generator.

    `degrade(batch, generator=[g_0, …])` gives the same result as `degrade_image(batch[i], generator=g_i)`.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator; got {type(generator).__name__}.")
    if not isinstance(hr, torch.Tensor) or hr.ndim != 3:
        shape = tuple(hr.shape) if isinstance(hr, torch.Tensor) else type(hr).__name__
        raise ValueError(f"`hr` must be a 3×H×W tensor; got {shape}.")
    out = degrade(hr.unsqueeze(0), config, scale=scale, generator=[generator])
    return DegradedImage(out.lr[0], out.params[0], out.values[0], out.labels[0], out.prompts[0])
