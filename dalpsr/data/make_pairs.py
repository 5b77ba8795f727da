"""Training pairs on disk (`dalpsr make-pairs`): HR crops + synthetic LR files + metadata.jsonl, resumable.

Layout of OUT_DIR: `hr/NAME.png`, `lr/NAME.png`, `metadata.jsonl` (one JSON object per pair, sorted by
name when the run ends) and `run.json` (the settings; a resumed run must use the same ones).
Each crop's randomness comes from a seed derived from (--seed, the image's path relative to HR_DIR, the
crop index), and every pair is computed with one torch thread (in this process as in the workers: the result of a
float reduction depends on how many threads share it), so the output is bit-identical whatever --workers is, and
does not depend on the order of work or on interruptions. Workers die with the process that started them.
Images and metadata lines are written atomically (a pair counts as done once its line is in
metadata.jsonl; a torn last line is dropped on resume and the pair is redone).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dalpsr.runtime import derive_seed


def pair_names(sources: list[str]) -> dict[str, str]:
    """Output base name per source path, unique: the path without suffix, '/' → '__'; where two sources share that
    name, both keep their suffix (`a.png`, `a.jpg` → `a_png`, `a_jpg`); where they still clash (`a__b.png` and
    `a/b.png`), each gets 8 hex digits of its path's SHA-1. Deterministic: the name depends only on the sources.

    Raises:
        ValueError: two sources still map to one name (not reachable short of a SHA-1 collision).
    """
    import hashlib

    def unique(names: dict[str, str], rename) -> dict[str, str]:
        counts: dict[str, int] = {}
        for n in names.values():
            counts[n] = counts.get(n, 0) + 1
        return {s: (n if counts[n] == 1 else rename(s, n)) for s, n in names.items()}

    names = {s: s.rsplit(".", 1)[0].replace("/", "__") for s in sources}
    names = unique(names, lambda s, n: s.replace("/", "__").replace(".", "_"))
    names = unique(names, lambda s, n: f"{n}_{hashlib.sha1(s.encode()).hexdigest()[:8]}")
    if len(set(names.values())) != len(names):
        clash = sorted(s for s in names if list(names.values()).count(names[s]) > 1)
        raise ValueError(f"`hr_dir` holds files that map to one output name: {clash}; rename one of them.")
    return names


@dataclass
class MakePairsSummary:
    """Outcome of `make_pairs`."""

    written: int = 0
    already_done: int = 0
    total: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False


def _process_image(task: dict) -> tuple[str, list[dict], str | None]:
    """Worker: make the requested crops of one image; returns (source, records, error)."""
    import torch

    from dalpsr.degradations.config import DegradationConfig
    from dalpsr.degradations.kernels import randint
    from dalpsr.degradations.pipeline import degrade_image
    from dalpsr.degradations.vocabulary import labels_to_bins
    from dalpsr.image_io import load_image, save_image_atomic, tensor_to_pil

    source, out = task["source"], Path(task["out_dir"])
    scale, size = task["scale"], task["size"]
    try:
        rgb = load_image(task["path"]).rgb
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable", reported in the summary
        return source, [], f"unreadable: {type(exc).__name__}: {exc}"
    _, h, w = rgb.shape
    crop = min(size, h, w)
    crop -= crop % scale
    if crop < scale:
        return source, [], f"too small: {h}×{w} is below the scale {scale}"
    config = DegradationConfig.from_dict(task["config"])
    records = []
    for c in task["crops"]:
        seed = derive_seed(task["seed"], source, c)
        g = torch.Generator().manual_seed(seed)
        top, left = randint(g, 0, h - crop), randint(g, 0, w - crop)
        hr = rgb[:, top : top + crop, left : left + crop].contiguous()
        result = degrade_image(hr, config, scale=scale, generator=g)
        name = f"{task['name']}_c{c:03d}"
        save_image_atomic(tensor_to_pil(hr), out / "hr" / f"{name}.png")
        save_image_atomic(tensor_to_pil(result.lr), out / "lr" / f"{name}.png")
        records.append(
            {
                "name": name,
                "hr": f"hr/{name}.png",
                "lr": f"lr/{name}.png",
                "source": source,
                "crop_index": c,
                "crop_box": [top, left, crop, crop],
                "seed": seed,
                "scale": scale,
                "preset": config.name,
                "prompt": result.prompt,
                "bins": labels_to_bins(result.labels),
                "labels": result.labels.int().tolist(),
                "values": result.values,
                "params": result.params.to_dict(),
            }
        )
    return source, records, None


@contextmanager
def _one_thread():
    """Run torch with one intra-op thread (as the workers do), restoring the caller's setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _parent_gone(parent_pid: int, ppid: int) -> bool:
    if os.getppid() != ppid:  # re-parented: the process that started this worker has exited
        return True
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # the pid exists (now someone else's)
        return True
    return False


def _watch_parent(parent_pid: int, ppid: int) -> None:
    while not _parent_gone(parent_pid, ppid):
        time.sleep(0.2)
    os._exit(1)


def _init_worker(parent_pid: int) -> None:
    """Worker initializer: one torch thread; exit as soon as the make-pairs process dies (SIGKILL included).

    On Linux the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); everywhere a watchdog thread
    polls the parent every 0.2 s, and covers a parent that died before the prctl call.
    """
    import torch

    torch.set_num_threads(1)
    ppid = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # no libc prctl: the watchdog still applies
    if _parent_gone(parent_pid, ppid):
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, ppid), daemon=True, name="parent-watchdog").start()


