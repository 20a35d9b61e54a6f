"""Files over HTTP end to end: Deepgram's pre-recorded `POST /v1/listen` with the official
`deepgram-sdk`, and OpenAI's `POST /v1/audio/transcriptions` with the official `openai` SDK,
both pointed at the bridge's base URL. Words are checked against the offline transcript of the
same audio through the same service (`offline_words`), never against the text synthesized."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import soundfile
from aiohttp import web
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.errors.bad_request_error import BadRequestError
from deepgram.types.listen_v1response import ListenV1Response

from api.app import Service
from api.config import ApiConfig
from api.transcribe import transcribe_pcm
from telephony.audio import PcmArray, float_to_pcm16, resample_whole
from tests.conftest import ServiceFactory, make_config
from tests.e2e.frontends import offline_words
from tests.e2e.server_process import free_port
from tests.speech import SENTENCES, normalize, read_pcm, sox_convert, speech_wav

KEY = "files-test-key"
RATE = 24_000  # hibari-tts writes 24 kHz


def speech(*sentences: int, gap_s: float = 1.5) -> PcmArray:
    """Test sentences one after another, `gap_s` of silence after each."""
    gap = np.zeros(int(RATE * gap_s), dtype=np.int16)
    parts = []
    for n in sentences:
        pcm, rate = read_pcm(speech_wav(SENTENCES[n]))
        assert rate == RATE
        parts += [pcm, gap]
    return np.concatenate(parts)


def wav_bytes(pcm: PcmArray, rate: int = RATE, fmt: str = "WAV") -> bytes:
    out = io.BytesIO()
    soundfile.write(out, pcm, rate, format=fmt, subtype="PCM_16")
    return out.getvalue()


def rounded(words: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**w, "start": round(w["start"], 3), "end": round(w["end"], 3)} for w in words]


async def keyed_service(start_service: ServiceFactory, **api: Any) -> Service:
    return await start_service(
        dataclasses.replace(make_config(), api=ApiConfig(keys=(KEY,), **api))
    )


def deepgram_client(service: Service, key: str = KEY) -> AsyncDeepgramClient:
    base = f"127.0.0.1:{service.ports['audio']}"
    environment = DeepgramClientEnvironment(
        base=f"http://{base}", production=f"ws://{base}", agent=f"ws://{base}",
        agent_rest=f"http://{base}",
    )  # fmt: skip
    return AsyncDeepgramClient(api_key=key, environment=environment)


def openai_client(service: Service, key: str = KEY) -> openai.AsyncOpenAI:
    base = f"http://127.0.0.1:{service.ports['audio']}/v1"
    return openai.AsyncOpenAI(api_key=key, base_url=base, max_retries=0, timeout=300)


def dg_words(response: ListenV1Response, channel: int = 0) -> list[dict[str, Any]]:
    words = response.results.channels[channel].alternatives[0].words  # type: ignore[index]
    return [{"text": w.punctuated_word, "start": w.start, "end": w.end} for w in words or []]


async def stored_call(service: Service, call_id: str) -> dict[str, Any]:
    await asyncio.get_running_loop().run_in_executor(None, service.bridge.store.flush)
    url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls/{call_id}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        async with http.get(url) as response:
            assert response.status == 200
            call: dict[str, Any] = await response.json()
            return call


class FileServer:
    """A loopback HTTP server with a file, and redirects to it (the `{"url": ...}` tests)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.port = free_port()
        self.fetched = 0
        self._runner: web.AppRunner | None = None

    async def _file(self, request: web.Request) -> web.Response:
        self.fetched += 1
        return web.Response(body=self.body, content_type="audio/wav")

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def up(self) -> None:
        app = web.Application()
        app.router.add_get("/call.wav", self._file)
        app.router.add_get("/redirect", self._redirect)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def two_sentences() -> AsyncIterator[tuple[PcmArray, FileServer]]:
    pcm = speech(1, 3)
    server = FileServer(wav_bytes(pcm))
    await server.up()
    yield pcm, server
    await server.down()


