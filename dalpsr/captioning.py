"""MLLM captions: a `Captioner` over transformers image-text-to-text models and a persistent `CaptionCache`.

DaLPSR conditions the ControlNet branch on a caption of the image content written by a multimodal LLM
(LLaVA-1.5 by default, as in SUPIR and DaLPSR). Any `AutoModelForImageTextToText` model id or local folder
works; processors with a chat template get the instruction as a user turn with one image, the others get
the bare instruction. Captions are cleaned of chat-template echoes and role tags; fitting them into the
77-token CLIP budget is a separate step (`fit_to_token_budget`) because it depends on the pipeline's
tokenizer.

The cache key is the SHA-256 of the decoded RGB pixels (EXIF orientation applied), the model id and the
instruction, so a file and the same image in memory share an entry, and re-encoding an image losslessly
does not invalidate it. Two storage formats share one API: JSONL (a `.jsonl` path; human-readable, what
`dalpsr caption` writes) and SQLite in WAL mode (any other path). Both are safe under concurrent writer
processes and skip and report malformed entries instead of failing.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dalpsr.image_io import load_pil_rgb, tensor_to_pil, to_rgb_images

DEFAULT_CAPTION_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_INSTRUCTION = (
    "Describe the content of this image and its style in detail: the main subjects, their appearance, "
    "the setting, colours, lighting and textures. Do not comment on blur, noise or image quality."
)
CLIP_TOKEN_BUDGET = 77

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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
# Text hygiene
# ----------------------------------------------------------------------------------------------------------

_TAGGED_ROLE_RE = re.compile(r"<\|?[a-z_]+\|?>\s*(system|user|assistant|model)\b", re.IGNORECASE)
_PLACEHOLDER_RE = re.compile(r"<\|[^<>|]*\|>|</?(?:image|img|vision)[^<>]*>|\[/?INST\]", re.IGNORECASE)
_ASSISTANT_MARK_RE = re.compile(r"(?:^|\s)(?:assistant|gpt|answer)\s*:|^\s*(?:assistant|model)\s*$", re.I | re.M)
_ROLE_PREFIX_RE = re.compile(r"^(?:\s*(?:user|assistant|system|human|gpt|question|answer)\s*:)+\s*", re.I)


def clean_caption(text: str, instruction: str | None = None) -> str:
    """Strip chat-template echoes, role tags and image placeholders from a decoded MLLM answer.

    Args:
        text: the decoded model output (with or without the echoed prompt).
        instruction: the instruction that was asked; an echo of it is removed.
    """
    text = _TAGGED_ROLE_RE.sub(lambda m: f"\n{m.group(1)}\n", text)  # "<|im_start|>assistant" → role line
    text = _PLACEHOLDER_RE.sub(" ", text)
    marks = list(_ASSISTANT_MARK_RE.finditer(text))
    if marks:
        text = text[marks[-1].end() :]
    elif instruction and instruction.strip() and instruction.strip() in text:
        text = text.rsplit(instruction.strip(), 1)[1]
    text = _ROLE_PREFIX_RE.sub("", text)
    text = " ".join(text.split())
    return text.strip(" \"'`").strip()


_PHRASE_END_RE = re.compile(r"[.!?;:,](?=\s|$)")
_CONJUNCTION_RE = re.compile(r"\s(?=(?:and|but|while|with|which|where|whereas)\s)", re.IGNORECASE)


def _count_tokens(tokenizer, texts: list[str]) -> list[int]:
    encoded = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
    return [len(ids) for ids in encoded["input_ids"]]


def fit_to_token_budget(text: str, tokenizer, max_tokens: int = CLIP_TOKEN_BUDGET) -> str:
    """Shorten `text` at a phrase boundary so that it encodes to at most `max_tokens` tokens.

    Tokens are counted with `tokenizer` including its special tokens (CLIP: start and end of text, so the
    77-token context leaves 75 for the text). The longest prefix that ends at a sentence or clause
    boundary (`. ! ? ; : ,` or before a conjunction such as "and" or "with") and fits is kept, without
    its trailing comma or conjunction; failing that, the longest fitting prefix of whole words; failing
    that (one overlong word), the first tokens decoded back to text.

    Args:
        text: the caption.
        tokenizer: a transformers tokenizer (the pipeline's text-encoder tokenizer).
        max_tokens: the budget, special tokens included.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str; got {type(text).__name__}.")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise TypeError(f"`max_tokens` must be an int; got {type(max_tokens).__name__}.")
    n_special = _count_tokens(tokenizer, [""])[0]
    if max_tokens <= n_special:
        raise ValueError(f"`max_tokens` must exceed the tokenizer's {n_special} special tokens; got {max_tokens}.")
    text = " ".join(text.split())
    if _count_tokens(tokenizer, [text])[0] <= max_tokens:
        return text

    phrase_cuts = {m.end() for m in _PHRASE_END_RE.finditer(text)}
    phrase_cuts |= {m.start() for m in _CONJUNCTION_RE.finditer(text)}
    phrases = sorted({_tidy_prefix(text[:i]) for i in phrase_cuts} - {""}, key=len, reverse=True)
    word_cuts = [m.start() for m in re.finditer(r"\s", text)]
    words = sorted({_tidy_prefix(text[:i]) for i in word_cuts} - {""}, key=len, reverse=True)
    for candidates in (phrases, words):
        if candidates:
            for candidate, count in zip(candidates, _count_tokens(tokenizer, candidates)):
                if count <= max_tokens:
                    return candidate
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    keep = max_tokens - n_special
    while keep > 0:
        candidate = tokenizer.decode(ids[:keep], skip_special_tokens=True).strip()
        if _count_tokens(tokenizer, [candidate])[0] <= max_tokens:
            return candidate
        keep -= 1
    return ""


def _tidy_prefix(prefix: str) -> str:
    prefix = prefix.rstrip()
    while prefix and prefix[-1] in ",;:":
        prefix = prefix[:-1].rstrip()
    return prefix


# ----------------------------------------------------------------------------------------------------------
# Cache
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


# ----------------------------------------------------------------------------------------------------------
# Captioner
# ----------------------------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device` must name a torch device such as 'cpu' or 'cuda:0'; got {device!r}.") from err


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"`dtype` must be one of 'auto', {', '.join(map(repr, _DTYPES))} or a torch dtype; got {dtype!r}.")


