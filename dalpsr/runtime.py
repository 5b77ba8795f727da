"""Run-time choices every entry point shares: device and dtype names, derived seeds, atomic folder writes.

One spelling each: devices are "auto" or a torch device string; dtypes are "auto", "fp32", "fp16", "bf16" (the
long torch names "float32", "float16", "bfloat16" are accepted too); a derived seed is a stable hash of a run seed
and the names of what it seeds, so it depends on no process count, order or Python hash salt.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`"auto"` / None → CUDA when available, else CPU; any other value must name a torch device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"`device` must be 'auto' or a torch device such as 'cpu' or 'cuda:0'; got {device!r}."
        ) from err


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """`"auto"` / None → float16 on CUDA, float32 elsewhere; else one of `DTYPE_CHOICES` (or its torch name)."""
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and DTYPE_ALIASES.get(dtype, dtype) in DTYPES:
        return DTYPES[DTYPE_ALIASES.get(dtype, dtype)]
    raise ValueError(f"`dtype` must be one of {', '.join(map(repr, DTYPE_CHOICES))} or a torch dtype; got {dtype!r}.")


def mix_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th epoch, rank or step of a run seeded `seed` (an integer map, one-to-one for
    indices below 1 000 003)."""
    return int(seed) * 1_000_003 + int(index)


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed from a run seed and the names of what it seeds (e.g. a file's relative path, a crop index)."""
    text = "/".join([str(int(seed)), *(str(n) for n in names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def seeded_generator(seed: int, *names: object) -> torch.Generator:
    """A CPU `torch.Generator` seeded with `derive_seed(seed, *names)`."""
    return torch.Generator().manual_seed(derive_seed(seed, *names))


@contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `dst`; on success it replaces `dst` in one rename, on failure it is removed.

    Raises:
        FileExistsError: `dst` exists and `overwrite` is False.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; give the folder the mode a plain mkdir would
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
