"""Sharded batch inference: the split, the merged log, resume, one report per bad file, and `accelerate launch`
with 2 CPU processes writing the same bytes and the same log as 1 process (DAT engine, tiny diffusion)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalpsr.batch import Shard, merge_logs, plan_jobs, rank_log_path, run_jobs


def _images(folder: Path, sizes: list[tuple[int, int]], broken: bool = False, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"im{i}.png")
    if broken:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def _double(job):
    """A stand-in engine: the input at twice the size, with a record that names it."""
    image = Image.open(job.src)
    return image.resize((image.width * 2, image.height * 2)), {"engine": "test"}


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ in one process
@pytest.mark.parametrize("count", [1, 2, 3])
def test_take_splits_every_item_once_in_a_stable_order(count):
    items = [f"k{i}" for i in range(10)]
    shares = [Shard(i, count).take(items) for i in range(count)]
    assert sorted(x for share in shares for x in share) == sorted(items)
    assert all(share == sorted(share, key=items.index) for share in shares)
    assert Shard(0, count).take(items) == Shard(0, count).take(list(items))


def test_device_per_process():
    if torch.cuda.is_available():
        assert Shard(1, 2, 1).device("auto") == torch.device("cuda", 1 % torch.cuda.device_count())
        assert Shard(1, 2, 1, cpu=True).device("auto") == torch.device("cpu")
    else:
        assert Shard(1, 2, 1).device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            Shard(1, 2, 1).device("cuda")
    assert Shard(1, 2, 1).device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="`device`"):
        Shard().device("gpu0")


def test_killed_run_resumes_and_the_merged_log_is_sorted_by_key(tmp_path):
    inputs = _images(tmp_path / "in", [(6, 5), (5, 7), (7, 6), (4, 4)])
    out = tmp_path / "out"
    log = out / "run.jsonl"
    calls = []

    def killed_on_third(job):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies: no merge, no summary
        calls.append(job.key)
        return _double(job)

    with pytest.raises(KeyboardInterrupt):
        run_jobs(plan_jobs([inputs], out).todo, killed_on_third, log)
    assert not log.exists() and len(_records(rank_log_path(log, 0))) == 2
    with open(rank_log_path(log, 0), "a") as f:
        f.write('{"key": "im2.png", "outp')  # killed while writing a line
    # a killed rank 1 of an earlier 2-process run left one output and its record
    plan = plan_jobs([inputs], out)
    stale = plan.todo[-1]
    image, record = _double(stale)
    image.save(stale.dst)
    rank_log_path(log, 1).write_text(json.dumps({"key": stale.key, "output": str(stale.dst), **record}) + "\n")

    plan = plan_jobs([inputs], out)
    assert [j.key for j in plan.todo] == ["im2.png"]
    assert run_jobs(plan.todo, _double, log) == []
    assert [r["key"] for r in _records(log)] == ["im0.png", "im1.png", "im2.png", "im3.png"]
    assert sorted(p.name for p in out.iterdir()) == ["im0.png", "im1.png", "im2.png", "im3.png", "run.jsonl"]


def test_merged_log_does_not_depend_on_the_split(tmp_path):
    records = [{"key": f"{k}.png", "output": f"out/{k}.png", "v": i} for i, k in enumerate("dbeac")]
    texts = []
    for count in (1, 2, 3):
        folder = tmp_path / str(count)
        folder.mkdir()
        for index in range(count):
            lines = "".join(json.dumps(r) + "\n" for r in Shard(index, count).take(records))
            rank_log_path(folder / "log.jsonl", index).write_text(lines)
        merge_logs(folder / "log.jsonl")
        texts.append((folder / "log.jsonl").read_bytes())
        assert sorted(p.name for p in folder.iterdir()) == ["log.jsonl"]
    assert texts[0] == texts[1] == texts[2]
    assert [r["key"] for r in map(json.loads, texts[0].decode().splitlines())] == [f"{k}.png" for k in "abcde"]


def test_a_bad_file_is_reported_once_and_the_batch_goes_on(tmp_path, capsys):
    inputs = _images(tmp_path / "in", [(6, 5), (5, 7)], broken=True)
    out = tmp_path / "out"
    failures = run_jobs(plan_jobs([inputs], out).todo, _double, out / "log.jsonl")
    assert [job.key for job, _ in failures] == ["broken.png"] and "Error" in failures[0][1]
    assert capsys.readouterr().err.count("broken.png") == 1
    assert [r["key"] for r in _records(out / "log.jsonl")] == ["im0.png", "im1.png"]


# ------------------------------------------------------------------------------------------------ accelerate launch
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dalpsr(num_processes: int, *args: str) -> subprocess.CompletedProcess:
    """`python -m dalpsr ARGS` (1 process) or `accelerate launch ... -m dalpsr ARGS` on CPU, 1 thread per process.

    Accelerate starts several CPU processes on one machine through torchrun (`--multi_gpu`) with $ACCELERATE_USE_CPU
    set; `accelerate launch --cpu --num_processes N` alone starts one process unless an MPI hostfile is given.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    if num_processes == 1:
        cmd = [sys.executable, "-m", "dalpsr", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
               "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "dalpsr", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


PROGRESS_SCRIPT = """
import time
from dalpsr.batch import Shard, ShardProgress
shard = Shard.current()
seen = []
with ShardProgress(shard, 7, "test", enabled=True) as progress:
    for i in shard.take(list(range(7))):
        time.sleep(0.05 * (1 + shard.index))  # rank 1 is slower: the main process waits and keeps counting
        progress.update()
        seen.append(progress.done)
print(f"rank {shard.index} of {shard.count}: done {progress.done} after {seen}", flush=True)
"""


@pytest.mark.slow
def test_one_bar_counts_the_items_of_every_process(tmp_path):
    script = tmp_path / "progress.py"
    script.write_text(PROGRESS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), str(script)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert lines[0].startswith("rank 0 of 2: done 7 after"), lines  # the global count, rank 1's items included
    assert lines[1] == "rank 1 of 2: done 3 after [1, 2, 3]", lines  # its own items


def _same_runs(tmp_path: Path, engine_args: list[str], n_images: int) -> None:
    """1 process, then 2 processes resuming after a killed rank: equal bytes, equal logs, one report per bad file."""
    inputs = _images(tmp_path / "in", [(24, 24), (24, 20), (20, 24), (24, 22)][:n_images], broken=True)
    one, two = tmp_path / "one", tmp_path / "two"
    done = run_dalpsr(1, "upscale", str(inputs), "-o", str(one), *engine_args)
    assert done.returncode == 1, done.stderr
    # a killed rank left one output and its record: the 2-process run must skip it and keep the record
    two.mkdir()
    (two / "im1.png").write_bytes((one / "im1.png").read_bytes())
    kept = next(r for r in _records(one / "dalpsr_upscale.jsonl") if r["key"] == "im1.png")
    kept["output"] = str(two / "im1.png")
    rank_log_path(two / "dalpsr_upscale.jsonl", 1).write_text(json.dumps(kept) + "\n")

    done = run_dalpsr(2, "upscale", str(inputs), "-o", str(two), *engine_args)
    assert done.returncode != 0  # the bad file fails the run (torchrun reports the exit status)
    assert [line.startswith("failed: ") for line in done.stderr.splitlines() if "broken.png" in line] == [True]
    assert done.stdout.count(f"upscaled {n_images - 1}, skipped 1 existing, failed 1") == 1, done.stdout
    assert json.loads((two / "dalpsr_upscale.json").read_text())["num_processes"] == 2
    names = [f"im{i}.png" for i in range(n_images)]
    assert sorted(p.name for p in two.iterdir()) == sorted([*names, "dalpsr_upscale.json", "dalpsr_upscale.jsonl"])
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), f"{name} differs (1 vs 2 processes)"
    log_one = (one / "dalpsr_upscale.jsonl").read_text().replace(str(one), "OUT")
    log_two = (two / "dalpsr_upscale.jsonl").read_text().replace(str(two), "OUT")
    assert log_one == log_two and len(log_one.splitlines()) == n_images


