"""moshi-server's ASR protocol on `/api/asr-streaming`, so Kyutai's clients work unchanged.

WebSocket: each binary frame is one MessagePack map tagged by "type". The client sends
`Audio{pcm}` (f32, 24 kHz mono), `OggOpus{data}` or `Marker{id}`; we answer `Ready`, then
`Word{text,start_time}` + `EndWord{stop_time}` per word, `Marker{id}` once every word of the
audio sent before it is out, and `Error{message}` before closing on bad input or a full engine.
POST: a whole audio file in the body gives a JSON array of Word/EndWord objects.
See ../shared/protocols/kyutai-stt.md §5; where that note and moshi-server differ, we follow
moshi-server (rust/moshi-server/src/batched_asr.rs); deliberate differences are marked "upstream".

`MoshiAsrCodec` is the protocol without I/O; `handle_streaming` and `handle_post` are the
aiohttp adapters, and `add_routes` registers them.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import soundfile
import sphn
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

from engine import moshi_wire as wire
from engine.base import BridgeError, EngineEvent, EngineFull, ModelStep, Word
from telephony.audio import PcmArray, ResampleStream, float_to_pcm16, resample_whole
from telephony.call import Call, CallHub, Leg, ReplyCallback
from telephony.errors import ProtocolError, rejection_for
from telephony.limits import limits_of
from telephony.ws_front import HUB, open_websocket
from telephony.ws_front import messages as ws_messages

log = logging.getLogger(__name__)

FRONT_END: Final = "moshi"
PATH: Final = wire.PATH
# The protocol's only rate for Audio.pcm and decoded Ogg/Opus (Kyutai's engine rate); the
# adapter resamples it once to the engine's own.
SAMPLE_RATE: Final = wire.SAMPLE_RATE

# moshi-server retries a POST that finds no free slot every 100 ms, 1000 times.
POST_RETRY_S: Final = 0.1
POST_MAX_RETRIES: Final = 1000
POST_MAX_BYTES: Final = 64 * 1024 * 1024  # aiohttp's default body limit (1 MiB) is too small
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024  # one WebSocket message (1 s of f32 is ~120 kB)


class MoshiProtocolError(ProtocolError):
    """A frame that is not a moshi-server ASR message (answered with `Error`, then close 1007)."""


@dataclass(frozen=True, eq=False)
class Audio:
    """24 kHz int16 audio, from `Audio.pcm` or decoded `OggOpus` pages."""

    pcm: PcmArray


# `Init`: batched moshi-server answers a client's Init with another Ready and resets the slot;
# the engine contract has no reset of a live stream, so the adapter ignores it, as
# single-stream moshi-server does.
ClientMessage = Audio | wire.Marker | wire.Init


class MoshiAsrCodec:
    """Binary frames in, client messages out (Ogg/Opus decoded, samples as int16); engine
    events to the frames moshi-server sends. The bytes both ways are engine/moshi_wire.py's."""

    def __init__(self) -> None:
        self._opus: sphn.OpusStreamReader | None = None

    def receive(self, frame: bytes) -> list[ClientMessage]:
        """One WebSocket binary message; raises `MoshiProtocolError` if it is not a message."""
        try:
            message = wire.decode_client(frame)
        except wire.WireError as exc:
            raise MoshiProtocolError(str(exc)) from None
        if isinstance(message, wire.Audio):
            return [Audio(float_to_pcm16(message.pcm))]
        if isinstance(message, wire.OggOpus):
            pcm = self._decode_opus(message.data)
            return [Audio(pcm)] if len(pcm) else []
        return [message]

    def _decode_opus(self, data: bytes) -> PcmArray:
        if self._opus is None:
            self._opus = sphn.OpusStreamReader(SAMPLE_RATE)
        try:
            pcm = self._opus.append_bytes(data)
        except ValueError as exc:
            raise MoshiProtocolError(f"bad Ogg/Opus data: {exc}") from None
        return float_to_pcm16(pcm)

    @staticmethod
    def encode_event(event: EngineEvent) -> list[bytes]:
        """A word is `Word` (its start) then `EndWord` (its end); nothing else goes out.

        moshi-server sends EndWord at the next word boundary the model emits; our engines give
        a word with both times at once, so the two go together. Segments and end-of-turn have
        no message in this protocol; its `Step` (raw VAD probabilities) is `encode_step`.
        """
        return [wire.encode(message) for message in word_messages(event)]

    @staticmethod
    def encode_step(step: ModelStep) -> bytes:
        return wire.encode(wire.Step(step.step_idx, step.pause_probs, step.buffered_samples))


