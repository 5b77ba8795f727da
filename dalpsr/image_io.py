"""Image loading, validation and atomic saving shared by the pipeline, the CLI and the datasets.

Alpha policy: colour channels are processed as stored (not premultiplied); the alpha channel is kept
apart, resized with bicubic interpolation to the output size and reattached to PIL outputs, so an
RGBA input gives an RGBA output (an LA input LA, see below). Palette images with transparency count as RGBA.

Gray policy: a one-channel input (L, 1, I;16, I, F, LA; a 2-D or one-channel array or tensor) is processed as RGB and
`RGBImage.mode` records "L" (or "LA"), so a PIL output can be converted back (L in, L out).

Folder rule (`scan_images`, used by `list_images`, `dalpsr.batch` and every command): a folder contributes its files
whose suffix is in `IMAGE_EXTENSIONS`; its other files are returned as ignored with the reason, hidden files (names
starting with ".") are left out; a file named explicitly is always tried. Of an animated image (GIF, APNG, WebP) the
first frame is used and `load_image` says so (a warning on the "dalpsr" logger and `RGBImage.note`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

logger = logging.getLogger("dalpsr")


class ImageDecodeError(OSError, ValueError):
    """An image file that cannot be decoded (not an image, truncated, or too large to decode); the message names
    the file. Both an `OSError` (as Pillow's errors) and a `ValueError` (bad input)."""


@dataclass
class RGBImage:
    """A decoded image: `rgb` is a 3×H×W float tensor in [0, 1]; `alpha` is 1×H×W in [0, 1] or None."""

    rgb: torch.Tensor
    alpha: torch.Tensor | None = None
    mode: str = "RGB"
    note: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.rgb.shape[-2]), int(self.rgb.shape[-1])


GRAY_MODES = ("1", "L", "I;16", "I;16B", "I;16L", "I", "F")


def _pil_to_rgb(image: Image.Image) -> RGBImage:
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in GRAY_MODES or mode == "LA":
        decoded = _pil_to_rgb_any(image, mode)
        decoded.mode = "LA" if decoded.alpha is not None else "L"
        return decoded
    return _pil_to_rgb_any(image, mode)


def _pil_to_rgb_any(image: Image.Image, mode: str) -> RGBImage:
    alpha = None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        scale = 65535.0 if mode.startswith("I") else 1.0
        if mode == "I" and arr.size and arr.max() <= 255:
            scale = 255.0
        gray = torch.from_numpy(np.clip(arr / scale, 0.0, 1.0))
        return RGBImage(gray.unsqueeze(0).expand(3, -1, -1).contiguous())
    if mode in ("RGBA", "LA", "PA"):
        alpha = torch.from_numpy(np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0).unsqueeze(0)
        if bool((alpha >= 1.0).all()):
            alpha = None
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return RGBImage(torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), alpha)


def _check_not_empty(height: int, width: int, name: str, shape: tuple) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"`{name}` is empty: {width}×{height} (W×H, shape {shape}); an image needs at least 1×1.")


def _numpy_to_rgb(array: np.ndarray, name: str) -> RGBImage:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(
            f"`{name}` as a numpy array must be H×W or H×W×C with C in 1, 2, 3, 4; got shape {array.shape}."
        )
    _check_not_empty(array.shape[0], array.shape[1], name, tuple(array.shape))
    if array.dtype == np.uint8:
        data = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        data = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.floating):
        data = array.astype(np.float32)
        if not np.isfinite(data).all():
            raise ValueError(f"`{name}` contains NaN or inf values.")
        if data.min() < 0.0 or data.max() > 1.0:
            raise ValueError(
                f"`{name}` as a float array must lie in [0, 1]; got range [{data.min():.4g}, {data.max():.4g}]."
            )
    else:
        raise TypeError(f"`{name}` numpy dtype must be uint8, uint16 or floating; got {array.dtype}.")
    tensor = torch.from_numpy(np.ascontiguousarray(data)).permute(2, 0, 1)
    channels = tensor.shape[0]
    alpha = None
    if channels in (2, 4):
        alpha = tensor[-1:].clone()
        tensor = tensor[:-1]
        if bool((alpha >= 1.0).all()):
            alpha = None
    gray = tensor.shape[0] == 1
    if gray:
        tensor = tensor.expand(3, -1, -1)
    mode = ("LA" if alpha is not None else "L") if gray else "RGB"
    return RGBImage(tensor.contiguous(), alpha, mode)


