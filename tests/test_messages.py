"""Messages a newcomer hits (issue 18): one line and exit code 2 without the metrics extra, nothing downloaded unless
asked (captioner, SeeSR's SD2 base), no bitsandbytes line on import."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalpsr.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_pyiqa(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # `import pyiqa` raises ImportError, as without the extra


def _folder(path: Path) -> Path:
    path.mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(path / "a.png")
    return path


def test_eval_without_the_metrics_extra_is_one_line(no_pyiqa, tmp_path, capsys):
    pred = _folder(tmp_path / "pred")
    assert main(["eval", "--pred", str(pred), "--gt", str(pred), "--metrics", "psnr", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "pip install dalpsr[metrics]" in err and "Traceback" not in err


def test_compare_without_the_metrics_extra_is_one_line(no_pyiqa, tmp_path, capsys):
    pred = _folder(tmp_path / "pred")
    argv = ["compare", "--method", f"m={pred}", "--gt", str(pred), "--out", str(tmp_path / "o"), "--metrics", "psnr"]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "pip install dalpsr[metrics]" in err


def test_captioner_hub_id_not_on_disk_fails_at_once(tmp_path, monkeypatch):
    from transformers import AutoProcessor

    from dalpsr.captioning import Captioner
    from dalpsr.captioning.captioner import CaptionModelNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda *a, **k: pytest.fail("tried to reach the hub"))
    start = time.perf_counter()
    with pytest.raises(CaptionModelNotFoundError) as info:
        Captioner.from_pretrained("llava-hf/llava-1.5-7b-hf", cache_dir=str(tmp_path))  # default: no download
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert (
        "\n" not in message and "nothing is downloaded unless asked" in message and "local_files_only=False" in message
    )
    # asking for the download goes to the hub (here: the patched loader)
    with pytest.raises(pytest.fail.Exception, match="tried to reach the hub"):
        Captioner.from_pretrained("llava-hf/llava-1.5-7b-hf", cache_dir=str(tmp_path), local_files_only=False)


def test_caption_cli_download_flag_reaches_the_loader(tmp_path, monkeypatch, capsys):
    import dalpsr.commands.caption as caption_cmd

    seen = []

    def fake_from_pretrained(model_id, **kwargs):
        seen.append(kwargs["local_files_only"])
        raise caption_cmd.CaptionModelNotFoundError("stop here")

    monkeypatch.setattr(caption_cmd.Captioner, "from_pretrained", staticmethod(fake_from_pretrained))
    images = _folder(tmp_path / "img")
    for extra in ([], ["--download"]):
        try:
            main(["caption", str(images), "--out", str(tmp_path / "c.jsonl"), *extra])
        except caption_cmd.CaptionModelNotFoundError:
            pass
    assert seen == [True, False]


def test_from_seesr_without_a_local_base_fails_fast_and_passes_download(tmp_path, monkeypatch, capsys):
    import dalpsr.loaders.seesr as seesr
    from dalpsr import DaLPSRPipeline

    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="download=True"):
        DaLPSRPipeline.from_seesr(tmp_path / "SeeSR", base="nobody/no-such-sd2-base", ram="ram.pth")
    assert time.perf_counter() - start < 10

    seen = []

    def fake_resolve(base, revision=None, download=False):
        seen.append(download)
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(seesr, "resolve_sd2_base", fake_resolve)
    with pytest.raises(FileNotFoundError):
        DaLPSRPipeline.from_seesr(tmp_path / "SeeSR", ram="ram.pth", download=True)
    out = tmp_path / "pipe"
    for extra in ([], ["--download"]):
        assert main(["convert-seesr", str(tmp_path / "SeeSR"), str(out), "--ram", "ram.pth", *extra]) == 1
    assert seen == [True, False, True]
    assert "stop here" in capsys.readouterr().out


def test_importing_the_api_prints_no_bitsandbytes_line():
    # the line itself appears only on CPUs with AVX512-BF16; emit one on bitsandbytes' logger after the import
    code = (
        "import logging, dalpsr.pipelines.pipeline_dalpsr\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "gemm_4bit" not in done.stderr and "bitsandbytes" not in done.stderr
