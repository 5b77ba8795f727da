"""`dalpsr make-pairs`: outputs, determinism across workers, resume after a kill, bad files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalpsr.cli import main
from dalpsr.data.make_pairs import make_pairs, pair_names
from dalpsr.degradations.vocabulary import text_to_labels

REPO = Path(__file__).resolve().parents[1]


def _make_hr_folder(folder: Path, n: int = 4, size: tuple[int, int] = (72, 88)) -> Path:
    skdata = pytest.importorskip("skimage.data")
    photo = skdata.astronaut()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        crop = photo[40 * i : 40 * i + size[0], 30 * i : 30 * i + size[1]]
        Image.fromarray(crop).save(folder / f"img{i}.png")
    return folder


def _snapshot(out: Path) -> dict[str, bytes]:
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith(".tmp")], "temporary files left behind"
    return files


def test_make_pairs_outputs_metadata(tmp_path):
    hr = _make_hr_folder(tmp_path / "hr", n=2)
    (hr / "broken.png").write_bytes(b"not an image")
    code = main(["make-pairs", str(hr), str(tmp_path / "out"), "--crops", "2", "--size", "64", "--no-progress"])
    assert code == 1  # one unreadable file, listed in the summary
    out = tmp_path / "out"
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 4
    records = [json.loads(line) for line in lines]
    assert [r["name"] for r in records] == sorted(r["name"] for r in records)
    for r in records:
        with Image.open(out / r["hr"]) as h, Image.open(out / r["lr"]) as lo:
            assert h.size == (64, 64) and lo.size == (16, 16)
        assert text_to_labels(r["prompt"]).int().tolist() == r["labels"]
        assert set(r["params"]) >= {"stage1", "stage2", "final"}
    assert len(list((out / "lr").iterdir())) == 4


def test_deterministic_regardless_of_workers(tmp_path):
    hr = _make_hr_folder(tmp_path / "hr", n=3)
    make_pairs(hr, tmp_path / "a", crops=2, size=64, seed=3, workers=0, progress=False)
    make_pairs(hr, tmp_path / "b", crops=2, size=64, seed=3, workers=2, progress=False)
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")
    make_pairs(hr, tmp_path / "c", crops=2, size=64, seed=4, workers=0, progress=False)
    assert _snapshot(tmp_path / "a")["metadata.jsonl"] != _snapshot(tmp_path / "c")["metadata.jsonl"]


def test_max_pairs_then_resume_equals_uninterrupted(tmp_path):
    hr = _make_hr_folder(tmp_path / "hr", n=3)
    full = make_pairs(hr, tmp_path / "full", crops=2, size=64, progress=False)
    assert full.complete and full.written == 6
    part = make_pairs(hr, tmp_path / "part", crops=2, size=64, max_pairs=4, progress=False)
    assert part.written == 4 and not part.complete
    # simulate a kill during an append: a torn last line must be dropped and that pair redone
    meta = tmp_path / "part" / "metadata.jsonl"
    meta.write_bytes(meta.read_bytes() + b'{"name": "img2_c0')
    rest = make_pairs(hr, tmp_path / "part", crops=2, size=64, progress=False)
    assert rest.written == 2 and rest.already_done == 4 and rest.complete
    assert _snapshot(tmp_path / "part") == _snapshot(tmp_path / "full")
    again = make_pairs(hr, tmp_path / "part", crops=2, size=64, progress=False)
    assert again.written == 0
    with pytest.raises(ValueError, match="different settings"):
        make_pairs(hr, tmp_path / "part", crops=2, size=64, seed=9, progress=False)


def test_killed_subprocess_resumes_to_the_same_set(tmp_path):
    hr = _make_hr_folder(tmp_path / "hr", n=4, size=(64, 64))
    args = ["--crops", "4", "--size", "64", "--seed", "1", "--no-progress"]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dalpsr.cli", "make-pairs", str(hr), str(out), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = out / "metadata.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if meta.exists() and meta.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = meta.read_bytes().count(b"\n") if meta.exists() else 0
    assert interrupted < 16, "the run finished before it could be killed"
    assert main(["make-pairs", str(hr), str(out), *args]) == 0
    assert main(["make-pairs", str(hr), str(tmp_path / "clean"), *args]) == 0
    assert _snapshot(out) == _snapshot(tmp_path / "clean")
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 16


def test_small_images_and_name_clashes(tmp_path):
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(np.full((30, 50, 3), 128, np.uint8)).save(hr / "a.png")
    Image.fromarray(np.full((30, 50, 3), 64, np.uint8)).save(hr / "a.jpg")
    Image.fromarray(np.full((3, 3, 3), 64, np.uint8)).save(hr / "tiny.png")
    summary = make_pairs(hr, tmp_path / "out", size=64, progress=False)
    assert summary.written == 2 and [s for s, _ in summary.skipped] == ["tiny.png"]
    names = sorted(p.name for p in (tmp_path / "out" / "lr").iterdir())
    assert names == ["a_jpg_c000.png", "a_png_c000.png"]
    with Image.open(tmp_path / "out" / "hr" / "a_png_c000.png") as im:
        assert im.size == (28, 28)
    assert pair_names(["x/a.png", "b.png"]) == {"x/a.png": "x__a", "b.png": "b"}


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    hr = _make_hr_folder(tmp_path / "hr", n=1)
    assert main(["make-pairs", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert main(["make-pairs", str(hr), str(tmp_path / "o"), "--size", "2"]) == 2
    assert "`size`" in capsys.readouterr().err


def test_resume_removes_orphaned_temporary_files(tmp_path):
    hr = _make_hr_folder(tmp_path / "hr", n=1, size=(64, 64))
    args = ["--crops", "1", "--size", "64", "--no-progress"]
    out = tmp_path / "out"
    assert main(["make-pairs", str(hr), str(out), *args]) == 0
    for sub in ("hr", "lr"):  # as a SIGKILL during an atomic write leaves them
        (out / sub / ".img9_c000.png.k3j2x1.tmp").write_bytes(b"partial")
    assert main(["make-pairs", str(hr), str(out), *args]) == 0
    _snapshot(out)