def _tensor_to_rgb(tensor: torch.Tensor, name: str) -> list[RGBImage]:
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4:
        raise ValueError(f"`{name}` as a tensor must be C×H×W or B×C×H×W; got shape {tuple(tensor.shape)}.")
    if tensor.shape[1] not in (1, 3):
        raise ValueError(
            f"`{name}` tensor must have 1 or 3 channels (B×C×H×W, RGB in [0, 1]); got {tensor.shape[1]} "
            f"channels in shape {tuple(tensor.shape)}."
        )
    if not tensor.is_floating_point():
        raise TypeError(f"`{name}` tensor must be floating point in [0, 1]; got dtype {tensor.dtype}.")
    _check_not_empty(tensor.shape[-2], tensor.shape[-1], name, tuple(tensor.shape))
    if tensor.shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch: shape {tuple(tensor.shape)}; pass at least one image.")
    tensor = tensor.detach().float().cpu()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"`{name}` contains NaN or inf values.")
    lo, hi = float(tensor.min()), float(tensor.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"`{name}` tensor values must lie in [0, 1]; got range [{lo:.4g}, {hi:.4g}].")
    gray = tensor.shape[1] == 1
    if gray:
        tensor = tensor.expand(-1, 3, -1, -1)
    return [RGBImage(t.contiguous(), mode="L" if gray else "RGB") for t in tensor]


def to_rgb_images(image, name: str = "image") -> list[RGBImage]:
    """Normalise any supported image input to a list of `RGBImage`.

    Args:
        image: a path, a PIL image of any mode, a numpy H×W(×C) array (uint8, uint16, or float in [0, 1]),
            a torch tensor C×H×W or B×C×H×W (float RGB or gray in [0, 1]), or a list of these.
        name: the argument name used in error messages.
    """
    if isinstance(image, list | tuple):
        if len(image) == 0:
            raise ValueError(f"`{name}` is an empty list; pass at least one image.")
        out: list[RGBImage] = []
        for i, item in enumerate(image):
            out.extend(to_rgb_images(item, f"{name}[{i}]"))
        return out
    if isinstance(image, str | os.PathLike):
        return [load_image(image)]
    if isinstance(image, Image.Image):
        _check_not_empty(image.height, image.width, name, (image.height, image.width))
        return [_pil_to_rgb(image)]
    if isinstance(image, np.ndarray):
        return [_numpy_to_rgb(image, name)]
    if isinstance(image, torch.Tensor):
        return _tensor_to_rgb(image, name)
    raise TypeError(
        f"`{name}` must be a path, PIL.Image, numpy array, torch tensor or a list of them; got {type(image).__name__}."
    )


def load_image(path: str | os.PathLike) -> RGBImage:
    """Decode an image file (any Pillow mode; EXIF orientation applied) to an `RGBImage`.

    Raises:
        FileNotFoundError: `path` is not a file.
        ImageDecodeError: not an image, truncated, or above Pillow's decompression-bomb limit (`MAX_IMAGE_PIXELS`);
            the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as img:
            frames = getattr(img, "n_frames", 1)
            img.load()
            image = _pil_to_rgb(img)
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(
            f"{path}: too large to decode safely ({err}). If you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS."
        ) from err
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's errors for unknown, broken and truncated files
        if isinstance(err, FileNotFoundError):
            raise
        raise ImageDecodeError(f"{path}: cannot decode the image ({type(err).__name__}: {err}).") from err
    if frames > 1:
        image.note = f"animated image with {frames} frames: the first frame is used"
        logger.warning("%s: %s", path, image.note)
    return image


def load_pil_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image (EXIF orientation applied, alpha dropped)."""
    return tensor_to_pil(load_image(path).rgb)