def word_messages(event: EngineEvent) -> list[wire.ServerMessage]:
    if isinstance(event, Word):
        return [wire.Word(event.text, event.start_s), wire.EndWord(event.end_s)]
    return []


def word_objects(event: EngineEvent) -> list[dict[str, Any]]:
    """The POST answer's objects for one event (serde's JSON of moshi-server's `OutMsg`)."""
    return [wire.as_map(message) for message in word_messages(event)]


class AudioFileError(MoshiProtocolError):
    """A POST body that is not an audio file."""


def decode_audio_file(data: bytes, out_rate: int) -> PcmArray:
    """A whole file (anything libsndfile reads) as int16 at `out_rate`: its first channel, as
    upstream."""
    if not data:
        raise AudioFileError("the body is empty: POST a whole audio file")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioFileError(f"cannot read the body as audio: {exc}") from None
    return resample_whole(float_to_pcm16(samples[:, 0]), int(rate), out_rate)


# --- asyncio adapters -------------------------------------------------------------------------


def _labels(request: web.Request, mode: str) -> dict[str, str]:
    labels = {"mode": mode}
    if request.remote:
        labels["remote"] = request.remote
    return labels


def _error_text(exc: BridgeError) -> str:
    return wire.NO_FREE_CHANNELS if isinstance(exc, EngineFull) else str(exc)


async def handle_streaming(request: web.Request) -> web.StreamResponse:
    """GET: the WebSocket protocol (auth, 401 before the upgrade, is the API-key middleware's)."""
    hub = request.app[HUB]
    codec = MoshiAsrCodec()
    ws = open_websocket(request, max_msg_size=limits_of(request).moshi_max_message_bytes)
    await ws.prepare(request)

    async def reply(leg: str, event: EngineEvent) -> None:
        for frame in codec.encode_event(event):
            await ws.send_bytes(frame)

    try:
        call = hub.open_call(FRONT_END, labels=_labels(request, "stream"), reply=reply)
    except BridgeError as exc:
        # moshi-server sends Error "no free channels" and closes without a code; we close with
        # the code of our rejection table: 1013 "Try Again Later" for a full engine or a drain.
        log.warning("stream rejected: %s", exc, extra={"front_end": FRONT_END})
        await ws.send_bytes(wire.encode(wire.Error(_error_text(exc))))
        await ws.close(code=rejection_for(exc).ws_close, message=_error_text(exc).encode()[:120])
        return ws
    await ws.send_bytes(wire.encode(wire.Ready()))

    leg = call.leg("caller")
    # moshi-server sends `Step` each step to clients of a model with VAD heads (Kyutai's mic
    # client shows end of turn from it). Fire and forget, in order: the socket's writer keeps
    # the order of the frames it is given, and a step is worthless once late.
    steps: set[asyncio.Task[None]] = set()

    def send_step(step: ModelStep) -> None:
        if ws.closed:
            return
        task = asyncio.ensure_future(ws.send_bytes(codec.encode_step(step)))
        steps.add(task)
        task.add_done_callback(_forget_step(steps))

    leg.stream.on_model_step = send_step
    markers: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    echo = asyncio.get_running_loop().create_task(_echo_markers(ws, leg, markers))
    resampler = ResampleStream(SAMPLE_RATE, call.sample_rate)
    reason, close_code = "client closed", int(WSCloseCode.OK)
    try:
        async for msg in ws_messages(ws, request):
            if msg.type == WSMsgType.BINARY:
                try:
                    messages = codec.receive(msg.data)
                except MoshiProtocolError as exc:
                    # upstream drops the connection without a word; we say why first.
                    log.info("bad frame: %s", exc, extra={"call_id": call.id})
                    await ws.send_bytes(wire.encode(wire.Error(str(exc))))
                    reason, close_code = f"protocol error: {exc}", rejection_for(exc).ws_close
                    break
                await _apply(messages, leg, resampler, markers)
                if call.ended:  # ended by the service (drain deadline): nothing more is heard
                    reason = "ended by the service"
                    break
            elif msg.type == WSMsgType.ERROR:
                reason = f"connection error: {ws.exception()}"
                break
            # Text frames are ignored, as moshi-server ignores them.
    finally:
        leg.push(resampler.flush())
        # Shielded: a cancelled handler (server shutdown) must still flush the transcript.
        await asyncio.shield(call.end(reason))
        echo.cancel()
        if not ws.closed:
            await ws.close(code=close_code)
    return ws


