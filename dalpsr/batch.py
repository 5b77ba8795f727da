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
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dalpsr.image_io import IMAGE_EXTENSIONS, save_image_atomic


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
    the folders with the reason, and inputs that do not exist (see the module rules)."""
    found: list[tuple[Path, Path]] = []
    ignored: list[tuple[Path, str]] = []
    missing: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            for f in sorted(q for q in path.glob(pattern) if q.is_file() and not q.name.startswith(".")):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append((f, f.relative_to(path)))
                else:
                    ignored.append((f, f"suffix {f.suffix or '(none)'!r} is not an image type"))
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            missing.append(path)
    return found, ignored, missing


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


def run_jobs(
    jobs: list[Job],
    process: Callable[[Job], tuple[object, dict]],
    log_path: Path,
    desc: str = "upscale",
    fmt: str = "png",
) -> list[tuple[Job, str]]:
    """Run `process(job) -> (PIL image, log record)` for each job; save each image atomically and append its record
    to `log_path` (JSON lines). A job that raises is reported and the rest go on.

    Returns:
        The failed jobs with their messages.
    """
    from tqdm.auto import tqdm

    failures: list[tuple[Job, str]] = []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        for job in tqdm(jobs, desc=desc, unit="img"):
            try:
                image, record = process(job)
                if fmt == "jpg" and image.mode in ("RGBA", "LA"):
                    image = image.convert("RGB")
                save_image_atomic(image, job.dst)
                log.write(json.dumps({"input": str(job.src), "output": str(job.dst), **record}) + "\n")
                log.flush()
            except Exception as err:  # a bad file must not stop the batch
                failures.append((job, f"{type(err).__name__}: {err}"))
                tqdm.write(f"failed: {job.src}: {type(err).__name__}: {err}", file=sys.stderr)
    return failures
