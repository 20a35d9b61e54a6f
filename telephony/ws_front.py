"""One adapter for every WebSocket front end: a sans-I/O codec in, a served stream out.

A front end is a codec (its protocol without I/O) and a few lines of route: what is refused
before the upgrade (a bad signature: 403; bad query parameters: 400), then
`await run_stream(request, codec)`. `run_stream` does the rest once, for all of them:

- the socket: `open_websocket` (the configured message size, the codec's sub-protocols) read
  through `messages` (closed with 1008 when the client is idle for `idle_timeout_s`);
- admission: the codec's `OpenCall` opens the call in the hub (at the upgrade, from
  `codec.open_at_connect()`, or at the protocol's start message, from `receive`); `EngineFull`,
  `Draining`, `ProtocolError`, `InvalidOptions` and every other `BridgeError` close the socket
  with the protocol's own code (telephony/errors.py's table) after the codec's own last words
  (`encode_rejection`);
- media: one branch (`FrontStream.push`/`write`) taken both on the direct path (as aiohttp
  parses a frame, telephony/direct_ws.py) and in the loop: wire bytes decoded per leg at the
  engine's rate with `phase=batch_phase(call.id)` (so calls that start together spread their
  80 ms batches), gaps in the codec's media clock filled with silence, interleaved channels
  split into legs; a message is parsed once, whichever path takes it;
- backpressure, chosen per codec by `can_wait`: a sender that can wait (an app, a file) is
  slowed while the engine is behind (`Leg.write`; its frames wait in aiohttp's reader and
  then in TCP), a phone leg that cannot is pushed and drops beyond the engine's buffer, with an
  audio-dropped notice where the codec has a way to say so (`encode_dropped`);
- DTMF on the caller's leg at the wire's position, `Finalize`, replies the codec asks for;
- the end: a `Stopped` or a close; what the decoders still hold is flushed, the call ends
  (shielded: a cancelled handler must still flush the transcript), and the socket closes with
  1000 or the engine's own end (`ws_close_at_end`).

How a codec plugs in: subclass `WsCodec` and implement `receive(msg)` for a text or binary
`aiohttp.WSMessage`, returning one event, a tuple of events, or None:

    OpenCall(legs, audio, call_id, labels, options)  open the call (at most once)
    Media(leg, payload, timestamp_ms)  wire audio of a leg (None: every leg interleaved, as
                                       `OpenCall.audio.channels` says); a timestamp in ms on
                                       the codec's media clock fills a gap with silence
    Dtmf(digit)  a key, on the caller's leg       Stopped(reason)  the sender's end
    Skipped(reason)  logged, the stream goes on   Reply(text)  a text frame back
    Finalize()  end the utterance in progress; answered with `encode_finalized(at_s)`

Raise a `ProtocolError` (or another `BridgeError`) for input that ends the stream. The state of
the stream (call, decoders, media clocks, end reason) lives in one `FrontStream`, as
python-websockets keeps a connection's state in its `Protocol`: a codec keeps only its
protocol's own state. Override the class attributes and methods a protocol needs:
`front_end` (the name in labels, logs and metrics), `protocols`, `can_wait`, `closed_reason`
(the end reason of a close without stop), `compress`, `open_at_connect`, `at_close` (what a
codec still holds when the peer closes), `may_be_media` (a cheap test that lets the direct
path leave other messages to the loop unparsed), `encode_event` (engine events back to the
peer: none, one or several frames), `encode_rejection`, `encode_dropped`, `encode_finalized`.
A protocol that answers errors in-band and goes on (AudioHook's `disconnect`) also takes
`call_opened` (its answer once the call is admitted), `refused` (its answer to a refused call
instead of a close), `engine_ended` (the same when the engine ends the call) and
`encode_farewell` (its last frame once the call has ended, before the close).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, cast

import numpy as np
import orjson
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from engine.base import BridgeError, Closed, EngineEvent
from telephony.audio import (
    WIRE_RATES,
    AudioDecoder,
    Encoding,
    MediaClock,
    PcmArray,
    alaw_encode,
    batch_phase,
    deinterleave,
    ulaw_encode,
)
from telephony.bus import AudioDropped
from telephony.call import Call, CallHub, Leg
from telephony.direct_ws import DIRECT_SUPPORTED, DirectHandler, DirectWebSocket
from telephony.errors import ProtocolError, rejection_for, ws_close_at_end
from telephony.limits import MAX_JSON_DEPTH, limits_of
from telephony.transcript import NO_OPTIONS, TranscriptOptions

log = logging.getLogger(__name__)

# The one app key of the call hub, for every front end.
HUB: Final = web.AppKey("call_hub", CallHub)

# A jump in a media clock beyond 20 ms is a gap (silence suppression, loss), filled with
# silence; beyond 10 s (as RTP's) it is a clock reset (telephony.audio.MediaClock).
GAP_TOLERANCE_S: Final = 0.02
MAX_GAP_S: Final = 10.0
_ZERO: Final = np.zeros(1, dtype=np.int16)
SILENCE: Final = {
    Encoding.MULAW: ulaw_encode(_ZERO),
    Encoding.ALAW: alaw_encode(_ZERO),
    Encoding.PCM16: b"\0\0",
    Encoding.PCM16_BE: b"\0\0",
}
FINALIZE_WAIT_S: Final = 5.0
HEARTBEAT_S: Final = 30.0


# --- events a codec yields ------------------------------------------------------------------


@dataclass(frozen=True)
class AudioFormat:
    encoding: Encoding
    rate: int
    channels: int = 1  # 2: samples interleaved, one channel per leg in `OpenCall.legs` order


@dataclass(frozen=True)
class OpenCall:
    legs: tuple[str, ...]
    audio: AudioFormat
    call_id: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    options: TranscriptOptions = NO_OPTIONS
    # Where the media clock starts: 0 (Twilio's stream clock: a track that starts late is
    # preceded by silence), or else at each leg's first timestamp (a carrier's wall clock).
    clock_from_zero: bool = False


# Not frozen, unlike the other events: a frozen dataclass's constructor sets each field through
# object.__setattr__ (0.47 µs), a plain one with slots assigns them (0.13 µs), and one is built
# per 20 ms frame of every call. Nothing changes an event once built.
@dataclass(slots=True)
class Media:
    leg: str | None  # None: every leg, interleaved as `AudioFormat.channels` says
    payload: bytes
    timestamp_ms: int | None = None  # the codec's media clock, where its protocol has one


@dataclass(frozen=True)
class Dtmf:
    digit: str


@dataclass(frozen=True)
class Stopped:
    reason: str


@dataclass(frozen=True)
class Skipped:
    """A message the stream survives (an unknown event, a mark): logged, ignored."""

    reason: str


@dataclass(frozen=True)
class Reply:
    """A text frame for the peer (an error message the protocol reports and goes on)."""

    text: str


@dataclass(frozen=True)
class Finalize:
    """End the utterance in progress; answered once every word of the audio so far is out."""


FrontEvent = OpenCall | Media | Dtmf | Stopped | Skipped | Reply | Finalize
Received = FrontEvent | tuple[FrontEvent, ...] | None


# A media timestamp's types as the JSON codecs' full readers take it (a bool is an int in
# Python, and refused there); the short road (`media_message`'s callers) checks the same.
STAMP_TYPES: Final = frozenset({str, int, float})


def media_message(text: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The per-frame road of the JSON protocols (Twilio and the carriers shaped like it): a text
    frame that is a JSON object with `"event": "media"` and a `media` object, as that message
    and its media object, parsed exactly as `telephony.limits.parse_json` would; None for
    anything else (a parse orjson refuses included), which the codec then reads in full.

    parse_json's nesting test counts both kinds of bracket on every message; a media message
    has no `[` (a fast scan) and two `{`, which keeps it under the bound without the rest of
    the test.
    """
    if "[" in text or text.count("{") > MAX_JSON_DEPTH:
        return None
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:  # parse_json's fallback (the standard library) is the codec's
        return None
    if type(message) is not dict or message.get("event") != "media":
        return None
    media = message.get("media")
    return (message, media) if type(media) is dict else None


