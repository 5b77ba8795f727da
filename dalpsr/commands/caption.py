"""`dalpsr caption`: caption a folder of images with an MLLM into a resumable caption cache."""

from __future__ import annotations

import sys
from pathlib import Path

from dalpsr.batch import Shard, ShardProgress, find_inputs
from dalpsr.captioning import (
    DEFAULT_CAPTION_MODEL,
    DEFAULT_INSTRUCTION,
    CaptionCache,
    Captioner,
    CaptionModelNotFoundError,
    image_content_sha256,
)
from dalpsr.image_io import load_pil_rgb
from dalpsr.runtime import DTYPE_CHOICES


def add_commands(subparsers) -> None:
    """Register `dalpsr caption`."""
    p = subparsers.add_parser(
        "caption",
        help="caption images with a multimodal LLM into a resumable cache (JSONL or SQLite)",
        description=(
            "Caption every image under the inputs with a transformers image-text-to-text model. Captions are "
            "appended to --out as they are made; a rerun skips images already captioned with the same model "
            "and instruction. Unreadable images are reported and skipped; the exit code is 1 when any failed. "
            "Training scripts read the result with dalpsr.captioning.load_captions. Under `accelerate launch -m "
            "dalpsr caption ...` the images are split over the processes (one device each), all writing one cache."
        ),
    )
    p.add_argument("inputs", nargs="+", type=Path, help="image folders and/or image files")
    p.add_argument(
        "--out", type=Path, required=True, help="caption cache: a .jsonl file, or a SQLite file (any other suffix)"
    )
    p.add_argument("--model", default=None, help="hub id or local folder (default llava-hf/llava-1.5-7b-hf)")
    p.add_argument(
        "--instruction", default=None, help="the question asked for each image (default: detailed content and style)"
    )
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--device", default=None, help="e.g. cuda, cuda:1, cpu (default: CUDA when available, one GPU per process)"
    )
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 weights (CUDA only)")
    quant.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit weights (CUDA only)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own code")
    p.add_argument("--local-files-only", action="store_true", help="never contact the model hub (the default)")
    p.add_argument("--download", action="store_true", help="download the model from the hub when it is not on disk")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--recursive", action="store_true", help="also caption images in sub-folders")
    p.set_defaults(func=run_caption)


def run_caption(args) -> int:
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            print(
                f"error: --{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}.",
                file=sys.stderr,
            )
            return 2
    instruction = args.instruction or DEFAULT_INSTRUCTION
    shard = Shard.current()
    try:
        device = shard.device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    found, _, missing = find_inputs(args.inputs, args.recursive)
    files = sorted(((f, rel.as_posix()) for f, rel in found), key=lambda item: item[1])
    total, files = len(files), shard.take(files)
    failures = [f"{m}: not found" for m in missing] if shard.is_main else []
    cache = CaptionCache(args.out)
    captioner = Captioner.from_pretrained(
        args.model or DEFAULT_CAPTION_MODEL,
        instruction=instruction,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        lazy=True,  # a finished run resumes without loading the model at all
        device=str(device),
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
        trust_remote_code=args.trust_remote_code,
        local_files_only=not args.download or args.local_files_only,
        revision=args.revision,
    )
    done = cached = 0
    batch: list[tuple[str, str, object, Path]] = []

    def flush() -> None:
        nonlocal done
        captioner.load()  # a model that cannot load is one error for the run, not one per image
        try:
            results = list(zip(batch, captioner([img for _, _, img, _ in batch])))
        except (ValueError, RuntimeError):
            results = []
            for item in batch:  # isolate the image that broke the batch
                try:
                    results.append((item, captioner([item[2]])[0]))
                except (ValueError, RuntimeError) as item_err:
                    failures.append(f"{item[3]}: captioning failed ({item_err})")
        for (name, digest, _, _), text in results:
            cache.put(digest, captioner.model_id, instruction, text, path=name)
            done += 1
        batch.clear()

    try:
        with ShardProgress(shard, total, "caption") as bar:
            for path, name in files:
                try:
                    image = load_pil_rgb(path)
                    digest = image_content_sha256(image)
                except Exception as err:  # any decoder error: report the file and go on
                    failures.append(f"{path}: unreadable image ({type(err).__name__}: {err})")
                    bar.update(1)
                    continue
                if cache.get(digest, captioner.model_id, instruction) is not None:
                    cached += 1
                    bar.update(1)
                    continue
                batch.append((name, digest, image, path))
                if len(batch) >= args.batch_size:
                    n = len(batch)
                    flush()
                    bar.update(n)
            if batch:
                n = len(batch)
                flush()
                bar.update(n)
    except (CaptionModelNotFoundError, ImportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted after {done} new captions; rerun the same command to resume.", file=sys.stderr)
        return 130
    finally:
        captioner.unload()
        cache.close()

    done, cached = sum(shard.gather([done])), sum(shard.gather([cached]))
    failures = shard.gather(failures)
    if shard.is_main:
        print(f"{done} captioned, {cached} already in {args.out}, {len(failures)} failed.")
        for line in failures:
            print(f"failed: {line}", file=sys.stderr)
    return 1 if failures else 0