async def test_deepgram_sdk_file_and_url(
    start_service: ServiceFactory, two_sentences: tuple[PcmArray, FileServer]
) -> None:
    pcm, files = two_sentences
    service = await keyed_service(start_service, fetch_hosts=(f"127.0.0.1:{files.port}",))
    expected = rounded(await offline_words(service, pcm, RATE))
    listen = deepgram_client(service).listen.v1.media

    response = await listen.transcribe_file(
        request=files.body, model="nova-3", punctuate=True, utterances=True, tag="e2e"
    )
    assert isinstance(response, ListenV1Response)
    type(response).model_validate(response.model_dump())  # the SDK's strict validation too
    assert expected and dg_words(response) == expected
    alternative = response.results.channels[0].alternatives[0]  # type: ignore[index]
    assert alternative.transcript == " ".join(w["text"] for w in expected)
    assert 0 < (alternative.confidence or 0) <= 1
    for word in alternative.words or []:
        assert word.word == (word.word or "").lower() and 0 < (word.confidence or 0) <= 1
    # Utterances are the engine's own (its segments: a sentence, or a pause over utt_split).
    reference = await transcribe_pcm(
        service.bridge.hub, resample_whole(pcm, RATE, service.bridge.hub.engine.sample_rate), "ref"
    )
    utterances = response.results.utterances or []
    assert len(reference.segments) >= 2  # two sentences, a pause between
    assert [[w.punctuated_word for w in u.words or []] for u in utterances] == [
        [w.text for w in segment.words] for segment in reference.segments
    ]
    assert [u.transcript for u in utterances] == [s.text for s in reference.segments]
    assert all(a.end <= b.start for a, b in itertools.pairwise(utterances))  # type: ignore[operator]
    metadata = response.metadata
    assert metadata.channels == 1 and metadata.duration == pytest.approx(len(pcm) / RATE, abs=1e-3)
    assert metadata.tags == ["e2e"] and metadata.models and metadata.model_info

    # Stored as a call of the front end `file`, under the request id.
    call = await stored_call(service, metadata.request_id)
    assert call["front_end"] == "file" and call["status"] == "ended"
    assert call["labels"]["api"] == "deepgram" and call["labels"]["model"] == "nova-3"

    # The same file by URL from an allowed host, also through a redirect on it.
    by_url = await listen.transcribe_url(url=f"http://127.0.0.1:{files.port}/call.wav")
    assert dg_words(by_url) == expected  # type: ignore[arg-type]
    direct = f"http://127.0.0.1:{files.port}/call.wav"
    redirected = await listen.transcribe_url(
        url=f"http://127.0.0.1:{files.port}/redirect?to={direct}"
    )
    assert dg_words(redirected) == expected  # type: ignore[arg-type]
    assert files.fetched == 2
    stored = await stored_call(service, by_url.metadata.request_id)  # type: ignore[union-attr]
    assert stored["labels"]["file"] == direct

    # Another host (the same server, named differently), directly or by a redirect: refused
    # before anything is fetched from it.
    elsewhere = f"http://localhost:{files.port}/call.wav"
    for url in (elsewhere, f"http://127.0.0.1:{files.port}/redirect?to={elsewhere}"):
        with pytest.raises(BadRequestError) as refused:
            await listen.transcribe_url(url=url)
        assert refused.value.body["err_code"] == "Bad Request"
        assert "localhost may not be fetched" in refused.value.body["err_msg"]
    assert files.fetched == 2

    # Without the key: 401 before the body is read.
    with pytest.raises(ApiError) as unauthorized:
        await deepgram_client(service, key="wrong").listen.v1.media.transcribe_file(
            request=files.body
        )
    assert unauthorized.value.status_code == 401
    assert unauthorized.value.body["err_code"] == "INVALID_AUTH"  # Deepgram's error shape
    assert set(unauthorized.value.body) == {"err_code", "err_msg", "request_id"}


async def test_deepgram_raw_multichannel_with_redaction(start_service: ServiceFactory) -> None:
    """Headerless 8 kHz linear16, two channels, `multichannel=true`: a channel each, and
    `redact=numbers` takes the account number out of the answer and of the stored call."""
    service = await start_service()
    left, right = (resample_whole(speech(n), RATE, 8000) for n in (2, 3))
    length = max(len(left), len(right))
    channels = [np.pad(p, (0, length - len(p))) for p in (left, right)]
    raw = np.stack(channels, axis=1).astype("<i2").tobytes()  # interleaved, as a PBX sends
    listen = deepgram_client(service).listen.v1.media
    response = await listen.transcribe_file(
        request=raw,
        encoding="linear16",
        multichannel=True,
        redact="numbers",
        request_options={"additional_query_parameters": {"sample_rate": 8000, "channels": 2}},
    )
    assert isinstance(response, ListenV1Response)
    assert response.metadata.channels == 2 and len(response.results.channels) == 2
    assert dg_words(response, 1) == rounded(await offline_words(service, channels[1], 8000))
    said = [w["text"] for w in dg_words(response, 0)]
    plain = [w["text"] for w in await offline_words(service, channels[0], 8000)]
    # The engine heard the number ("four, five, six, seven,"), and it did not come out.
    assert sum(t.isdigit() for w in plain for t in normalize(w)) == 4
    assert not any(t.isdigit() for w in said for t in normalize(w))
    assert any(w.startswith("[") for w in said) and "account" in " ".join(said).lower()
    call = await stored_call(service, response.metadata.request_id)
    assert call["front_end"] == "file" and set(call["legs"]) >= {"channel_0", "channel_1"}
    assert call["labels"]["encoding"] == "linear16" and call["labels"]["sample_rate"] == "8000"
    url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls/{call['id']}/transcript"
    async with aiohttp.ClientSession() as http, http.get(url) as stored:
        kept = [w["text"] for w in (await stored.json())["words"] if w["leg"] == "channel_0"]
    assert kept == said