def _looks_like_path(model_id: str) -> bool:
    return (
        os.path.isabs(model_id)
        or model_id.startswith((".", "~"))
        or model_id.count("/") > 1
        or (os.sep != "/" and os.sep in model_id)
    )


class CaptionModelNotFoundError(OSError):
    """The caption model is neither a local folder nor reachable on (or cached from) the model hub."""


def _missing_model_error(model_id: str, detail: str) -> CaptionModelNotFoundError:
    return CaptionModelNotFoundError(
        f"Caption model {model_id!r} could not be loaded: {detail}\n"
        f"No model hub is needed when the weights are on disk: download them once where a network is "
        f"available (`huggingface-cli download {model_id} --local-dir ./{model_id.rsplit('/', 1)[-1]}`) "
        f"and pass the folder instead of the id, e.g. `Captioner.from_pretrained('./"
        f"{model_id.rsplit('/', 1)[-1]}')` or `dalpsr caption DIR --model ./{model_id.rsplit('/', 1)[-1]}`."
    )


def _locate_model(
    model_id: str, revision: str | None, cache_dir: str | None, local_files_only: bool | None
) -> tuple[str, bool]:
    """Return (what to load from, whether to stay offline); raise one clear error if it cannot exist."""
    if os.path.isdir(os.path.expanduser(model_id)):
        return os.path.expanduser(model_id), True
    if _looks_like_path(model_id):
        raise _missing_model_error(model_id, f"the folder {os.path.expanduser(model_id)} does not exist.")
    if local_files_only is not False:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True), True
        except LocalEntryNotFoundError:
            if local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
                raise _missing_model_error(
                    model_id, "it is not in the local Hugging Face cache and offline mode is on."
                ) from None
    return model_id, False


def load_caption_model(
    model_id: str = DEFAULT_CAPTION_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
):
    """Load `(model, processor)` for an image-text-to-text model id or local folder.

    Args:
        model_id: a Hugging Face model id or a local folder (as written by `save_pretrained`).
        device: where to run; default CUDA when available, else CPU.
        dtype: `"auto"` (float16 on CUDA, float32 on CPU), `"float32"`, `"float16"`, `"bfloat16"`.
        load_in_4bit: quantise the weights to 4 bit (NF4) with bitsandbytes; CUDA only.
        load_in_8bit: quantise the weights to 8 bit with bitsandbytes; CUDA only.
        trust_remote_code: allow the model repository's own Python code; off unless asked.
        local_files_only: True never contacts the hub; None (default) uses the local cache when the
            model is there and downloads otherwise; False always checks the hub.
        revision: hub revision (branch, tag or commit).
        cache_dir: Hugging Face cache folder.
    """
    if not isinstance(model_id, str) or not model_id:
        raise TypeError(f"`model_id` must be a non-empty str (hub id or local folder); got {model_id!r}.")
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    if load_in_4bit and load_in_8bit:
        raise ValueError("`load_in_4bit` and `load_in_8bit` are exclusive; pick one.")
    quantization = None
    if load_in_4bit or load_in_8bit:
        flag = "load_in_4bit" if load_in_4bit else "load_in_8bit"
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(
                f"`{flag}` uses bitsandbytes, which needs a CUDA device; got device {str(device)!r} "
                f"(CUDA available: {torch.cuda.is_available()}). Load without quantisation on this machine."
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError(f"`{flag}` needs bitsandbytes: `pip install bitsandbytes`.") from err
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type="nf4",
        )

    from transformers import AutoModelForImageTextToText, AutoProcessor

    source, offline = _locate_model(model_id, revision, cache_dir, local_files_only)
    common = {"trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
    if not offline:
        common["revision"] = revision
    try:
        processor = AutoProcessor.from_pretrained(source, **common)
        if quantization is not None:
            model = AutoModelForImageTextToText.from_pretrained(
                source, dtype=dtype, quantization_config=quantization, device_map={"": device.index or 0}, **common
            )
        else:
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, **common).to(device)
    except OSError as err:
        raise _missing_model_error(model_id, str(err).splitlines()[0]) from None
    return model.eval(), processor


