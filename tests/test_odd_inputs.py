"""A corpus of odd and broken image files (issue 18) through `dalpsr.image_io`, `dalpsr upscale` (both engines),
`dalpsr describe`, `dalpsr eval` and the pipeline API: every bad file is reported by name, the rest are processed,
the exit code says something failed, and nothing comes out silently wrong (colours of tiny images, gray mode,
animated GIFs, sizes)."""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalpsr.batch import find_inputs
from dalpsr.cli import main
from dalpsr.image_io import ImageDecodeError, list_images, load_image, scan_images, tensor_to_pil, to_rgb_images

SOLIDS = {  # name: ((width, height), colour)
    "solid_1x1.png": ((1, 1), (200, 10, 10)),
    "solid_2x2.png": ((2, 2), (255, 0, 0)),
    "solid_3x5.png": ((3, 5), (10, 200, 30)),
}
BAD = ("truncated.png", "empty.png", "text.png", "bomb.png")
IGNORED = ("notes.txt", "array.npy")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A valid-looking PNG whose header claims `width`×`height` RGB pixels, with one tiny IDAT (a few hundred bytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def build_corpus(folder: Path) -> Path:
    """Write the odd-file corpus into `folder` (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(bomb_png())
    for name, (size, colour) in SOLIDS.items():
        Image.new("RGB", size, colour).save(folder / name)
    gray16 = (np.linspace(0, 65535, 20 * 24).reshape(20, 24)).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")  # mode I;16
    Image.fromarray(photo[..., 0]).save(folder / "gray8.png")  # mode L
    Image.fromarray(photo).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    palette = Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette_alpha.png", transparency=0)
    frames = [Image.new("RGB", (16, 12), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (folder / "notes.txt").write_text("not an image\n")
    np.save(folder / "array.npy", photo)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("odd") / "in")


GOOD = sorted([*SOLIDS, "gray16.png", "gray8.png", "cmyk.jpg", "palette_alpha.png", "animated.gif"])


# ---------------------------------------------------------------------------------------------- image_io
def test_zero_size_inputs_raise_a_value_error_naming_the_argument():
    for empty in (
        torch.zeros(3, 0, 0),
        torch.zeros(1, 3, 4, 0),
        np.zeros((0, 0, 3), np.uint8),
        Image.new("RGB", (0, 0)),
    ):
        with pytest.raises(ValueError, match=r"`image` is empty"):
            to_rgb_images(empty)
    with pytest.raises(ValueError, match="empty batch"):
        to_rgb_images(torch.zeros(0, 3, 4, 4))


def test_bad_files_raise_one_error_naming_the_file(corpus):
    for name in BAD:
        with pytest.raises(ImageDecodeError) as info:
            load_image(corpus / name)
        assert str(corpus / name) in str(info.value)
        assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)
    with pytest.raises(ImageDecodeError, match="too large to decode safely"):
        load_image(corpus / "bomb.png")
    assert (corpus / "bomb.png").stat().st_size < 2000


def test_one_folder_rule_for_every_lister(corpus):
    found, ignored, missing = scan_images([corpus])
    names = {f.name for f, _ in found}
    assert names == set(GOOD) | set(BAD) and not missing
    assert {p.name: why for p, why in ignored} == {
        "notes.txt": "suffix '.txt' is not an image type",
        "array.npy": "suffix '.npy' is not an image type",
    }
    assert list_images([corpus]) == [f for f, _ in found]
    assert find_inputs([corpus]) == (found, ignored, missing)


def test_animated_gif_first_frame_is_announced(corpus, caplog):
    with caplog.at_level(logging.WARNING, logger="dalpsr"):
        image = load_image(corpus / "animated.gif")
    assert image.note == "animated image with 3 frames: the first frame is used"
    assert "animated.gif" in caplog.text and "first frame" in caplog.text
    assert image.rgb[0].mean() > 0.9 and image.rgb[1:].mean() < 0.1  # frame 0 is red
    assert load_image(corpus / "solid_1x1.png").note is None


def test_gray_modes_are_recorded_and_restored(corpus):
    for name in ("gray16.png", "gray8.png"):
        image = load_image(corpus / name)
        assert image.mode == "L" and image.rgb.shape[0] == 3
        assert tensor_to_pil(image.rgb, image.alpha, image.mode).mode == "L"
    assert to_rgb_images(torch.rand(1, 1, 4, 4))[0].mode == "L"
    assert to_rgb_images(np.zeros((4, 4, 2), np.uint8))[0].mode == "LA"
    assert load_image(corpus / "cmyk.jpg").mode == "RGB"
    assert load_image(corpus / "palette_alpha.png").alpha is not None


# ---------------------------------------------------------------------------------------------- commands
def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _records(out_dir: Path) -> dict[str, dict]:
    lines = (out_dir / "dalpsr_upscale.jsonl").read_text().splitlines()
    return {Path(r["input"]).name: r for r in map(json.loads, lines)}


def _check_upscale_run(corpus: Path, out_dir: Path, code: int, err: str) -> dict[str, dict]:
    assert code == 1, err
    assert "Traceback" not in err
    for name in BAD:
        assert f"failed: {corpus / name}" in err, err
    assert "too large to decode safely" in err
    for name in IGNORED:
        assert f"ignored: {corpus / name}" in err
    records = _records(out_dir)
    assert set(records) == set(GOOD)
    for name, record in records.items():
        with Image.open(record["output"]) as im:
            src = load_image(corpus / name)
            assert list(im.size) == record["size_wh"] == [4 * src.rgb.shape[2], 4 * src.rgb.shape[1]]
            assert im.mode == {"gray16.png": "L", "gray8.png": "L", "palette_alpha.png": "RGBA"}.get(name, "RGB")
    return records


@pytest.mark.slow  # tens of seconds on the shared 2-core machine
def test_upscale_dat_engine_on_the_corpus(corpus, tmp_path, capsys):
    out = tmp_path / "dat"
    code, _, err = _run(capsys, ["upscale", str(corpus), "-o", str(out), "--engine", "dat"])
    records = _check_upscale_run(corpus, out, code, err)
    assert records["animated.gif"]["note"] == "animated image with 3 frames: the first frame is used"
    # tiny solid colours come out as the same solid colour (before padding: 1×1 (200, 10, 10) gave ≈(117, 99, 87))
    for name, (size, colour) in SOLIDS.items():
        with Image.open(out / name) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float64)
        assert im.size == (4 * size[0], 4 * size[1])
        assert np.abs(arr - np.array(colour)).max() <= 6, (name, arr.reshape(-1, 3).mean(0))


@pytest.mark.slow  # tens of seconds on the shared 2-core machine
def test_upscale_random_diffusion_on_the_corpus(corpus, tmp_path, capsys):
    out = tmp_path / "diffusion"
    argv = ["upscale", str(corpus), "-o", str(out), "--random-weights-for-testing", "--steps", "1"]
    code, _, err = _run(capsys, argv)
    _check_upscale_run(corpus, out, code, err)


def test_describe_reports_every_bad_file_and_goes_on(corpus, capsys):
    code, out, err = _run(capsys, ["describe", str(corpus), "--json", "--device", "cpu"])
    assert code == 1 and "Traceback" not in err
    for name in BAD:
        assert f"error: {corpus / name}: " in err
    assert "too large to decode safely" in err
    for name in IGNORED:
        assert f"ignored: {corpus / name}" in err
    described = {Path(json.loads(line)["image"]).name for line in out.splitlines()}
    assert described == set(GOOD)


def test_eval_reports_bad_files_and_goes_on(corpus, tmp_path, capsys):
    pytest.importorskip("pyiqa")
    code, out, err = _run(
        capsys, ["eval", "--pred", str(corpus), "--gt", str(corpus), "--metrics", "psnr", "--no-progress"]
    )
    assert code == 1 and "Traceback" not in err
    for name in BAD:
        assert f"skipped {Path(name).stem}: " in err and str(corpus / name) in err


# ---------------------------------------------------------------------------------------------- pipeline API
@pytest.mark.slow  # tens of seconds on the shared 2-core machine
def test_pipeline_api_on_the_corpus(corpus):
    from dalpsr.testing import get_dummy_pipeline

    pipe = get_dummy_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    for name in BAD:
        with pytest.raises(ImageDecodeError, match=str(corpus / name).replace(".", r"\.")):
            pipe(str(corpus / name), num_inference_steps=1)
    paths = [str(corpus / n) for n in GOOD]
    out = pipe(paths, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    for name, image in zip(GOOD, out.images):
        src = load_image(corpus / name)
        assert image.size == (4 * src.rgb.shape[2], 4 * src.rgb.shape[1])
        assert image.mode == {"gray16.png": "L", "gray8.png": "L", "palette_alpha.png": "RGBA"}.get(name, "RGB")
