"""The console on the web page (#live), in headless Chromium, as a person uses it.

API keys are on: calls come in through `/v1/stream` with an `ingest` key and real speech (one
with `redact=pci` and a card number read out); the page, opened on the web port, asks for a
key, which is typed once (an `ingest` key first, refused, then a `read` key). Then: search,
press Enter, see the right call with the match highlighted, open it and read words equal to
the stored transcript's, see the card as a styled placeholder, download a transcript, open a
live call and see its earlier words and then the new ones, without duplicates; a key given
in the page's URL; paging and the filters. Screenshots of each view are saved under the
test's tmp_path (the path is printed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from api.app import Service
from api.config import ApiConfig
from tests.conftest import ServiceFactory, make_config
from tests.e2e.frontends import watch_events
from tests.speech import SENTENCES, phone_bytes

pytestmark = pytest.mark.xdist_group("browser")

INGEST = "console-ingest-key"
READ = "console-read-key"
# Repeated ones ("four one one one, one one one one, ...") came out as 18 digits, and so as no
# card, in some decodes: 4242 is a test card the model writes as 16 digits.
CARD = (
    "My card number is four two four two, four two four two, four two four two, four two four two."
)
RATE = 16000
SILENCE = b"\x00\x00" * RATE  # 1 s of pcm16
# White noise louder than the speech: Moonshine is unsure of some words there (measured: 'show'
# 0.15, 'of' 0.20 in SENTENCES[4]; the README's threshold for marking a word is 0.5).
NOISE_SNR_DB = -4.0


def noisy(text: str) -> bytes:
    speech = np.frombuffer(phone_bytes(text, "pcm16", RATE), "<i2").astype(np.float64)
    noise = np.random.default_rng(7).standard_normal(len(speech))
    mixed = speech + noise * np.sqrt(np.mean(speech**2) / 10 ** (NOISE_SNR_DB / 10))
    return bytes(np.clip(mixed, -32768, 32767).astype("<i2").tobytes()) + SILENCE


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=ChromeService("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        try:
            driver.save_screenshot(str(tmp_path / "last.png"))
        finally:
            driver.quit()  # ends the chromedriver and Chromium processes it started
            shutil.rmtree(profile, ignore_errors=True)


async def wait_for(driver: WebDriver, condition: Any, timeout: float = 30) -> Any:
    # The list is rebuilt as answers come: an element read mid-rebuild is retried.
    wait = WebDriverWait(driver, timeout, 0.2, ignored_exceptions=(StaleElementReferenceException,))
    return await asyncio.to_thread(wait.until, condition)


async def on_page(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def shot(driver: WebDriver, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


async def speak(
    service: Service, call_id: str, parts: list[bytes], query: str = "", between: Any = None
) -> None:
    """One call on /v1/stream (pcm16 16 kHz) with the ingest key: each part sent 10x faster
    than real time; `between(i)` is awaited after part i (the live part of the test)."""
    url = (
        f"ws://127.0.0.1:{service.ports['audio']}/v1/stream?encoding=pcm16&sample_rate={RATE}"
        f"&call_id={call_id}{query}"
    )
    headers = {"Authorization": f"Bearer {INGEST}"}
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        for i, audio in enumerate(parts):
            for at in range(0, len(audio), 3200):
                await ws.send_bytes(audio[at : at + 3200])
                await asyncio.sleep(0.01)
            if between is not None:
                await between(i)
        await ws.send_str('{"type": "stop"}')
        async for _ in ws:
            pass


async def stored(service: Service, call_id: str, ended: bool = True) -> dict[str, Any]:
    """The call's stored transcript; for an `ended` call, once its end is written (the store
    writes on its own thread, after the `call_ended` event)."""
    url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls/{call_id}/transcript?format=json"
    async with aiohttp.ClientSession() as http, asyncio.timeout(10):
        while True:
            async with http.get(url, headers={"Authorization": f"Bearer {READ}"}) as response:
                assert response.status == 200
                body: dict[str, Any] = await response.json()
            if not ended or body["call"]["status"] != "live":
                return body
            await asyncio.sleep(0.1)


def rows(driver: WebDriver) -> dict[str, WebElement]:
    return {
        li.get_attribute("data-call-id") or "": li
        for li in driver.find_elements(By.CSS_SELECTOR, "#calls li")
    }


def page_lines(driver: WebDriver) -> list[tuple[str, float, str]]:
    """(leg, start, text) of each final line of the open call; its shown time is checked to
    be that start (m:ss.s)."""
    lines = []
    for p in driver.find_elements(By.CSS_SELECTOR, "#detail-transcript .line:not(.partial)"):
        start = float(p.get_attribute("data-start") or "nan")
        shown = p.find_element(By.TAG_NAME, "time").text
        minutes, _, secs = shown.partition(":")
        assert abs(int(minutes) * 60 + float(secs) - start) <= 0.051, (shown, start)
        lines.append(
            (p.get_attribute("data-leg") or "", start, p.find_element(By.CLASS_NAME, "text").text)
        )
    return lines


def as_lines(transcript: dict[str, Any]) -> list[tuple[str, float, str]]:
    return [(s["leg"], s["start"], s["text"]) for s in transcript["segments"]]


def search(driver: WebDriver, words: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#live-view input[type=search]")
    assert box.accessible_name == "Search transcripts"
    box.clear()
    box.send_keys(words, Keys.ENTER)


async def test_console_search_read_redacted_live_and_keys(
    start_service: ServiceFactory, browser: WebDriver, tmp_path: Path
) -> None:
    base = make_config()
    service = await start_service(
        dataclasses.replace(base, api=ApiConfig(keys=(f"{INGEST}:ingest", f"{READ}:read")))
    )
    web = f"http://127.0.0.1:{service.ports['web']}"
    order = phone_bytes(SENTENCES[1], "pcm16", RATE) + SILENCE
    card = phone_bytes(CARD, "pcm16", RATE) + SILENCE
    async with watch_events(service, {"Authorization": f"Bearer {READ}"}) as events:
        await asyncio.gather(
            speak(service, "order-call", [order], "&customer=ACME-42"),
            speak(service, "card-call", [card], "&redact=pci"),
            speak(service, "noisy-call", [noisy(SENTENCES[4])]),
        )
        await events.wait_ended(3)
    order_stored = await stored(service, "order-call")
    card_stored = await stored(service, "card-call")
    noisy_stored = await stored(service, "noisy-call")
    assert any("[CARD_NUMBER]" in s["text"] for s in card_stored["segments"]), card_stored
    print(f"screenshots in {tmp_path}")

    # Keys are on and the page has none: it asks once; the key is kept for the tab.
    await on_page(browser.get, f"{web}/#live")
    key_box = await wait_for(browser, lambda d: d.find_element(By.ID, "key-input").is_displayed())
    key_box = browser.find_element(By.ID, "key-input")
    assert key_box.accessible_name == "API key"
    shot(browser, tmp_path, "1-key-asked")
    # A key that may only send audio is refused by the API (403), and the page says so.
    await on_page(key_box.send_keys, INGEST, Keys.ENTER)
    await wait_for(browser, lambda d: "may not read calls" in d.find_element(By.ID, "key-why").text)
    assert not rows(browser)
    key_box = browser.find_element(By.ID, "key-input")
    await on_page(key_box.send_keys, READ, Keys.ENTER)
    await wait_for(browser, lambda d: {"order-call", "card-call", "noisy-call"} <= set(rows(d)))
    await wait_for(
        browser,
        lambda d: d.find_element(By.ID, "live-status").get_attribute("data-state") == "watching",
    )
    listed = await on_page(rows, browser)
    order_row = listed["order-call"]
    assert order_row.find_element(By.CLASS_NAME, "front-end").text == "websocket"
    assert "customer=ACME-42" in order_row.find_element(By.CLASS_NAME, "labels").text
    assert order_row.find_element(By.CLASS_NAME, "state").text.startswith("ended")
    seconds = order_row.find_element(By.CLASS_NAME, "duration").text
    assert seconds and seconds[0].isdigit(), seconds
    assert browser.find_element(By.ID, "page-info").text == "1–3 of 3"
    shot(browser, tmp_path, "2-list")

    # Search: Enter, the results replace the list, the match is highlighted.
    await on_page(search, browser, "status ORDER")
    await wait_for(browser, lambda d: set(rows(d)) == {"order-call"})
    marks = await on_page(
        lambda: [m.text.lower() for m in browser.find_elements(By.CSS_SELECTOR, "#calls mark")]
    )
    assert {"status", "order"} <= set(marks), marks
    mark_bg = browser.find_element(By.CSS_SELECTOR, "#calls mark").value_of_css_property(
        "background-color"
    )
    assert mark_bg not in ("rgba(0, 0, 0, 0)", "transparent")
    shot(browser, tmp_path, "3-search")
    await on_page(search, browser, "refund")  # nobody said it
    await wait_for(browser, lambda d: not rows(d))
    assert "0 calls" in browser.find_element(By.ID, "list-summary").text

    # A past call's page: its words are the stored transcript's, with their times.
    await on_page(search, browser, "status order")
    await wait_for(browser, lambda d: set(rows(d)) == {"order-call"})
    await on_page(rows(browser)["order-call"].click)
    await wait_for(
        browser,
        lambda d: d.find_element(By.ID, "call-detail").get_attribute("data-state") == "ended",
    )
    expected = as_lines(order_stored)
    assert expected and await on_page(page_lines, browser) == expected
    confidences = await on_page(
        lambda: [
            (
                w.text,
                float(w.get_attribute("data-confidence") or "nan"),
                "low" in (w.get_attribute("class") or ""),
            )
            for w in browser.find_elements(By.CSS_SELECTOR, "#detail-transcript .word")
        ]
    )
    stored_words = [(w["text"], w["confidence"]) for w in order_stored["words"]]
    assert [(t, c) for t, c, _ in confidences] == stored_words
    assert all(low == (c < 0.5) for _, c, low in confidences)
    assert "#live/order-call" in browser.current_url
    assert rows(browser)["order-call"].get_attribute("aria-current") == "true"
    shot(browser, tmp_path, "4-call")
    await on_page(browser.find_element(By.ID, "layout-toggle").click)
    transcript = browser.find_element(By.ID, "detail-transcript")
    assert transcript.value_of_css_property("display") == "grid"
    shot(browser, tmp_path, "5-side-by-side")
    await on_page(browser.find_element(By.ID, "layout-toggle").click)

    # A download carries the key too and is the stored export.
    txt_button = browser.find_element(By.CSS_SELECTOR, '#detail-links button[data-format="txt"]')
    assert txt_button.accessible_name == "Download transcript as txt"
    await on_page(txt_button.click)
    saved = tmp_path / "downloads" / "order-call.txt"
    for _ in range(100):
        if saved.exists():
            break
        await asyncio.sleep(0.1)
    url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls/order-call/transcript?format=txt"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Authorization": f"Bearer {READ}"}) as response:
            assert saved.read_text() == await response.text()

    # The redacted call: the card is a placeholder, styled as redacted.
    await on_page(search, browser, "card number")
    await wait_for(browser, lambda d: set(rows(d)) == {"card-call"})
    await on_page(rows(browser)["card-call"].click)
    await wait_for(
        browser,
        lambda d: d.find_element(By.ID, "call-detail").get_attribute("data-state") == "ended",
    )
    assert await on_page(page_lines, browser) == as_lines(card_stored)
    redacted = browser.find_element(By.CSS_SELECTOR, "#detail-transcript .redacted")
    assert redacted.text.startswith("[CARD_NUMBER]")
    assert redacted.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "")
    assert "redacted: pci" in browser.find_element(By.ID, "detail-meta").text
    shot(browser, tmp_path, "6-redacted")

    # Low-confidence words are marked; the page says below what. The call's own address is
    # opened, then the page reloaded: the key stays for the tab, the call's page comes back.
    await on_page(browser.get, f"{web}/#live/noisy-call")
    await wait_for(
        browser,
        lambda d: d.find_element(By.ID, "detail-title").text.startswith("Call noisy-call (ended"),
    )
    await on_page(browser.refresh)
    await wait_for(
        browser,
        lambda d: d.find_element(By.ID, "call-detail").get_attribute("data-state") == "ended",
    )
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    assert await on_page(page_lines, browser) == as_lines(noisy_stored)
    low = await on_page(
        lambda: [
            (w.text, w.value_of_css_property("text-decoration-line"))
            for w in browser.find_elements(By.CSS_SELECTOR, "#detail-transcript .word.low")
        ]
    )
    unsure = [w["text"] for w in noisy_stored["words"] if w["confidence"] < 0.5]
    assert unsure and [text for text, _ in low] == unsure
    assert all(decoration == "underline" for _, decoration in low)
    assert "50 %" in browser.find_element(By.ID, "detail-legend").text
    shot(browser, tmp_path, "6b-low-confidence")

    # A live call: opened mid-call, its earlier words show, then the new ones; no duplicates.
    await on_page(browser.find_element(By.ID, "filter-clear").click)
    first = phone_bytes(SENTENCES[4], "pcm16", RATE) + SILENCE
    second = phone_bytes(SENTENCES[5], "pcm16", RATE) + SILENCE
    earlier: list[tuple[str, float, str]] = []

    async def open_mid_call(part: int) -> None:
        if part != 0:
            return
        for _ in range(200):  # until the first sentence's segment is stored
            if (await stored(service, "live-call", ended=False))["segments"]:
                break
            await asyncio.sleep(0.1)
        row = await wait_for(browser, lambda d: rows(d).get("live-call") or False)
        assert row.find_element(By.CLASS_NAME, "state").text == "live"
        assert browser.find_element(By.ID, "page-info").text == "1–4 of 4"
        await on_page(row.click)
        await wait_for(
            browser,
            lambda d: (
                d.find_element(By.ID, "call-detail").get_attribute("data-state") == "following"
            ),
        )
        earlier.extend(await on_page(page_lines, browser))
        shot(browser, tmp_path, "7-live-earlier")

    async with watch_events(service, {"Authorization": f"Bearer {READ}"}) as events:
        await speak(service, "live-call", [first, second], between=open_mid_call)
        await events.wait_ended(1)
    await wait_for(
        browser,
        lambda d: d.find_element(By.ID, "call-detail").get_attribute("data-state") == "ended",
    )
    live_stored = await stored(service, "live-call")
    final = await on_page(page_lines, browser)
    assert earlier and earlier == final[: len(earlier)]  # what was said before it was opened
    assert len(final) > len(earlier)  # then what was said while it was open
    assert final == as_lines(live_stored)
    page_words = " ".join(text for _, _, text in final).split()
    assert page_words == [w["text"] for w in events.words("live-call")]
    assert browser.find_element(By.ID, "live-count").text == "(0 live)"
    shot(browser, tmp_path, "8-live-ended")

    # The key in the page's URL: used, kept for the tab, taken out of the address bar.
    await on_page(browser.execute_script, "sessionStorage.clear()")
    await on_page(browser.get, f"{web}/?key={READ}#live")
    await wait_for(browser, lambda d: {"order-call", "noisy-call", "live-call"} <= set(rows(d)))
    assert READ not in browser.current_url
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    await on_page(browser.refresh)
    await wait_for(browser, lambda d: "live-call" in rows(d))
    shot(browser, tmp_path, "9-key-in-url")

    # Paging and filters: 18 short calls more make 22, two pages of 20.
    for n in range(18):
        await speak(service, f"quiet-{n:02}", [SILENCE[: RATE // 5 * 2]])
    await wait_for(browser, lambda d: "quiet-17" in rows(d))  # the feed brings new calls
    await on_page(browser.find_element(By.ID, "filter-clear").click)
    await wait_for(browser, lambda d: d.find_element(By.ID, "page-info").text == "1–20 of 22")
    assert len(rows(browser)) == 20 and "quiet-17" in rows(browser)
    await on_page(browser.find_element(By.ID, "page-next").click)
    await wait_for(browser, lambda d: d.find_element(By.ID, "page-info").text == "21–22 of 22")
    assert set(rows(browser)) < {"order-call", "card-call", "noisy-call"}  # the oldest
    assert not browser.find_element(By.ID, "page-next").is_enabled()
    shot(browser, tmp_path, "10-page-2")
    await on_page(browser.find_element(By.ID, "page-prev").click)
    await wait_for(browser, lambda d: d.find_element(By.ID, "page-info").text == "1–20 of 22")

    async def choose(control: str, value: str) -> None:
        await on_page(Select(browser.find_element(By.ID, control)).select_by_visible_text, value)

    await choose("filter-front-end", "sip")
    await wait_for(browser, lambda d: d.find_element(By.ID, "page-info").text == "0–0 of 0")
    await choose("filter-front-end", "websocket")
    await choose("filter-status", "live")
    await wait_for(browser, lambda d: d.find_element(By.ID, "page-info").text == "0–0 of 0")
    await choose("filter-status", "ended")
    await wait_for(browser, lambda d: d.find_element(By.ID, "page-info").text == "1–20 of 22")
    assert browser.find_element(By.ID, "filter-front-end").accessible_name == "Front end"
    since = browser.find_element(By.ID, "filter-since")
    assert since.accessible_name == "From date"
    for day, listed in (("2099-01-01", "0–0 of 0"), ("2000-01-01", "1–20 of 22")):
        await on_page(
            browser.execute_script,
            "arguments[0].value = arguments[1];arguments[0].dispatchEvent(new Event('change'));",
            since,
            day,
        )
        await wait_for(
            browser, lambda d, listed=listed: d.find_element(By.ID, "page-info").text == listed
        )
    shot(browser, tmp_path, "11-filtered")


async def test_only_the_page_origin_may_read_calls_across_ports(
    start_service: ServiceFactory,
) -> None:
    """The page on the web port reads /v1/calls on the audio port (CORS); another site's page
    gets no CORS header, so the user's browser keeps the transcripts from it."""
    base = make_config()
    service = await start_service(dataclasses.replace(base, api=ApiConfig(keys=(f"{READ}:read",))))
    api = f"http://127.0.0.1:{service.ports['audio']}/v1/calls"
    page = f"http://127.0.0.1:{service.ports['web']}"
    key = {"Authorization": f"Bearer {READ}"}
    preflight = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    async with aiohttp.ClientSession() as http:
        async with http.options(api, headers={"Origin": page, **preflight}) as response:
            assert response.status == 204  # answered without the key: browsers send none here
            assert response.headers["Access-Control-Allow-Origin"] == page
            assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
        async with http.get(api, headers={"Origin": page, **key}) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == page
        async with http.get(api, headers={"Origin": page}) as response:
            assert response.status == 401  # the page can tell "a key is needed"
            assert response.headers["Access-Control-Allow-Origin"] == page
        async with http.get(f"{api}/nobody/transcript", headers={"Origin": page, **key}) as r:
            assert r.status == 404
            assert r.headers["Access-Control-Allow-Origin"] == page
        for other in ("http://evil.test", f"http://evil.test:{service.ports['web']}", page + "0"):
            async with http.options(api, headers={"Origin": other, **preflight}) as response:
                assert response.status == 401
                assert "Access-Control-Allow-Origin" not in response.headers
            async with http.get(api, headers={"Origin": other, **key}) as response:
                assert response.status == 200
                assert "Access-Control-Allow-Origin" not in response.headers
