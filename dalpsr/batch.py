"""Folder jobs shared by every engine of `dalpsr upscale`: which inputs map to which outputs, and one loop that runs
them with a progress bar, atomic writes, a per-image JSON-lines log and per-file failure reports.

Rules (the same for every engine):
- A folder contributes the files whose suffix is in `IMAGE_EXTENSIONS` (with `recursive`, also its sub-folders);
  every other file is listed in `JobPlan.ignored`, never dropped silently. A file named on the command line is
  always tried.
- An output keeps the input's path relative to the folder it came from, with the output suffix. When two inputs
  would map to one output (`photo.jpg` and `photo.png`), each of them keeps its source suffix in the name
  (`photo_jpg.png`, `photo_png.png`), deterministically, so nothing is overwritten and a resumed run finds them.
- Outputs that exist are skipped (a killed run resumes), unless `overwrite`; an output never lands on an input.

Sharding (`accelerate launch -m dalpsr ...`): every process plans the same jobs, takes those of its rank (every
`count`-th of the plan sorted by key), writes its own log file and reports its own failures; the main process shows
one bar with the global count and merges the logs once, sorted by key, so the merged log does not depend on the
number of processes. Several nodes need the output folder on a file system they share.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from dalpsr.image_io import atomic_write_bytes, save_image_atomic, scan_images

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """One input file, its output file and its key (relative path, '/'-separated: seeds and logs use it)."""

    src: Path
    dst: Path
    key: str


@dataclass
class JobPlan:
    """What a run will do: `todo` jobs, `existing` outputs skipped, and `ignored` (path, reason) inputs."""

    todo: list[Job] = field(default_factory=list)
    existing: list[Job] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)


def find_inputs(
    inputs: Iterable[str | Path], recursive: bool = False
) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]], list[Path]]:
    """(found, ignored, missing): image files as (file, path relative to the folder it came from), other files of
    the folders with the reason, and inputs that do not exist (the folder rule of `dalpsr.image_io.scan_images`)."""
    return scan_images(inputs, recursive)


def plan_jobs(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    fmt: str = "png",
    recursive: bool = False,
    overwrite: bool = False,
) -> JobPlan:
    """The jobs for `inputs` (files and folders) writing `fmt` files into `out_dir` (see the module rules).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an output would overwrite an input.
    """
    out_dir = Path(out_dir)
    plan = JobPlan()
    found, plan.ignored, missing = find_inputs(inputs, recursive)
    if missing:
        raise FileNotFoundError(f"input not found: {missing[0]}")
    stems: dict[Path, int] = {}
    for _, rel in found:
        stems[rel.with_suffix("")] = stems.get(rel.with_suffix(""), 0) + 1
    inputs_resolved = {f.resolve() for f, _ in found}
    for f, rel in found:
        stem = rel.with_suffix("")
        if stems[stem] > 1:  # keep the source suffix so two inputs never share an output
            stem = stem.with_name(f"{stem.name}_{rel.suffix.lstrip('.').lower() or 'noext'}")
        dst = out_dir / f"{stem.as_posix()}.{fmt}"
        if dst.resolve() in inputs_resolved:
            raise ValueError(f"output {dst} would overwrite an input; choose another --output.")
        job = Job(f, dst, rel.as_posix())
        (plan.todo if overwrite or not dst.exists() else plan.existing).append(job)
    dsts = [j.dst for j in plan.todo + plan.existing]
    if len(set(dsts)) != len(dsts):
        duplicate = next(d for d in dsts if dsts.count(d) > 1)
        raise ValueError(f"two inputs map to the output {duplicate}; rename one of them.")
    return plan


@dataclass(frozen=True)
class Shard:
    """This process's share of a run: rank `index` of `count` processes, `local_index` on its node; `cpu`: the
    launcher asked for CPU processes."""

    index: int = 0
    count: int = 1
    local_index: int = 0
    cpu: bool = False

    @classmethod
    def current(cls) -> Shard:
        """The shard of this process from `accelerate.PartialState` (a plain run is rank 0 of 1). Processes started
        without CUDA, or with $ACCELERATE_USE_CPU set, form a CPU (gloo) group."""
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        cpu = parse_flag_from_env("ACCELERATE_USE_CPU")
        state = PartialState(cpu=cpu or not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, state.local_process_index, cpu)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """Every `count`-th item from `index` on: a stable split of a list all processes hold in the same order."""
        return list(items[self.index :: self.count])

    def device(self, requested: str | None = "auto") -> torch.device:
        """The device of this process: "auto" (or None) is this node's GPU `local_index` when CUDA is available (and
        `cpu` is not set), else the CPU; a bare "cuda" is also this process's GPU; any other device is used as
        given."""
        if requested in (None, "auto", "cuda"):
            if torch.cuda.is_available() and not (self.cpu and requested != "cuda"):
                return torch.device("cuda", self.local_index % torch.cuda.device_count())
            if requested == "cuda":
                raise ValueError("`device` is 'cuda' but CUDA is not available; use 'auto' or 'cpu'.")
            return torch.device("cpu")
        try:
            return torch.device(requested)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"`device` must be 'auto' or a torch device such as 'cpu' or 'cuda:0'; got {requested!r}."
            ) from err

    def barrier(self) -> None:
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def gather(self, items: list[T]) -> list[T]:
        """The items of every process, rank by rank, on every process."""
        if self.count == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))


_progress_ids = itertools.count()


class ShardProgress:
    """One progress bar for all processes, shown by the main process with the global count.

    Each process adds what it finished to a counter in the process group's key-value store (no collective call,
    so ranks never wait for each other per item); `close` waits for every process while the bar keeps moving.
    Use it as a context manager; every process must open and close it (the same number of times). `done`: the
    global count on the main process, this process's own elsewhere.
    """

    def __init__(self, shard: Shard, total: int, desc: str, unit: str = "img", enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.shard, self.total, self.done = shard, total, 0
        self.key = f"dalpsr/progress/{next(_progress_ids)}"
        self.store = None
        if shard.count > 1:
            from torch.distributed.distributed_c10d import _get_default_store

            self.store = _get_default_store()
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and shard.is_main) or None)

    def __enter__(self) -> ShardProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close(wait=exc[0] is None)

    def _refresh(self) -> None:
        done = int(self.store.add(self.key, 0))
        if done > self.done:
            self.bar.update(done - self.done)
            self.done = done

    def update(self, n: int = 1) -> None:
        if self.store is None or not self.shard.is_main:
            self.done += n
        if self.store is None:
            self.bar.update(n)
            return
        self.store.add(self.key, n)
        if self.shard.is_main:
            self._refresh()

    def close(self, wait: bool = True) -> None:
        """Wait for every process (unless `wait` is False: an error is on its way up), then close the bar."""
        if self.store is not None and wait:
            work = torch.distributed.barrier(async_op=True)
            while not work.is_completed():
                if self.shard.is_main:
                    self._refresh()
                time.sleep(0.1)
            work.wait()
            if self.shard.is_main:
                self._refresh()
        self.bar.close()


def rank_log_path(log_path: Path, index: int) -> Path:
    """Where process `index` writes its records before `merge_logs` folds them into `log_path`."""
    return log_path.with_name(f"{log_path.stem}.rank{index}{log_path.suffix}")


def merge_logs(log_path: Path) -> None:
    """Fold the per-process logs beside `log_path` (from this run or a killed one) into it, one record per output
    (the newest), sorted by key; then remove them."""
    log_path = Path(log_path)
    pattern = re.compile(rf"{re.escape(log_path.stem)}\.rank(\d+){re.escape(log_path.suffix)}")
    ranks = {int(m[1]): p for p in log_path.parent.iterdir() if (m := pattern.fullmatch(p.name))}
    parts = [ranks[i] for i in sorted(ranks)]
    if not parts:
        return
    records: dict[str, dict] = {}
    for path in [log_path, *parts]:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed process may be cut short
                continue
            if isinstance(record, dict) and "output" in record:
                records[record["output"]] = record
    ordered = sorted(records.values(), key=lambda r: (r.get("key", ""), r["output"]))
    atomic_write_bytes(log_path, "".join(json.dumps(r) + "\n" for r in ordered).encode("utf-8"))
    for path in parts:
        path.unlink()


def _open_log(path: Path):
    """`path` opened for appending lines; a line a killed process cut short is ended first."""
    log = open(path, "a", encoding="utf-8")
    if log.tell():
        with open(path, "rb") as tail:
            tail.seek(-1, 2)
            if tail.read(1) != b"\n":
                log.write("\n")
    return log


def run_jobs(
    jobs: list[Job],
    process: Callable[[Job], tuple[object, dict]],
    log_path: Path,
    desc: str = "upscale",
    fmt: str = "png",
    shard: Shard | None = None,
) -> list[tuple[Job, str]]:
    """Run `process(job) -> (PIL image, log record)` for this process's share of `jobs` (the same list in every
    process); save each image atomically and append its record to this process's log; a job that raises is reported
    (once, by the process that ran it) and the rest go on. At the end the main process merges the logs into
    `log_path` (JSON lines, sorted by key).

    Returns:
        The failed jobs of all processes with their messages, in key order.
    """
    from tqdm.auto import tqdm

    shard = shard or Shard()
    failures: list[tuple[Job, str]] = []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    mine = shard.take(sorted(jobs, key=lambda j: j.key))
    shard.barrier()  # every process has planned before any output appears
    with (
        ShardProgress(shard, len(jobs), desc) as bar,
        _open_log(rank_log_path(log_path, shard.index)) as log,
    ):
        for job in mine:
            try:
                image, record = process(job)
                if fmt == "jpg" and image.mode in ("RGBA", "LA"):
                    image = image.convert("RGB")
                save_image_atomic(image, job.dst)
                log.write(json.dumps({"key": job.key, "input": str(job.src), "output": str(job.dst), **record}) + "\n")
                log.flush()
            except Exception as err:  # a bad file must not stop the batch
                failures.append((job, f"{type(err).__name__}: {err}"))
                tqdm.write(f"failed: {job.src}: {type(err).__name__}: {err}", file=sys.stderr)
            bar.update()
    failures = sorted(shard.gather(failures), key=lambda f: f[0].key)
    if shard.is_main:
        merge_logs(log_path)
    shard.barrier()
    return failures