@pytest.mark.slow
def test_two_processes_write_what_one_writes_dat(tmp_path):
    _same_runs(tmp_path, ["--engine", "dat"], n_images=4)


@pytest.mark.slow
def test_two_processes_write_what_one_writes_diffusion(tmp_path):
    _same_runs(tmp_path, ["--random-weights-for-testing", "--steps", "2", "--upscale", "2"], n_images=3)


@pytest.mark.slow
def test_two_processes_score_what_one_scores_eval(tmp_path):
    sizes = [(16, 16), (16, 12), (12, 16), (16, 14), (14, 16)]
    pred, gt = _images(tmp_path / "pred", sizes, broken=True), _images(tmp_path / "gt", sizes, seed=1)
    (gt / "broken.png").write_bytes((gt / "im0.png").read_bytes())
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"scores{n}"
        done = run_dalpsr(n, "eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr", "ssim",
                          "--out", str(outs[n]), "--no-progress")  # fmt: skip
        assert done.returncode != 0, "the unreadable prediction is reported"
        assert [line for line in done.stderr.splitlines() if line.startswith("skipped broken")], done.stderr
        assert len([line for line in done.stderr.splitlines() if "broken" in line]) == 1, done.stderr
        assert done.stdout.count("| pred |") == 1, done.stdout
    for name in ("per_image.csv", "summary.json", "table.md"):
        assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name


@pytest.mark.slow
def test_two_processes_caption_what_one_captions(tmp_path):
    from dalpsr.captioning import load_captions
    from dalpsr.testing import get_dummy_llava

    model, processor = get_dummy_llava(seed=0)
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    images = _images(tmp_path / "in", [(16, 16), (16, 12), (12, 16), (16, 14)], broken=True)
    captions = {}
    for n in (1, 2):
        out = tmp_path / f"captions{n}.jsonl"
        done = run_dalpsr(n, "caption", str(images), "--out", str(out), "--model", str(tmp_path / "llava"),
                          "--batch-size", "1", "--max-new-tokens", "6", "--local-files-only")  # fmt: skip
        assert done.returncode != 0, "the unreadable image is reported"
        assert len([line for line in done.stderr.splitlines() if "broken.png" in line]) == 1, done.stderr
        assert done.stdout.count("4 captioned, 0 already") == 1, done.stdout
        captions[n] = load_captions(out)
    assert captions[1] == captions[2] and len(captions[1]) == 4