def _read_done(meta: Path) -> dict[str, str]:
    """name → line for every complete line of metadata.jsonl; rewrites the file without torn lines."""
    from dalpsr.image_io import atomic_write_bytes

    if not meta.exists():
        return {}
    done: dict[str, str] = {}
    raw = meta.read_bytes().decode("utf-8", errors="replace")
    lines = raw.split("\n")
    clean = True
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if i == len(lines) - 1:
                raise ValueError("last line without newline")  # torn write
            done[record["name"]] = line
        except (ValueError, KeyError, TypeError):
            clean = False
    if not clean:
        atomic_write_bytes(meta, "".join(f"{line}\n" for line in done.values()).encode())
    return done


def make_pairs(
    hr_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    scale: int = 4,
    preset_name: str = "realesrgan",
    config=None,
    crops: int = 1,
    size: int = 512,
    seed: int = 0,
    workers: int = 0,
    recursive: bool = False,
    max_pairs: int | None = None,
    progress: bool = True,
) -> MakePairsSummary:
    """Make HR/LR training pairs from a folder of HR images (see the module docstring).

    Args:
        hr_dir: folder of HR images (never modified).
        out_dir: output folder; an existing run there is resumed (same settings required).
        scale: SR scale (LR crop = HR crop / scale).
        preset_name: degradation preset, used when `config` is None.
        config: a `DegradationConfig` overriding the preset.
        crops: random crops per image.
        size: HR crop size (smaller images give one crop of their short side, rounded down to the scale).
        seed: run seed.
        workers: worker processes (0 = in this process).
        recursive: include images in sub-folders.
        max_pairs: stop after writing this many new pairs (run again to continue).
        progress: show a tqdm progress bar.
    """
    from tqdm import tqdm

    from dalpsr.degradations.config import preset
    from dalpsr.image_io import atomic_write_bytes, list_images

    hr_dir, out_dir = Path(hr_dir), Path(out_dir)
    if not hr_dir.is_dir():
        raise ValueError(f"`hr_dir` must be an existing folder; got {str(hr_dir)!r}.")
    for name, value, low in (("scale", scale, 1), ("crops", crops, 1), ("size", size, 1), ("workers", workers, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}; got {value!r}.")
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"`max_pairs` must be >= 0 or None; got {max_pairs!r}.")
    if size < scale:
        raise ValueError(f"`size` must be at least `scale` ({scale}); got {size}.")
    if out_dir.resolve() == hr_dir.resolve():
        raise ValueError("`out_dir` must differ from `hr_dir` (inputs are never overwritten).")
    config = config if config is not None else preset(preset_name, scale=scale)
    settings = {"scale": scale, "size": size, "crops": crops, "seed": seed, "config": config.to_dict()}
    run_file = out_dir / "run.json"
    settings_text = json.dumps(settings, indent=2, sort_keys=True)
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous != json.loads(settings_text):
            changed = sorted(k for k in settings if previous.get(k) != json.loads(settings_text)[k])
            raise ValueError(
                f"`out_dir` {str(out_dir)!r} holds a run with different settings ({changed}); "
                "use a new folder or the same settings to resume."
            )
        # a killed run can leave the temporary file of a write in flight; its pair is not in the metadata, so it is
        # written again, and the orphan goes (one make-pairs run per folder at a time)
        for folder in (out_dir, out_dir / "hr", out_dir / "lr"):
            for orphan in folder.glob(".*.tmp"):
                orphan.unlink(missing_ok=True)
    else:
        atomic_write_bytes(run_file, settings_text.encode())

    paths = list_images([hr_dir], recursive=recursive)
    sources = [p.relative_to(hr_dir).as_posix() for p in paths]
    names = pair_names(sources)
    meta = out_dir / "metadata.jsonl"
    done = _read_done(meta)
    summary = MakePairsSummary(total=len(sources) * crops)
    tasks = []
    budget = max_pairs
    for path, source in zip(paths, sources):
        todo = [c for c in range(crops) if f"{names[source]}_c{c:03d}" not in done]
        summary.already_done += crops - len(todo)
        if budget is not None:
            todo = todo[:budget]
            budget -= len(todo)
        if todo:
            tasks.append(
                {
                    "path": str(path),
                    "source": source,
                    "name": names[source],
                    "crops": todo,
                    "out_dir": str(out_dir),
                    "scale": scale,
                    "size": size,
                    "seed": seed,
                    "config": settings["config"],
                }
            )
    bar = tqdm(total=summary.total, initial=summary.already_done, unit="pair", disable=not progress, file=sys.stderr)
    with open(meta, "a", encoding="utf-8") as fh:

        def collect(source, records, error):
            if error:
                summary.skipped.append((source, error))
                bar.update(crops)
            for record in records:
                line = json.dumps(record, sort_keys=True)
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                done[record["name"]] = line
                summary.written += 1
                bar.update(1)

        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
                for future in as_completed([pool.submit(_process_image, t) for t in tasks]):
                    collect(*future.result())
        else:
            with _one_thread():
                for t in tasks:
                    collect(*_process_image(t))
    bar.close()
    skipped = {s for s, _ in summary.skipped}
    expected = {f"{names[s]}_c{c:03d}" for s in sources if s not in skipped for c in range(crops)}
    summary.complete = expected <= set(done)
    if summary.complete:
        atomic_write_bytes(meta, "".join(f"{done[n]}\n" for n in sorted(done)).encode())
    return summary
