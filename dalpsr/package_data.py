"""Where the data folders shipped with dalpsr lie: `weights/` (small weights, cards, manifest) and `configs/`.

An installed wheel has them inside the package (`dalpsr/weights/`, `dalpsr/configs/`); a source checkout or an
editable install has them beside it, at the repository's top level. They hold no Python code.
"""

from __future__ import annotations

from pathlib import Path

DATA_FOLDERS = ("weights", "configs")
_PACKAGE = Path(__file__).resolve().parent


def package_data(folder: str, *parts: str) -> Path:
    """The path of `folder/parts...` in this installation (`folder` is "weights" or "configs")."""
    if folder not in DATA_FOLDERS:
        raise ValueError(f"`folder` must be one of {DATA_FOLDERS}; got {folder!r}.")
    root = _PACKAGE / folder
    if not root.is_dir():
        root = _PACKAGE.parent / folder
    return root.joinpath(*parts)
