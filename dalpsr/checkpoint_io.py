"""Reading tensor state dicts from checkpoint files: safetensors, or torch pickles with `weights_only=True`.

The one file reader of the project (a base module, like `image_io` for images): models' own `from_*` class
methods and every converter in `dalpsr.loaders` read weights through it.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_state_dict(
    path: str | os.PathLike,
    wrapper_keys: Sequence[str] = (),
    param_key: str | None = None,
    trust_pickle: bool = False,
) -> dict[str, Tensor]:
    """A tensor state dict from `.safetensors` or a torch pickle (`weights_only=True`), unwrapped.

    Args:
        path: checkpoint file.
        wrapper_keys: entries tried in order when the file wraps its weights (e.g. `{"params": ...}`); the first
            one holding a dict is used, else the file's dict itself.
        param_key: the entry to use instead of trying `wrapper_keys`; it must exist.
        trust_pickle: allow full unpickling of a torch pickle that `weights_only=True` refuses (only for files
            from a source you trust).

    Returns:
        The state dict with DataParallel/DDP `module.` prefixes removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path} holds objects that `torch.load(weights_only=True)` refuses; if you trust the file, pass "
                f"`trust_pickle=True` (CLI: --trust-pickle). ({err})"
            ) from err
    else:
        raise ValueError(f"`path` must end in .safetensors or one of {PICKLE_SUFFIXES}; got {path.name!r}.")
    if not isinstance(state, dict):
        raise ValueError(f"`path` {path} does not hold a dict of tensors (got {type(state).__name__}).")
    if param_key is not None:
        if param_key not in state:
            raise ValueError(f"`param_key` {param_key!r} is not in {path.name}; it has {sorted(state)}.")
        state = state[param_key]
    else:
        state = next((state[k] for k in wrapper_keys if isinstance(state.get(k), dict)), state)
    state = {re.sub(r"^(module\.)+", "", k): v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"`path` {path} holds non-tensor entries where weights were expected, e.g. {bad[:5]}.")
    return state