class WsCodec:
    """A WebSocket front end's protocol without I/O; see the module's docstring."""

    front_end: str = "websocket"
    protocols: tuple[str, ...] = ()
    compress: bool = True  # permessage-deflate when the peer offers it
    # True: the sender can wait (slowed while the engine is behind, nothing lost); False: a
    # phone leg, pushed in real time, dropped beyond the engine's buffer.
    can_wait: ClassVar[bool] = False
    closed_reason: ClassVar[str] = "socket closed"

    def receive(self, msg: WSMessage) -> Received:
        raise NotImplementedError

    def at_close(self) -> Received:
        """Events once the peer has closed (audio a codec still holds); None: nothing."""
        return None

    def open_at_connect(self) -> OpenCall | None:
        """The call to open at the upgrade (a protocol whose URL says it all), else None."""
        return None

    def may_be_media(self, msg: WSMessage) -> bool:
        """False for a frame that is surely not media: the direct path leaves it to the loop
        without parsing it twice."""
        return True

    def encode_event(self, call: Call, leg: str, event: EngineEvent) -> str | list[str] | None:
        """An engine event as text frames for the peer; None: not sent."""
        return None

    def encode_rejection(self, exc: BridgeError) -> str | None:
        """A text frame sent before closing with the rejection's code; None: the close alone."""
        return None

    def encode_dropped(self, notice: AudioDropped) -> str | None:
        """The engine dropped audio of a leg (it fell behind); None: the protocol cannot say."""
        return None

    def encode_finalized(self, at_s: float) -> str | None:
        return None

    # Protocols that answer in-band instead of closing (AudioHook's `disconnect`):

    def call_opened(self, call: Call) -> Received:
        """Events once the call is admitted (a handshake's answer); None: nothing."""
        return None

    def refused(self, exc: BridgeError) -> Received:
        """The protocol's own answer to a refused call (the stream goes on); None: the socket
        closes with the rejection's code."""
        return None

    def engine_ended(self, call: Call) -> Received:
        """The protocol's own answer when the engine ended the call (a lost node; the stream
        goes on); None: the socket closes with the engine's end (`ws_close_at_end`)."""
        return None

    def encode_farewell(self) -> str | None:
        """A text frame once the call has ended, before the close (AudioHook's `closed`)."""
        return None


