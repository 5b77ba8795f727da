"""JPEG quality read from the file's quantisation tables, and the describe report naming its evidence.

The JPEGs are written here with Pillow (libjpeg) from a real camera LR photo in `examples/` (RealSR, Canon), so
their quality is known.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dalpsr.cli import main
from dalpsr.degradations.jpeg_tables import quality_from_tables, read_jpeg_quality
from dalpsr.degradations.ops import quantization_tables
from dalpsr.models.prompt_decoder import prediction_from_probabilities

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PHOTO = EXAMPLES / "canon004_sign.png"

pytestmark = pytest.mark.usefixtures("one_thread")


def _jpeg(image: Image.Image, **save) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **save)
    buf.seek(0)
    return Image.open(buf)


@pytest.mark.parametrize("quality", [5, 18, 31, 40, 50, 63, 75, 87, 90, 95, 100])
@pytest.mark.parametrize("save", [{"subsampling": "4:2:0"}, {"subsampling": "4:4:4", "progressive": True}])
def test_quality_of_pillow_jpegs_is_read_exactly(quality, save):
    found = read_jpeg_quality(_jpeg(Image.open(PHOTO).convert("RGB"), quality=quality, **save))
    assert (found.quality, found.exact, found.mean_abs_error, found.num_tables) == (quality, True, 0.0, 2)
    assert found.describe() == f"JPEG quantisation tables: libjpeg quality {quality} (exact)"


def test_greyscale_jpeg_and_file_paths(tmp_path):
    grey = tmp_path / "grey.jpg"
    Image.open(PHOTO).convert("L").save(grey, quality=33)
    found = read_jpeg_quality(grey)
    assert (found.quality, found.exact, found.num_tables) == (33, True, 1)
    # the container decides, not the name
    disguised = tmp_path / "jpeg_inside.png"
    disguised.write_bytes((EXAMPLES / "canon004_sign_q40.jpg").read_bytes())
    assert read_jpeg_quality(disguised).quality == 40
    webp = tmp_path / "webp_inside.jpg"
    Image.open(PHOTO).convert("RGB").save(webp, format="WEBP", quality=30)
    assert read_jpeg_quality(webp) is None
    assert read_jpeg_quality(PHOTO) is None  # a PNG


def test_shipped_jpeg_examples_read_their_known_quality():
    assert read_jpeg_quality(EXAMPLES / "canon004_sign_q40.jpg").quality == 40
    assert read_jpeg_quality(EXAMPLES / "canon045_chart_q75.jpg").quality == 75


def test_tables_of_another_encoder_give_the_nearest_quality_flagged_inexact():
    luma, chroma = (t.flatten().int().tolist() for t in quantization_tables(60))
    luma[0] += 3  # no libjpeg quality gives this table
    found = read_jpeg_quality(_jpeg(Image.open(PHOTO).convert("RGB"), qtables=[luma, chroma]))
    assert found.quality == 60 and not found.exact and found.mean_abs_error == pytest.approx(3 / 128)
    assert found.describe().startswith("JPEG quantisation tables: ≈ libjpeg quality 60 (not libjpeg's tables")


def test_bad_tables_name_the_argument():
    with pytest.raises(ValueError, match="`tables`"):
        quality_from_tables({1: [1] * 64})
    with pytest.raises(ValueError, match=r"`tables\[0\]` must hold 64 values; got 3"):
        quality_from_tables({0: [1, 2, 3]})
    with pytest.raises(TypeError, match="`source`"):
        read_jpeg_quality(3)


def test_file_evidence_replaces_the_estimators_jpeg_line_and_the_report_says_so():
    probs = torch.zeros(1, 4, 4)
    probs[0, 1, 2] = 0.9  # the estimator: noise bin 2, no JPEG
    estimated = prediction_from_probabilities(probs)
    assert estimated.bins[0]["jpeg"] is None
    read = estimated.with_evidence(0, "jpeg", 40, "JPEG quantisation tables: libjpeg quality 40 (exact)")
    assert read.bins[0]["jpeg"] == 0 and read.labels[0, 2].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert read.prompts[0] == "Denoise with sigma 0.50~0.75, Dejpeg with quality 30~49"
    report = read.report(0)
    assert report["types"]["jpeg"]["source"] == "file" and "quality 40" in report["types"]["jpeg"]["evidence"]
    assert report["types"]["noise"]["source"] == "estimator"
    assert report["types"]["noise"]["evidence"] == "learned estimator: summed bin probability 0.90"
    assert estimated.bins[0]["jpeg"] is None and estimated.report(0)["types"]["jpeg"]["source"] == "estimator"


def test_describe_reports_the_quality_read_from_the_jpeg_examples(capsys):
    files = [EXAMPLES / "canon004_sign_q40.jpg", EXAMPLES / "canon045_chart_q75.jpg"]
    assert main(["describe", *map(str, files), "--json", "--device", "cpu"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["jpeg_quality"] for r in reports] == [40, 75]
    assert [r["types"]["jpeg"]["text"] for r in reports] == ["Dejpeg with quality 30~49", "Dejpeg with quality 70~89"]
    for r in reports:
        assert r["types"]["jpeg"]["source"] == "file" and "exact" in r["types"]["jpeg"]["evidence"]
        assert {r["types"][t]["source"] for t in ("blur", "noise", "downscale")} == {"estimator"}
    assert main(["describe", str(EXAMPLES / "building.png"), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "jpeg " in text and "estimator, p(bins) =" in text and "quantisation" not in text
