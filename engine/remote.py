"""A remote engine: streams go over moshi-server's ASR protocol to engine nodes elsewhere.

`engine.name = "remote"`, `engine.urls = ["ws://gpu1:8080", ...]` lets a CPU-only front-end
node use engine nodes: other stt-bridge services (their `/api/asr-streaming`, telephony/
moshi_asr.py) or Kyutai's own moshi-server. Each stream is one WebSocket speaking only what
moshi-server speaks (rust/moshi-server/src/batched_asr.rs, Kyutai's
scripts/stt_from_file_rust_server.py): MessagePack `Audio{pcm}` (f32, 24 kHz) in 1920-sample
messages, `Marker{id}`; back `Ready`, `Word{text,start_time}`, `EndWord{stop_time}`,
`Marker{id}`, `Step`, `Error{message}`; the key in the `kyutai-api-key` header.
See ../shared/protocols/kyutai-stt.md §5.

- Placement: each stream goes to the reachable node with the most free slots (ties in turn).
  A node entry may name its health port, `"ws://host:8080 health=http://host:8001"`: its
  `/info` then gives its capacity and free slots, probed every `probe_interval_s`. A node
  without one (moshi-server has no such endpoint) is probed with a plain HTTP request and
  assumed to have `node_capacity` slots, so placement among those is least-streams, in turn.
- A node that answers `Error "no free channels"` is skipped and the next one tried; when none
  takes it the stream ends `Closed("engine_full")`. `open()` itself raises `EngineFull` when
  every reachable node is known full, so front ends refuse at protocol level.
- A node that dies mid-call (connection lost, or closed without our asking) ends each of its
  streams with the words so far and `Closed(ENGINE_LOST)`; it is marked unreachable until a
  probe finds it again, so new streams go elsewhere.
- The protocol carries words only: `Segment` and `EndOfTurn` are built here from pauses of
  `end_of_turn_silence_s` between words, told by `Marker` echoes sent every few frames (an
  echo says every word of the audio before it is out). The echoes also settle audio.
- `close()` flushes as Kyutai's clients do: silence and a `Marker`, silence until it comes
  back, then `Closed`. `finalize()` does the same without closing. Silence we add (~1 s first,
  as Kyutai's clients send "for the 2.6B model", and the flushes) is cut out of word times.
- Word times: moshi-server gives a word's end with the next word (`EndWord` at the next word
  boundary); a word still waiting for it when the next echo arrives goes out with its end set
  to its start. stt-bridge nodes send `EndWord` right after `Word`, so their ends are exact.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import numpy as np

from engine import moshi_wire as wire
from engine.base import (
    ENGINE_FULL,
    ENGINE_LOST,
    Closed,
    EndOfTurn,
    Engine,
    EngineEvent,
    EngineFull,
    EngineInfo,
    EngineNode,
    EngineStream,
    EngineUnavailable,
    ModelStep,
    Segment,
    Word,
)

log = logging.getLogger(__name__)

SAMPLE_RATE: Final = wire.SAMPLE_RATE  # the protocol's only rate
FRAME_SIZE: Final = 1920  # 80 ms: what Kyutai's clients send per message, one model step
DEFAULT_PATH: Final = wire.PATH
FLUSH_TIMEOUT: Final = "engine_timeout"  # Closed reason: the closing flush never came back
# Sent first, as Kyutai's clients send 1 s ("needed for the 2.6B model"); 12 whole model frames,
# which is also 30 whole 32 ms VAD windows at 16 kHz (a Moonshine node cuts the same as without).
LEAD_SILENCE_S: Final = 0.96
FLUSH_SILENCE_S: Final = 0.96  # before a flush marker: a VAD (Moonshine) ends the utterance
KEEPALIVE_PACE_S: Final = 0.04  # while a flush marker is out: a silent frame per 40 ms (2x)
FLUSH_MAX_S: Final = 40.0  # Kyutai's client gives up after 5 + 35 s of silence (calls: 60 s)
MARKER_EVERY: Final = 5  # frames (400 ms) between progress markers
CONNECT_TIMEOUT_S: Final = 5.0  # handshake until Ready
HEARTBEAT_S: Final = 5.0  # WebSocket ping; a node silent for 1.5x this is lost
PROBE_TIMEOUT_S: Final = 2.0
DEFAULT_NODE_CAPACITY: Final = 64  # moshi-server's batch for stt-1b


# --- the protocol, no I/O ---------------------------------------------------------------------
# Bytes and messages are engine/moshi_wire.py's (our server on /api/asr-streaming reads the same).


class Timeline:
    """Maps the node's time (our audio with silence we added) back to our own audio's time."""

    def __init__(self) -> None:
        self.node_samples = 0  # sent to the node, added silence included
        self.our_samples = 0  # of our own audio, sent
        self._starts: list[int] = []  # node sample where each added silence starts
        self._added: list[int] = []  # added samples up to the end of each of those

    def add_ours(self, samples: int) -> None:
        self.node_samples += samples
        self.our_samples += samples

    def add_silence(self, samples: int) -> None:
        total = self._added[-1] if self._added else 0
        if self._starts and self.node_samples - self.our_samples == total and self._ends_here():
            self._added[-1] += samples  # continues the last added silence
        else:
            self._starts.append(self.node_samples)
            self._added.append(total + samples)
        self.node_samples += samples

    def _ends_here(self) -> bool:
        before = self._added[-2] if len(self._added) > 1 else 0
        return self._starts[-1] + self._added[-1] - before == self.node_samples

    def skip_ours(self, samples: int) -> None:
        """Our audio that never reaches the node (our buffer dropped it while the node was
        behind): node time after this point is that much earlier than ours."""
        total = self._added[-1] if self._added else 0
        self._starts.append(self.node_samples)
        self._added.append(total - samples)  # negative "added": a jump forward of ours
        self.our_samples += samples

    def our_seconds(self, node_s: float) -> float:
        """A node time in seconds of our audio; inside added silence: where it was added."""
        at = round(node_s * SAMPLE_RATE)
        i = bisect.bisect_right(self._starts, at) - 1
        if i < 0:
            ours = at
        else:
            before = self._added[i - 1] if i > 0 else 0
            length = self._added[i] - before
            ours = (
                self._starts[i] - before if at < self._starts[i] + length else at - self._added[i]
            )
        return round(max(0, ours) / SAMPLE_RATE, 3)


class Turns:
    """Words to `Word`, `Segment` and `EndOfTurn` events, from what the node says and when.

    A `Word` waits for its `EndWord`; the next progress echo lets it go without one. A turn
    ends at a pause of `silence_s` between words, or when an echo shows that much audio after
    the last word with no new word, or on a flush.
    """

    def __init__(self, timeline: Timeline, silence_s: float) -> None:
        self._timeline = timeline
        self._silence_s = silence_s
        self._open: wire.Word | None = None  # a Word whose EndWord has not come
        self._words: list[Word] = []  # the turn so far
        self.last_end_s = 0.0

    def on_word(self, message: wire.Word) -> list[EngineEvent]:
        events = self._close_open(None)
        start = self._timeline.our_seconds(message.start_time)
        if self._words and start - self._words[-1].end_s >= self._silence_s:
            events += self.end_turn()
        self._open = wire.Word(message.text, start)
        return events

    def on_end_word(self, message: wire.EndWord) -> list[EngineEvent]:
        return self._close_open(self._timeline.our_seconds(message.stop_time))

    def on_progress(self, done_s: float) -> list[EngineEvent]:
        """Every word of our audio before `done_s` is out: a word without its end goes now."""
        events = self._close_open(None)
        if self._words and done_s - self._words[-1].end_s >= self._silence_s:
            events += self.end_turn()
        return events

    def flush(self) -> list[EngineEvent]:
        return self._close_open(None) + self.end_turn()

    @property
    def open_start_s(self) -> float | None:
        return None if self._open is None else self._open.start_time

    def end_turn(self) -> list[EngineEvent]:
        words = tuple(self._words)
        self._words = []
        if not words:
            return []
        text = " ".join(w.text for w in words)
        return [
            Segment(text, words[0].start_s, words[-1].end_s, words),
            EndOfTurn(words[-1].end_s),
        ]

    def _close_open(self, end_s: float | None) -> list[EngineEvent]:
        if self._open is None:
            return []
        start = self._open.start_time
        word = Word(
            self._open.text.strip(), start, max(start, end_s if end_s is not None else start)
        )
        self._open = None
        if not word.text:
            return []
        self._words.append(word)
        self.last_end_s = word.end_s
        return [word]


# --- nodes ------------------------------------------------------------------------------------


def parse_node(entry: str) -> tuple[str, str]:
    """`"ws://host:port[/path] [health=http://host:hport]"` → (WebSocket URL, /info URL or "").

    No path (or "/") means moshi-server's `/api/asr-streaming`."""
    parts = entry.split()
    if not parts:
        raise ValueError("an empty engine.urls entry")
    url = urlsplit(parts[0])
    if url.scheme not in ("ws", "wss") or not url.hostname:
        raise ValueError(f"engine.urls: {parts[0]!r} is not a ws:// or wss:// URL")
    path = url.path if url.path not in ("", "/") else DEFAULT_PATH
    ws_url = urlunsplit((url.scheme, url.netloc, path, url.query, ""))
    info_url = ""
    for extra in parts[1:]:
        key, _, value = extra.partition("=")
        if key != "health" or not value.startswith(("http://", "https://")):
            raise ValueError(f"engine.urls: {extra!r}: expected health=http://host:port")
        info_url = value.rstrip("/")
        if not info_url.endswith("/info"):
            info_url += "/info"
    return ws_url, info_url


