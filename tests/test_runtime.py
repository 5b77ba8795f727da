"""dalpsr.runtime: one spelling of devices and dtypes, stable derived seeds, atomic folder writes."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from dalpsr.runtime import atomic_directory, derive_seed, mix_seed, resolve_device, resolve_dtype


def test_dtype_and_device_names():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32 and resolve_dtype("auto", "cuda") is torch.float16
    for short, long in (("fp16", "float16"), ("bf16", "bfloat16"), ("fp32", "float32")):
        assert resolve_dtype(short, cpu) is resolve_dtype(long, cpu) is getattr(torch, long)
    with pytest.raises(ValueError, match="`dtype` must be one of 'auto', 'fp32'"):
        resolve_dtype("half", cpu)
    assert resolve_device("cpu") == cpu
    with pytest.raises(ValueError, match="`device` must be 'auto' or a torch device"):
        resolve_device("gpu0")


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "a.png", 1) == derive_seed(0, "a.png", 1)
    assert len({derive_seed(0, "a.png", 1), derive_seed(0, "a.png", 2), derive_seed(1, "a.png", 1)}) == 3
    assert 0 <= derive_seed(123, "x") < 2**63
    assert mix_seed(2, 5) == 2 * 1_000_003 + 5


def test_atomic_directory_replaces_in_one_step_and_cleans_up(tmp_path):
    dst = tmp_path / "out"
    with atomic_directory(dst) as tmp:
        (tmp / "weights.bin").write_bytes(b"1")
        assert not dst.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (dst / "weights.bin").read_bytes() == b"1"
    assert stat.S_IMODE(dst.stat().st_mode) == 0o777 & ~umask, "the folder gets the mode a plain mkdir gives"
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_directory(dst):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(dst, overwrite=True) as tmp:
            (tmp / "weights.bin").write_bytes(b"2")
            raise RuntimeError("killed mid-write")
    assert (dst / "weights.bin").read_bytes() == b"1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
