"""`dalpsr make-pairs` (issue 18): unique output names, bit-identical output whatever --workers and the torch
thread count are, workers that die with a killed parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalpsr.cli import main
from dalpsr.data.make_pairs import make_pairs, pair_names

REPO = Path(__file__).resolve().parents[1]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _photo_folder(folder: Path, n: int, size: int) -> Path:
    skdata = pytest.importorskip("skimage.data")
    photo = skdata.astronaut()  # 512×512
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.roll(photo, 37 * i, axis=1)[:size, :size]).save(folder / f"img{i}.png")
    return folder


def test_pair_names_are_unique_and_deterministic():
    sources = ["a__b.png", "a/b.png", "x/a.png", "b.png", "a.png", "a.jpg", "a_png.png"]
    names = pair_names(sources)
    assert len(set(names.values())) == len(sources)
    assert names["x/a.png"] == "x__a" and names["b.png"] == "b" and names["a.jpg"] == "a_jpg"
    assert names == pair_names(list(reversed(sources)))


def test_flattened_name_clash_gives_two_pairs(tmp_path, capsys):
    hr = tmp_path / "hr"
    (hr / "a").mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(hr / "a__b.png")
    Image.fromarray(np.full((32, 32, 3), 50, np.uint8)).save(hr / "a" / "b.png")
    out = tmp_path / "out"
    assert main(["make-pairs", str(hr), str(out), "--size", "32", "--recursive", "--no-progress"]) == 0
    assert "2 pairs written" in capsys.readouterr().out
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 2 and len(list((out / "hr").iterdir())) == 2
    # each pair holds its own source's pixels
    for name, source in pair_names(["a__b.png", "a/b.png"]).items():
        with Image.open(out / "hr" / f"{source}_c000.png") as im:
            assert im.getpixel((0, 0))[0] == (200 if name == "a__b.png" else 50)


def test_bit_identical_whatever_workers_and_threads(tmp_path):
    # with 4 intra-op threads in this process, 512² crops differed from the 1-thread workers in the last digits of
    # the metadata floats before every pair was computed with one thread
    hr = _photo_folder(tmp_path / "hr", n=3, size=512)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        make_pairs(hr, tmp_path / "a", size=512, seed=3, workers=0, progress=False)
        assert torch.get_num_threads() == 4  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    make_pairs(hr, tmp_path / "b", size=512, seed=3, workers=2, progress=False)
    a, b = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b")
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids |= {int(c) for c in (task / "children").read_text().split()}
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the workers")
def test_workers_die_with_a_killed_parent(tmp_path):
    hr = _photo_folder(tmp_path / "hr", n=6, size=256)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dalpsr.cli", "make-pairs", str(hr), str(out), "--size", "256", "--crops", "6"]
    cmd += ["--workers", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = out / "metadata.jsonl"
    deadline = time.time() + 120
    workers: set[int] = set()
    while time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        if len(workers) >= 2 and meta.exists() and meta.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None and len(workers) >= 2, "the run ended before its workers could be observed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 3
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)], "workers outlived their parent"
    files = _snapshot(out)
    time.sleep(0.5)
    assert _snapshot(out).keys() == files.keys()  # nothing writes into the folder any more
    assert len(files) < 2 * 36 + 2, "the run finished before it could be killed"
