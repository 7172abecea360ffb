"""The arena in a real browser: start `sample_gradio.py` with two tiny local models and two peers
(loopback servers that answer with HTML), drive headless Debian Chromium through Playwright, run a
dual generation, vote, and read the leaderboard; chat with the HTML peer and see its text as text.

The app runs as a subprocess on a free loopback port, exactly as a user starts it. Chromium is the
system one (`/usr/bin/chromium`, never a downloaded browser) with networking extras turned off, and
the test fails if the page asks for anything outside 127.0.0.1 (fonts, analytics, a CDN).
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


HTML_ANSWER = ["<b id='bold'>粗体</b>", "\n<img id='img' src='x'>", " **星**"]


class HtmlPeer(BaseHTTPRequestHandler):
    """A peer whose answer (200) or error body (500, for the path /broken) is HTML."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.broken:
            data = b"<b id='boom'>boom</b>"
            self.send_response(500)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in [p.encode() for p in HTML_ANSWER] + [b""]:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()


@pytest.fixture(scope="module")
def arena_url(tmp_path_factory, tiny_tokenizer):
    tmp_path = tmp_path_factory.mktemp("arena")
    runs = [make_run(tmp_path / name, tiny_tokenizer, seed=seed) for name, seed in (("alpha", 1), ("beta", 2))]
    peers = []
    for broken in (False, True):
        server = ThreadingHTTPServer(("127.0.0.1", 0), HtmlPeer)
        server.daemon_threads, server.broken = True, broken
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        peers.append(server)
    (tmp_path / "peers.json").write_text(json.dumps({"html": f"127.0.0.1:{peers[0].server_port}",
                                                     "broken": f"127.0.0.1:{peers[1].server_port}"}))
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    app = subprocess.Popen(
        [sys.executable, str(ROOT / "sample_gradio.py"), "--port", str(port), "--models", *map(str, runs),
         "--peers", str(tmp_path / "peers.json"), "--votes", str(tmp_path / "votes.jsonl"),
         "--flagged", str(tmp_path / "flagged.csv"), "--device", "cpu"],
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
        yield url, tmp_path
    finally:
        app.terminate()
        app.wait(timeout=10)
        log.close()
        for server in peers:
            server.shutdown()
            server.server_close()


def test_dual_run_vote_and_leaderboard(arena_url):
    arena_url, tmp_path = arena_url
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


def choose(page, dropdown_id, option):
    page.click(f"#{dropdown_id} input")
    page.get_by_role("option", name=option, exact=True).click()


def test_peer_html_is_shown_as_text(arena_url):
    arena_url, tmp_path = arena_url
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(arena_url)
            # an error body with HTML, in the stats line (Markdown)
            choose(page, "right_name", "broken")
            page.fill("#prompt textarea", "北京是")
            page.click("#run")
            page.wait_for_function("() => document.querySelector('#right_stats').innerText.includes('error')",
                                   timeout=60_000)
            assert "<b id='boom'>boom</b>" in page.inner_text("#right_stats")
            assert page.locator("#right_stats #boom").count() == 0
            # an answer with HTML, in the chat (the Chatbot)
            page.get_by_role("tab", name="Chat").click()
            choose(page, "chat_model", "html")
            page.fill("#message textarea", "<i id='mine'>你好</i>")
            page.click("#send")
            page.wait_for_function("() => document.querySelector('#chat_stats').innerText.includes('done')",
                                   timeout=60_000)
            shown = page.inner_text("#chatbot")
            elements = page.locator("#chatbot #bold, #chatbot #img, #chatbot #mine").count()
            page.screenshot(path=str(tmp_path / "chat.png"))
        finally:
            browser.close()
    assert "<b id='bold'>粗体</b>" in shown and "<img id='img' src='x'>" in shown and "**星**" in shown
    assert "<i id='mine'>你好</i>" in shown
    assert elements == 0  # no element was made from the text
