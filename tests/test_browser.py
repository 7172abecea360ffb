"""The arena in a real browser: start `sample_gradio.py` with two tiny local models, drive headless
Debian Chromium through Playwright, run a dual generation, vote, and read the leaderboard.

The app runs as a subprocess on a free loopback port, exactly as a user starts it. Chromium is the
system one (`/usr/bin/chromium`, never a downloaded browser) with networking extras turned off, and
the test fails if the page asks for anything outside 127.0.0.1 (fonts, analytics, a CDN).
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, make_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Debian Chromium not found at {CHROMIUM}")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def arena_url(tmp_path, tiny_tokenizer):
    runs = [make_run(tmp_path / name, tiny_tokenizer, seed=seed) for name, seed in (("alpha", 1), ("beta", 2))]
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    app = subprocess.Popen(
        [sys.executable, str(ROOT / "sample_gradio.py"), "--port", str(port), "--models", *map(str, runs),
         "--votes", str(tmp_path / "votes.jsonl"), "--flagged", str(tmp_path / "flagged.csv"), "--device", "cpu"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120  # importing gradio takes a while on a busy 2-core machine
        while True:
            assert app.poll() is None, (tmp_path / "app.log").read_text()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the arena did not start within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        app.terminate()
        app.wait(timeout=10)
        log.close()


def test_dual_run_vote_and_leaderboard(arena_url, tmp_path):
    outside = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith((arena_url, "data:", "blob:")) else None)
            page.goto(arena_url)
            page.fill("#prompt textarea", "北京是")
            page.click("#run")
            page.wait_for_function("""() => ['#left_stats', '#right_stats'].every(
                id => document.querySelector(id).innerText.includes('done'))""", timeout=60_000)
            assert page.input_value("#left_out textarea") and page.input_value("#right_out textarea")
            assert "tokens/s" in page.inner_text("#left_stats")
            page.screenshot(path=str(tmp_path / "arena.png"))

            page.get_by_role("button", name="Left is better").click()
            page.wait_for_function("() => document.querySelector('#status').innerText.includes('Vote recorded')")
            page.get_by_role("tab", name="Leaderboard").click()
            page.wait_for_function("() => document.querySelector('#board').innerText.includes('beta')")
            board = page.inner_text("#board")
            page.screenshot(path=str(tmp_path / "leaderboard.png"))
        finally:
            browser.close()
    assert "alpha" in board and "1016" in board and "984" in board
    vote = json.loads((tmp_path / "votes.jsonl").read_text(encoding="utf-8"))
    assert (vote["left"], vote["right"], vote["winner"], vote["prompt"]) == ("alpha", "beta", "left", "北京是")
    assert not outside, f"the page reached outside the loopback server: {outside}"