async def test_openai_sdk_every_response_format(start_service: ServiceFactory) -> None:
    service = await keyed_service(start_service)
    pcm = speech(0)
    expected = await offline_words(service, pcm, RATE)
    text = " ".join(w["text"] for w in expected)
    client = openai_client(service)
    flac = wav_bytes(pcm, fmt="FLAC")
    upload = ("call.flac", flac, "audio/flac")

    plain = await client.audio.transcriptions.create(model="whisper-1", file=upload)
    assert expected and plain.text == text

    verbose = await client.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=upload, response_format="verbose_json",
        timestamp_granularities=["word", "segment"], language="en",
        prompt="Thank you for calling",
    )  # fmt: skip
    assert verbose.text == text and verbose.language == "english"
    assert verbose.duration == pytest.approx(len(pcm) / RATE, abs=1e-3)
    words = [{"text": w.word, "start": w.start, "end": w.end} for w in verbose.words or []]
    assert words == rounded(expected)
    segments = verbose.segments or []
    assert segments and " ".join(s.text for s in segments) == text
    assert segments[0].start <= words[0]["start"] and segments[-1].end >= words[-1]["end"]

    srt = await client.audio.transcriptions.create(
        model="whisper-1", file=upload, response_format="srt"
    )
    vtt = await client.audio.transcriptions.create(
        model="whisper-1", file=upload, response_format="vtt"
    )
    as_text = await client.audio.transcriptions.create(
        model="whisper-1", file=upload, response_format="text"
    )
    assert srt.startswith("1\n00:00:0") and " --> " in srt and segments[0].text in srt
    assert vtt.startswith("WEBVTT\n") and segments[0].text in vtt
    assert as_text.strip() == text

    # Stored as a call; the response's x-request-id names it.
    raw = await client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=upload)
    call = await stored_call(service, raw.headers["x-request-id"])
    assert call["front_end"] == "file" and call["labels"]["api"] == "openai"
    assert call["labels"]["file"] == "call.flac" and call["labels"]["model"] == "whisper-1"

    with pytest.raises(openai.AuthenticationError) as unauthorized:
        await openai_client(service, key="wrong").audio.transcriptions.create(
            model="whisper-1", file=upload
        )
    # OpenAI's error shape: the SDK reads its code and message.
    assert unauthorized.value.code == "invalid_api_key"
    assert unauthorized.value.body == {
        "message": "a valid API key is required",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }


