"""Image-quality metrics through pyiqa with an explicit, recorded protocol.

Defaults follow the Real-SR tables (StableSR, SeeSR, OSEDiff): PSNR/SSIM on the Y channel of BT.601 YCbCr
(as BasicSR computes it), 4 border pixels cropped, inputs rounded to 8 bit. pyiqa's own default for the
Y channel is YIQ (`color_space='yiq'`), which reads lower than YCbCr; here `color_space='ycbcr'` is passed.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch

from dalpsr.evaluation.weights import (
    MissingWeightsError,
    missing_message,
    missing_weight_files,
    offline_pyiqa,
    shipped_metric_options,
    shipped_parameters,
)

# Pixel-fidelity metrics that take pyiqa's `test_y_channel` / `color_space` options.
LUMA_METRICS = ("psnr", "ssim", "ms_ssim")
SIZE_POLICIES = ("skip", "crop", "resize")
COLOR_MODES = ("y", "rgb")
COLOR_SPACES = ("ycbcr", "yiq")


def _require_pyiqa():
    try:
        import pyiqa
    except ImportError as err:
        raise ImportError(
            "Image-quality metrics need pyiqa: `pip install dalpsr[metrics]` (pyiqa's licence is "
            "non-commercial; see its repository)."
        ) from err
    return pyiqa


@dataclass
class MetricProtocol:
    """How images are prepared and scored; written into every output.

    Args:
        color: "y" scores psnr/ssim/ms_ssim on the luminance channel, "rgb" on the three RGB channels.
        color_space: "ycbcr" (BT.601, as BasicSR and the Real-SR tables) or "yiq" (pyiqa's default).
        crop_border: pixels removed from each edge of both images before every full-reference metric.
        round_8bit: round inputs to 8-bit levels before scoring (16-bit or float inputs included).
        size_mismatch: when prediction and GT sizes differ: "skip" the pair (reported), "crop" both to
            the common top-left region, or "resize" the prediction to the GT size (bicubic).
        device: torch device for the metric networks.
    """

    color: str = "y"
    color_space: str = "ycbcr"
    crop_border: int = 4
    round_8bit: bool = True
    size_mismatch: str = "skip"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.color not in COLOR_MODES:
            raise ValueError(f"`color` must be one of {COLOR_MODES}; got {self.color!r}.")
        if self.color_space not in COLOR_SPACES:
            raise ValueError(f"`color_space` must be one of {COLOR_SPACES}; got {self.color_space!r}.")
        if not isinstance(self.crop_border, int) or self.crop_border < 0:
            raise ValueError(f"`crop_border` must be an integer >= 0; got {self.crop_border!r}.")
        if self.size_mismatch not in SIZE_POLICIES:
            raise ValueError(f"`size_mismatch` must be one of {SIZE_POLICIES}; got {self.size_mismatch!r}.")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["luma_metrics"] = list(LUMA_METRICS)
        out["luma"] = "BT.601 YCbCr Y" if self.color_space == "ycbcr" else "YIQ Y"
        out["nr_metrics_cropped"] = False
        return out


@dataclass
class Metric:
    """A built pyiqa metric with its direction and the options it was created with."""

    name: str
    mode: str  # "FR" or "NR"
    lower_better: bool
    options: dict
    model: torch.nn.Module

    @property
    def arrow(self) -> str:
        return "↓" if self.lower_better else "↑"


def metric_options(name: str, protocol: MetricProtocol) -> dict:
    """The keyword options passed to `pyiqa.create_metric` for `name` under `protocol`."""
    if name in LUMA_METRICS:
        if protocol.color == "y":
            return {"test_y_channel": True, "color_space": protocol.color_space}
        return {"test_y_channel": False}
    return {}


def metric_info(name: str) -> tuple[str, bool]:
    """(mode "FR"/"NR", lower_better) for a pyiqa metric name, without building it."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    if name not in DEFAULT_CONFIGS:
        raise ValueError(f"`metrics` has unknown pyiqa metric {name!r}; see `pyiqa.list_models()` for the valid names.")
    cfg = DEFAULT_CONFIGS[name]
    return cfg.get("metric_mode", "NR"), bool(cfg.get("lower_better", False))


def build_metrics(
    names: list[str], protocol: MetricProtocol, weights_dir: str | os.PathLike | None = None
) -> tuple[dict[str, Metric], dict[str, str]]:
    """Build each metric offline; a metric that cannot be built is reported and the others still run.

    Returns:
        (metrics by name, error message by name for the ones that failed).
    """
    pyiqa = _require_pyiqa()
    if not names:
        raise ValueError("`metrics` is empty; pass at least one pyiqa metric name such as psnr or ssim.")
    built: dict[str, Metric] = {}
    errors: dict[str, str] = {}
    for name in dict.fromkeys(names):
        try:
            mode, lower_better = metric_info(name)
        except ValueError as err:
            errors[name] = str(err)
            continue
        missing = missing_weight_files(name, weights_dir)
        if missing:
            errors[name] = missing_message(name, missing)
            continue
        options = metric_options(name, protocol)
        try:
            with offline_pyiqa(weights_dir, name), shipped_metric_options(name, weights_dir) as shipped:
                model = pyiqa.create_metric(name, device=torch.device(protocol.device), **options, **shipped)
        except MissingWeightsError as err:
            errors[name] = str(err)
            continue
        except Exception as err:  # noqa: BLE001 - one broken metric must not stop the others
            errors[name] = f"metric `{name}` could not be built offline: {type(err).__name__}: {err}"
            continue
        model.eval()
        if shipped:
            options = {**options, "parameters": str(shipped_parameters(name, weights_dir))}
        built[name] = Metric(name, mode, lower_better, options, model)
    return built, errors


def quantize(image: torch.Tensor, protocol: MetricProtocol) -> torch.Tensor:
    """Round a [0, 1] image to 8-bit levels when the protocol asks for it."""
    image = image.clamp(0, 1)
    return (image * 255.0).round() / 255.0 if protocol.round_8bit else image


def crop_border(image: torch.Tensor, border: int) -> torch.Tensor:
    """Remove `border` pixels from each edge of a (…, H, W) tensor."""
    if border == 0:
        return image
    h, w = image.shape[-2:]
    if h <= 2 * border or w <= 2 * border:
        raise ValueError(f"`crop_border`={border} leaves nothing of an image of size {h}×{w}.")
    return image[..., border : h - border, border : w - border]


@torch.no_grad()
def score(metric: Metric, pred: torch.Tensor, gt: torch.Tensor | None, protocol: MetricProtocol) -> float:
    """Score one image (3×H×W in [0, 1]); `gt` is required for full-reference metrics.

    Sizes must already agree (see `dalpsr.evaluation.pairing.align_sizes`).
    """
    device = torch.device(protocol.device)
    x = quantize(pred, protocol).unsqueeze(0).to(device)
    if metric.mode == "FR":
        if gt is None:
            raise ValueError(f"metric `{metric.name}` is full-reference; pass `gt`.")
        y = quantize(gt, protocol).unsqueeze(0).to(device)
        if x.shape != y.shape:
            raise ValueError(f"`pred` {tuple(x.shape)} and `gt` {tuple(y.shape)} differ in size.")
        x, y = crop_border(x, protocol.crop_border), crop_border(y, protocol.crop_border)
        value = metric.model(x, y)
    else:
        value = metric.model(x)
    value = float(torch.as_tensor(value).double().mean())
    if not math.isfinite(value):
        raise ValueError(f"metric `{metric.name}` returned a non-finite value {value}.")
    return value