# --- the socket ---------------------------------------------------------------------------------


def heartbeat_for(request: web.Request, read_by_messages: bool) -> float | None:
    """aiohttp's ping heartbeat, or None where `messages` watches the client already.

    A connection read through `messages` is closed once silent for `idle_timeout_s`, which
    finds a dead peer as a ping would. The heartbeat re-arms a timer after every message
    received (a loop callback per 20 ms audio frame: 3-4 % of the server at 200 calls), so
    audio connections go without it.
    """
    if read_by_messages and limits_of(request).idle_timeout_s > 0:
        return None
    return HEARTBEAT_S


def open_websocket(
    request: web.Request,
    protocols: tuple[str, ...] = (),
    max_msg_size: int | None = None,
    read_by_messages: bool = False,
    compress: bool = True,
) -> web.WebSocketResponse:
    """A WebSocketResponse with the configured message size (over it: close 1009).
    `read_by_messages`: the handler reads it through `messages` (see `heartbeat_for`), which
    may then hand messages to a `direct` function as they are parsed (telephony/direct_ws.py)."""
    limits = limits_of(request)
    size = limits.websocket_max_message_bytes if max_msg_size is None else max_msg_size
    heartbeat = heartbeat_for(request, read_by_messages)
    kind = DirectWebSocket if read_by_messages and DIRECT_SUPPORTED else web.WebSocketResponse
    return kind(protocols=protocols, heartbeat=heartbeat, max_msg_size=size, compress=compress)


async def messages(
    ws: web.WebSocketResponse,
    request: web.Request,
    idle_s: float | None = None,
    on_idle: Callable[[], Awaitable[None]] | None = None,
    direct: DirectHandler | None = None,
) -> AsyncIterator[WSMessage]:
    """`async for msg in ws`, except that a client silent for `idle_timeout_s` (a whole
    message must arrive in that time: trickling one frame does not count) is closed with 1008.
    A protocol with its own idle rule passes `idle_s` and `on_idle` (which closes the socket
    its own way); iteration then ends as for any close.

    One watchdog per connection checks the time of the last whole message, waking once per
    `idle_timeout_s`: a timeout around every `receive` cost 6 % of the server's time at
    100 calls (py-spy), an audio frame being a message every 20 ms.

    `direct(msg)`, on a socket from `open_websocket(read_by_messages=True)`, is offered each
    message as it is parsed while this loop waits with nothing queued (telephony/direct_ws.py):
    True when it handled it, False to have it yielded here in order. It must do exactly what
    the loop body does with such a message: on an aiohttp without the hook every message is
    yielded. What it raises is raised here, in place of that message.
    """
    loop = asyncio.get_running_loop()
    if idle_s is None:
        idle_s = limits_of(request).idle_timeout_s
    last = loop.time()
    # The handler is at work on a message (waiting for room in the engine's buffer: the client
    # is slowed, not silent): the time until it reads again is not the client's idleness.
    busy = False

    async def watch() -> None:
        assert idle_s is not None
        while not ws.closed:
            wait = last + idle_s - loop.time()
            if wait <= 0 and busy:
                wait = idle_s  # looked at again once the handler reads
            elif wait <= 0:
                if on_idle is not None:
                    await on_idle()
                else:
                    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"idle timeout")
                return
            await asyncio.sleep(wait)

    # Without a `direct` function (or without the hook) this is the plain loop.
    queue = ws.direct_queue if direct is not None and isinstance(ws, DirectWebSocket) else None
    if queue is not None:
        assert direct is not None

        def handled(msg: WSMessage) -> bool:
            nonlocal last
            if direct(msg):
                last = loop.time()
                return True
            return False

        queue.direct = handled

    watchdog = loop.create_task(watch()) if idle_s > 0 else None
    try:
        while True:
            if queue is None:
                msg = await ws.receive()
            else:
                queue.waiting = True
                try:
                    msg = await ws.receive()
                finally:
                    queue.waiting = False
                if queue.error is not None:
                    error, queue.error = queue.error, None
                    raise error
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            busy = True
            yield msg
            busy = False
            last = loop.time()
    finally:
        if queue is not None:
            queue.direct = None
        if watchdog is not None:
            watchdog.cancel()


