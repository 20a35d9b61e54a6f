"""The web client in headless Chromium with a fake microphone fed from a speech file.

Debian's chromium + chromium-driver, driven by selenium (see
../shared/protocols/browser-testing.md). The words on the page must be the words the server
sent for that stream, as seen on `WS /v1/events`.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ServiceFactory
from tests.speech import SENTENCES, sox_convert, speech_wav, word_error_rate

pytestmark = pytest.mark.xdist_group("browser")

# Measured: the page's words for SENTENCES[0] via the fake microphone, WER 0.14 (two runs).
BROWSER_WER_BOUND = 0.35


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
        # Words arrive while the file plays (about 6 s of speech and silence).
        await wait_for(browser, lambda d: d.find_element(By.ID, "transcript").text.strip())
        await asyncio.sleep(3)
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
