"""Degradation settings as dataclasses, with the Real-ESRGAN defaults and the blind-SR presets.

Real-ESRGAN (Wang et al., ICCVW 2021, xinntao/Real-ESRGAN) facts carried over: kernel types and
probabilities, kernel sizes 7–21, sigma ranges, generalized/plateau beta ranges, sinc probabilities and
cutoffs, resize probabilities and ranges, noise ranges and probabilities, JPEG range, stage-2 blur
probability and the random order of the final step. Differences: every random choice is per image (the
reference shares the resize scale, noise kind and final order across a batch); JPEG qualities are
integers; Poisson noise always uses 256 photon levels (see `ops.add_poisson_noise`).

Blind-SR presets follow the DASR / IKC protocol used by CDSR and PL-IDENet: "setting1" isotropic
Gaussian kernels (size 21, sigma in [0.2, 2/3/4] for ×2/×3/×4) then bicubic downsampling; "setting2"
anisotropic Gaussian kernels (axis sigmas in [0.2, 4], rotation in [0, π]) then bicubic downsampling and
Gaussian noise of level [0, 25] on the LR. "light" is this project's milder one-stage variant.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic", "bicubic_antialias")
JPEG_BACKENDS = ("auto", "torch", "pillow")
PRESETS = ("realesrgan", "light", "bicubic", "setting1", "setting2", "balanced")
ODD_SIZES_7_21 = (7, 9, 11, 13, 15, 17, 19, 21)


def _check_range(name: str, r, lo: float = -math.inf, hi: float = math.inf) -> None:
    if len(r) != 2 or not (lo <= r[0] <= r[1] <= hi):
        raise ValueError(f"`{name}` must be (low, high) with {lo} <= low <= high <= {hi}; got {tuple(r)}.")


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"`{name}` must be a probability in [0, 1]; got {p}.")


def _check_probs(name: str, probs, n: int) -> None:
    if len(probs) != n or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"`{name}` must be {n} non-negative probabilities summing to 1; got {tuple(probs)}.")


@dataclass
class KernelConfig:
    """Random blur kernel settings (Real-ESRGAN stage-1 defaults)."""

    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sizes: tuple[int, ...] = ODD_SIZES_7_21
    sigma_range: tuple[float, float] = (0.2, 3.0)
    rotation_range: tuple[float, float] = (-math.pi, math.pi)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1

    def validate(self, prefix: str) -> None:
        bad = [t for t in self.kernel_types if t not in KERNEL_TYPES]
        if bad or not self.kernel_types:
            raise ValueError(f"`{prefix}.kernel_types` must be a non-empty subset of {KERNEL_TYPES}; got {bad}.")
        _check_probs(f"{prefix}.kernel_probs", self.kernel_probs, len(self.kernel_types))
        if not self.sizes or any(s < 1 or s % 2 == 0 or s > 31 for s in self.sizes):
            raise ValueError(f"`{prefix}.sizes` must be odd kernel sizes in [1, 31]; got {self.sizes}.")
        _check_range(f"{prefix}.sigma_range", self.sigma_range, 1e-3)
        _check_range(f"{prefix}.rotation_range", self.rotation_range)
        _check_range(f"{prefix}.betag_range", self.betag_range, 1e-3)
        _check_range(f"{prefix}.betap_range", self.betap_range, 1e-3)
        _check_prob(f"{prefix}.sinc_prob", self.sinc_prob)


@dataclass
class StageConfig:
    """One degradation stage: blur → resize → noise → JPEG (Real-ESRGAN stage-1 defaults).

    Stage 1 resizes relative to its input; stage 2 resizes relative to the final output size (so "keep"
    in stage 2 means "to the output size"), as in Real-ESRGAN.
    """

    blur_prob: float = 1.0
    kernel: KernelConfig = field(default_factory=KernelConfig)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    noise_prob: float = 1.0
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_prob: float = 1.0
    jpeg_range: tuple[int, int] = (30, 95)

    def validate(self, prefix: str) -> None:
        _check_prob(f"{prefix}.blur_prob", self.blur_prob)
        self.kernel.validate(f"{prefix}.kernel")
        _check_probs(f"{prefix}.resize_probs", self.resize_probs, 3)
        _check_range(f"{prefix}.resize_range", self.resize_range, 1e-3)
        if self.resize_probs[0] > 0 and self.resize_range[1] < 1:
            raise ValueError(f"`{prefix}.resize_range` must reach above 1 when upscaling has probability > 0.")
        if self.resize_probs[1] > 0 and self.resize_range[0] > 1:
            raise ValueError(f"`{prefix}.resize_range` must reach below 1 when downscaling has probability > 0.")
        _check_modes(f"{prefix}.resize_modes", self.resize_modes)
        _check_prob(f"{prefix}.noise_prob", self.noise_prob)
        _check_prob(f"{prefix}.gaussian_noise_prob", self.gaussian_noise_prob)
        _check_range(f"{prefix}.noise_range", self.noise_range, 0.0)
        _check_range(f"{prefix}.poisson_scale_range", self.poisson_scale_range, 0.0)
        _check_prob(f"{prefix}.gray_noise_prob", self.gray_noise_prob)
        _check_prob(f"{prefix}.jpeg_prob", self.jpeg_prob)
        _check_range(f"{prefix}.jpeg_range", self.jpeg_range, 1, 100)


def _check_modes(name: str, modes) -> None:
    if not modes or any(m not in RESIZE_MODES for m in modes):
        raise ValueError(f"`{name}` must be a non-empty subset of {RESIZE_MODES}; got {tuple(modes)}.")


@dataclass
class FinalConfig:
    """The last step: (resize to the output size + sinc filter) and JPEG, in random order."""

    resize_first_prob: float = 0.5
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    sinc_prob: float = 0.8
    sinc_sizes: tuple[int, ...] = ODD_SIZES_7_21
    sinc_omega_range: tuple[float, float] = (math.pi / 3, math.pi)
    jpeg_prob: float = 1.0
    jpeg_range: tuple[int, int] = (30, 95)

    def validate(self, prefix: str) -> None:
        _check_prob(f"{prefix}.resize_first_prob", self.resize_first_prob)
        _check_modes(f"{prefix}.resize_modes", self.resize_modes)
        _check_prob(f"{prefix}.sinc_prob", self.sinc_prob)
        if not self.sinc_sizes or any(s < 1 or s % 2 == 0 or s > 31 for s in self.sinc_sizes):
            raise ValueError(f"`{prefix}.sinc_sizes` must be odd sizes in [1, 31]; got {self.sinc_sizes}.")
        _check_range(f"{prefix}.sinc_omega_range", self.sinc_omega_range, 1e-3, math.pi)
        _check_prob(f"{prefix}.jpeg_prob", self.jpeg_prob)
        _check_range(f"{prefix}.jpeg_range", self.jpeg_range, 1, 100)


@dataclass
class DegradationConfig:
    """Second-order degradation settings; the defaults are Real-ESRGAN's published ones.

    Args:
        stage1: first stage (applied to the HR image).
        stage2: second stage, or None for a one-stage pipeline.
        final: the final resize/sinc/JPEG step.
        jpeg_backend: "torch" (block-DCT JPEG in torch, batched, any device), "pillow" (libjpeg through
            Pillow, per image on CPU) or "auto" (Pillow for CPU tensors, where libjpeg is the faster of the
            two, torch for GPU tensors).
        name: a label stored with the outputs.
    """

    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig | None = field(
        default_factory=lambda: StageConfig(
            blur_prob=0.8,
            kernel=KernelConfig(sigma_range=(0.2, 1.5), sinc_prob=0.1),
            resize_probs=(0.3, 0.4, 0.3),
            resize_range=(0.3, 1.2),
            noise_range=(1.0, 25.0),
            poisson_scale_range=(0.05, 2.5),
        )
    )
    final: FinalConfig = field(default_factory=FinalConfig)
    jpeg_backend: str = "auto"
    name: str = "realesrgan"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on any out-of-range setting."""
        self.stage1.validate("stage1")
        if self.stage2 is not None:
            self.stage2.validate("stage2")
        self.final.validate("final")
        if self.jpeg_backend not in JPEG_BACKENDS:
            raise ValueError(f"`jpeg_backend` must be one of {JPEG_BACKENDS}; got {self.jpeg_backend!r}.")

    @property
    def max_kernel_size(self) -> int:
        """Size every blur/sinc kernel is padded to (so kernels stack into one batched convolution)."""
        sizes = list(self.stage1.kernel.sizes) + list(self.final.sinc_sizes)
        if self.stage2 is not None:
            sizes += list(self.stage2.kernel.sizes)
        return max(sizes)

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DegradationConfig:
        """Inverse of `to_dict`; unknown keys raise ValueError."""

        def build(kind, d):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(d) - names
            if unknown:
                raise ValueError(
                    f"`data` has unknown {kind.__name__} keys {sorted(unknown)}; allowed: {sorted(names)}."
                )
            kwargs = {}
            for k, v in d.items():
                if k == "kernel":
                    v = build(KernelConfig, v)
                elif k in ("stage1", "stage2"):
                    v = None if v is None else build(StageConfig, v)
                elif k == "final":
                    v = build(FinalConfig, v)
                elif isinstance(v, list):
                    v = tuple(v)
                kwargs[k] = v
            return kind(**kwargs)

        return build(cls, data)


