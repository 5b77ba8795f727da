"""The Gradio demo: local-only by default, bounded uploads and inputs, and a working request handler."""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import app  # noqa: E402
from dalpsr.testing import get_dummy_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return get_dummy_pipeline(seed=0)


def test_binds_to_localhost_by_default():
    args = app.parse_args(["--random-weights-for-testing"])
    assert args.host == "127.0.0.1"
    assert args.max_upload_mb > 0 and args.max_input_pixels > 0


def test_handler_returns_image_and_prompts(pipe):
    image = Image.new("RGB", (9, 7), (120, 30, 200))
    out, used = app.upscale(pipe, app.DemoLimits(), image, "a purple wall", "", 2, 2, 1.0, 1.0, "wavelet", 0)
    assert out.size == (18, 14)
    assert used["prompt"] == "a purple wall" and used["controlnet_prompt"] == "a purple wall"


def test_handler_bounds_input_pixels_and_steps(pipe):
    limits = app.DemoLimits(max_input_pixels=50, max_steps=3)
    with pytest.raises(ValueError, match="pixels"):
        app.upscale(pipe, limits, Image.new("RGB", (10, 10)), "", "", 2, 2, 1.0, 1.0, "none", 0)
    with pytest.raises(ValueError, match="steps"):
        app.upscale(pipe, limits, Image.new("RGB", (5, 5)), "", "", 2, 9, 1.0, 1.0, "none", 0)
    with pytest.raises(ValueError, match="image"):
        app.upscale(pipe, limits, None, "", "", 2, 2, 1.0, 1.0, "none", 0)


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


def test_server_rejects_uploads_over_the_limit(pipe, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    limits = app.DemoLimits(max_upload_mb=0.01)
    demo = app.build_demo(pipe, limits)
    demo.queue().launch(
        server_name="127.0.0.1",
        server_port=_free_port(),
        max_file_size=limits.max_upload_bytes,
        prevent_thread_lock=True,
        quiet=True,
    )
    try:
        assert demo.server_name == "127.0.0.1"
        assert _upload(demo.local_url, 1_000) == 200
        assert _upload(demo.local_url, 50_000) == 413
    finally:
        demo.close()
