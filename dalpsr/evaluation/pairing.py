"""Pairing prediction, ground-truth and LR files by stem, and reconciling their sizes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dalpsr.image_io import list_images


@dataclass
class Pairing:
    """Files matched by stem across folders.

    Args:
        stems: stems present in every folder, sorted.
        files: folder label → {stem: path} for the matched stems.
        unmatched: folder label → stems present there but missing from at least one other folder.
        duplicates: folder label → stems that occur more than once (e.g. `a.png` and `a.jpg`); the first
            file in sorted order is used.
    """

    stems: list[str]
    files: dict[str, dict[str, Path]]
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    duplicates: dict[str, list[str]] = field(default_factory=dict)

    def report_lines(self) -> list[str]:
        lines = []
        for label, stems in self.unmatched.items():
            if stems:
                shown = ", ".join(stems[:10]) + (" …" if len(stems) > 10 else "")
                lines.append(f"{len(stems)} file(s) in `{label}` have no match elsewhere: {shown}")
        for label, stems in self.duplicates.items():
            if stems:
                lines.append(f"`{label}` has several files with the same stem (first one used): {', '.join(stems)}")
        return lines


def _index(folder: str | os.PathLike, label: str) -> tuple[dict[str, Path], list[str]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"`{label}` must be a folder of images; got {str(folder)!r}, which is not a folder.")
    index: dict[str, Path] = {}
    dups: list[str] = []
    for path in list_images([folder]):
        if path.stem in index:
            dups.append(path.stem)
            continue
        index[path.stem] = path
    return index, sorted(set(dups))


def pair_folders(folders: dict[str, str | os.PathLike]) -> Pairing:
    """Match image files by stem across labelled folders (e.g. {"pred": …, "gt": …}).

    Args:
        folders: label → folder; at least one.
    """
    if not folders:
        raise ValueError("`folders` is empty; pass at least one labelled folder.")
    indexes: dict[str, dict[str, Path]] = {}
    duplicates: dict[str, list[str]] = {}
    for label, folder in folders.items():
        indexes[label], duplicates[label] = _index(folder, label)
    common = set.intersection(*(set(ix) for ix in indexes.values()))
    stems = sorted(common)
    files = {label: {s: ix[s] for s in stems} for label, ix in indexes.items()}
    unmatched = {label: sorted(set(ix) - common) for label, ix in indexes.items()}
    return Pairing(stems, files, unmatched, duplicates)


def align_sizes(pred: torch.Tensor, gt: torch.Tensor, policy: str) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Reconcile the sizes of a prediction and its GT (3×H×W each).

    Args:
        policy: "skip" raises ValueError on a mismatch; "crop" keeps the common top-left region (as BasicSR
            mod-crops GT); "resize" resizes the prediction to the GT size with bicubic interpolation.

    Returns:
        (pred, gt, note) where `note` describes what was done, or None when the sizes already agreed.
    """
    if pred.shape[-2:] == gt.shape[-2:]:
        return pred, gt, None
    ps, gs = tuple(pred.shape[-2:]), tuple(gt.shape[-2:])
    if policy == "skip":
        raise ValueError(f"size mismatch: prediction {ps[0]}×{ps[1]} vs GT {gs[0]}×{gs[1]} (policy `skip`).")
    if policy == "crop":
        h, w = min(ps[0], gs[0]), min(ps[1], gs[1])
        return pred[..., :h, :w], gt[..., :h, :w], f"cropped {ps}/{gs} to {(h, w)}"
    if policy == "resize":
        resized = F.interpolate(pred.unsqueeze(0), size=gs, mode="bicubic", align_corners=False)
        return resized[0].clamp(0, 1), gt, f"resized prediction {ps} to {gs}"
    raise ValueError(f"`size_mismatch` must be one of skip, crop, resize; got {policy!r}.")
