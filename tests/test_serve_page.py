"""The web page, driven end to end in headless Chromium over the DevTools protocol.

Types a document and a question, clicks the button, and reads the highlighted answer back from
the page. Needs Debian's ``chromium`` (CI installs it); skipped without it.
"""

import json
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from serve_helpers import SMALL_QA, TOKEN, service_config, serving

from bench.local_service import free_port, wait_until

from qa_common import QAConfig, Question, answer_questions

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Chromium to drive the page (Debian: apt-get install chromium)"
)


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page."""

    def __init__(self, websocket_url: str):
        from websockets.sync.client import connect

        self.connection = connect(websocket_url, max_size=None, open_timeout=10)
        self.last_id = 0

    def call(self, method: str, **params) -> dict:
        self.last_id += 1
        self.connection.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # skip the events the page sends meanwhile
            message = json.loads(self.connection.recv(timeout=30))
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise AssertionError(f"{method} failed: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} raised in the page: {result['exceptionDetails']}")
        return result["result"].get("value")

    def type_into(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def click(self, selector: str) -> None:
        box = self.evaluate(
            f"(() => {{ const element = document.querySelector({json.dumps(selector)});"
            " element.scrollIntoView({block: 'center'}); const r = element.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
        )
        for event in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=event, x=box["x"], y=box["y"], button="left", clickCount=1)

    def close(self) -> None:
        self.connection.close()


@contextmanager
def headless_chromium(url: str, profile: Path):
    """A page loaded from ``url`` in a headless Chromium of our own, as a :class:`DevTools` client."""
    browser = subprocess.Popen(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # Chromium writes the port it picked into the profile directory.
        port_file = profile / "DevToolsActivePort"
        wait_until(lambda: port_file.is_file() and port_file.read_text().strip(), timeout_s=30, what="Chromium")
        port = int(port_file.read_text().split()[0])
        pages = wait_until(
            lambda: [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"],
            timeout_s=15, what="Chromium's page",
        )
        page = DevTools(pages[0]["webSocketDebuggerUrl"])
        try:
            page.call("Page.navigate", url=url)
            wait_until(
                lambda: page.evaluate(f"location.href == {json.dumps(url)} && document.readyState == 'complete'"),
                timeout_s=15, what=f"{url} to load",
            )
            yield page
        finally:
            page.close()
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(timeout=10)


def ask_and_wait(page, panel: str = "result") -> None:
    """Click "Ask" and wait for the answer's panel (``result`` or ``library-result``) or an error."""
    page.click("#ask")
    shown = f"!document.getElementById('{panel}').hidden || document.getElementById('status').className == 'error'"
    wait_until(lambda: page.evaluate(shown), timeout_s=60, what=f"the answer in #{panel}")


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    with serving(service_config(tiny_model_dir, free_port())) as url:
        yield url


def test_ask_on_the_page_and_see_the_answer_highlighted(service, fixture_records, tiny_model_and_tokenizer, tmp_path):
    record = fixture_records[1]
    # A character outside the Basic Multilingual Plane first: the page must count offsets in code
    # points as the service does, not in JavaScript's UTF-16 units.
    document = "\N{STETHOSCOPE} " + record["context"]
    model, tokenizer = tiny_model_and_tokenizer
    question = Question(record["question"], document, top_k=3)
    [expected] = answer_questions(model, tokenizer, [question], QAConfig(**SMALL_QA))

    with headless_chromium(service + "/", tmp_path / "profile") as page:
        page.type_into("#token", TOKEN)
        page.type_into("#document", document)
        page.type_into("#question", record["question"])
        ask_and_wait(page)
        shown = page.evaluate("""({
            status: document.getElementById('status').textContent,
            marked: document.querySelector('#document-view mark').textContent,
            document: document.getElementById('document-view').textContent,
            answer: document.getElementById('answer-text').textContent,
            score: document.getElementById('answer-score').textContent,
            candidates: document.querySelectorAll('#answers li').length,
            token: sessionStorage.getItem('qa-api-token'),
        })""")
        wait_until(lambda: page.evaluate("document.getElementById('model-info').textContent"), timeout_s=30,
                   what="the model's name")
        footer = page.evaluate("document.getElementById('model-info').textContent")

    assert shown["status"] == ""
    assert shown["marked"] == expected[0]["answer"] == shown["answer"]
    assert shown["document"] == document
    assert float(shown["score"].removesuffix("%")) == pytest.approx(100 * expected[0]["score"], abs=0.051)
    assert shown["candidates"] == len(expected)
    assert shown["token"] == TOKEN  # kept for the tab, so the next question needs no pasting
    assert footer.startswith("Model ") and "/" not in footer


def _ask(page, question: str = "Why?") -> str:
    page.evaluate("document.getElementById('status').className = ''")
    page.type_into("#document", "Some document.")
    page.type_into("#question", question)
    page.click("#ask")
    wait_until(lambda: page.evaluate("document.getElementById('status').className == 'error'"), timeout_s=30,
               what="an error on the page")
    return page.evaluate("document.getElementById('status').textContent")


def test_the_page_asks_for_a_token_and_says_when_the_service_is_busy(service, tmp_path):
    with headless_chromium(service + "/", tmp_path / "profile") as page:
        assert "API token" in _ask(page)  # no token: 401
        # A full queue answers 503 with Retry-After; the page says how long to wait.
        page.evaluate("""window.fetch = async () => new Response(JSON.stringify({error: "busy"}),
            {status: 503, headers: {"Retry-After": "7", "Content-Type": "application/json"}})""")
        page.type_into("#token", TOKEN)
        assert _ask(page, "Again?") == "The service is busy, try again in 7 s."