def _no_extra_stage(**kwargs) -> StageConfig:
    base = dict(
        blur_prob=0.0,
        resize_probs=(0.0, 0.0, 1.0),
        resize_range=(1.0, 1.0),
        noise_prob=0.0,
        jpeg_prob=0.0,
    )
    base.update(kwargs)
    return StageConfig(**base)


def _bicubic_final() -> FinalConfig:
    return FinalConfig(resize_first_prob=1.0, resize_modes=("bicubic_antialias",), sinc_prob=0.0, jpeg_prob=0.0)


def preset(name: str = "realesrgan", scale: int = 4, jpeg_backend: str = "auto") -> DegradationConfig:
    """A named `DegradationConfig`.

    Args:
        name: one of `PRESETS`: "realesrgan" (default), "light", "bicubic", "setting1" (isotropic Gaussian
            blur + bicubic), "setting2" (anisotropic Gaussian blur + bicubic + noise), "balanced" (for training the
            degradation encoder: blur, extra downscaling, noise and JPEG each present with probability 1/2,
            independently, one parameter each and never too faint to see at scale 1, so every label follows from
            one visible cause and "none" is the majority class of no type by much).
        scale: SR scale; "setting1" widens its sigma range with it (2.0 / 3.0 / 4.0 for ×2 / ×3 / ×4).
        jpeg_backend: "auto", "torch" or "pillow" (see `DegradationConfig`).
    """
    if name == "realesrgan":
        return DegradationConfig(jpeg_backend=jpeg_backend, name=name)
    if name == "light":
        stage1 = StageConfig(
            kernel=KernelConfig(sigma_range=(0.2, 1.5), sinc_prob=0.0),
            resize_range=(0.5, 1.2),
            noise_range=(1.0, 10.0),
            poisson_scale_range=(0.05, 1.0),
            jpeg_range=(60, 95),
        )
        final = FinalConfig(sinc_prob=0.0, jpeg_range=(70, 95))
        return DegradationConfig(stage1=stage1, stage2=None, final=final, jpeg_backend=jpeg_backend, name=name)
    if name == "bicubic":
        return DegradationConfig(
            stage1=_no_extra_stage(), stage2=None, final=_bicubic_final(), jpeg_backend=jpeg_backend, name=name
        )
    if name == "setting1":
        sigma_max = {2: 2.0, 3: 3.0}.get(int(scale), 4.0)
        kernel = KernelConfig(
            kernel_types=("iso",), kernel_probs=(1.0,), sizes=(21,), sigma_range=(0.2, sigma_max), sinc_prob=0.0
        )
        return DegradationConfig(
            stage1=_no_extra_stage(blur_prob=1.0, kernel=kernel),
            stage2=None,
            final=_bicubic_final(),
            jpeg_backend=jpeg_backend,
            name=name,
        )
    if name == "setting2":
        kernel = KernelConfig(
            kernel_types=("aniso",),
            kernel_probs=(1.0,),
            sizes=(21,),
            sigma_range=(0.2, 4.0),
            rotation_range=(0.0, math.pi),
            sinc_prob=0.0,
        )
        noise_stage = _no_extra_stage(
            resize_modes=("bicubic_antialias",),
            noise_prob=1.0,
            gaussian_noise_prob=1.0,
            noise_range=(0.0, 25.0),
            gray_noise_prob=0.0,
        )
        return DegradationConfig(
            stage1=_no_extra_stage(blur_prob=1.0, kernel=kernel),
            stage2=noise_stage,
            final=_bicubic_final(),
            jpeg_backend=jpeg_backend,
            name=name,
        )
    if name == "balanced":
        # stage 1: isotropic Gaussian blur on the HR image; stage 2 (relative to the output size): the extra
        # downscaling (level 1 - s, s in [0.25, 0.75]) and Gaussian noise; final: back to the output size, JPEG.
        # A present degradation is always visible at scale 1: blur sigma >= 0.75 px, noise sigma >= 4, downscale
        # level >= 0.25, JPEG quality <= 89 (fainter ones would be labelled yet indistinguishable from none)
        kernel = KernelConfig(
            kernel_types=("iso",), kernel_probs=(1.0,), sizes=(21,), sigma_range=(0.75, 3.0), sinc_prob=0.0
        )
        stage2 = _no_extra_stage(
            resize_probs=(0.0, 0.5, 0.5),
            resize_range=(0.25, 0.75),
            resize_modes=("area", "bicubic_antialias"),
            noise_prob=0.5,
            gaussian_noise_prob=1.0,
            noise_range=(4.0, 32.0),
            gray_noise_prob=0.4,
        )
        final = FinalConfig(
            resize_first_prob=1.0,
            resize_modes=("bicubic_antialias",),
            sinc_prob=0.0,
            jpeg_prob=0.5,
            jpeg_range=(30, 89),
        )
        return DegradationConfig(
            stage1=_no_extra_stage(blur_prob=0.5, kernel=kernel),
            stage2=stage2,
            final=final,
            jpeg_backend=jpeg_backend,
            name=name,
        )
    raise ValueError(f"`name` must be one of {PRESETS}; got {name!r}.")