def _forget_step(steps: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        steps.discard(task)
        if not task.cancelled():
            task.exception()  # a closing socket: nothing to report

    return done


async def _apply(
    messages: Sequence[ClientMessage],
    leg: Leg,
    resampler: ResampleStream,
    markers: asyncio.Queue[tuple[int, int]],
) -> None:
    for message in messages:
        if isinstance(message, Audio):
            # Waits while the engine is behind instead of dropping: moshi-server buffers
            # without bound, and its clients send 40 s of silence at once after the audio.
            await leg.write(resampler.process(message.pcm))
        elif isinstance(message, wire.Marker):
            markers.put_nowait((leg.stream.stats.samples_in, message.id))


async def _echo_markers(
    ws: web.WebSocketResponse,
    leg: Leg,
    markers: asyncio.Queue[tuple[int, int]],
) -> None:
    """Echo each marker, in order, once every word of the audio before it has been sent.

    moshi-server echoes it `asr_delay_in_tokens` steps after the last frame before it; the
    engine contract says the same thing as `EngineStream.settled_samples`. As upstream, a
    client that stops sending audio may wait: the engine settles audio as it hears what follows.
    """
    while True:
        samples, marker_id = await markers.get()
        if not await leg.wait_settled(samples):
            return
        try:
            await ws.send_bytes(wire.encode(wire.Marker(marker_id)))
        except (ConnectionError, RuntimeError):  # the socket is closing
            return


async def handle_post(request: web.Request) -> web.StreamResponse:
    """POST: a whole file in, `[{"type":"Word",...},{"type":"EndWord",...},...]` out."""
    hub = request.app[HUB]
    body = bytearray()
    try:
        async for chunk in request.content.iter_chunked(1 << 16):
            body += chunk
            if len(body) > POST_MAX_BYTES:
                reason = f"the body is over {POST_MAX_BYTES} bytes"
                return web.json_response({"error": "too_large", "reason": reason}, status=413)
    except (ConnectionError, HttpProcessingError) as exc:  # the client gave up mid-upload
        log.info("upload aborted: %s", type(exc).__name__, extra={"front_end": FRONT_END})
        return web.json_response({"error": "aborted", "reason": "upload aborted"}, status=400)
    try:
        pcm = decode_audio_file(bytes(body), hub.engine.sample_rate)
    except AudioFileError as exc:
        status = rejection_for(exc).http_status
        return web.json_response({"error": "bad_audio", "reason": str(exc)}, status=status)

    answer: list[dict[str, Any]] = []

    async def collect(leg: str, event: EngineEvent) -> None:
        answer.extend(word_objects(event))

    try:
        call = await _open_waiting(hub, _labels(request, "post"), collect)
    except BridgeError as exc:
        status = rejection_for(exc).http_status
        return web.json_response({"error": "rejected", "reason": _error_text(exc)}, status=status)
    # moshi-server appends 10 s of silence and a Marker; closing the stream flushes instead.
    try:
        await call.leg("caller").write(pcm)
    finally:
        await asyncio.shield(call.end("end of file"))
    return web.Response(body=json.dumps(answer).encode(), content_type="application/json")


async def _open_waiting(hub: CallHub, labels: dict[str, str], reply: ReplyCallback) -> Call:
    """Open a call, waiting for a free slot the way moshi-server's POST does (100 s at most).

    It looks at `free_slots` while it waits, so only the last try counts as a rejection.
    """
    for _ in range(POST_MAX_RETRIES):
        if hub.engine.free_slots > 0 or hub.draining:
            try:
                return hub.open_call(FRONT_END, labels=labels, reply=reply)
            except EngineFull:
                pass  # another call took the slot first
        await asyncio.sleep(POST_RETRY_S)
    return hub.open_call(FRONT_END, labels=labels, reply=reply)


def add_routes(app: web.Application, hub: CallHub) -> None:
    app[HUB] = hub
    app.router.add_get(PATH, handle_streaming)
    app.router.add_post(PATH, handle_post)