@dataclass(eq=False)
class RemoteNode:
    url: str
    info_url: str
    capacity: int
    reachable: bool = True  # until a probe or a connection says otherwise
    reported_free: int | None = None  # from its /info
    ours_at_report: int = 0
    ours: int = 0  # our streams on it (reserved at open)
    full_until: float = 0.0  # it said "no free channels": none free until then (monotonic)
    error: str = ""
    refusals: int = 0
    model: str = ""
    probing: asyncio.Task[None] | None = field(default=None, repr=False)

    def free(self, now: float) -> int:
        if not self.reachable or now < self.full_until:
            return 0
        if self.reported_free is None:
            return max(0, self.capacity - self.ours)
        return max(0, self.reported_free - (self.ours - self.ours_at_report))

    def snapshot(self, now: float) -> EngineNode:
        return EngineNode(
            self.url,
            self.reachable,
            self.capacity,
            self.free(now),
            self.ours,
            self.error,
            self.refusals,
        )


# --- engine -----------------------------------------------------------------------------------


class RemoteEngine(Engine):
    name = "remote"
    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        urls: tuple[str, ...] | list[str],
        api_key: str = "",
        max_buffer_s: float = 10.0,
        end_of_turn_silence_s: float = 1.2,
        probe_interval_s: float = 2.0,
        node_capacity: int = DEFAULT_NODE_CAPACITY,
    ) -> None:
        if not urls:
            raise ValueError('engine.name = "remote" needs engine.urls (ws://host:port, ...)')
        self.nodes_: list[RemoteNode] = [
            RemoteNode(*parse_node(entry), capacity=node_capacity) for entry in urls
        ]
        self.api_key = api_key
        self.max_buffer_s = max_buffer_s
        self.end_of_turn_silence_s = end_of_turn_silence_s
        self.probe_interval_s = probe_interval_s
        self._turn = 0
        self._http: aiohttp.ClientSession | None = None
        self._prober: asyncio.Task[None] | None = None
        self._streams: set[RemoteStream] = set()

    # -- Engine --

    @property
    def capacity(self) -> int:
        return sum(n.capacity for n in self.nodes_ if n.reachable)

    @property
    def free_slots(self) -> int:
        now = time.monotonic()
        return sum(n.free(now) for n in self.nodes_)

    def open(
        self, call_id: str, leg: str = "caller", keyterms: tuple[str, ...] = ()
    ) -> RemoteStream:
        if self._http is None:
            raise EngineUnavailable("the remote engine is not running")
        candidates = self.candidates()
        if not candidates:
            if not any(n.reachable for n in self.nodes_):
                raise EngineUnavailable("no engine node is reachable")
            raise EngineFull("every engine node is full")
        stream = RemoteStream(self, call_id, leg, candidates)
        self._streams.add(stream)
        return stream

    def candidates(self) -> list[RemoteNode]:
        """Reachable nodes, most free slots first, ties in turn; those thought full last (what
        they said may be stale). Empty when none is thought to have a free slot."""
        now = time.monotonic()
        count = len(self.nodes_)
        self._turn = (self._turn + 1) % count
        order = sorted(
            (n for n in self.nodes_ if n.reachable),
            key=lambda n: (-n.free(now), (self.nodes_.index(n) - self._turn) % count),
        )
        if not order or order[0].free(now) <= 0:
            return []
        return order

    def info(self) -> EngineInfo:
        now = time.monotonic()
        models = sorted({n.model for n in self.nodes_ if n.model})
        return EngineInfo(
            name=self.name,
            model=", ".join(models) or "moshi-server ASR protocol",
            capacity=self.capacity,
            device="remote",
            extra={
                "nodes": [
                    {
                        "url": s.url,
                        "reachable": s.reachable,
                        "capacity": s.capacity,
                        "free_slots": s.free_slots,
                        "streams": s.streams,
                        "error": s.error,
                        "refusals": s.refusals,
                    }
                    for s in (n.snapshot(now) for n in self.nodes_)
                ]
            },
        )

    def nodes(self) -> list[EngineNode]:
        now = time.monotonic()
        return [n.snapshot(now) for n in self.nodes_]

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        await asyncio.gather(*(self._probe(n) for n in self.nodes_))
        self._prober = asyncio.get_running_loop().create_task(self._probe_forever())
        for node in self.nodes_:
            log.info(
                "engine node %s",
                "reachable" if node.reachable else f"unreachable: {node.error}",
                extra={"url": node.url, "capacity": node.capacity},
            )

    async def stop(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        for stream in list(self._streams):
            stream.abandon()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- nodes --

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "start() the engine first"
        return self._http

    def headers(self) -> dict[str, str]:
        return {"kyutai-api-key": self.api_key} if self.api_key else {}

    def lost(self, node: RemoteNode, why: str) -> None:
        """A node failed a connection or dropped a stream: no new streams until a probe."""
        if node.reachable:
            log.warning("engine node lost: %s", why, extra={"url": node.url})
        node.reachable = False
        node.error = why

    def refused(self, node: RemoteNode, why: str) -> None:
        node.full_until = time.monotonic() + self.probe_interval_s
        node.error = why
        node.refusals += 1
        self.probe_soon(node)

    def probe_soon(self, node: RemoteNode) -> None:
        if self._http is None or (node.probing is not None and not node.probing.done()):
            return
        node.probing = asyncio.get_running_loop().create_task(self._probe(node))

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            await asyncio.gather(*(self._probe(n) for n in self.nodes_))

    async def _probe(self, node: RemoteNode) -> None:
        """Its /info (slots), or any HTTP answer on the WebSocket path (moshi-server)."""
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        try:
            if node.info_url:
                async with self.http.get(node.info_url, timeout=timeout) as response:
                    response.raise_for_status()
                    engine = (await response.json())["engine"]
                node.capacity = int(engine["capacity"])
                node.reported_free = int(engine["free_slots"])
                node.ours_at_report = node.ours
                node.model = f"{engine.get('name', '')}: {engine.get('model', '')}"
            else:
                http_url = node.url.replace("ws", "http", 1)
                async with self.http.get(http_url, timeout=timeout, headers=self.headers()):
                    pass  # any status: something answers HTTP there
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError) as exc:
            if node.reachable:
                log.warning("engine node unreachable: %s", exc, extra={"url": node.url})
            node.reachable = False
            node.error = f"probe: {type(exc).__name__}: {exc}".strip(": ")
            return
        if not node.reachable:
            log.info("engine node reachable again", extra={"url": node.url})
        node.reachable = True
        node.error = ""
        node.full_until = 0.0

    def _forget(self, stream: RemoteStream) -> None:
        self._streams.discard(stream)