def send_soon(ws: web.WebSocketResponse, text: str) -> None:
    """Send from synchronous code (a push in the parser's callback); order is kept by the
    socket's writer, and a closing socket is no error."""
    if ws.closed:
        return
    task = asyncio.ensure_future(ws.send_str(text))
    task.add_done_callback(_quiet)


def _quiet(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # the socket closed under it: nothing to tell


# --- the stream ----------------------------------------------------------------------------------


class FrontStream:
    """The state of one served stream: its call, each leg's decoder and media clock, its end."""

    def __init__(self, request: web.Request, codec: WsCodec, ws: web.WebSocketResponse) -> None:
        self.request = request
        self.codec = codec
        self.ws = ws
        self.call: Call | None = None
        self.reason = codec.closed_reason
        self._audio = AudioFormat(Encoding.PCM16, 8000)
        self._decoders: dict[str, AudioDecoder] = {}
        self._clocks: dict[str, MediaClock] = {}  # each leg's, in wire samples
        self._carry = b""  # part of an interleaved frame, for the next message
        self._engine_end_told = False
        # What the direct path parsed of a message it left to the loop: not parsed again.
        self.parsed: tuple[WSMessage, Received] | None = None
        self._legs: dict[str, Leg] = {}
        self._first = ""  # the leg of audio that names none
        self._width = 2  # bytes per sample
        self._channels = 1
        self._rate = 8000

    # -- opening

    def open(self, spec: OpenCall) -> Call:
        if self.call is not None:
            raise BridgeError("a second call on one stream")  # codecs refuse a second start
        if spec.audio.rate not in WIRE_RATES:  # no decoder takes it: refused as bad input
            raise ProtocolError(f"unsupported sample rate {spec.audio.rate}")
        codec = self.codec
        reply = self._reply if type(codec).encode_event is not WsCodec.encode_event else None
        call = self.request.app[HUB].open_call(
            codec.front_end,
            legs=spec.legs,
            call_id=spec.call_id,
            labels=spec.labels,
            reply=reply,
            options=spec.options,
        )
        self.call = call
        self._audio = spec.audio
        phase = batch_phase(call.id)
        self._decoders = {
            leg: AudioDecoder(spec.audio.encoding, spec.audio.rate, call.sample_rate, phase=phase)
            for leg in call.legs
        }
        rate = spec.audio.rate
        start = 0 if spec.clock_from_zero else None
        self._clocks = {
            leg: MediaClock(int(MAX_GAP_S * rate), int(GAP_TOLERANCE_S * rate), start)
            for leg in call.legs
        }
        self._legs = dict(call.legs)
        self._first = spec.legs[0]
        self._width = spec.audio.encoding.bytes_per_sample
        self._channels = spec.audio.channels
        self._rate = rate
        if type(codec).encode_dropped is not WsCodec.encode_dropped:
            call.on_audio_dropped = self._dropped
        return call

    async def _reply(self, leg: str, event: EngineEvent) -> None:
        call, ws = self.call, self.ws
        assert call is not None
        texts = self.codec.encode_event(call, leg, event)
        for text in [texts] if isinstance(texts, str) else texts or ():
            if not ws.closed:
                await ws.send_str(text)
        if isinstance(event, Closed) and call.engine_reason and not ws.closed:
            # The engine ended the call (a lost node): say so now, not at the client's next
            # frame (a client waiting for words may send none).
            await self.engine_ended()

    async def engine_ended(self) -> bool:
        """Tell the peer (once) that the engine ended the call; True when the socket closed."""
        call, ws = self.call, self.ws
        assert call is not None
        if self._engine_end_told:
            return False
        self._engine_end_told = True
        answer = self.codec.engine_ended(call)
        if answer is None:
            code, message = ws_close_at_end(call)
            await ws.close(code=code, message=message)
            return True
        await _handle(self, answer if isinstance(answer, tuple) else (answer,))
        return False

    def _dropped(self, notice: AudioDropped) -> None:
        text = self.codec.encode_dropped(notice)
        if text is not None:
            send_soon(self.ws, text)

    # -- media

    def decode(self, event: Media) -> list[tuple[Leg, PcmArray]]:
        """Wire audio of one message as each leg's samples at the engine's rate."""
        if event.leg is None and self._channels > 1:
            return self._interleaved(event.payload)
        one = self._mono(event)
        return [] if one is None else [one]

    def _mono(self, event: Media) -> tuple[Leg, PcmArray] | None:
        """One leg's audio (the per-frame path of most front ends: kept short)."""
        leg = event.leg if event.leg is not None else self._first
        decoder = self._decoders.get(leg)
        if decoder is None:
            return None  # a track the stream was not set up for
        payload = event.payload
        clock = self._clocks[leg]
        if event.timestamp_ms is not None:
            gap = clock.gap(event.timestamp_ms * self._rate // 1000)
            if gap > 0:  # silence in the missing samples' place
                payload = SILENCE[self._audio.encoding] * gap + payload
        clock.advance(len(payload) // self._width)
        pcm = decoder.feed(payload)
        return (self._legs[leg], pcm) if len(pcm) else None

    def _interleaved(self, payload: bytes) -> list[tuple[Leg, PcmArray]]:
        """Interleaved channels, one per leg in order; a frame cut between two messages is
        carried over."""
        out: list[tuple[Leg, PcmArray]] = []
        frame = self._width * self._channels
        data = self._carry + payload if self._carry else payload
        usable = len(data) - len(data) % frame
        self._carry = data[usable:]
        decoders = self._decoders
        first = decoders[self._first]
        channels = deinterleave(first.decode(data[:usable]), self._channels)
        for (name, decoder), samples in zip(decoders.items(), channels, strict=False):
            self._clocks[name].advance(len(samples))
            pcm = decoder.feed_samples(samples)
            if len(pcm):
                out.append((self._legs[name], pcm))
        return out

    def push(self, event: Media) -> None:
        """A phone leg's audio: pushed now; beyond the engine's buffer it is dropped."""
        if event.leg is None and self._channels > 1:
            for leg, pcm in self._interleaved(event.payload):
                leg.push(pcm)
            return
        one = self._mono(event)
        if one is not None:
            one[0].push(one[1])

    async def write(self, event: Media) -> None:
        """Audio of a sender that can wait: slowed while the engine is behind, never lost.
        Its frames wait in aiohttp's reader, which stops reading the socket once it holds
        128 KiB, and TCP slows a client sending faster than real time."""
        for leg, pcm in self.decode(event):
            await leg.write(pcm)

    def has_room(self) -> bool:
        call = self.call
        return call is not None and all(leg.has_room for leg in call.legs.values())

    def dtmf(self, digit: str) -> None:
        call = self.call
        if call is None:
            return
        # Keys are the caller's; a stream with no caller's leg (Twilio's outbound-only) gives
        # them to the leg it has.
        leg = "caller" if "caller" in call.legs else next(iter(call.legs))
        call.leg(leg).dtmf(digit, self._decoders[leg].seconds_in)

    async def finalize(self) -> float:
        """Cut the utterance in progress; wait (bounded) until every word so far is out.
        Returns the seconds of the first leg's audio that are settled (all their words sent)."""
        call = self.call
        if call is None:
            return 0.0
        leg = next(iter(call.legs.values()))
        stream = leg.stream
        stream.finalize()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(leg.wait_settled(stream.stats.samples_in), FINALIZE_WAIT_S)
        return stream.settled_samples / stream.sample_rate

    def flush(self) -> None:
        call = self.call
        if call is None:
            return
        for leg, decoder in self._decoders.items():
            call.leg(leg).push(decoder.flush())


# --- the handler ---------------------------------------------------------------------------------


async def run_stream(request: web.Request, codec: WsCodec) -> web.WebSocketResponse:
    """Serve one WebSocket stream of `codec`'s protocol; see the module's docstring."""
    ws = open_websocket(
        request, protocols=codec.protocols, read_by_messages=True, compress=codec.compress
    )
    await ws.prepare(request)
    stream = FrontStream(request, codec, ws)
    front_end = codec.front_end
    wait = codec.can_wait
    # Only a codec's own test is called per frame (the default says True to all).
    overridden = type(codec).may_be_media is not WsCodec.may_be_media
    media_test = codec.may_be_media if overridden else None

    def direct(msg: WSMessage) -> bool:
        """The loop's media branch, as frames are parsed. What it parsed of anything else goes
        to the loop with the message (next in order: this runs only when nothing is queued)."""
        call = stream.call
        if call is None or call.ended or (media_test is not None and not media_test(msg)):
            return False
        if wait and not stream.has_room():
            return False  # the engine is behind: the loop waits for room
        event = codec.receive(msg)
        if type(event) is Media:
            stream.push(event)
            return True
        if type(event) is tuple and all(type(e) is Media for e in event):  # one per leg
            for media in event:
                stream.push(cast(Media, media))
            return True
        stream.parsed = (msg, event)
        return False

    try:
        spec = codec.open_at_connect()
        if spec is not None:
            stream.open(spec)
        async for msg in messages(ws, request, direct=direct):
            if msg.type == WSMsgType.ERROR:
                stream.reason = f"connection error: {ws.exception()}"
                break
            parsed, stream.parsed = stream.parsed, None
            received = parsed[1] if parsed is not None and parsed[0] is msg else codec.receive(msg)
            events = received if isinstance(received, tuple) else (received,)
            if await _handle(stream, events):
                break
        else:
            last = codec.at_close()
            if last is not None:
                await _handle(stream, last if isinstance(last, tuple) else (last,))
    except BridgeError as exc:
        log.warning("%s stream closed: %s", front_end, exc, extra={"front_end": front_end})
        stream.reason = f"rejected: {exc}"
        if not ws.closed:
            text = codec.encode_rejection(exc)
            if text is not None:
                await ws.send_str(text)
            await ws.close(code=rejection_for(exc).ws_close, message=str(exc).encode()[:120])
    finally:
        call = stream.call
        if call is not None:
            stream.flush()
            # Shielded: a cancelled handler (server shutdown) must still flush the transcript.
            await asyncio.shield(call.end(stream.reason))
        farewell = codec.encode_farewell()
        if farewell is not None and not ws.closed:
            await ws.send_str(farewell)
        if not ws.closed:
            code, message = ws_close_at_end(call)
            await ws.close(code=code, message=message)
    return ws


async def _handle(stream: FrontStream, events: tuple[FrontEvent | None, ...]) -> bool:
    """One message's events; True when the stream is over."""
    codec = stream.codec
    for event in events:
        if isinstance(event, Media):
            call = stream.call
            if call is None or call.ended:
                continue  # media before the call (a codec that allows it), or after its end
            if codec.can_wait:
                await stream.write(event)
            else:
                stream.push(event)
            if call.ended and await stream.engine_ended():  # a lost engine node
                return True
        elif isinstance(event, OpenCall):
            try:
                call = stream.open(event)
            except BridgeError as exc:
                answer = codec.refused(exc)
                if answer is None:
                    raise
                await _handle(stream, answer if isinstance(answer, tuple) else (answer,))
                return False  # the rest of this message was for the call
            answer = codec.call_opened(call)
            if answer is not None:
                await _handle(stream, answer if isinstance(answer, tuple) else (answer,))
        elif isinstance(event, Dtmf):
            stream.dtmf(event.digit)
        elif isinstance(event, Stopped):
            stream.reason = event.reason
            return True
        elif isinstance(event, Reply):
            await stream.ws.send_str(event.text)
        elif isinstance(event, Finalize):
            text = codec.encode_finalized(await stream.finalize())
            if text is not None:
                await stream.ws.send_str(text)
        elif isinstance(event, Skipped):
            front_end = codec.front_end
            log.info(
                "%s message skipped: %s", front_end, event.reason, extra={"front_end": front_end}
            )
    return False
