"""Torch datasets of HR/LR pairs: synthesised on the fly from an HR folder, or read from a pairs folder.

Items are dicts that the default `DataLoader` collate stacks: "hr" (3×S×S), "lr" (3×S/s×S/s), "labels"
(NUM_TYPES×NUM_BINS multi-hot), "prompt" (degradation prompt text), "name", and "seed" for on-the-fly items.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dalpsr.degradations.config import DegradationConfig, preset
from dalpsr.degradations.kernels import randint
from dalpsr.degradations.pipeline import degrade_image
from dalpsr.degradations.vocabulary import text_to_labels
from dalpsr.image_io import list_images, load_image
from dalpsr.runtime import derive_seed, mix_seed


class HRFolderPairs(Dataset):
    """Random HR crops from a folder, degraded on the fly (per image, CPU) into LR with labels.

    Item `i` is crop `i % crops_per_image` of image `i // crops_per_image`; its crop position and
    degradation come from a seed derived from (`seed`, epoch, image path, crop index), so items are
    reproducible and change with `set_epoch`. Items carry "source", the image path relative to `root`. With
    `degrade=False` items carry only "hr", "seed", "name" and "source", for batched degradation in the training
    loop: `degrade(batch["hr"].to(device), seeds=batch["seed"])`.

    Args:
        root: folder of HR images.
        size: HR crop size (a multiple of `scale`); images smaller than it raise ValueError when read.
        scale: SR scale.
        config: `DegradationConfig` or preset name.
        crops_per_image: virtual crops per image per epoch.
        seed: base seed.
        recursive: include sub-folders.
        degrade: synthesise the LR in `__getitem__` (True) or leave it to the caller (False).
        paths: the images to use, inside `root` (default: every image in it).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int = 256,
        scale: int = 4,
        config: DegradationConfig | str = "realesrgan",
        crops_per_image: int = 1,
        seed: int = 0,
        recursive: bool = False,
        degrade: bool = True,
        paths: Sequence[str | os.PathLike] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"`root` must be an existing folder of images; got {str(root)!r}.")
        if size < scale or size % scale:
            raise ValueError(f"`size` must be a positive multiple of `scale` ({scale}); got {size}.")
        if crops_per_image < 1:
            raise ValueError(f"`crops_per_image` must be >= 1; got {crops_per_image}.")
        self.paths = list_images([self.root], recursive=recursive) if paths is None else [Path(q) for q in paths]
        outside = [q for q in self.paths if not q.resolve().is_relative_to(self.root.resolve())]
        if outside:
            raise ValueError(f"`paths` must lie inside `root` {str(root)!r}; got {str(outside[0])!r}.")
        if not self.paths:
            raise ValueError(f"`root` {str(root)!r} holds no images.")
        self.size, self.scale, self.seed = size, scale, seed
        self.config = preset(config, scale=scale) if isinstance(config, str) else config
        self.crops_per_image = crops_per_image
        self.degrade = degrade
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw new crops and degradations for `epoch`."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths) * self.crops_per_image

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"`index` {index} out of range for {len(self)} items.")
        path = self.paths[index // self.crops_per_image]
        source = path.relative_to(self.root).as_posix()
        seed = derive_seed(mix_seed(self.seed, self.epoch), source, index % self.crops_per_image)
        rgb = load_image(path).rgb
        _, h, w = rgb.shape
        if min(h, w) < self.size:
            raise ValueError(f"Image {source!r} is {h}×{w}, smaller than the crop `size` {self.size}.")
        g = torch.Generator().manual_seed(seed)
        top, left = randint(g, 0, h - self.size), randint(g, 0, w - self.size)
        hr = rgb[:, top : top + self.size, left : left + self.size].contiguous()
        item = {"hr": hr, "seed": seed, "name": f"{path.stem}_{index % self.crops_per_image}", "source": source}
        if self.degrade:
            out = degrade_image(hr, self.config, scale=self.scale, generator=g)
            item.update(lr=out.lr, labels=out.labels, prompt=out.prompt)
        return item


class PairsFolder(Dataset):
    """Pairs written by `dalpsr make-pairs` (or any folder with a metadata.jsonl of "hr"/"lr" paths).

    Each metadata line needs "hr" and "lr" (paths relative to the folder); "name", "prompt" and "labels"
    are used when present (labels are parsed from "prompt" otherwise, and empty when neither exists).
    `records` replaces the metadata lines with a chosen subset of them.
    """

    def __init__(self, root: str | os.PathLike, records: Sequence[dict] | None = None) -> None:
        self.root = Path(root)
        meta = self.root / "metadata.jsonl"
        if records is not None:  # a chosen subset of the folder's records
            self.records = list(records)
            return
        if not meta.is_file():
            raise ValueError(f"`root` must hold a metadata.jsonl; not found in {str(root)!r}.")
        self.records: list[dict] = []
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{meta}:{n} is not valid JSON ({exc}).") from exc
            if "hr" not in record or "lr" not in record:
                raise ValueError(f"{meta}:{n} lacks the 'hr' and 'lr' keys; got keys {sorted(record)}.")
            self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        prompt = r.get("prompt", "")
        labels = torch.tensor(r["labels"], dtype=torch.float32) if "labels" in r else text_to_labels(prompt)
        return {
            "hr": load_image(self.root / r["hr"]).rgb,
            "lr": load_image(self.root / r["lr"]).rgb,
            "labels": labels,
            "prompt": prompt,
            "name": r.get("name", Path(r["lr"]).stem),
        }
