"""The persistent caption cache: content keys, `CaptionCache` (JSONL or SQLite) and `load_captions`.

The cache key is the SHA-256 of the decoded RGB pixels (EXIF orientation applied), the model id and the
instruction, so a file and the same image in memory share an entry, and re-encoding an image losslessly
does not invalidate it. Two storage formats share one API: JSONL (a `.jsonl` path; human-readable, what
`dalpsr caption` writes) and SQLite in WAL mode (any other path). Both are safe under concurrent writer
processes and skip and report malformed entries instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from dalpsr.image_io import load_pil_rgb, tensor_to_pil, to_rgb_images

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------------------


def image_content_sha256(image: Image.Image | str | os.PathLike) -> str:
    """SHA-256 of an image's decoded 8-bit RGB pixels (EXIF orientation applied) and size.

    Args:
        image: a PIL image of any mode or a path to an image file.
    """
    if isinstance(image, str | os.PathLike):
        rgb = load_pil_rgb(image)
    elif isinstance(image, Image.Image):
        rgb = image if image.mode == "RGB" and not image.getexif().get(0x0112) else _to_pil_rgb(image)
    else:
        raise TypeError(f"`image` must be a PIL.Image or a path; got {type(image).__name__}.")
    digest = hashlib.sha256(f"rgb8:{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def caption_key(image_sha256: str, model_id: str, instruction: str) -> str:
    """The cache key: SHA-256 over the image hash, the model id and the instruction."""
    payload = json.dumps([image_sha256, model_id, instruction], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _to_pil_rgb(image: Image.Image) -> Image.Image:
    return tensor_to_pil(to_rgb_images(image)[0].rgb)


# ----------------------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionRecord:
    """One cached caption. `path` is where the image was found (informational, may be None)."""

    key: str
    image_sha256: str
    model: str
    instruction: str
    caption: str
    path: str | None = None
    created: float = 0.0


@dataclass(frozen=True)
class CorruptEntry:
    """A cache entry that was skipped: `location` is "line N" (JSONL) or "row KEY" (SQLite)."""

    location: str
    reason: str


_RECORD_FIELDS = ("key", "image_sha256", "model", "instruction", "caption")


def _validate_record(data: Any) -> CaptionRecord:
    """Build a record from a decoded entry or raise ValueError saying what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError(f"entry is a {type(data).__name__}, not an object")
    for name in _RECORD_FIELDS:
        if not isinstance(data.get(name), str):
            raise ValueError(f"field {name!r} is missing or not a string")
    for name in ("key", "image_sha256"):
        if not _SHA256_RE.match(data[name]):
            raise ValueError(f"field {name!r} is not a SHA-256 hex digest")
    if data["key"] != caption_key(data["image_sha256"], data["model"], data["instruction"]):
        raise ValueError("key does not match the image hash, model and instruction")
    path = data.get("path")
    if path is not None and not isinstance(path, str):
        raise ValueError("field 'path' is not a string")
    created = data.get("created", 0.0)
    if isinstance(created, bool) or not isinstance(created, int | float):
        raise ValueError("field 'created' is not a number")
    return CaptionRecord(
        data["key"], data["image_sha256"], data["model"], data["instruction"], data["caption"], path, created
    )


