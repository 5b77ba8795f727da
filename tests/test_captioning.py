"""MLLM captions: tiny random LLaVA and BLIP-2 through the real generate path, cache, CLI, token budget."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dalpsr import captioning
from dalpsr.captioning import (
    DEFAULT_INSTRUCTION,
    CaptionCache,
    Captioner,
    CaptionModelNotFoundError,
    caption_key,
    clean_caption,
    fit_to_token_budget,
    image_content_sha256,
    load_captions,
)
from dalpsr.captioning import captioner as captioner_module
from dalpsr.testing import get_dummy_blip2, get_dummy_captioner, get_dummy_llava, get_dummy_tokenizer

SHARED = Path(__file__).parents[2] / "shared" / "data"


def _image(seed: int, size: tuple[int, int] = (40, 52)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _sha(i: int) -> str:
    return image_content_sha256(_image(i, (8, 8)))


@pytest.fixture(scope="module")
def captioner():
    return get_dummy_captioner(seed=0, batch_size=2)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    model, processor = get_dummy_llava(seed=0)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_tokenizer():
    return get_dummy_tokenizer()


# ---------------------------------------------------------------- text hygiene and the 77-token budget


@pytest.mark.parametrize(
    "raw",
    [
        "USER: <image>\nDescribe this image. ASSISTANT: A red car parked on a street.",
        "system\nYou are helpful.\nuser\nDescribe this image.\nassistant\nA red car parked on a street.",
        "ASSISTANT: A red car parked on a street.",
        "<|im_start|>assistant A red car parked on a street.<|im_end|>",
        'Describe this image. "A red car parked on a street."',
        "  A red   car parked\non a street.  ",
    ],
)
def test_clean_caption_strips_echoes_and_role_tags(raw):
    assert clean_caption(raw, "Describe this image.") == "A red car parked on a street."


def test_fit_to_token_budget_keeps_short_text(clip_tokenizer):
    text = "A red car parked on a quiet street at sunset."
    assert fit_to_token_budget(text, clip_tokenizer) == text


def test_fit_to_token_budget_cuts_at_a_phrase_boundary(clip_tokenizer):
    phrases = [f"a {c} house with a garden, tall trees and a wooden fence" for c in ("red", "blue", "green")]
    text = "The image shows a quiet village. " + ". ".join(phrases * 3) + "."
    assert len(clip_tokenizer(text).input_ids) > 77
    fitted = fit_to_token_budget(text, clip_tokenizer)
    n = len(clip_tokenizer(fitted).input_ids)
    assert n <= 77
    assert text.startswith(fitted)
    rest = text[len(fitted) :]
    assert rest[0] in ".,;" or rest.startswith((" and ", " with ")), rest[:20]
    assert not fitted.endswith((",", ";", " and"))
    # It is the longest such cut: the next phrase boundary would not fit.
    next_cut = min(i for i in (rest.find(", ", 1), rest.find(". ", 1), rest.find(" and ", 1)) if i > 0)
    longer = (fitted + rest[:next_cut]).rstrip(",")
    assert len(clip_tokenizer(longer).input_ids) > 77


def test_fit_to_token_budget_counts_special_tokens_and_falls_back(clip_tokenizer):
    words = " ".join(f"word{i}" for i in range(80))  # no punctuation: word boundary fallback
    fitted = fit_to_token_budget(words, clip_tokenizer, max_tokens=20)
    assert words.startswith(fitted) and words[len(fitted)] == " "
    assert len(clip_tokenizer(fitted).input_ids) <= 20
    assert len(clip_tokenizer(fitted + " word").input_ids) > 20 - 1
    one_word = "x" * 400  # a single overlong word: token-level cut
    fitted = fit_to_token_budget(one_word, clip_tokenizer, max_tokens=10)
    assert 0 < len(fitted) < 400 and len(clip_tokenizer(fitted).input_ids) <= 10
    with pytest.raises(ValueError, match="`max_tokens`"):
        fit_to_token_budget("a cat", clip_tokenizer, max_tokens=2)
    with pytest.raises(TypeError, match="`text`"):
        fit_to_token_budget(None, clip_tokenizer)


# ---------------------------------------------------------------- image keys


def test_image_hash_is_content_based(tmp_path):
    img = _image(1)
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.png", compress_level=9)
    img.convert("RGBA").save(tmp_path / "c.png")
    digest = image_content_sha256(img)
    assert image_content_sha256(tmp_path / "a.png") == digest
    assert image_content_sha256(tmp_path / "b.png") == digest
    assert image_content_sha256(tmp_path / "c.png") == digest  # opaque alpha is dropped
    assert image_content_sha256(_image(2)) != digest
    # EXIF orientation is applied: a rotated file tagged back to upright hashes like the upright image.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    img.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "d.jpg", exif=exif, quality=100)
    stored = Image.open(tmp_path / "d.jpg")
    assert stored.size == (52, 40)
    assert image_content_sha256(tmp_path / "d.jpg") == image_content_sha256(stored)
    upright = np.asarray(ImageOps.exif_transpose(stored))
    assert upright.shape == (52, 40, 3)
    assert image_content_sha256(Image.fromarray(upright)) == image_content_sha256(stored)
    assert image_content_sha256(Image.fromarray(np.asarray(stored))) != image_content_sha256(stored)
    with pytest.raises(TypeError, match="`image`"):
        image_content_sha256(np.zeros((4, 4, 3)))


# ---------------------------------------------------------------- captioner: tiny LLaVA


def test_llava_captions_are_batched_and_clean(captioner):
    images = [_image(i, (40 + 9 * i, 52)) for i in range(3)]
    prompt = captioner.build_prompt(captioner.instruction)
    assert prompt.startswith("USER: <image>\n" + DEFAULT_INSTRUCTION) and prompt.endswith("ASSISTANT:")
    captions = captioner(images)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    for c in captions:
        assert "<image>" not in c and "assistant:" not in c.lower() and "user:" not in c.lower()
    # Batched (batch_size=2) and one-by-one decoding agree; a second call is deterministic.
    assert [captioner([img])[0] for img in images] == captions
    assert captioner(images) == captions
    # Different images give different captions from the same model.
    assert len(set(captions)) > 1
    # Tensor and path inputs are accepted too.
    tensor = torch.from_numpy(np.array(images[0])).permute(2, 0, 1).float() / 255
    assert captioner(tensor) == captions[:1]
    assert captioner(images[0], max_new_tokens=4)[0] != captions[0]


def test_captioner_rejects_bad_arguments(captioner):
    with pytest.raises(ValueError, match="`instruction`"):
        captioner([_image(0)], instruction="  ")
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        captioner([_image(0)], max_new_tokens=0)
    with pytest.raises(TypeError, match=r"`images\[0\]`"):
        captioner([object()])
    model, processor = get_dummy_llava()
    with pytest.raises(ValueError, match="`batch_size`"):
        Captioner(model, processor, model_id="x", batch_size=0)
    with pytest.raises(ValueError, match="`model` and `processor`"):
        Captioner(model, None, model_id="x")
    with pytest.raises(ValueError, match="`model_id`"):
        Captioner(model, processor)


def test_captioner_uses_the_cache(captioner, tmp_path):
    model, processor = get_dummy_llava(seed=0)
    calls = []
    generate = model.generate

    def counting_generate(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)

    model.generate = counting_generate
    cached = Captioner(model, processor, model_id=captioner.model_id, max_new_tokens=12,
                       generation_kwargs={"min_new_tokens": 4}, cache=tmp_path / "c.sqlite")  # fmt: skip
    images = [_image(i) for i in range(3)]
    first = cached(images)
    assert first == captioner(images) and calls == [3]
    assert cached(images[::-1]) == first[::-1] and calls == [3]  # all hits
    cached([images[0]], instruction="Name the main object.")
    assert calls == [3, 1]  # the instruction is part of the key
    digest = image_content_sha256(images[1])
    assert CaptionCache(tmp_path / "c.sqlite").get(digest, captioner.model_id, DEFAULT_INSTRUCTION) == first[1]


def test_unload_frees_the_model_and_reloads(tmp_path):
    cap = get_dummy_captioner(seed=3)
    before = cap([_image(5)])
    ref = weakref.ref(cap.model)
    cap.unload()
    assert not cap.is_loaded and ref() is None
    assert cap([_image(5)]) == before  # the loader rebuilds the same weights
    model, processor = get_dummy_llava(seed=3)
    plain = Captioner(model, processor, model_id="plain")
    del model
    plain.unload()
    with pytest.raises(RuntimeError, match="unloaded"):
        plain([_image(5)])


def test_from_pretrained_local_folder(llava_dir, captioner):
    images = [_image(i) for i in range(2)]
    loaded = Captioner.from_pretrained(str(llava_dir), max_new_tokens=12, generation_kwargs={"min_new_tokens": 4},
                                       dtype="float32", device="cpu")  # fmt: skip
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    assert loaded(images) == captioner(images)
    lazy = Captioner.from_pretrained(str(llava_dir), lazy=True, max_new_tokens=12,
                                     generation_kwargs={"min_new_tokens": 4})  # fmt: skip
    assert not lazy.is_loaded
    assert lazy(images) == captioner(images) and lazy.is_loaded
    rebuilt = Captioner.from_config(json.loads(json.dumps(lazy.config)))
    assert not rebuilt.is_loaded and rebuilt(images[:1]) == captioner(images[:1])


def test_trust_remote_code_only_when_asked(llava_dir, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    seen = []
    for cls in (AutoModelForImageTextToText, AutoProcessor):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    captioning.load_caption_model(str(llava_dir))
    assert seen == [False, False]
    captioning.load_caption_model(str(llava_dir), trust_remote_code=True)
    assert seen[2:] == [True, True]


def test_missing_model_gives_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(CaptionModelNotFoundError, match="nobody/no-such-captioner") as info:
        Captioner.from_pretrained("nobody/no-such-captioner", local_files_only=True, cache_dir=str(tmp_path))
    message = str(info.value)
    assert "local Hugging Face cache" in message and "pass the folder" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(CaptionModelNotFoundError, match="does not exist"):
        Captioner.from_pretrained(str(tmp_path / "missing-folder"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaptionModelNotFoundError, match="offline mode"):
        Captioner.from_pretrained("nobody/no-such-captioner", cache_dir=str(tmp_path), local_files_only=False)


def test_cached_hub_snapshot_loads_offline(llava_dir, tmp_path, monkeypatch):
    # Lay the tiny model out as a Hugging Face cache entry; it must load without any hub request.
    snapshot = tmp_path / "models--tiny--llava" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    (tmp_path / "models--tiny--llava" / "refs").mkdir()
    (tmp_path / "models--tiny--llava" / "refs" / "main").write_text("0" * 40)
    snapshot.symlink_to(llava_dir, target_is_directory=True)
    import huggingface_hub.file_download as fd

    monkeypatch.setattr(fd, "get_hf_file_metadata", lambda *a, **k: pytest.fail("contacted the hub"))
    model, _ = captioning.load_caption_model("tiny/llava", cache_dir=str(tmp_path))
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_quantisation_needs_cuda():
    with pytest.raises(ValueError, match="`load_in_4bit`.*CUDA"):
        Captioner.from_pretrained("llava-hf/llava-1.5-7b-hf", load_in_4bit=True, device="cpu")
    with pytest.raises(ValueError, match="`load_in_8bit`.*CUDA"):
        Captioner.from_pretrained("llava-hf/llava-1.5-7b-hf", load_in_8bit=True, device="cpu")
    with pytest.raises(ValueError, match="exclusive"):
        Captioner.from_pretrained("x/y", load_in_4bit=True, load_in_8bit=True, device="cpu")
    with pytest.raises(ValueError, match="`dtype`"):
        Captioner.from_pretrained("x/y", dtype="float64", device="cpu")
    with pytest.raises(TypeError, match="Unknown argument"):
        Captioner.from_pretrained("x/y", torch_dtype="float16")


# ---------------------------------------------------------------- captioner: another family (BLIP-2)


def test_blip2_through_the_generic_path(tmp_path):
    model, processor = get_dummy_blip2(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    cap = Captioner.from_pretrained(str(tmp_path), instruction="a photo of", max_new_tokens=6, batch_size=2,
                                    generation_kwargs={"min_new_tokens": 3}, device="cpu")  # fmt: skip
    assert type(cap.model).__name__ == "Blip2ForConditionalGeneration"
    assert cap.build_prompt("a photo of") == "a photo of"  # no chat template: the bare instruction
    images = [_image(i) for i in range(3)]
    captions = cap(images)
    assert len(captions) == 3 and all(c and "<image>" not in c for c in captions)
    assert [cap([img])[0] for img in images] == captions


# ---------------------------------------------------------------- cache


@pytest.mark.parametrize("suffix", [".jsonl", ".sqlite"])
def test_cache_round_trip(tmp_path, suffix):
    path = tmp_path / f"captions{suffix}"
    with CaptionCache(path) as cache:
        assert cache.get(_sha(0), "m", "i") is None
        cache.put(_sha(0), "m", "i", "a cat", path="a/0.png")
        cache.put(_sha(1), "m", "i", "a dog", path="1.png")
        cache.put(_sha(0), "m", "other", "a small cat", path="a/0.png")
        cache.put(_sha(1), "m", "i", "a brown dog", path="1.png")  # replaces
    cache = CaptionCache(path)
    assert cache.get(_sha(0), "m", "i") == "a cat"
    assert cache.get(_sha(0), "m", "other") == "a small cat"
    assert cache.get(_sha(0), "m2", "i") is None
    assert cache.get(_sha(1), "m", "i") == "a brown dog"
    assert len(cache) == 3 and cache.corrupt == []
    assert load_captions(path, model_id="m", instruction="i") == {"a/0.png": "a cat", "1.png": "a brown dog"}
    assert load_captions(path, key="sha256", instruction="i") == {_sha(0): "a cat", _sha(1): "a brown dog"}
    assert load_captions(path)["a/0.png"] == "a small cat"  # latest entry wins without filters
    with pytest.raises(ValueError, match="`key`"):
        load_captions(path, key="name")
    with pytest.raises(FileNotFoundError, match="dalpsr caption"):
        load_captions(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="`image_sha256`"):
        cache.put("abc", "m", "i", "x")


def _writer(path: str, worker: int, n: int) -> None:
    cache = CaptionCache(path)
    for j in range(n):
        digest = f"{worker:032x}{j:032x}"
        cache.put(digest, "m", "i", f"caption {worker} {j} " + "x" * 300, path=f"{worker}/{j}.png")
    cache.close()


@pytest.mark.parametrize("suffix", [".jsonl", ".sqlite"])
def test_cache_concurrent_writers(tmp_path, suffix):
    path = tmp_path / f"captions{suffix}"
    CaptionCache(path).close()  # an existing empty cache; workers also create/append concurrently
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    procs = [ctx.Process(target=_writer, args=(str(path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    cache = CaptionCache(path)
    records = cache.records()
    assert len(records) == 160 and cache.corrupt == []
    captions = load_captions(path)
    assert captions["3/39.png"].startswith("caption 3 39 ")
    assert all(cache.get(f"{w:032x}{j:032x}", "m", "i") for w in range(4) for j in range(40))


def test_jsonl_corrupt_entries_are_skipped_and_reported(tmp_path):
    path = tmp_path / "captions.jsonl"
    with CaptionCache(path) as cache:
        good = cache.put(_sha(0), "m", "i", "a cat", path="0.png")
    bad_key = dict(json.loads(json.dumps(good.__dict__)), caption="x", image_sha256=_sha(1))
    missing = {k: v for k, v in good.__dict__.items() if k != "caption"}
    with open(path, "a", encoding="utf-8") as f:
        f.write("{not json\n" + json.dumps(bad_key) + "\n" + json.dumps(missing) + "\n[1, 2]\n")
        f.write('{"key": "torn line from a crashed wri')  # no newline: an interrupted writer
    with pytest.warns(RuntimeWarning, match="skipped 4 corrupt entries"):
        cache = CaptionCache(path)
    assert [e.location for e in cache.corrupt] == ["line 2", "line 3", "line 4", "line 5"]
    assert "key does not match" in cache.corrupt[1].reason and "'caption'" in cache.corrupt[2].reason
    assert cache.get(_sha(0), "m", "i") == "a cat" and cache.get(_sha(1), "m", "i") is None
    cache.put(_sha(1), "m", "i", "a dog", path="1.png")  # lands on its own line after the torn one
    with pytest.warns(RuntimeWarning, match="skipped 5 corrupt"):
        reopened = CaptionCache(path)
    assert reopened.get(_sha(1), "m", "i") == "a dog"
    with pytest.warns(RuntimeWarning, match="skipped 5 corrupt"):
        assert load_captions(path) == {"0.png": "a cat", "1.png": "a dog"}


def test_sqlite_corrupt_rows_and_files(tmp_path):
    path = tmp_path / "captions.sqlite"
    with CaptionCache(path) as cache:
        cache.put(_sha(0), "m", "i", "a cat")
        cache.put(_sha(1), "m", "i", "a dog")
    conn = sqlite3.connect(path)
    conn.execute("UPDATE captions SET caption = NULL WHERE key = ?", (caption_key(_sha(1), "m", "i"),))
    conn.commit()
    conn.close()
    cache = CaptionCache(path)
    with pytest.warns(RuntimeWarning, match="'caption' is missing"):
        assert cache.get(_sha(1), "m", "i") is None
    assert cache.get(_sha(0), "m", "i") == "a cat"
    cache.put(_sha(1), "m", "i", "a dog again")  # recomputed entries replace corrupt rows
    assert cache.get(_sha(1), "m", "i") == "a dog again"
    cache.close()
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.warns(RuntimeWarning, match="unreadable database"):
        fresh = CaptionCache(garbage)
    fresh.put(_sha(0), "m", "i", "a cat")
    assert fresh.get(_sha(0), "m", "i") == "a cat"
    assert len(list(tmp_path.glob("garbage.sqlite.corrupt-*"))) == 1


# ---------------------------------------------------------------- `dalpsr caption`


def test_cli_caption_resumes_and_reports_bad_files(tmp_path, llava_dir, captioner, monkeypatch, capsys):
    from dalpsr.cli import main

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        _image(i).save(images / name, quality=95)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "captions.jsonl"
    # A previous (interrupted) run already captioned a.png.
    with CaptionCache(out) as cache:
        cache.put(image_content_sha256(images / "a.png"), str(llava_dir), DEFAULT_INSTRUCTION, "earlier", "a.png")
    args = ["caption", str(images), "--out", str(out), "--model", str(llava_dir), "--batch-size", "2",
            "--max-new-tokens", "12", "--recursive", "--device", "cpu"]  # fmt: skip
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "unreadable image" in captured.err
    assert "1 failed" in captured.out and "1 already" in captured.out and "2 captioned" in captured.out
    captions = load_captions(out)
    assert set(captions) == {"a.png", "b.jpg", "sub/c.png"} and captions["a.png"] == "earlier"
    assert captions["b.jpg"] == Captioner.from_pretrained(str(llava_dir), max_new_tokens=12)(images / "b.jpg")[0]

    # Rerun: everything is cached, the model is never loaded; the bad file still fails the run.
    monkeypatch.setattr(captioner_module, "load_caption_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(args) == 1
    assert "0 captioned, 3 already" in capsys.readouterr().out
    (images / "broken.png").unlink()
    assert main(args) == 0


def test_cli_caption_missing_model(tmp_path, capsys):
    from dalpsr.cli import main

    (tmp_path / "images").mkdir()
    _image(0).save(tmp_path / "images" / "a.png")
    args = ["caption", str(tmp_path / "images"), "--out", str(tmp_path / "c.jsonl"), "--model",
            str(tmp_path / "no-model"), "--device", "cpu"]  # fmt: skip
    assert main(args) == 2
    assert "no-model" in capsys.readouterr().err
    assert not (tmp_path / "c.jsonl").exists()


def test_cli_caption_real_photos(tmp_path, llava_dir, capsys):
    from dalpsr.cli import main
    from dalpsr.image_io import list_images

    root = SHARED / "real_lr" / "Real-ESRGAN"
    files = list_images([root])[:3] if root.is_dir() else []
    if len(files) < 3:
        pytest.skip(f"real low-resolution photos not found under {root}")
    out = tmp_path / "captions.sqlite"
    args = ["caption", *map(str, files), "--out", str(out), "--model", str(llava_dir), "--max-new-tokens", "6"]
    assert main(args) == 0
    captions = load_captions(out)
    assert set(captions) == {f.name for f in files} and all(captions.values())
    assert set(load_captions(out, key="sha256")) == {image_content_sha256(f) for f in files}


# ---------------------------------------------------------------- through the pipeline


def test_pipeline_uses_the_caption(captioner):
    from dalpsr.testing import get_dummy_pipeline

    pipe = get_dummy_pipeline(captioner=captioner)
    lr = _image(7, (16, 16))
    out = pipe(lr, upscale=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    upsampled_caption = out.prompts[0]
    assert upsampled_caption and upsampled_caption in out.controlnet_prompts[0]
    given = pipe(lr, prompt="a cat", upscale=2, num_inference_steps=2, output_type="np")
    assert given.prompts == ["a cat"]
