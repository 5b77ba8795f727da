"""`dalpsr upscale --engine dat`: restorer alone, batch semantics (bad files, resume, atomic), model lookup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalpsr.cli import main
from dalpsr.models.dat import DAT
from dalpsr.models.fusion import DATRestorer
from dalpsr.testing import get_dummy_degradation_models

TINY_DAT = {"embed_dim": 32, "depth": [2], "num_heads": [2], "split_size": [2, 4], "img_size": 64, "upscale": 2}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((7, 9, 3)) * 255).astype(np.uint8)).save(src / "a.png")
    Image.fromarray((rng.random((6, 5)) * 255).astype(np.uint8), "L").save(src / "b.jpg")
    rgba = (rng.random((8, 6, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(src / "c.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return src


@pytest.fixture
def fusion_model(tmp_path):
    """training/train_dat.py output layout: restorer/ + degradation_encoder/ (fusion blocks randomised)."""
    torch.manual_seed(0)
    encoder = get_dummy_degradation_models(seed=0)[0]
    restorer = DATRestorer(dat_config=TINY_DAT, context_dim=encoder.embed_dim, fusion_num_heads=2)
    with torch.no_grad():
        for p in restorer.fusion_blocks.parameters():
            p.normal_(0, 0.1)
    run = tmp_path / "run"
    restorer.save_pretrained(run / "restorer")
    encoder.save_pretrained(run / "degradation_encoder")
    return run, restorer.eval(), encoder


def test_batch_with_fusion_restorer_reports_bad_file_and_resumes(tmp_path, inputs, fusion_model, capsys):
    run, restorer, encoder = fusion_model
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    args = ["upscale", str(inputs), "-o", str(out), "--engine", "dat", "--dat-model", str(run), "--upscale", "2"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "upscaled 3, skipped 0 existing, failed 1" in captured.out
    assert Image.open(out / "a.png").size == (18, 14)
    assert Image.open(out / "b.png").size == (10, 12)
    assert Image.open(out / "c.png").mode == "RGBA" and Image.open(out / "c.png").size == (12, 16)
    assert not list(out.glob(".*.tmp")) and not (out / "broken.png").exists()
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before, "inputs are never modified"
    settings = json.loads((out / "dalpsr_upscale.json").read_text())
    assert settings["engine"] == "dat" and settings["fusion"] and settings["model_scale"] == 2
    records = [json.loads(line) for line in (out / "dalpsr_upscale.jsonl").read_text().splitlines()]
    assert sorted(Path(r["input"]).name for r in records) == ["a.png", "b.jpg", "c.png"]

    # the written pixels are the restorer's output with its encoder's features
    from dalpsr.image_io import load_image, tensor_to_pil

    lr = load_image(inputs / "a.png").rgb[None]
    expected = np.asarray(tensor_to_pil(restorer.super_resolve(lr, encoder=encoder)[0]))
    assert np.abs(np.asarray(Image.open(out / "a.png")).astype(int) - expected.astype(int)).max() <= 1

    # a second run skips finished outputs and only retries the failure
    stamp = (out / "a.png").stat().st_mtime_ns
    (inputs / "broken.png").unlink()
    assert main([*args, "--restorer", str(run)]) == 0
    assert (out / "a.png").stat().st_mtime_ns == stamp
    assert "nothing to do: 3 outputs already exist" in capsys.readouterr().out


def test_official_checkpoint_tiles_and_other_upscale(tmp_path, inputs, capsys):
    torch.manual_seed(0)
    dat = DAT(**TINY_DAT).eval()
    torch.save({"params": dat.state_dict()}, tmp_path / "dat_x2.pth")
    (inputs / "broken.png").unlink()
    out = tmp_path / "out"
    code = main(["upscale", str(inputs / "a.png"), "-o", str(out), "--engine", "dat",
                 "--dat-model", str(tmp_path / "dat_x2.pth"), "--upscale", "3", "--tile-size", "8",
                 "--tile-overlap", "4", "--format", "jpg"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert Image.open(out / "a.jpg").size == (27, 21)  # ×2 model resampled to the requested ×3
    assert json.loads((out / "dalpsr_upscale.json").read_text())["fusion"] is False


def test_missing_restorer_gives_one_clear_message(tmp_path, inputs, capsys, monkeypatch):
    monkeypatch.delenv("DALPSR_DAT_MODEL", raising=False)
    monkeypatch.setattr("dalpsr.pipelines.engines.DEFAULT_DAT_SUBFOLDER", "no_such_model")
    code = main(["upscale", str(inputs / "a.png"), "-o", str(tmp_path / "out"), "--engine", "dat"])
    err = capsys.readouterr().err
    assert code == 2 and "No DAT restorer found" in err and "--dat-model" in err
    assert not (tmp_path / "out" / "a.png").exists()
    # a fusion restorer without its encoder folder
    restorer = DATRestorer(dat_config=TINY_DAT, context_dim=32, fusion_num_heads=2)
    restorer.save_pretrained(tmp_path / "lonely")
    code = main(["upscale", str(inputs / "a.png"), "-o", str(tmp_path / "out"), "--engine", "dat",
                 "--dat-model", str(tmp_path / "lonely")])  # fmt: skip
    assert code == 2 and "degradation encoder" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "paired" / "RealSR" / "lr_x4").is_dir(), reason="../shared/data is absent")
def test_real_lr_photo(tmp_path):
    src = sorted((SHARED / "paired" / "RealSR" / "lr_x4").glob("*.png"))[0]
    torch.manual_seed(0)
    DAT(**{**TINY_DAT, "upscale": 4}).save_pretrained(tmp_path / "dat")
    out = tmp_path / "out"
    assert main(["upscale", str(src), "-o", str(out), "--engine", "dat", "--dat-model", str(tmp_path / "dat")]) == 0
    w, h = Image.open(src).size
    assert Image.open(out / f"{src.stem}.png").size == (4 * w, 4 * h)