@contextmanager
def _exclusive_lock(fd: int):
    """Hold an exclusive advisory lock on an open file for the duration of the block."""
    try:
        import fcntl
    except ImportError:  # Windows: lock the first byte instead
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        try:
            yield
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class _JSONLStore:
    """Append-only JSON lines; appends are whole lines written under an exclusive file lock."""

    def __init__(self, path: Path):
        self.path = path
        self.index: dict[str, CaptionRecord] = {}
        self.order: list[str] = []
        self.corrupt: list[CorruptEntry] = []
        self._offset = 0
        self._line_no = 0
        self.refresh()

    def refresh(self) -> list[CorruptEntry]:
        """Read entries appended since the last read (by this or another process)."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # an unterminated last line may still be being written
        new_corrupt = []
        for raw in data[:end].split(b"\n")[:-1]:
            self._line_no += 1
            if not raw.strip():
                continue
            try:
                record = _validate_record(json.loads(raw.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
                new_corrupt.append(CorruptEntry(f"line {self._line_no}", str(err)))
                continue
            if record.key not in self.index:
                self.order.append(record.key)
            self.index[record.key] = record
        self._offset += end
        self.corrupt.extend(new_corrupt)
        return new_corrupt

    def get(self, key: str) -> CaptionRecord | None:
        if key not in self.index and self.path.exists() and self.path.stat().st_size != self._offset:
            self.refresh()
        return self.index.get(key)

    def put(self, record: CaptionRecord) -> None:
        line = (json.dumps(asdict(record), ensure_ascii=False) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            with _exclusive_lock(fd):
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # close a line torn by a crashed writer so ours stays intact
                os.write(fd, line)
                os.fsync(fd)
        finally:
            os.close(fd)
        if record.key not in self.index:
            self.order.append(record.key)
        self.index[record.key] = record

    def records(self) -> Iterator[CaptionRecord]:
        self.refresh()
        return (self.index[k] for k in self.order)

    def close(self) -> None:
        pass


class _SQLiteStore:
    """One table in a SQLite database in WAL mode; one connection per process, autocommit writes."""

    _COLUMNS = "key, image_sha256, model, instruction, caption, path, created"

    def __init__(self, path: Path):
        self.path = path
        self.corrupt: list[CorruptEntry] = []
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._lock = threading.Lock()  # one connection per process, shared by its threads
        self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as err:
            moved = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, moved)
            self.corrupt.append(CorruptEntry(str(self.path), f"unreadable database ({err}); moved to {moved}"))
            self._conn = self._open()
        self._pid = os.getpid()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS captions (key TEXT PRIMARY KEY, image_sha256 TEXT, model TEXT, "
                "instruction TEXT, caption TEXT, path TEXT, created REAL)"
            )
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def _row_to_record(self, row: tuple, report: bool) -> CaptionRecord | None:
        try:
            return _validate_record(dict(zip(self._COLUMNS.split(", "), row)))
        except ValueError as err:
            entry = CorruptEntry(f"row {row[0]!r}", str(err))
            if report and entry not in self.corrupt:
                self.corrupt.append(entry)
            return None

    def _execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._connect().execute(sql, params).fetchall()

    def get(self, key: str) -> CaptionRecord | None:
        rows = self._execute(f"SELECT {self._COLUMNS} FROM captions WHERE key = ?", (key,))
        return self._row_to_record(rows[0], report=True) if rows else None

    def put(self, record: CaptionRecord) -> None:
        values = tuple(asdict(record)[c] for c in self._COLUMNS.split(", "))
        self._execute(f"INSERT OR REPLACE INTO captions ({self._COLUMNS}) VALUES (?,?,?,?,?,?,?)", values)

    def records(self) -> Iterator[CaptionRecord]:
        rows = self._execute(f"SELECT {self._COLUMNS} FROM captions ORDER BY rowid")
        for row in rows:
            record = self._row_to_record(row, report=True)
            if record is not None:
                yield record

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


class CaptionCache:
    """Persistent captions keyed by image content hash + model id + instruction.

    A `.jsonl` path stores one JSON object per line (appends under an exclusive file lock); any other
    path is a SQLite database in WAL mode. Both are safe with several writer processes, resume where a
    previous run stopped, and skip entries that fail validation (broken JSON, missing fields, a key
    that does not match its fields): each is listed in `corrupt` and reported once with a warning.
    A later `put` for the same key supersedes a skipped or older entry.

    Args:
        path: the cache file (created on first write).
    """

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"`path` must be a str or os.PathLike; got {type(path).__name__}.")
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"`path` must be a file, got the folder {self.path}.")
        self._store = _JSONLStore(self.path) if self.path.suffix.lower() == ".jsonl" else _SQLiteStore(self.path)
        self._reported = 0
        self._report()

    @property
    def corrupt(self) -> list[CorruptEntry]:
        """Entries skipped so far because they failed validation."""
        return list(self._store.corrupt)

    def _report(self) -> None:
        new = self._store.corrupt[self._reported :]
        if new:
            shown = "; ".join(f"{e.location}: {e.reason}" for e in new[:5])
            more = f" (and {len(new) - 5} more)" if len(new) > 5 else ""
            warnings.warn(
                f"Caption cache {self.path}: skipped {len(new)} corrupt entr{'y' if len(new) == 1 else 'ies'}: "
                f"{shown}{more}. They will be recomputed.",
                RuntimeWarning,
                stacklevel=3,
            )
            self._reported = len(self._store.corrupt)

    def get(self, image_sha256: str, model_id: str, instruction: str) -> str | None:
        """The cached caption, or None when absent (or when the stored entry is corrupt)."""
        record = self._store.get(caption_key(image_sha256, model_id, instruction))
        self._report()
        return None if record is None else record.caption

    def put(
        self, image_sha256: str, model_id: str, instruction: str, caption: str, path: str | None = None
    ) -> CaptionRecord:
        """Store a caption (replacing an earlier one for the same key) and return its record."""
        if not isinstance(caption, str):
            raise TypeError(f"`caption` must be a str; got {type(caption).__name__}.")
        if not isinstance(image_sha256, str) or not _SHA256_RE.match(image_sha256):
            raise ValueError(f"`image_sha256` must be a lowercase SHA-256 hex digest; got {image_sha256!r}.")
        key = caption_key(image_sha256, model_id, instruction)
        record = CaptionRecord(key, image_sha256, model_id, instruction, caption, path, time.time())
        self._store.put(record)
        return record

    def records(self) -> list[CaptionRecord]:
        """All valid records, oldest first; a key written twice appears once, with its latest caption."""
        records = list(self._store.records())
        self._report()
        return records

    def __len__(self) -> int:
        return len(self.records())

    def close(self) -> None:
        """Close the database connection (JSONL needs none)."""
        self._store.close()

    def __enter__(self) -> CaptionCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_captions(
    path: str | os.PathLike, key: str = "path", model_id: str | None = None, instruction: str | None = None
) -> dict[str, str]:
    """Read a caption cache as a plain mapping, for training scripts.

    Args:
        path: a cache written by `dalpsr caption` or `CaptionCache` (`.jsonl` or SQLite).
        key: `"path"` maps the image path recorded at captioning time (relative to the folder that
            was captioned, POSIX separators) to its caption; `"sha256"` maps `image_content_sha256`.
        model_id: keep only captions from this model.
        instruction: keep only captions made with this instruction.

    When several entries map to the same key, the latest one wins.
    """
    if key not in ("path", "sha256"):
        raise ValueError(f"`key` must be 'path' or 'sha256'; got {key!r}.")
    if not Path(path).is_file():
        raise FileNotFoundError(f"Caption cache not found: {path}. Write one with `dalpsr caption DIR --out {path}`.")
    cache = CaptionCache(path)
    try:
        records = cache.records()
    finally:
        cache.close()
    out: dict[str, str] = {}
    for record in sorted(records, key=lambda r: r.created):
        if (model_id is not None and record.model != model_id) or (
            instruction is not None and record.instruction != instruction
        ):
            continue
        name = record.path if key == "path" else record.image_sha256
        if name is not None:
            out[name] = record.caption
    return out
