"""The playground in a real headless Chromium, against a real gateway on loopback.

The gateway and a fake upstream run on an event loop in a background thread; the test
thread drives the page through Selenium and holds or releases the upstream's chunks, so
"the answer grows while the upstream still holds the rest" and "Stop closes the upstream
connection" are observed, not timed. Waits poll the page; nothing sleeps a fixed time.

Chromium comes from Debian (`apt-get install chromium chromium-driver`); without it these
tests skip locally and fail in CI.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.command import Command
from selenium.webdriver.support.ui import Select, WebDriverWait

from gateway.auth import hash_key
from gateway.testing.fake_upstream import Script, openai_stream
from gateway.testing.harness import run_gateway
from tests.integration._support import GatedUpstream, config_for, gated_script

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BOUND = 15.0  # only turns a hang into a failure; never paces the test
KEY = "sk-sluice-playground-test-key-0123"
FIGURE = re.compile(r"^\d+ ms$|^\d+\.\d\d s$")
RATE = re.compile(r"^\d+\.\d$")

T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a daemon thread, for the servers the browser talks to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], within: float = BOUND) -> T:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(within)

    def call(self, fn: Callable[[], object]) -> None:
        """Call `fn` on the loop's thread (asyncio objects are not thread-safe)."""
        self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(BOUND)
        self.loop.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """One headless Chromium for the module; each test opens its own gateway's page."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        reason = f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the explicit driver: selenium-manager idle
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--window-size=1000,900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def fake(loop: LoopThread) -> Iterator[GatedUpstream]:
    async def start() -> GatedUpstream:
        upstream = GatedUpstream()
        await upstream.start()
        return upstream

    upstream = loop.run(start())
    try:
        yield upstream
    finally:
        loop.run(upstream.close())


@contextmanager
def gateway(loop: LoopThread, config: dict[str, Any]) -> Iterator[str]:
    """A gateway for `config` on a loopback port; yields its base URL."""
    stack = AsyncExitStack()
    running = loop.run(stack.enter_async_context(run_gateway(config)))
    try:
        yield running.url
    finally:
        loop.run(stack.aclose())


def playground_config(fake: GatedUpstream, **extra: Any) -> dict[str, Any]:
    config = config_for(fake, server={"playground": True})
    config.update(extra)
    return config


class Page:
    """The playground as a person sees it."""

    def __init__(self, driver: webdriver.Chrome, url: str, loaded: str = "true") -> None:
        self.driver = driver
        driver.get(url + "/playground")
        self.wait(lambda: self.element("model").get_attribute("data-loaded") == loaded, loaded)

    def element(self, element_id: str) -> Any:
        return self.driver.find_element(By.ID, element_id)

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        WebDriverWait(self.driver, BOUND, poll_frequency=0.02).until(
            lambda _: condition(), f"timed out waiting for: {what}"
        )

    def text(self, element_id: str) -> str:
        """An element's text content (the answer's exact text, even while scrolled)."""
        value = self.driver.execute_script(
            "return document.getElementById(arguments[0]).textContent", element_id
        )
        assert isinstance(value, str)
        return value

    @property
    def state(self) -> str:
        return str(self.element("status").get_attribute("data-state"))

    def figures(self) -> dict[str, str]:
        return {name: self.text(name) for name in ("ttft", "tps", "tokens", "total")}

    def models(self) -> list[str]:
        return [str(o.get_attribute("value")) for o in Select(self.element("model")).options]

    def send(self, prompt: str = "Say hello") -> None:
        box = self.element("prompt")
        box.clear()
        box.send_keys(prompt)
        self.element("send").click()

    def error(self) -> str:
        """The visible error message ("" when none is shown)."""
        shown = self.element("error")
        return str(shown.text) if shown.is_displayed() else ""


def test_page_lists_the_models_and_runs_under_its_csp(
    loop: LoopThread, fake: GatedUpstream, browser: webdriver.Chrome
) -> None:
    config = playground_config(fake)
    config["routes"].append({"model": "other", "upstream": "fake", "retries": 0})
    with gateway(loop, config) as url:
        page = Page(browser, url)
        assert page.models() == ["m", "other"]
        assert page.text("key-need") == "(optional)"
        assert page.state == "idle"
        assert page.error() == ""
        # The inline style ran too (a script or style the CSP refused would also be logged).
        margin = browser.execute_script("return getComputedStyle(document.body).margin")
        assert margin == "0px"
        logged = browser.execute(Command.GET_LOG, {"type": "browser"})["value"]
        assert [entry for entry in logged if entry["level"] == "SEVERE"] == []


def test_answer_streams_in_while_the_upstream_holds_the_rest(
    loop: LoopThread, fake: GatedUpstream, browser: webdriver.Chrome
) -> None:
    # events: 0 role, 1 "Hello", 2 " there", 3 " friend", 4 "!", 5 finish, 6 [DONE]
    script, (after_first, before_last) = gated_script(
        openai_stream(["Hello", " there", " friend", "!"]), 2, 4
    )
    fake.queue(script)
    with gateway(loop, playground_config(fake)) as url:
        page = Page(browser, url)
        page.send("Greet me")
        seen: list[int] = []

        page.wait(lambda: page.text("answer") == "Hello", "the first token")
        seen.append(len(page.text("answer")))
        assert page.state == "streaming"
        figures = page.figures()
        assert FIGURE.match(figures["ttft"]), figures
        assert figures["tokens"] == "1"
        assert page.element("stop").is_enabled()
        assert not page.element("send").is_enabled()

        loop.call(after_first.set)
        page.wait(lambda: page.text("answer") == "Hello there friend", "three tokens")
        seen.append(len(page.text("answer")))
        assert page.state == "streaming"  # the upstream still holds "!"
        page.wait(lambda: RATE.match(page.text("tps")) is not None, "a live tokens/s")
        assert page.text("tokens") == "3"

        loop.call(before_last.set)
        page.wait(lambda: page.state == "done", "the end of the stream")
        assert page.text("answer") == "Hello there friend!"
        assert page.element("status").text == "Done (stop)"
        figures = page.figures()
        assert FIGURE.match(figures["ttft"]), figures
        assert RATE.match(figures["tps"]), figures
        assert figures["tokens"] == "4"
        assert FIGURE.match(figures["total"]), figures
        assert page.error() == ""

    assert len(set(seen)) >= 2, seen
    assert 0 < seen[0] < seen[1]
    (exchange,) = fake.exchanges
    assert exchange.body["stream"] is True
    assert exchange.body["messages"] == [{"role": "user", "content": "Greet me"}]


def test_stop_cancels_the_upstream(
    loop: LoopThread, fake: GatedUpstream, browser: webdriver.Chrome
) -> None:
    script, (held,) = gated_script(openai_stream(["Hello", " never"]), 2)
    fake.queue(script)
    with gateway(loop, playground_config(fake)) as url:
        page = Page(browser, url)
        page.send()
        page.wait(lambda: page.text("answer") == "Hello", "the first token")
        (exchange,) = fake.exchanges
        assert not exchange.finished.is_set()

        page.element("stop").click()

        async def upstream_closed() -> bool:
            try:
                await asyncio.wait_for(exchange.finished.wait(), BOUND)
            except TimeoutError:
                return False
            return True

        assert loop.run(upstream_closed(), BOUND + 5), "the upstream was still open after Stop"
        assert exchange.closed_by_peer, "the gateway did not close the upstream connection"
        assert not held.is_set()
        page.wait(lambda: page.state == "stopped", "the page to show it stopped")
        assert page.element("status").text == "Stopped"
        assert page.text("answer") == "Hello"
        assert page.element("send").is_enabled()
        assert not page.element("stop").is_enabled()
        assert page.error() == ""


def test_a_required_key_is_labelled_so_and_used_once_entered(
    loop: LoopThread, fake: GatedUpstream, browser: webdriver.Chrome
) -> None:
    teams = {"web": {"keys": [{"name": "page", "sha256": hash_key(KEY)}]}}
    fake.queue(Script(openai_stream(["Welcome"])))
    with gateway(loop, playground_config(fake, teams=teams)) as url:
        page = Page(browser, url, loaded="needs-key")
        assert page.text("key-need") == "(required)"
        assert page.models() == [""]
        assert page.error() == ""

        page.send()
        page.wait(lambda: "requires one" in page.error(), "the ask for a key")
        assert page.state == "idle"

        page.element("key").send_keys("sk-sluice-not-the-right-key-0123")
        page.send()
        page.wait(lambda: "HTTP 401" in page.error(), "the 401 for a wrong key")
        assert "invalid_api_key" in page.error()
        assert page.text("answer") == ""
        assert fake.exchanges == []

        page.element("key").clear()
        page.element("key").send_keys(KEY)
        page.send()
        page.wait(lambda: page.state == "done", "the answer with the key")
        assert page.models() == ["m"]
        assert page.text("answer") == "Welcome"
        assert page.error() == ""
        stored = browser.execute_script(
            "return [sessionStorage.getItem('sluice.playground.key'), localStorage.length]"
        )
        assert stored == [KEY, 0]


def test_public_models_list_without_a_key_but_the_key_is_still_required(
    loop: LoopThread, fake: GatedUpstream, browser: webdriver.Chrome
) -> None:
    teams = {"web": {"keys": [{"name": "page", "sha256": hash_key(KEY)}]}}
    config = playground_config(fake, teams=teams)
    config["server"]["public_models"] = True
    with gateway(loop, config) as url:
        page = Page(browser, url)
        assert page.models() == ["m"]
        assert page.text("key-need") == "(required)"
        page.send()
        page.wait(lambda: "requires one" in page.error(), "the ask for a key")
        assert fake.exchanges == []


def test_an_error_mid_stream_is_shown_after_the_partial_answer(
    loop: LoopThread, fake: GatedUpstream, browser: webdriver.Chrome
) -> None:
    fake.queue(Script(openai_stream(["Partial", " answer"], done=False), then="reset"))
    with gateway(loop, playground_config(fake)) as url:
        page = Page(browser, url)
        page.send()
        page.wait(lambda: page.state == "error", "the error event")
        assert page.text("answer") == "Partial answer"
        assert "upstream" in page.error()
        assert page.element("status").text == "Failed"


# Comment, UTF-8 (2 and 4 bytes), CRLF, LF, CR-only, multi-line data, unknown fields, no space
# after the colon, and an unterminated last event (dropped, as the SSE spec says).
SSE_SAMPLES = [
    (
        b": keep-alive\r\n\r\n"
        b'data: {"content":"h\xc3\xa9llo \xf0\x9f\x8c\x8a"}\r\n\r\n'
        b"data: first\ndata:second\n\n"
        b"event: x\rid: 1\rdata: cr only\r\r"
        b"data: [DONE]\n\n"
        b"data: unterminated",
        ['{"content":"h\u00e9llo \U0001f30a"}', "first\nsecond", "cr only", "[DONE]"],
    ),
    (b"data: one\r\ndata: two\r\n\r\ndata: tail\r\r", ["one\ntwo", "tail"]),
]

DECODE_EVERY_SPLIT = """
const bytes = new Uint8Array(arguments[0]);
const { sseDecoder } = window.sluicePlayground;
function decode(pieces) {
  const sse = sseDecoder(), out = [];
  for (const piece of pieces) out.push(...sse.feed(piece));
  out.push(...sse.end());
  return JSON.stringify(out);
}
const whole = decode([bytes]);
const differ = [];
for (let i = 0; i <= bytes.length; i++) {
  if (decode([bytes.slice(0, i), bytes.slice(i)]) !== whole) differ.push(i);
}
const bytewise = decode(Array.from(bytes, (_, i) => bytes.slice(i, i + 1)));
return [JSON.parse(whole), differ, JSON.parse(bytewise)];
"""


@pytest.mark.parametrize(("raw", "expected"), SSE_SAMPLES)
def test_the_page_decodes_sse_split_anywhere(
    loop: LoopThread,
    fake: GatedUpstream,
    browser: webdriver.Chrome,
    raw: bytes,
    expected: list[str],
) -> None:
    with gateway(loop, playground_config(fake)) as url:
        Page(browser, url)
        whole, differ, bytewise = browser.execute_script(DECODE_EVERY_SPLIT, list(raw))
    assert whole == expected
    assert differ == [], "split positions that changed the events"
    assert bytewise == expected


def _status(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=BOUND) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_playground_off_is_not_found(
    loop: LoopThread, fake: GatedUpstream, browser: webdriver.Chrome
) -> None:
    config = config_for(fake, server={"playground": False})
    with gateway(loop, config) as url:
        for path in ("/playground", "/"):
            status, body = _status(url + path)
            assert status == 404
            assert orjson.loads(body)["error"]["code"] == "not_found"
        browser.get(url + "/playground")
        assert browser.find_elements(By.ID, "prompt") == []
        assert "not_found" in browser.find_element(By.TAG_NAME, "body").text