class Captioner:
    """Caption images with a multimodal LLM (transformers image-text-to-text model).

    `captioner(images)` returns one cleaned caption per image, batched; captions are looked up in and
    written to `cache` when one is set. `unload()` frees the model (before diffusion runs); when the
    captioner knows how to load it again (`from_pretrained`, `get_dummy_captioner`), the next call
    reloads it.

    As the optional `captioner` component of `DaLPSRPipeline` it is not written by `save_pretrained`
    (diffusers saves only its own, transformers and scheduler classes, and records `[None, None]`); pass
    it again to `from_pretrained(..., captioner=...)`, or keep `captioner.config` (JSON) and rebuild it
    lazily with `Captioner.from_config`.

    Args:
        model: a loaded image-text-to-text model (e.g. `LlavaForConditionalGeneration`).
        processor: its processor (image processor + tokenizer, ideally with a chat template).
        model_id: the name recorded in cache keys; defaults to the model's `name_or_path`.
        loader: a zero-argument callable returning `(model, processor)`, used to (re)load.
        instruction: the question asked for every image.
        max_new_tokens: generation length limit.
        batch_size: images per `generate` call.
        generation_kwargs: extra `generate` arguments (greedy decoding by default).
        cache: a `CaptionCache` or a cache path.
    """

    def __init__(
        self,
        model=None,
        processor=None,
        *,
        model_id: str | None = None,
        loader: Callable[[], tuple[Any, Any]] | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        max_new_tokens: int = 100,
        batch_size: int = 4,
        generation_kwargs: dict[str, Any] | None = None,
        cache: CaptionCache | str | os.PathLike | None = None,
    ):
        if (model is None) != (processor is None):
            raise ValueError("`model` and `processor` must be given together.")
        if model is None and loader is None:
            raise ValueError("Pass `model` and `processor`, or a `loader`; got neither.")
        self._check_instruction(instruction)
        self._check_positive("max_new_tokens", max_new_tokens)
        self._check_positive("batch_size", batch_size)
        if model_id is None:
            model_id = getattr(model, "name_or_path", "") or ""
        if not model_id:
            raise ValueError("`model_id` is needed (it is part of every cache key); got none.")
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.loader = loader
        self.instruction = instruction
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.generation_kwargs = dict(generation_kwargs or {})
        self.cache = cache if cache is None or isinstance(cache, CaptionCache) else CaptionCache(cache)
        self.load_settings: dict[str, Any] = {}
        if model is not None:
            self._prepare_processor()

    @classmethod
    def from_pretrained(
        cls,
        model_id: str = DEFAULT_CAPTION_MODEL,
        *,
        instruction: str = DEFAULT_INSTRUCTION,
        max_new_tokens: int = 100,
        batch_size: int = 4,
        generation_kwargs: dict[str, Any] | None = None,
        cache: CaptionCache | str | os.PathLike | None = None,
        lazy: bool = False,
        **load_kwargs,
    ) -> Captioner:
        """Build a captioner for a hub id or local folder.

        Args:
            model_id: e.g. `"llava-hf/llava-1.5-7b-hf"` (default) or a folder written by `save_pretrained`.
            lazy: load the weights on the first call instead of now.
            load_kwargs: `device`, `dtype`, `load_in_4bit`, `load_in_8bit`, `trust_remote_code`,
                `local_files_only`, `revision`, `cache_dir` (see `load_caption_model`).
        """
        allowed = {"device", "dtype", "load_in_4bit", "load_in_8bit", "trust_remote_code", "local_files_only",
                   "revision", "cache_dir"}  # fmt: skip
        unknown = sorted(set(load_kwargs) - allowed)
        if unknown:
            raise TypeError(
                f"Unknown argument(s) {unknown} for `Captioner.from_pretrained`; allowed: {sorted(allowed)}."
            )

        def loader():
            return load_caption_model(model_id, **load_kwargs)

        captioner = cls(
            model_id=model_id,
            loader=loader,
            instruction=instruction,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            generation_kwargs=generation_kwargs,
            cache=cache,
        )
        captioner.load_settings = {k: v for k, v in load_kwargs.items() if k != "cache_dir"}
        if not lazy:
            captioner.load()
        return captioner

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings; `Captioner.from_config(config)` rebuilds the captioner."""
        settings = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype | torch.device) else v)
                    for k, v in self.load_settings.items()}  # fmt: skip
        return {
            "model_id": self.model_id,
            "instruction": self.instruction,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "generation_kwargs": self.generation_kwargs,
            **settings,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides) -> Captioner:
        """Rebuild a captioner from `config` (lazily unless `lazy=False` is passed)."""
        if not isinstance(config, dict) or "model_id" not in config:
            raise ValueError(f"`config` must be a dict with a 'model_id' entry; got {config!r}.")
        settings = {"lazy": True, **config, **overrides}
        return cls.from_pretrained(settings.pop("model_id"), **settings)

    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    @property
    def device(self) -> torch.device | None:
        return None if self.model is None else next(self.model.parameters()).device

    def load(self) -> None:
        """Load the model now (no-op when loaded)."""
        if self.model is not None:
            return
        if self.loader is None:
            raise RuntimeError(
                f"The caption model {self.model_id!r} was unloaded and this captioner has no `loader` to load "
                "it again; build it with `Captioner.from_pretrained` or pass `loader=`."
            )
        self.model, self.processor = self.loader()
        self._prepare_processor()

    def unload(self) -> None:
        """Drop the model and processor and free their memory (CUDA cache included)."""
        self.model = None
        self.processor = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def to(self, device: str | torch.device) -> Captioner:
        """Move the (non-quantised) model to `device`."""
        if self.model is not None:
            self.model.to(_resolve_device(device))
        return self

    def _prepare_processor(self) -> None:
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise TypeError(
                f"`processor` must be a multimodal processor with a `tokenizer`; got {type(self.processor).__name__}."
            )
        if not getattr(self.model.config, "is_encoder_decoder", False):
            tokenizer.padding_side = "left"  # decoder-only batched generation continues from the right edge
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @staticmethod
    def _check_instruction(instruction: str) -> None:
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"`instruction` must be a non-empty str; got {instruction!r}.")

    @staticmethod
    def _check_positive(name: str, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int; got {value!r}.")

    def build_prompt(self, instruction: str) -> str:
        """The text fed to the processor: the chat template's user turn with one image, or the instruction."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return instruction

    def __call__(
        self,
        images: Image.Image | str | os.PathLike | torch.Tensor | Sequence,
        instruction: str | None = None,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Caption `images` (PIL images, paths, float tensors in [0, 1], or a list of them); one str each.

        A caption may be empty when the model answers with nothing but tags or an immediate end token.
        """
        instruction = self.instruction if instruction is None else instruction
        self._check_instruction(instruction)
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        self._check_positive("max_new_tokens", max_new_tokens)
        pils = [tensor_to_pil(item.rgb) for item in to_rgb_images(images, "images")]
        captions: list[str | None] = [None] * len(pils)
        hashes = [image_content_sha256(p) for p in pils] if self.cache is not None else []
        if self.cache is not None:
            captions = [self.cache.get(h, self.model_id, instruction) for h in hashes]
        todo = [i for i, c in enumerate(captions) if c is None]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for i, text in zip(chunk, self._generate([pils[i] for i in chunk], instruction, max_new_tokens)):
                captions[i] = text
                if self.cache is not None:
                    self.cache.put(hashes[i], self.model_id, instruction, text)
        return [c or "" for c in captions]

    @torch.inference_mode()
    def _generate(self, images: list[Image.Image], instruction: str, max_new_tokens: int) -> list[str]:
        self.load()
        prompt = self.build_prompt(instruction)
        inputs = self.processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
        device = self.device
        dtype = self.model.dtype
        inputs = {
            k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in inputs.items()
        }
        settings = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.processor.tokenizer.pad_token_id,
            **self.generation_kwargs,
        }
        output = self.model.generate(**inputs, **settings)
        prompt_ids = inputs.get("input_ids")
        if (
            prompt_ids is not None
            and output.shape[1] >= prompt_ids.shape[1]
            and torch.equal(output[:, : prompt_ids.shape[1]], prompt_ids)
        ):
            output = output[:, prompt_ids.shape[1] :]
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        return [clean_caption(t, instruction) for t in texts]
