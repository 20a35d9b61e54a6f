"""Files over HTTP: transcription speed (x real time) through each API, on this machine.

    python bench/files.py            # both files through both APIs (about 2 minutes on 2 cores)

An in-process service with the CPU engine (Moonshine), files POSTed over loopback as a client
sends them: Deepgram's `POST /v1/listen` (the WAV as the body) and OpenAI's
`POST /v1/audio/transcriptions` (multipart, verbose_json with words). Two files:
- dense: the call-centre sentences back to back, 0.5 s apart, for 2 minutes (speech nearly
  all the time: the engine decodes all of it);
- sparse: one sentence every 30.72 s for 10 minutes (a voicemail box, a quiet call: the VAD
  passes over the silence).
Wall time is from the first byte sent to the last byte of the answer (decode, resampling,
transcription, the answer's JSON).
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.app import Service
from telephony.audio import PcmArray
from tests.conftest import make_config
from tests.speech import SENTENCES, read_pcm, speech_wav

RATE = 24_000


def sentence(n: int) -> PcmArray:
    pcm, rate = read_pcm(speech_wav(SENTENCES[n]))
    assert rate == RATE
    return pcm


def dense(seconds: float) -> PcmArray:
    gap = np.zeros(RATE // 2, dtype=np.int16)
    parts: list[PcmArray] = []
    n = 0
    while sum(len(p) for p in parts) < seconds * RATE:
        parts += [sentence(n % len(SENTENCES)), gap]
        n += 1
    return np.concatenate(parts)[: int(seconds * RATE)]


def sparse(seconds: float, block_s: float = 30.72) -> PcmArray:
    one = sentence(5)
    block = np.pad(one, (0, int(block_s * RATE) - len(one)))
    return np.tile(block, int(seconds // block_s) + 1)[: int(seconds * RATE)]


def wav(pcm: PcmArray) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, pcm, RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


async def deepgram(http: aiohttp.ClientSession, base: str, body: bytes) -> int:
    async with http.post(f"{base}/v1/listen?punctuate=true", data=body) as response:
        doc = await response.json()
        assert response.status == 200, doc
        return len(doc["results"]["channels"][0]["alternatives"][0]["words"])


async def openai(http: aiohttp.ClientSession, base: str, body: bytes) -> int:
    form = aiohttp.FormData()
    form.add_field("file", body, filename="file.wav", content_type="audio/wav")
    form.add_field("model", "whisper-1")
    form.add_field("response_format", "verbose_json")
    form.add_field("timestamp_granularities[]", "word")
    async with http.post(f"{base}/v1/audio/transcriptions", data=form) as response:
        doc = await response.json()
        assert response.status == 200, doc
        return len(doc["words"])


async def main() -> None:
    service = Service(make_config())
    await service.start()
    base = f"http://127.0.0.1:{service.ports['audio']}"
    files = {"dense 2 min": dense(120), "sparse 10 min": sparse(600)}
    print(f"{'file':<14} {'API':<9} {'audio s':>8} {'wall s':>7} {'x real time':>12} {'words':>6}")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            for name, pcm in files.items():
                body = wav(pcm)
                for api, send in (("deepgram", deepgram), ("openai", openai)):
                    started = time.monotonic()
                    words = await send(http, base, body)
                    took = time.monotonic() - started
                    audio_s = len(pcm) / RATE
                    print(
                        f"{name:<14} {api:<9} {audio_s:>8.1f} {took:>7.1f} "
                        f"{audio_s / took:>11.1f}x {words:>6}",
                        flush=True,
                    )
    finally:
        await service.stop(drain_timeout_s=0)


if __name__ == "__main__":
    asyncio.run(main())
