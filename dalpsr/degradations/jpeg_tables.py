"""JPEG quality read from a file's quantisation tables (what the file says, before any learned estimate).

A JPEG file stores the 8×8 quantisation tables its encoder used. libjpeg (and so Pillow, most cameras' software
and the web's tools) scales the standard IJG tables by quality (`ops.quantization_tables`), so matching the stored
tables against the 100 scaled pairs recovers the quality exactly for such files. Tables of other encoders
(Photoshop, some cameras) are not scaled IJG tables: the nearest IJG quality is then an approximation, flagged by
`exact=False`. The tables only tell the last compression: a photo compressed harder earlier and re-saved at a high
quality reads as that high quality.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dalpsr.degradations.ops import quantization_tables


@dataclass(frozen=True)
class JpegQuality:
    """The IJG quality that best explains a JPEG file's quantisation tables.

    Attributes:
        quality: the nearest libjpeg quality in [1, 100].
        exact: the stored tables are exactly libjpeg's at `quality`.
        mean_abs_error: mean |stored − libjpeg's| over the compared coefficients (0 when exact).
        num_tables: how many tables the file has (1 for greyscale, 2 for colour).
    """

    quality: int
    exact: bool
    mean_abs_error: float
    num_tables: int

    def describe(self) -> str:
        """One line naming the evidence, e.g. "JPEG quantisation tables: libjpeg quality 75 (exact)"."""
        if self.exact:
            return f"JPEG quantisation tables: libjpeg quality {self.quality} (exact)"
        return (
            f"JPEG quantisation tables: ≈ libjpeg quality {self.quality} (not libjpeg's tables; mean table "
            f"difference {self.mean_abs_error:.1f})"
        )


def _ijg_tables() -> np.ndarray:
    """100×2×64 array: libjpeg's (luma, chroma) tables for qualities 1..100."""
    return np.stack([np.stack([t.flatten().numpy() for t in quantization_tables(q)]) for q in range(1, 101)])


_IJG = _ijg_tables()


def quality_from_tables(tables) -> JpegQuality:
    """Match quantisation tables (Pillow's `Image.quantization`: {index: 64 values in natural order}).

    Table 0 is compared with libjpeg's luma table and table 1 (when present) with its chroma table.
    """
    if not isinstance(tables, dict) or 0 not in tables:
        raise ValueError(f"`tables` must be a dict with a luma table at key 0; got {tables!r:.80}.")
    stored = [np.asarray(list(tables[i]), dtype=np.float64) for i in sorted(tables)[:2]]
    for i, t in enumerate(stored):
        if t.shape != (64,):
            raise ValueError(f"`tables[{i}]` must hold 64 values; got {t.shape[0]}.")
    stacked = np.stack(stored)  # T×64
    errors = np.abs(_IJG[:, : len(stored)] - stacked[None]).mean(axis=(1, 2))  # 100
    best = int(np.argmin(errors))
    return JpegQuality(best + 1, bool(errors[best] == 0.0), float(errors[best]), len(tables))


def read_jpeg_quality(source: str | os.PathLike | Image.Image) -> JpegQuality | None:
    """The quality a JPEG file was saved at, from its quantisation tables; None when `source` is not a JPEG.

    Args:
        source: a file path or an opened (not converted) PIL image. The container decides, not the file name:
            a ".jpg" holding WEBP gives None, a ".png" holding JPEG is read.
    """
    if isinstance(source, Image.Image):
        return _from_image(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"`source` must be a path or a PIL image; got {type(source).__name__}.")
    with Image.open(source) as image:
        return _from_image(image)


def _from_image(image: Image.Image) -> JpegQuality | None:
    tables = getattr(image, "quantization", None)
    if image.format not in ("JPEG", "MPO") or not tables:
        return None
    return quality_from_tables(tables)
