"""NIQE offline: the MATLAB model parameters shipped in weights/niqe (from BasicSR) reach pyiqa's NIQE with no
download and reproduce published values on pyiqa's calibration images (TID2013, shipped in the pyiqa wheel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyiqa")

from dalpsr.cli import main  # noqa: E402
from dalpsr.evaluation.metrics import MetricProtocol, build_metrics, score  # noqa: E402
from dalpsr.evaluation.weights import missing_weight_files, shipped_parameters  # noqa: E402
from dalpsr.image_io import load_image  # noqa: E402
from dalpsr.package_data import package_data  # noqa: E402

SHIPPED = package_data("weights", "niqe", "niqe_pris_params.safetensors")
# pyiqa's ResultsCalibra.md: NIQE of the official MATLAB code ("org") and pyiqa's own ("ours imported").
MATLAB = {"I03": 15.7536, "I04": 3.6549, "I06": 3.2355, "I08": 3.1840, "I19": 8.6352}
PYIQA = {"I03": 15.6530, "I04": 3.6541, "I06": 3.2343, "I08": 3.2076, "I19": 9.1060}


def calibration_image(stem: str) -> Path:
    import pyiqa

    path = Path(pyiqa.__file__).resolve().parents[1] / "ResultsCalibra" / "dist_dir" / f"{stem}.bmp"
    if not path.is_file():
        pytest.skip(f"pyiqa's calibration image {path} is not installed")
    return path


def test_shipped_parameters_are_the_matlab_model():
    from safetensors.numpy import load_file

    arrays = load_file(str(SHIPPED))
    mu, cov = arrays["mu_pris_param"], arrays["cov_pris_param"]
    assert mu.shape == (1, 36) and cov.shape == (36, 36) and mu.dtype == cov.dtype == np.float64
    np.testing.assert_allclose(mu[0, :4], [2.60131368, 0.90570272, 0.81204778, 0.09042671], rtol=0, atol=1e-8)
    assert np.allclose(cov, cov.T) and np.linalg.eigvalsh(cov).min() > 0
    assert (SHIPPED.parent / "LICENSE.md").is_file() and "BasicSR" in (SHIPPED.parent / "README.md").read_text()


@pytest.fixture
def empty_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("DALPSR_IQA_WEIGHTS", raising=False)
    monkeypatch.delenv("TORCH_HOME", raising=False)
    return tmp_path / "weights"


def test_niqe_needs_no_file_and_a_file_put_there_wins(empty_weights):
    assert missing_weight_files("niqe", empty_weights) == []
    assert shipped_parameters("niqe", empty_weights) == SHIPPED
    own = empty_weights / "hub" / "pyiqa" / "niqe_modelparameters.mat"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"")
    assert shipped_parameters("niqe", empty_weights) is None
    assert shipped_parameters("brisque", empty_weights) is None
    assert missing_weight_files("brisque", empty_weights)  # other metrics still need their files


def test_niqe_reproduces_the_matlab_value_of_i04(empty_weights):
    built, errors = build_metrics(["niqe"], MetricProtocol(), empty_weights)
    assert errors == {}
    assert built["niqe"].options["parameters"] == str(SHIPPED)
    value = score(built["niqe"], load_image(calibration_image("I04")).rgb, None, MetricProtocol())
    assert abs(value - MATLAB["I04"]) < 1e-3
    assert abs(value - PYIQA["I04"]) < 2e-3


@pytest.mark.slow
def test_niqe_on_all_calibration_images(empty_weights):
    built, _ = build_metrics(["niqe"], MetricProtocol(), empty_weights)
    for stem, published in PYIQA.items():
        value = score(built["niqe"], load_image(calibration_image(stem)).rgb, None, MetricProtocol())
        assert abs(value - published) < 0.05, (stem, value, published)


def test_eval_cli_niqe_offline(empty_weights, tmp_path, capsys):
    from PIL import Image

    pred = tmp_path / "pred"
    pred.mkdir()
    Image.open(calibration_image("I04")).crop((0, 0, 192, 192)).save(pred / "i04.png")
    out = tmp_path / "out"
    code = main(["eval", "--pred", str(pred), "--metrics", "niqe", "--weights-dir", str(empty_weights),
                 "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    import csv

    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert [r["image"] for r in rows] == ["i04"] and 0 < float(rows[0]["niqe"]) < 100
    assert not (empty_weights / "hub" / "pyiqa").exists() or not any((empty_weights / "hub" / "pyiqa").iterdir())
