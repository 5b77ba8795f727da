"""`dalpsr upscale --engine clip-sr`: the shipped ×8 CLIP-SR model as an engine; its prompt edits the output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dalpsr.cli import main
from dalpsr.loaders import shipped_weights

NOISY = "Denoise with sigma 0.75~1.00"
pytestmark = pytest.mark.skipif(
    not (shipped_weights("clip_sr_tiny") / "config.json").is_file(), reason="weights/clip_sr_tiny is not shipped"
)


def test_clip_sr_engine_x8_and_the_prompt_edits_the_result(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "lr.png"
    Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).save(src)
    runs = {}
    prompts = {"predicted": [], "clean": ["--degradation-prompt", ""], "noisy": ["--degradation-prompt", NOISY]}
    for name, extra in prompts.items():
        out = tmp_path / name
        assert main(["upscale", str(src), "-o", str(out), "--engine", "clip-sr", "--upscale", "8", *extra]) == 0
        (record,) = [json.loads(line) for line in (out / "dalpsr_upscale.jsonl").read_text().splitlines()]
        runs[name] = (np.asarray(Image.open(out / "lr.png"), dtype=np.float64), record)
    assert "engine: clip-sr" in capsys.readouterr().out
    for image, record in runs.values():
        assert image.shape == (96, 128, 3) and record["size_wh"] == [128, 96] and record["engine"] == "clip-sr"
    assert runs["predicted"][1]["prompt_source"] == "predicted"
    assert runs["noisy"][1] == {
        **runs["noisy"][1],
        "prompt_source": "given",
        "degradation_prompt": NOISY,
    }
    assert runs["clean"][1]["degradation_prompt"] == "" and runs["clean"][1]["prompt_source"] == "given"
    assert np.abs(runs["noisy"][0] - runs["clean"][0]).mean() > 1, "the prompt must change the output"
