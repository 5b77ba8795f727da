"""Pair datasets: on-the-fly from an HR folder, and pair folders with metadata.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dalpsr.data import HRFolderPairs, PairsFolder
from dalpsr.data.make_pairs import make_pairs
from dalpsr.degradations import degrade, degrade_image, text_to_labels

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SET5 = SHARED / "paired" / "Set5" / "hr"


@pytest.fixture(scope="module")
def set5() -> Path:
    if not SET5.is_dir():
        pytest.skip(f"shared data not found at {SET5}")
    return SET5


def test_on_the_fly_pairs(set5):
    ds = HRFolderPairs(set5, size=64, scale=4, crops_per_image=2, seed=1)
    assert len(ds) == 10
    item = ds[3]
    assert item["hr"].shape == (3, 64, 64) and item["lr"].shape == (3, 16, 16)
    assert torch.equal(text_to_labels(item["prompt"]), item["labels"])
    again = ds[3]
    assert torch.equal(item["lr"], again["lr"]) and item["prompt"] == again["prompt"]
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["hr"], item["hr"])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["lr"].shape == (4, 3, 16, 16) and batch["labels"].shape == (4, 4, 4)
    with pytest.raises(ValueError, match="`size`"):
        HRFolderPairs(set5, size=30, scale=4)


def test_hr_only_items_for_batched_degradation(set5):
    ds = HRFolderPairs(set5, size=64, scale=4, seed=2, degrade=False)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert set(batch) == {"hr", "seed", "name", "source"}
    out = degrade(batch["hr"], "realesrgan", seeds=batch["seed"])
    for i in range(3):
        single = degrade_image(
            batch["hr"][i], "realesrgan", generator=torch.Generator().manual_seed(int(batch["seed"][i]))
        )
        assert torch.equal(out.lr[i], single.lr)


def test_pairs_folder_reads_make_pairs_output(set5, tmp_path):
    make_pairs(set5, tmp_path / "pairs", crops=1, size=64, progress=False)
    ds = PairsFolder(tmp_path / "pairs")
    assert len(ds) == 5
    item = ds[0]
    assert item["hr"].shape == (3, 64, 64) and item["lr"].shape == (3, 16, 16)
    assert torch.equal(item["labels"], text_to_labels(item["prompt"]))
    assert item["name"] == "baby_c000"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metadata.jsonl").write_text('{"lr": "x.png"}\n')
    with pytest.raises(ValueError, match="'hr'"):
        PairsFolder(tmp_path / "bad")
    with pytest.raises(ValueError, match="metadata.jsonl"):
        PairsFolder(tmp_path)
