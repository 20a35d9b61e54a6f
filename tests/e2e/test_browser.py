"""The web client in headless Chromium with a fake microphone fed from a speech file.

Debian's chromium + chromium-driver, driven by selenium (see
../shared/protocols/browser-testing.md). The words on the page must be the words the server
sent for that stream, as seen on `WS /v1/events`; the "Live calls" view must show every call
and the followed call's words, leg by leg.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ServiceFactory
from tests.e2e.frontends import paced, watch_events
from tests.speech import (
    SENTENCES,
    phone_bytes,
    read_pcm,
    sox_convert,
    speech_wav,
    word_error_rate,
)

pytestmark = pytest.mark.xdist_group("browser")

# Measured: the page's words for SENTENCES[0] via the fake microphone, Moonshine: WER 0.00.
BROWSER_WER_BOUND = 0.05


@pytest.fixture
def speech_48k() -> Path:
    # 1 s of silence first: the capture starts before the worklet is wired up.
    return sox_convert(
        speech_wav(SENTENCES[0]), "-r", "48000", "-b", "16", effects=("pad", "1", "1")
    )


@pytest.fixture
def browser(speech_48k: Path, tmp_path: Path) -> Iterator[WebDriver]:
    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={speech_48k}%noloop",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeService("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        try:
            driver.save_screenshot(str(tmp_path / "page.png"))
        finally:
            driver.quit()  # ends the chromedriver and Chromium processes it started
            shutil.rmtree(profile, ignore_errors=True)


async def wait_for(driver: WebDriver, condition: Any, timeout: float = 30) -> Any:
    return await asyncio.to_thread(WebDriverWait(driver, timeout, 0.2).until, condition)


async def test_microphone_words_appear_on_the_page(
    start_service: ServiceFactory, browser: WebDriver
) -> None:
    service = await start_service()
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        feed = await http.ws_connect(f"ws://127.0.0.1:{service.ports['audio']}/v1/events")

        async def listen() -> None:
            async for msg in feed:
                events.append(msg.json())

        listener = asyncio.create_task(listen())
        await asyncio.to_thread(browser.get, f"http://127.0.0.1:{service.ports['web']}/")
        await asyncio.to_thread(browser.find_element(By.ID, "connect").click)
        await wait_for(browser, lambda d: d.find_element(By.ID, "start").is_enabled())
        await asyncio.to_thread(browser.find_element(By.ID, "start").click)
        # Partials (greyed) while the first utterance is spoken, then its segment replaces
        # them: the file plays about 6 s of speech and silence.
        shown_partials: list[str] = []

        def glance() -> str:
            partial = browser.find_element(By.ID, "partial")
            text = partial.text  # read once: the page may replace it between two reads
            if text and partial.value_of_css_property("font-style") == "italic":
                shown_partials.append(text)
            return str(browser.find_element(By.ID, "transcript").text.strip())

        for _ in range(300):
            if await asyncio.to_thread(glance):
                break
            await asyncio.sleep(0.05)
        for _ in range(60):  # 3 s more: the next utterance's partials
            await asyncio.to_thread(glance)
            await asyncio.sleep(0.05)
        await asyncio.to_thread(browser.find_element(By.ID, "stop").click)
        await wait_for(
            browser,
            lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "closed",
        )
        page_text = await asyncio.to_thread(
            lambda: "\n".join(
                e.text for e in browser.find_elements(By.CSS_SELECTOR, ".segment .text")
            )
        )
        peak = await asyncio.to_thread(
            lambda: browser.find_element(By.ID, "level").get_attribute("data-peak")
        )
        for _ in range(50):
            if any(e["type"] == "call_ended" for e in events):
                break
            await asyncio.sleep(0.1)
        listener.cancel()
        await feed.close()

    server_words = [e["text"] for e in events if e.get("type") == "word"]
    # The greyed line is the engine's partial, or, between an utterance's words and its
    # segment, those words so far (a loaded machine shows that moment too).
    partials = {e["text"] for e in events if e.get("type") == "partial"}
    engine_said = set(partials)
    pending: list[str] = []
    for e in events:
        if e.get("type") == "word":
            pending.append(e["text"])
            engine_said.add(" ".join(pending))
        elif e.get("type") == "segment":
            pending = []
    assert partials & set(shown_partials), (shown_partials, partials)  # partials reach the page
    assert set(shown_partials) <= engine_said, (shown_partials, engine_said)
    page_words = page_text.split()
    assert server_words, "the server heard no words"
    assert page_words == server_words
    assert word_error_rate(SENTENCES[0], " ".join(page_words)) <= BROWSER_WER_BOUND, page_text
    assert float(peak or 0) > 0.1  # the level meter saw the speech
    started = next(e for e in events if e["type"] == "call_started")
    assert started["front_end"] == "websocket"


async def test_page_is_served_on_the_audio_port_too(
    start_service: ServiceFactory, browser: WebDriver
) -> None:
    service = await start_service()
    await asyncio.to_thread(browser.get, f"http://127.0.0.1:{service.ports['audio']}/")
    await asyncio.to_thread(browser.find_element(By.ID, "connect").click)
    await wait_for(
        browser,
        lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "connected",
    )


def _stereo(left: bytes, right: bytes) -> bytes:
    a, b = np.frombuffer(left, "<i2"), np.frombuffer(right, "<i2")
    frames = np.zeros((max(len(a), len(b)), 2), dtype="<i2")
    frames[: len(a), 0], frames[: len(b), 1] = a, b
    return frames.tobytes()


def _live_row(driver: WebDriver, call_id: str) -> Any:
    found = driver.find_elements(By.CSS_SELECTOR, f'#calls li[data-call-id="{call_id}"]')
    return found[0] if found else False


async def test_live_calls_view_lists_calls_and_follows_one_with_labelled_legs(
    start_service: ServiceFactory, browser: WebDriver
) -> None:
    """The "Live calls" view: WS /v1/events lists every call; picking one opens
    WS /v1/calls/{id}/events and its transcript appears line by line, legs labelled."""
    service = await start_service()
    audio_port = service.ports["audio"]
    caller = phone_bytes(SENTENCES[2], "pcm16", 16000)
    callee = phone_bytes(SENTENCES[4], "pcm16", 16000)
    fork_audio = _stereo(caller, callee)
    fork_frame = 16000 // 50 * 4  # 20 ms of 16 kHz stereo
    other_pcm = read_pcm(speech_wav(SENTENCES[1]))[0].tobytes()
    meta = {"event": "start", "uuid": "fs-live", "from": "1001", "mix": "stereo", "rate": 16000}

    await asyncio.to_thread(browser.get, f"http://127.0.0.1:{service.ports['web']}/#live")
    await wait_for(
        browser,
        lambda d: d.find_element(By.ID, "live-status").get_attribute("data-state") == "watching",
    )
    async with watch_events(service) as events, aiohttp.ClientSession() as http:
        fork = await http.ws_connect(
            f"ws://127.0.0.1:{audio_port}/freeswitch/fs-live", protocols=("audio.drachtio.org",)
        )
        await fork.send_str(json.dumps(meta))
        other = await http.ws_connect(f"ws://127.0.0.1:{audio_port}/v1/stream?call_id=ws-other")
        # Both calls are listed as soon as they start, before a word is said.
        fs_row = await wait_for(browser, lambda d: _live_row(d, "fs-live"))
        await wait_for(browser, lambda d: _live_row(d, "ws-other"))
        listed = await asyncio.to_thread(
            lambda: {
                li.get_attribute("data-call-id"): li.find_element(By.CLASS_NAME, "front-end").text
                for li in browser.find_elements(By.CSS_SELECTOR, "#calls li")
            }
        )
        assert listed == {"fs-live": "freeswitch", "ws-other": "websocket"}
        await asyncio.to_thread(fs_row.click)
        await wait_for(
            browser,
            lambda d: (
                d.find_element(By.ID, "call-detail").get_attribute("data-state") == "following"
            ),
        )

        async def speak_fork() -> None:
            frames = [fork_audio[i : i + fork_frame] for i in range(0, len(fork_audio), fork_frame)]
            async for chunk in paced(frames, 0.005):
                await fork.send_bytes(chunk)
            await fork.send_bytes(b"")  # mod_audio_fork's graceful shutdown
            async for _ in fork:
                pass

        async def speak_other() -> None:
            for i in range(0, len(other_pcm), 4800):
                await other.send_bytes(other_pcm[i : i + 4800])
                await asyncio.sleep(0.025)
            await other.send_str('{"type": "stop"}')
            async for _ in other:
                pass

        await asyncio.gather(speak_fork(), speak_other())
        await events.wait_ended(2)

    await wait_for(
        browser,
        lambda d: d.find_element(By.ID, "call-detail").get_attribute("data-state") == "ended",
    )
    await wait_for(
        browser, lambda d: _live_row(d, "fs-live").get_attribute("data-status") == "ended"
    )
    lines = await asyncio.to_thread(
        lambda: [
            (p.get_attribute("data-leg"), p.find_element(By.CLASS_NAME, "leg").text, p.text)
            for p in browser.find_elements(By.CSS_SELECTOR, "#detail-transcript .line")
        ]
    )
    texts = await asyncio.to_thread(
        lambda: [
            (p.get_attribute("data-leg"), p.find_element(By.CLASS_NAME, "text").text)
            for p in browser.find_elements(By.CSS_SELECTOR, "#detail-transcript .line")
        ]
    )
    assert lines and all(leg and label.lower() == leg for leg, label, _ in lines)
    assert not browser.find_elements(By.CSS_SELECTOR, "#detail-transcript .line.partial")
    for leg in ("caller", "callee"):
        server_words = [w["text"] for w in events.words("fs-live", leg)]
        page_words = " ".join(text for line_leg, text in texts if line_leg == leg).split()
        assert server_words and page_words == server_words, leg
    # The other call's words went to its row in the list, not into the followed call.
    other_words = [w["text"] for w in events.words("ws-other")]
    assert other_words
    last = await asyncio.to_thread(
        lambda: _live_row(browser, "ws-other").find_element(By.CLASS_NAME, "last").text
    )
    assert last.startswith("caller: ") and last.split()[-1] == other_words[-1]
    count = await asyncio.to_thread(lambda: browser.find_element(By.ID, "live-count").text)
    assert count == "(0 live)"
