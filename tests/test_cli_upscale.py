"""`dalpsr upscale`: weights lookup message, batch with a bad file, resume, atomic outputs, inputs untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dalpsr.cli import main

FAST = ["--steps", "1", "--guidance-scale", "1.0", "--upscale", "2", "--random-weights-for-testing"]


@pytest.fixture
def inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((7, 9, 3)) * 255).astype(np.uint8)).save(src / "a.png")
    Image.fromarray((rng.random((6, 5)) * 255).astype(np.uint8), "L").save(src / "b.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (src / "notes.txt").write_text("not an image")
    return src


def test_missing_weights_gives_one_clear_message(tmp_path, inputs, capsys, monkeypatch):
    monkeypatch.delenv("DALPSR_MODEL", raising=False)
    monkeypatch.delenv("DALPSR_SD2_BASE", raising=False)
    monkeypatch.setattr("dalpsr.pipelines.engines.DEFAULT_MODEL_DIR", tmp_path / "nowhere")
    code = main(["upscale", str(inputs / "a.png"), "-o", str(tmp_path / "out"), "--engine", "diffusion"])
    err = capsys.readouterr().err
    assert code == 2
    assert "No DaLPSR weights found" in err and "--sd2-base" in err and str(tmp_path / "nowhere") in err
    assert not (tmp_path / "out" / "a.png").exists()


def test_batch_reports_bad_file_and_continues_then_resumes(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    code = main(["upscale", str(inputs), "-o", str(out), *FAST])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.png" in captured.err
    assert Image.open(out / "a.png").size == (18, 14)
    assert Image.open(out / "b.png").size == (10, 12)
    assert not (out / "broken.png").exists()
    assert not list(out.glob(".*.tmp")), "no temporary files are left behind"
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before, "inputs are never modified"
    settings = json.loads((out / "dalpsr_upscale.json").read_text())
    assert settings["steps"] == 1 and settings["upscale"] == 2
    records = [json.loads(line) for line in (out / "dalpsr_upscale.jsonl").read_text().splitlines()]
    assert sorted(r["input"].rsplit("/", 1)[-1] for r in records) == ["a.png", "b.jpg"]

    # A second run skips finished outputs and only retries the failure.
    stamp = (out / "a.png").stat().st_mtime_ns
    (inputs / "broken.png").unlink()
    code = main(["upscale", str(inputs), "-o", str(out), *FAST])
    assert code == 0
    assert (out / "a.png").stat().st_mtime_ns == stamp
    assert "nothing to do" in capsys.readouterr().out


def test_output_onto_input_is_refused(tmp_path, inputs, capsys):
    code = main(["upscale", str(inputs / "a.png"), "-o", str(inputs), *FAST])
    assert code == 2
    assert "overwrite an input" in capsys.readouterr().err


def test_missing_input_is_reported(tmp_path, capsys):
    code = main(["upscale", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o"), *FAST])
    assert code == 2
    assert "nope.png" in capsys.readouterr().err


def test_weights_command_lists_the_manifest(capsys, monkeypatch, tmp_path):
    from dalpsr.loaders.manifest import load_manifest

    monkeypatch.setenv("DALPSR_DAT_MODEL", str(tmp_path))
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    for entry in load_manifest():
        assert entry.name in out and entry.licence in out
    assert f"found at {tmp_path}" in out
