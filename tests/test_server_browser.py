"""The chat page in headless Chromium: it loads, sends a message typed into it, and streams the reply.

Chromium is driven through chromedriver's W3C WebDriver HTTP API with urllib (no Selenium or Playwright
dependency). Needs the Debian packages `chromium` and `chromium-driver`; skips, saying so, without them.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from test_server import MODEL_ID, LiveServer, free_port, post

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs headless Chromium: apt-get install -y chromium chromium-driver",
)


class WebDriver:
    """Just enough of the W3C WebDriver protocol: one session, find, type, click, run a script."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                        ],
                    }
                }
            }
        }
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"WebDriver {method} {path}: {e.read().decode()}") from None

    def cmd(self, method: str, path: str, body: dict | None = None) -> dict:
        return self._call(method, f"/session/{self.session}{path}", body)

    def go(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str) -> None:
        element = self.find(css)
        self.cmd("POST", f"/element/{element}/clear", {})
        self.cmd("POST", f"/element/{element}/value", {"text": text})

    def click(self, css: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def js(self, script: str):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": []})

    def wait_for(self, script: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(script)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for: {script}")

    def quit(self) -> None:
        self._call("DELETE", f"/session/{self.session}")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    port = free_port()
    proc = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.skip("chromedriver did not start")
                time.sleep(0.1)
        try:
            driver = WebDriver(port)
        except RuntimeError as e:
            pytest.skip(f"Chromium cannot run here: {e}")
        yield driver
        driver.quit()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def page_server(tmp_path_factory) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory.mktemp("page"), "-np", "2")
    yield srv
    srv.stop()


# Record every length the reply bubble's text takes, to see it grow chunk by chunk.
WATCH_REPLIES = """
window.__lengths = [];
new MutationObserver(() => {
  const b = document.querySelector('.msg.assistant');
  const text = b && b.firstChild && b.firstChild.nodeType === 3 ? b.firstChild.nodeValue : '';
  if (b) window.__lengths.push(text.length);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
return true;
"""
REPLY_TEXT = """
const b = document.querySelector('.msg.assistant');
return Array.from(b.childNodes).filter(n => n.nodeType === 3).map(n => n.nodeValue).join('');
"""


def test_chat_page_streams_a_reply(browser, page_server):
    browser.go(page_server.url + "/")
    browser.wait_for("return document.getElementById('status').textContent === 'ready'")
    assert browser.js("return document.getElementById('model').textContent") == MODEL_ID
    browser.type("#temperature", "0")
    browser.type("#max-tokens", "16")
    browser.js(WATCH_REPLIES)
    browser.type("#prompt", "hello there")
    browser.click("#send")
    state = browser.wait_for(
        "const b = document.querySelector('.msg.assistant');"
        "return b && b.dataset.state !== 'streaming' ? b.dataset.state : null"
    )
    assert state == "done"
    reply = browser.js(REPLY_TEXT)
    chunks = int(browser.js("return document.querySelector('.msg.assistant').dataset.chunks"))
    lengths = browser.js("return window.__lengths")
    assert browser.js("return document.querySelector('.msg.user').textContent") == "hello there"

    # the same request without streaming gives the same text
    status, body = post(
        page_server.url + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hello there"}], "temperature": 0, "max_tokens": 16},
    )
    assert status == 200
    expected = body["choices"][0]["message"]["content"]
    assert reply == expected and reply
    # streamed: several content chunks, and the page showed partial replies before the whole one
    assert chunks >= 2
    assert any(0 < n < len(reply) for n in lengths), lengths
    meta = browser.js("return document.querySelector('.msg.assistant .meta').textContent")
    assert f"{body['usage']['completion_tokens']} tokens" in meta
