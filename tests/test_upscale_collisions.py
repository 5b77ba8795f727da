"""`dalpsr upscale` (issue 18, item 1): two inputs never map to one output. `photo.jpg` and `photo.png` in one folder
used to give one `photo.png`, exit 0, "failed 0"; fixed in `dalpsr.batch.plan_jobs` at 107f5c8."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dalpsr.batch import plan_jobs
from dalpsr.cli import main


def _inputs(folder):
    folder.mkdir()
    Image.new("RGB", (8, 8), (250, 0, 0)).save(folder / "photo.png")
    Image.new("RGB", (8, 8), (0, 0, 250)).save(folder / "photo.jpg", quality=100)
    Image.new("RGB", (8, 8), (0, 250, 0)).save(folder / "other.png")
    return folder


def test_plan_keeps_the_source_suffix_on_a_shared_stem(tmp_path):
    src = _inputs(tmp_path / "in")
    plan = plan_jobs([src], tmp_path / "out")
    names = sorted(j.dst.name for j in plan.todo)
    assert names == ["other.png", "photo_jpg.png", "photo_png.png"]
    assert len({j.dst for j in plan.todo}) == len(plan.todo) == 3
    assert plan_jobs([src], tmp_path / "out").todo == plan.todo  # deterministic


@pytest.mark.slow  # loads the shipped restorer: tens of seconds on the shared 2-core machine
def test_upscale_writes_both_results(tmp_path, capsys):
    src = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["upscale", str(src), "-o", str(out), "--engine", "dat"]) == 0
    assert "upscaled 3, skipped 0 existing, failed 0" in capsys.readouterr().out
    for name, channel in (("photo_png.png", 0), ("photo_jpg.png", 2), ("other.png", 1)):
        with Image.open(out / name) as im:
            assert np.asarray(im).reshape(-1, 3).mean(0).argmax() == channel  # each output holds its own input
    records = [json.loads(line) for line in (out / "dalpsr_upscale.jsonl").read_text().splitlines()]
    assert sorted(r["output"].rsplit("/", 1)[1] for r in records) == ["other.png", "photo_jpg.png", "photo_png.png"]