async def test_bad_input_is_refused_in_each_apis_shape(start_service: ServiceFactory) -> None:
    """Not audio, too large, a URL on a host not allowed, a bad parameter: each refused with
    the API's own error while a good file is transcribed at the same time, unharmed."""
    cap = 1024 * 1024
    service = await start_service(
        dataclasses.replace(make_config(), api=ApiConfig(file_max_bytes=cap))
    )
    pcm = speech(4)
    good = wav_bytes(pcm)
    expected = rounded(await offline_words(service, pcm, RATE))
    too_large = wav_bytes(np.zeros(cap, dtype=np.int16))  # 2 MiB of samples
    not_audio = b"<html>this is not audio</html>" * 100
    listen = deepgram_client(service).listen.v1.media
    transcriptions = openai_client(service).audio.transcriptions

    async def deepgram_error(**kwargs: Any) -> tuple[int, Any]:
        with pytest.raises(ApiError) as refused:
            if "url" in kwargs:
                await listen.transcribe_url(**kwargs)
            else:
                await listen.transcribe_file(**kwargs)
        return refused.value.status_code or 0, refused.value.body

    async def openai_error(**kwargs: Any) -> tuple[int, dict[str, Any]]:
        with pytest.raises(openai.APIStatusError) as refused:
            await transcriptions.create(model="whisper-1", **kwargs)
        body = refused.value.response.json()  # the SDK's `.body` is the inner "error"
        assert isinstance(body, dict) and body["error"] == refused.value.body
        return refused.value.status_code, body

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(data), 65536):
            yield data[start : start + 65536]

    good_one = asyncio.create_task(listen.transcribe_file(request=good))
    results = await asyncio.gather(
        deepgram_error(request=not_audio),
        deepgram_error(request=too_large),
        deepgram_error(url="http://127.0.0.1:9/call.wav"),
        deepgram_error(request=good, redact="everything"),
        deepgram_error(request=chunks(too_large)),  # no Content-Length: refused as it arrives
        deepgram_error(request=good, redact="naïve\r\nx"),  # quoted back in the dg-error header
        openai_error(file=("a.wav", not_audio)),
        openai_error(file=("a.wav", too_large)),
        openai_error(file=("a.wav", good), response_format="docx"),  # type: ignore[arg-type]
    )
    (dg_junk, dg_large, dg_url, dg_param, dg_streamed, dg_odd, oa_junk, oa_large, oa_format) = (
        results
    )
    assert dg_junk[0] == 400 and "not audio" in dg_junk[1]["err_msg"]
    assert dg_large[0] == 413 and "limit of 1048576" in dg_large[1]["err_msg"]
    assert dg_url[0] == 400 and "fetch_hosts is empty" in dg_url[1]["err_msg"]
    assert dg_param[0] == 400 and "redaction kind" in dg_param[1]["err_msg"]
    assert dg_streamed[0] == 413 and "the file is over the limit" in dg_streamed[1]["err_msg"]
    assert dg_odd[0] == 400 and "naïve" in dg_odd[1]["err_msg"]
    for _, body in (dg_junk, dg_large, dg_url, dg_param, dg_streamed, dg_odd):
        assert set(body) == {"err_code", "err_msg", "request_id"}
    assert oa_junk[0] == 400 and oa_junk[1]["error"]["param"] == "file"
    assert "Invalid file format" in oa_junk[1]["error"]["message"]
    assert oa_large[0] == 413 and oa_large[1]["error"]["code"] == "file_too_large"
    assert oa_format[0] == 400 and oa_format[1]["error"]["param"] == "response_format"
    for _, body in (oa_junk, oa_large, oa_format):
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error"

    response = await good_one
    assert dg_words(response) == expected  # type: ignore[arg-type]
    # Nothing refused became a call; the good one did.
    await asyncio.get_running_loop().run_in_executor(None, service.bridge.store.flush)
    url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls?front_end=file"
    async with aiohttp.ClientSession() as http, http.get(url) as listed:
        calls = (await listed.json())["calls"]
    assert [c["id"] for c in calls if c["labels"].get("api")] == [
        response.metadata.request_id  # type: ignore[union-attr]
    ]


BLOCK_S = 30.72  # a sentence and its silence: a multiple of every frame size the engine uses
BLOCKS = 20  # 20 x 30.72 s = 10 min 14 s


async def test_a_ten_minute_file_faster_than_real_time(start_service: ServiceFactory) -> None:
    """Twenty times one sentence, 30.72 s apart: every repetition's words are the sentence's
    offline words at that offset (times within 20 ms). Prints the speed (x real time)."""
    service = await start_service()
    sentence = speech(5, gap_s=0)
    block = np.pad(sentence, (0, int(BLOCK_S * RATE) - len(sentence)))
    expected = await offline_words(service, block, RATE)
    long = np.tile(block, BLOCKS)
    body = wav_bytes(long)
    started = time.monotonic()
    verbose = await openai_client(service).audio.transcriptions.create(
        model="whisper-1", file=("long.wav", body), response_format="verbose_json",
        timestamp_granularities=["word"],
    )  # fmt: skip
    took = time.monotonic() - started
    duration = len(long) / RATE
    print(f"\n{duration:.0f} s of audio through OpenAI's route in {took:.1f} s: "
          f"{duration / took:.1f}x real time")  # fmt: skip
    assert verbose.duration == pytest.approx(duration, abs=1e-3)
    words = verbose.words or []
    assert len(words) == BLOCKS * len(expected)
    for n, word in enumerate(words):
        want = expected[n % len(expected)]
        offset = n // len(expected) * BLOCK_S
        assert word.word == want["text"]
        assert word.start == pytest.approx(want["start"] + offset, abs=0.02)
        assert word.end == pytest.approx(want["end"] + offset, abs=0.02)
    assert took < duration  # faster than real time, even on a loaded machine


