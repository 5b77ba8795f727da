"""benchmarks/gpu_check.py: the dry run (same code, CPU, tiny components) prints every row; FLOP tally."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def test_flop_tally_counts_each_call_by_its_shape():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 3, 3, padding=1))
    small, large = torch.rand(1, 3, 8, 8), torch.rand(2, 3, 16, 16)
    with FlopCounterMode(display=False) as counter:
        model(small)
        model(large)
        model(large)
    tally = gpu_check.FlopTally(model)
    tally.install()
    model(small)  # outside `count`: not counted
    with tally.count():
        model(small)
        model(large)
        model(large)
    assert tally.total == counter.get_total_flops() > 0
    assert len(tally.per_shape) == 2


def test_peak_table_matches_device_names():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H100 SXM5 80GB") == 989.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("NVIDIA L4") == 121.0
    assert gpu_check.peak_tflops("Some Future GPU") is None


def test_dry_run_prints_every_row(capsys):
    assert gpu_check.main(["--dry-run", "--skip-tests"]) == 0
    out = capsys.readouterr().out
    rows = [
        line.split("|")[1:-1]
        for line in out.splitlines()
        if line.startswith("| pipeline") or line.startswith("| restorer")
    ]
    rows = [[cell.strip() for cell in row] for row in rows]
    timed = {(r[0], r[1], r[2]) for r in rows if r[3] != "–"}
    assert {("pipeline", "sdpa", s) for s in ("4→16", "8→32", "16→64")} <= timed  # 16→64 runs in tiles
    for name in ("DAT-S (random) fp32", "shipped restorer fp32"):
        assert {("restorer", name, s) for s in ("8→32", "16→64")} <= timed
    assert all(float(r[5]) > 0 for r in rows if r[3] != "–"), "every timed run has its FLOPs"
    pipeline_flops = {r[2]: float(r[5]) for r in rows if r[1] == "sdpa"}
    assert pipeline_flops["4→16"] < pipeline_flops["8→32"] < pipeline_flops["16→64"]


@pytest.mark.slow
def test_dry_run_collects_the_gpu_tests():
    line = gpu_check.run_gpu_tests(dry_run=True, timeout=300)
    assert "exit 0" in line and "collected" in line, line
