"""The degradation label vocabulary: types, severity bins, prompt text and parsing back.

This module is the single source of the label layout shared by the synthesis code, the restoration
prompt decoder (one logit per (type, bin)) and the diffusion pipeline (degradation prompt text such as
"Deblur with sigma 0.50~0.75, Denoise with sigma 0.25~0.50, Dejpeg with quality 50~69", after DaLPSR).

Layout: `TYPES` in a fixed order, each with `NUM_BINS` bins; labels are a `NUM_TYPES × NUM_BINS` tensor
with at most one 1 per row (a row of zeros means the degradation is absent). Flattened row-major it
matches `CANDIDATE_PHRASES`, so a text encoder can embed every phrase once.

Values that go into the bins (computed by `dalpsr.degradations.pipeline.label_values`):
- blur: effective Gaussian sigma in HR pixels divided by `BLUR_SIGMA_MAX` (clipped to [0, 1]);
- noise: total noise standard deviation in 0–255 units divided by `NOISE_SIGMA_MAX` (clipped to [0, 1]);
- jpeg: the lowest JPEG quality applied (qualities below 30 fall in the lowest bin, 30~49);
- downscale: resolution loss beyond the output scale, 1 - min(1, lowest intermediate size / output size).
A value of 0 (or None) means "absent" for blur, noise and downscale; None means no JPEG.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

BLUR_SIGMA_MAX = 3.0
NOISE_SIGMA_MAX = 30.0


@dataclass(frozen=True)
class Bin:
    """One severity bin: values in [`low`, `high`) (the last bin of a type also includes `high`)."""

    low: float
    high: float
    text: str


@dataclass(frozen=True)
class DegradationType:
    """A degradation type with its prompt verb, the quantity named in the text, and its bins."""

    name: str
    verb: str
    quantity: str
    bins: tuple[Bin, ...]

    def phrase(self, bin_index: int) -> str:
        """The prompt phrase for one bin, e.g. "Deblur with sigma 0.50~0.75"."""
        return f"{self.verb} with {self.quantity} {self.bins[bin_index].text}"


def _unit_bins() -> tuple[Bin, ...]:
    edges = (0.0, 0.25, 0.5, 0.75, 1.0)
    return tuple(Bin(lo, hi, f"{lo:.2f}~{hi:.2f}") for lo, hi in zip(edges[:-1], edges[1:]))


TYPES: tuple[DegradationType, ...] = (
    DegradationType("blur", "Deblur", "sigma", _unit_bins()),
    DegradationType("noise", "Denoise", "sigma", _unit_bins()),
    DegradationType(
        "jpeg",
        "Dejpeg",
        "quality",
        (Bin(30, 50, "30~49"), Bin(50, 70, "50~69"), Bin(70, 90, "70~89"), Bin(90, 100, "90~100")),
    ),
    DegradationType("downscale", "Deresize", "level", _unit_bins()),
)
TYPE_NAMES: tuple[str, ...] = tuple(t.name for t in TYPES)
NUM_TYPES = len(TYPES)
NUM_BINS = 4
LABEL_SHAPE = (NUM_TYPES, NUM_BINS)
CANDIDATE_PHRASES: tuple[str, ...] = tuple(t.phrase(b) for t in TYPES for b in range(NUM_BINS))


def type_index(name: str) -> int:
    """Row of degradation type `name` in the label layout."""
    if name not in TYPE_NAMES:
        raise ValueError(f"`name` must be one of {TYPE_NAMES}; got {name!r}.")
    return TYPE_NAMES.index(name)


def value_to_bin(name: str, value: float | None) -> int | None:
    """Bin index of a label value for type `name`, or None when the degradation is absent.

    Args:
        name: a type in `TYPE_NAMES`.
        value: normalised severity in [0, 1] (blur, noise, downscale; clipped) or JPEG quality (jpeg).
    """
    dtype = TYPES[type_index(name)]
    if value is None:
        return None
    value = float(value)
    if value != value:
        raise ValueError(f"`value` for {name!r} is NaN.")
    if name != "jpeg" and value <= 0.0:
        return None
    for i, b in enumerate(dtype.bins[:-1]):
        if value < b.high:
            return i
    return NUM_BINS - 1


def values_to_labels(values: Mapping[str, float | None]) -> torch.Tensor:
    """Multi-hot labels (`LABEL_SHAPE`, float32) from label values keyed by type name."""
    unknown = set(values) - set(TYPE_NAMES)
    if unknown:
        raise ValueError(f"`values` has unknown types {sorted(unknown)}; allowed: {TYPE_NAMES}.")
    labels = torch.zeros(LABEL_SHAPE)
    for name, value in values.items():
        b = value_to_bin(name, value)
        if b is not None:
            labels[type_index(name), b] = 1.0
    return labels


def _labels_to_bins(labels) -> list[int | None]:
    if isinstance(labels, Mapping):
        bins: list[int | None] = [None] * NUM_TYPES
        for name, b in labels.items():
            if b is not None and not (isinstance(b, int) and 0 <= b < NUM_BINS):
                raise ValueError(f"`labels[{name!r}]` must be a bin index in [0, {NUM_BINS}) or None; got {b!r}.")
            bins[type_index(name)] = b
        return bins
    t = torch.as_tensor(labels)
    if t.shape == (NUM_TYPES * NUM_BINS,):
        t = t.reshape(LABEL_SHAPE)
    if tuple(t.shape) != LABEL_SHAPE:
        raise ValueError(
            f"`labels` must have shape {LABEL_SHAPE} or ({NUM_TYPES * NUM_BINS},), or be a dict of bin indices; "
            f"got shape {tuple(t.shape)}."
        )
    bins = []
    for row in t:
        hot = torch.nonzero(row > 0.5).flatten().tolist()
        if len(hot) > 1:
            raise ValueError(f"`labels` row has several bins set {hot}; each type takes at most one bin.")
        bins.append(hot[0] if hot else None)
    return bins


def labels_to_text(labels) -> str:
    """Degradation prompt text for one label set (an empty string when nothing is set).

    Args:
        labels: a `LABEL_SHAPE` (or flattened) multi-hot tensor/array, or a dict {type name: bin index | None}.
    """
    bins = _labels_to_bins(labels)
    return ", ".join(TYPES[i].phrase(b) for i, b in enumerate(bins) if b is not None)


_PHRASE_RE = re.compile(
    r"^(?P<verb>[a-z\-]+)\s+with\s+(?P<quantity>[a-z]+)\s*(?P<lo>\d+(?:\.\d+)?)\s*~\s*(?P<hi>\d+(?:\.\d+)?)$",
    re.IGNORECASE,
)


def _match_bin(dtype: DegradationType, lo: float, hi: float) -> int | None:
    for i, b in enumerate(dtype.bins):
        text_lo, text_hi = (float(x) for x in b.text.split("~"))
        if abs(lo - text_lo) < 1e-6 and abs(hi - text_hi) < 1e-6:
            return i
    return None


def text_to_labels(text: str) -> torch.Tensor:
    """Parse degradation prompt text back to multi-hot labels (`LABEL_SHAPE`, float32).

    Phrases may come in any order, separated by commas or semicolons, with any spacing or letter case;
    an empty string means no degradation.

    Raises:
        ValueError: a phrase that is not one of `CANDIDATE_PHRASES`, or two different bins for one type.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a string; got {type(text).__name__}.")
    labels = torch.zeros(LABEL_SHAPE)
    verbs = {t.verb.lower(): i for i, t in enumerate(TYPES)}
    for part in re.split(r"[,;]", text.strip().rstrip(".")):
        part = " ".join(part.split())
        if not part:
            continue
        m = _PHRASE_RE.match(part)
        ti = verbs.get(m.group("verb").lower()) if m else None
        dtype = TYPES[ti] if ti is not None else None
        b = None
        if dtype is not None and m.group("quantity").lower() == dtype.quantity:
            b = _match_bin(dtype, float(m.group("lo")), float(m.group("hi")))
        if b is None:
            raise ValueError(
                f"`text` has an unparseable degradation phrase {part!r}; allowed phrases: {list(CANDIDATE_PHRASES)}."
            )
        row = labels[ti]
        if row.sum() > 0 and row[b] == 0:
            raise ValueError(f"`text` gives two different bins for {dtype.name!r}: {text!r}.")
        row[b] = 1.0
    return labels


def labels_to_bins(labels) -> dict[str, int | None]:
    """{type name: bin index or None} for one label set (tensor or dict)."""
    return dict(zip(TYPE_NAMES, _labels_to_bins(labels)))


def batch_labels_to_text(labels: torch.Tensor | Sequence) -> list[str]:
    """`labels_to_text` for each item of a B × `LABEL_SHAPE` tensor (or a list of label sets)."""
    return [labels_to_text(item) for item in labels]