# --- stream -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Marker:
    ours: int  # our samples sent before it
    position: int  # the stream's position then (`stats.samples_in` counting: drops included)
    flush: bool  # a flush (close, finalize): the turn ends when it comes back


class RemoteStream(EngineStream):
    """One leg on one node's WebSocket; every method runs on the event loop."""

    settles_on_take = False

    def __init__(
        self, engine: RemoteEngine, call_id: str, leg: str, candidates: list[RemoteNode]
    ) -> None:
        super().__init__(call_id, leg, engine.max_buffer_s, SAMPLE_RATE)
        self._engine = engine
        self._candidates = deque(candidates)
        self.node: RemoteNode = candidates[0]
        self.node.ours += 1  # reserved now: the next open sees it
        self._timeline = Timeline()
        self._turns = Turns(self._timeline, engine.end_of_turn_silence_s)
        self._wake = asyncio.Event()
        self._markers: dict[int, _Marker] = {}
        self._next_marker = 1
        self._since_marker = 0
        self._finalize = False
        self._refused = False  # a node said "no free channels"
        self._flush_out = 0  # flush markers sent, not yet back
        self._close_marker = 0  # the flush of close()
        self._done = False  # the flush of close() came back: the node may close
        self._ended = False  # Closed emitted
        self._task = asyncio.get_running_loop().create_task(self._run())

    # -- EngineStream --

    def _on_audio(self) -> None:
        if self._ended:
            self._take_pending()  # the node is gone: nothing will hear it
            return
        if self.pending_samples >= FRAME_SIZE:
            self._wake.set()

    def _on_close(self) -> None:
        self._wake.set()

    def finalize(self) -> None:
        if not self.closing and not self._ended:
            self._finalize = True
            self._wake.set()

    def abandon(self) -> None:
        """The engine stops: end now with what was said."""
        self._task.cancel()

    # -- the connection --

    async def _run(self) -> None:
        reason = ENGINE_LOST
        try:
            ws = await self._connect()
            if ws is None:
                reason = ENGINE_FULL if self._refused else ENGINE_LOST
                return
            async with ws:
                reason = await self._serve(ws)
        except asyncio.CancelledError:
            reason = "engine stopped"
        finally:
            self.node.ours -= 1
            self._engine._forget(self)
            self._end(reason)

    async def _connect(self) -> aiohttp.ClientWebSocketResponse | None:
        """A WebSocket to a node that said Ready, trying the candidates in order."""
        engine = self._engine
        while self._candidates:
            node = self._candidates.popleft()
            if node is not self.node:
                self.node.ours -= 1
                node.ours += 1
                self.node = node
            if not node.reachable:
                continue
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    ws = await engine.http.ws_connect(
                        node.url,
                        headers=engine.headers(),
                        heartbeat=HEARTBEAT_S,
                        max_msg_size=0,
                        timeout=aiohttp.ClientWSTimeout(ws_close=CONNECT_TIMEOUT_S),
                    )
                    first = await ws.receive()
            except aiohttp.WSServerHandshakeError as exc:  # 401, 503 before the upgrade, ...
                self._refuse(node, f"HTTP {exc.status}: {exc.message}", exc.status == 503)
                continue
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                engine.lost(node, f"connect: {type(exc).__name__}: {exc}")
                continue
            message = self._decode(first)
            if isinstance(message, wire.Ready):
                return ws
            await ws.close()
            if isinstance(message, wire.Error):
                self._refuse(node, message.message, message.message == wire.NO_FREE_CHANNELS)
            else:
                self._refuse(node, f"no Ready: {first.type.name}", False)
        return None

    def _refuse(self, node: RemoteNode, why: str, full: bool) -> None:
        self._refused = self._refused or full
        self._engine.refused(node, why)
        log.info(
            "engine node refused a stream: %s",
            why,
            extra={"call_id": self.call_id, "url": node.url},
        )

    def _decode(self, msg: aiohttp.WSMessage) -> wire.ServerMessage | None:
        if msg.type != aiohttp.WSMsgType.BINARY:
            return None
        try:
            return wire.decode_server(msg.data)
        except wire.WireError as exc:
            return wire.Error(str(exc))

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """Audio out, words in, until our flush comes back (returns why the stream ended)."""
        loop = asyncio.get_running_loop()
        sender = loop.create_task(self._send(ws))
        receiver = loop.create_task(self._read(ws))
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is None and task.result():
                return task.result()  # flushed, or the flush never came back
        failed = next((t.exception() for t in done if not t.cancelled() and t.exception()), None)
        why = f"stream dropped (close code {ws.close_code}{f', {failed}' if failed else ''})"
        self._engine.lost(self.node, why)
        self._engine.probe_soon(self.node)
        log.warning(
            "engine node dropped a live stream: its words so far are kept",
            extra={"call_id": self.call_id, "url": self.node.url},
        )
        return ENGINE_LOST

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """The node's messages; "flushed" once our closing flush is back, "" if it hung up."""
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue  # text frames are ignored, as moshi-server ignores them
            message = self._decode(msg)
            if isinstance(message, wire.Error):
                log.warning(
                    "engine node error: %s", message.message, extra={"call_id": self.call_id}
                )
            elif message is not None:
                self._receive(message)
            if self._done:
                return "flushed"
        return ""

    async def _send(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """Our audio in 80 ms messages, a progress marker every few, flushes when asked; while
        a flush is out, silence (moshi-server steps only the slots that have audio). Returns
        only if the closing flush does not come back in time."""
        silent_frame = wire.encode_audio(np.zeros(FRAME_SIZE, dtype=np.int16))
        await self._send_silence(ws, int(LEAD_SILENCE_S * SAMPLE_RATE))
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # of the closing flush
        while True:
            cut = self.closing or self._finalize  # the last short frame goes too
            while self.pending_samples >= FRAME_SIZE or (cut and self.pending_samples):
                gap = self._take_gap()  # dropped just before this frame: taken together
                pcm = self._take_pending(FRAME_SIZE)
                if gap:
                    self._timeline.skip_ours(gap)
                await ws.send_bytes(wire.encode_audio(pcm))
                self._timeline.add_ours(len(pcm))
                self._since_marker += 1
                if self._since_marker >= MARKER_EVERY:
                    await self._send_marker(ws, flush=False)
            if self._finalize or (self.closing and deadline is None):
                self._finalize = False
                await self._send_silence(ws, int(FLUSH_SILENCE_S * SAMPLE_RATE))
                await self._send_marker(ws, flush=True)
                if self.closing:
                    deadline = loop.time() + FLUSH_MAX_S
            if not self._flush_out:
                await self._wake.wait()
                self._wake.clear()
                continue
            if deadline is not None and loop.time() > deadline:
                log.warning("engine node never echoed the flush", extra={"call_id": self.call_id})
                return FLUSH_TIMEOUT
            try:
                await asyncio.wait_for(self._wake.wait(), KEEPALIVE_PACE_S)
                self._wake.clear()
            except TimeoutError:  # no audio of ours came: keep the model stepping
                await ws.send_bytes(silent_frame)
                self._timeline.add_silence(FRAME_SIZE)

    async def _send_silence(self, ws: aiohttp.ClientWebSocketResponse, samples: int) -> None:
        await ws.send_bytes(wire.encode_audio(np.zeros(samples, dtype=np.int16)))
        self._timeline.add_silence(samples)

    async def _send_marker(self, ws: aiohttp.ClientWebSocketResponse, flush: bool) -> None:
        marker_id = self._next_marker
        self._next_marker += 1
        self._since_marker = 0
        self._markers[marker_id] = _Marker(self._timeline.our_samples, self._taken, flush)
        if flush:
            self._flush_out += 1
            if self.closing:
                self._close_marker = marker_id
        await ws.send_bytes(wire.encode(wire.Marker(marker_id)))

    def _receive(self, message: wire.ServerMessage) -> None:
        turns = self._turns
        if isinstance(message, wire.Word):
            self._emit_all(turns.on_word(message))
        elif isinstance(message, wire.EndWord):
            self._emit_all(turns.on_end_word(message))
        elif isinstance(message, wire.Marker):
            marker = self._markers.pop(message.id, None)
            if marker is None:
                return
            if marker.flush:
                self._flush_out -= 1
                self._emit_all(turns.flush())
                self._done = message.id == self._close_marker
            else:
                self._emit_all(turns.on_progress(marker.ours / SAMPLE_RATE))
            self._settle(marker.position)
        elif isinstance(message, wire.Step) and self.on_model_step is not None:
            self.on_model_step(ModelStep(message.step_idx, message.prs, message.buffered_pcm))

    def _emit_all(self, events: list[EngineEvent]) -> None:
        for event in events:
            self._emit(event)

    def _end(self, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._emit_all(self._turns.flush())
        self._take_pending()
        self._emit(Closed(reason))