async def test_a_full_engine_is_retry_later_in_each_apis_shape(
    start_service: ServiceFactory,
) -> None:
    """The engine's one slot is a live call's: a file is refused (503, Retry-After), in each
    API's own error, and the live call goes on; once it ends, the file is taken."""
    service = await start_service(capacity=1)
    live = service.bridge.hub.open_call("websocket")
    body = wav_bytes(speech(0))
    try:
        with pytest.raises(ApiError) as deepgram_refused:
            await deepgram_client(service).listen.v1.media.transcribe_file(request=body)
        with pytest.raises(openai.InternalServerError) as openai_refused:
            await openai_client(service).audio.transcriptions.create(
                model="whisper-1", file=("a.wav", body)
            )
        assert not live.ended and live.id in service.bridge.hub.calls
    finally:
        await live.end("test over")
    assert deepgram_refused.value.status_code == 503
    assert (deepgram_refused.value.headers or {}).get("retry-after") == "1"
    assert set(deepgram_refused.value.body) == {"err_code", "err_msg", "request_id"}
    assert openai_refused.value.status_code == 503
    assert openai_refused.value.response.headers["retry-after"] == "1"
    assert set(openai_refused.value.response.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    answer = await deepgram_client(service).listen.v1.media.transcribe_file(request=body)
    assert dg_words(answer)  # type: ignore[arg-type]


# Rare words the engine alone misspells through the phone path (tests/engine's keyterm tests).
VOICEMAIL = (
    "I bought the Quillon speaker from your store.",
    "The Tremfya injection arrived damaged.",
)
TERMS = ("Quillon", "Tremfya")


def says(text: str, term: str) -> bool:
    words, wanted = normalize(text), normalize(term)
    return any(words[i : i + len(wanted)] == wanted for i in range(len(words)))


def voicemail() -> bytes:
    """Two sentences as a PBX stores a voicemail: 8 kHz μ-law WAV."""
    parts = [sox_convert(speech_wav(text), "-r", "8000", "-c", "1") for text in VOICEMAIL]
    pcm = np.concatenate([np.pad(read_pcm(p)[0], (4000, 8000)) for p in parts])
    out = io.BytesIO()
    soundfile.write(out, pcm, 8000, format="WAV", subtype="ULAW")
    return out.getvalue()


async def test_keyterms_from_a_prompt_list_or_keyterm_and_not_from_prose(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    body = voicemail()
    transcriptions = openai_client(service).audio.transcriptions

    async def openai_text(prompt: str | None = None) -> str:
        extra = {} if prompt is None else {"prompt": prompt}
        answer = await transcriptions.create(model="whisper-1", file=("vm.wav", body), **extra)
        return answer.text

    plain = await openai_text()
    assert not any(says(plain, term) for term in TERMS), plain  # the engine alone misses them
    listed = await openai_text("Quillon, Tremfya")
    assert all(says(listed, term) for term in TERMS), listed
    # Prose naming the same words is Whisper's style hint: accepted, not used as keyterms.
    prose = await openai_text("I bought the Quillon speaker and the Tremfya injection.")
    assert prose == plain
    # Deepgram's keyterm= on the same file, through the same call path.
    response = await deepgram_client(service).listen.v1.media.transcribe_file(
        request=body, keyterm=list(TERMS), punctuate=True
    )
    said = response.results.channels[0].alternatives[0].transcript or ""  # type: ignore[union-attr]
    assert all(says(said, term) for term in TERMS), said


async def test_mp3_and_ogg_opus_files(start_service: ServiceFactory) -> None:
    """Lossy containers as recorders and phones keep them: MP3 through OpenAI's route, Ogg Opus
    through Deepgram's; words equal the offline transcript of the same decoded audio."""
    service = await start_service()
    pcm = speech(1)
    for fmt, subtype in (("MP3", "MPEG_LAYER_III"), ("OGG", "OPUS")):
        out = io.BytesIO()
        rate = 48000 if fmt == "OGG" else RATE  # Opus is 48 kHz only
        soundfile.write(out, resample_whole(pcm, RATE, rate), rate, format=fmt, subtype=subtype)
        body = out.getvalue()
        samples, _ = soundfile.read(io.BytesIO(body), dtype="float32")
        expected = rounded(await offline_words(service, float_to_pcm16(samples), rate))
        assert expected
        if fmt == "MP3":
            verbose = await openai_client(service).audio.transcriptions.create(
                model="whisper-1", file=("memo.mp3", body), response_format="verbose_json",
                timestamp_granularities=["word"],
            )  # fmt: skip
            got = [{"text": w.word, "start": w.start, "end": w.end} for w in verbose.words or []]
        else:
            response = await deepgram_client(service).listen.v1.media.transcribe_file(
                request=body, encoding="opus", punctuate=True
            )
            got = dg_words(response)  # type: ignore[arg-type]
        assert got == expected, fmt