def _to_uint8(chw: torch.Tensor) -> np.ndarray:
    # C×H×W float [0, 1] → H×W×C uint8 (round to nearest), a band of rows at a time: no float copy of a whole
    # large output (a 16000×12000 one is 2.2 GB as float32; converted at once it took three such copies).
    chw = chw.detach()
    channels, height, width = chw.shape
    out = np.empty((height, width, channels), dtype=np.uint8)
    rows = max(1, 2**20 // max(1, channels * width))
    for top in range(0, height, rows):
        band = chw[:, top : top + rows].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        out[top : top + rows] = (band * 255.0).round()
    return out


def tensor_to_pil(rgb: torch.Tensor, alpha: torch.Tensor | None = None, mode: str = "RGB") -> Image.Image:
    """3×H×W float [0, 1] (and optional 1×H×W alpha) → 8-bit PIL RGB/RGBA, rounding to nearest; with `mode` "L" or
    "LA" (a gray input's `RGBImage.mode`) → L/LA by Pillow's ITU-R 601-2 luma."""
    arr = _to_uint8(rgb)
    if alpha is None:
        image = Image.fromarray(arr, mode="RGB")
    else:
        image = Image.fromarray(np.concatenate([arr, _to_uint8(alpha[:1])], axis=2), mode="RGBA")
    if mode in ("L", "LA"):
        return image.convert("LA" if alpha is not None else "L")
    return image


def scan_images(
    paths: Iterable[str | os.PathLike], recursive: bool = False
) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]], list[Path]]:
    """(found, ignored, missing) for files and folders, by the folder rule of this module: image files as (file, path
    relative to the folder it came from; a named file: its name), the folders' other files with the reason, and
    inputs that do not exist."""
    found: list[tuple[Path, Path]] = []
    ignored: list[tuple[Path, str]] = []
    missing: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            for f in sorted(q for q in path.glob(pattern) if q.is_file() and not q.name.startswith(".")):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append((f, f.relative_to(path)))
                else:
                    ignored.append((f, f"suffix {f.suffix or '(none)'!r} is not an image type"))
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            missing.append(path)
    return found, ignored, missing


def list_images(paths: Iterable[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Expand files and folders into a list of image files by the folder rule (`scan_images`; folders sorted).

    Raises:
        FileNotFoundError: an input does not exist.
    """
    found, _, missing = scan_images(paths, recursive)
    if missing:
        raise FileNotFoundError(f"Input not found: {missing[0]}")
    return [f for f, _ in found]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image_atomic(image: Image.Image, path: str | os.PathLike, **save_kwargs) -> None:
    """Save a PIL image atomically; the format follows the suffix of `path`."""
    import io

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"`path` has an unsupported image suffix {path.suffix!r}; use one of {IMAGE_EXTENSIONS}.")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kwargs)
    atomic_write_bytes(path, buf.getvalue())


def read_image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) from the file header, or None when the file is not a readable image."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def usable_images(paths, min_size: int) -> tuple[list[Path], list[tuple[str, str]]]:
    """Split image paths into those whose shorter side is at least `min_size` and the skipped ones (with reasons)."""
    ok, skipped = [], []
    for path in paths:
        size = read_image_size(path)
        if size is None:
            skipped.append((str(path), "unreadable"))
        elif min(size) < min_size:
            skipped.append((str(path), f"{size[0]}×{size[1]} is smaller than the crop size {min_size}"))
        else:
            ok.append(Path(path))
    return ok, skipped
