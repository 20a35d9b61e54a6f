"""Many nodes on one PostgreSQL store: every node's live events on every node, and the lease.

Two threads, each with its own connection, start and stop with the service:

- `cluster-listen` LISTENs on `EVENTS_CHANNEL`. The store's writer NOTIFYs each event it commits
  (in the same transaction, so the words are in the database before anyone hears of them; long
  events come in chunks, NOTIFY payloads stay under 8000 bytes). An event from another node is
  relayed to this node's live subscribers (`WS /v1/events`, `WS /v1/calls/{id}/events`) only:
  the node that took the call already stored it and counted it.
- `cluster-lease` renews this node's lease every `lease_s / 4` (`Store.heartbeat`), and marks
  the live calls of any node whose lease ran out `interrupted`, keeping their words; those ends
  reach every node's live view like any other event.

`remote_live` holds the calls live on other nodes, so a `/v1/events` opened mid-call starts with
them as it starts with this node's own.

PostgreSQL going away takes the channel with it, and a notification sent while this node was
not listening is lost for good (the other node's writer may commit its waiting events before
this one listens again). So each relayed event carries its `events.id`, and once the listener
is back it reads from the store what other nodes wrote since it lost the channel: calls that
started or ended, and every stored event past the last one it relayed per call. Notifications
that repeat what it read are dropped (`Relayed`). This node's own subscribers never depend on
the channel: its bus tells them directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any, Final

import psycopg

from api.store import DB_ERRORS, EVENTS_CHANNEL, Store
from engine.base import Closed, EndOfTurn, EngineEvent, Partial, Segment, Word
from telephony.bus import (
    AudioDropped,
    BusEvent,
    CallEnded,
    CallStarted,
    DtmfPressed,
    EventBus,
    LegEvent,
)

log = logging.getLogger(__name__)

LISTEN_POLL_S: Final = 0.5  # how often the listener looks up from its socket to see if it must stop
RECONNECT_S: Final = 1.0
# What the relay read back after a lost channel starts this long before it last heard the
# channel: notifications already on the wire when it broke are lost with it.
CATCH_UP_MARGIN_S: Final = 5.0
RELAYED_KEEP_S: Final = 600.0  # an ended call's relay state, kept against late repeats


def _word(d: dict[str, Any]) -> Word:
    return Word(d["text"], d["start"], d["end"], d.get("confidence"))


def _engine_event(d: dict[str, Any]) -> EngineEvent:
    kind = d["type"]
    if kind == "word":
        return _word(d)
    if kind == "segment":
        words = tuple(_word(w) for w in d["words"])
        return Segment(d["text"], d["start"], d["end"], words, d.get("confidence"))
    if kind == "partial":
        return Partial(d["text"], d["start"], d["end"])
    if kind == "end_of_turn":
        return EndOfTurn(d["at"], d["probability"])
    return Closed(d["reason"])


def bus_event_from_json(d: dict[str, Any]) -> BusEvent:
    """The inverse of `telephony.bus.bus_event_to_json`."""
    kind = d["type"]
    if kind == "call_started":
        return CallStarted(d["call_id"], d["front_end"], tuple(d["legs"]), d["labels"], d["at"])
    if kind == "call_ended":
        dropped = d.get("dropped_s", 0.0)  # a node of an earlier version does not say
        return CallEnded(d["call_id"], d["front_end"], d["reason"], d["at"], d["audio_s"], dropped)
    if kind == "audio_dropped":
        return AudioDropped(d["call_id"], d["leg"], d["at"], d["dropped_s"])
    if kind == "dtmf":
        return DtmfPressed(d["call_id"], d["leg"], d["digit"], d["at"])
    return LegEvent(d["call_id"], d["leg"], _engine_event(d))


class Reassembly:
    """NOTIFY payloads (`sender seq index count chunk`) back into whole events."""

    def __init__(self, own_node: str) -> None:
        self.own_node = own_node
        self._parts: dict[tuple[str, str], list[str]] = {}

    def feed(self, payload: str) -> dict[str, Any] | None:
        """The event this payload completes, if it is another node's; else None."""
        sender, seq, index, count, chunk = payload.split(" ", 4)
        if sender in (self.own_node, f"{self.own_node}/lease"):
            return None  # this node's own writer or lease: relayed here already
        if count == "1":
            parsed: dict[str, Any] = json.loads(chunk)
            return parsed
        parts = self._parts.setdefault((sender, seq), [])
        if int(index) != len(parts):  # a chunk lost (a reconnect): drop the event
            self._parts.pop((sender, seq), None)
            return None
        parts.append(chunk)
        if len(parts) < int(count):
            return None
        del self._parts[(sender, seq)]
        whole: dict[str, Any] = json.loads("".join(parts))
        return whole


class Relayed:
    """What the relay has shown of other nodes' calls, so an event read back from the store
    after a lost channel and the same event notified later are shown once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the listener thread; the snapshot at start
        self.live: set[str] = set()
        self.rows: dict[str, int] = {}  # the last `events.id` shown per call
        self.ended: dict[str, float] = {}  # calls whose end was shown (monotonic time)

    def started_elsewhere(self, call_id: str) -> None:
        with self._lock:
            self.live.add(call_id)

    def fresh(self, event: BusEvent, row: int | None) -> bool:
        """Whether `event` is new to this node's views (and now counted as shown)."""
        call_id = event.call_id
        with self._lock:
            if isinstance(event, CallStarted):
                if call_id in self.live:
                    return False
                self.live.add(call_id)
                self.ended.pop(call_id, None)
                return True
            if isinstance(event, CallEnded):
                if call_id in self.ended and call_id not in self.live:
                    return False
                self.live.discard(call_id)
                self._forget_old()
                self.ended[call_id] = time.monotonic()
                return True
            if row is not None:
                if row <= self.rows.get(call_id, 0):
                    return False
                self.rows[call_id] = row
            return True

    def done(self, call_id: str) -> bool:
        """Its end was shown and it is not live again: nothing of it is left to read back."""
        with self._lock:
            return call_id in self.ended and call_id not in self.live

    def last_row(self, call_id: str) -> int:
        with self._lock:
            return self.rows.get(call_id, 0)

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - RELAYED_KEEP_S
        for call_id in [c for c, at in self.ended.items() if at < cutoff]:
            del self.ended[call_id]
            self.rows.pop(call_id, None)


def stored_event(call_id: str, leg: str, payload: dict[str, Any]) -> BusEvent:
    """A row of `events` (its payload) as the bus event that wrote it."""
    if payload["type"] == "dtmf":
        return DtmfPressed(call_id, leg, payload["digit"], payload["at"])
    return LegEvent(call_id, leg, _engine_event(payload))


class Cluster:
    def __init__(self, store: Store, bus: EventBus) -> None:
        assert store.postgres, "a cluster needs the PostgreSQL store (data.url)"
        self.store = store
        self.bus = bus
        self.remote_live: dict[str, CallStarted] = {}
        self.relayed = 0  # other nodes' events shown here (metrics, tests)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._listening = threading.Event()
        self._shown = Relayed()
        self.caught_up = 0  # events read back from the store after a lost channel (tests)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # The lease is renewed before this node takes a call: the one Store took at its start
        # may have run out while the engine loaded (a model takes longer than `lease_s`), and
        # a node whose calls are live must not look dead for the first period.
        self._renew(sweep=False)  # dead nodes are the lease thread's, once views are open
        self._threads = [
            threading.Thread(target=self._listen, name="cluster-listen", daemon=True),
            threading.Thread(target=self._lease, name="cluster-lease", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._listening.wait(10)  # LISTEN is on before the snapshot: no event falls between
        for call in self.store.live_calls_elsewhere():
            self.remote_live[call.id] = CallStarted(
                call.id, call.front_end, tuple(call.legs), call.labels, call.started_at
            )
            self._shown.started_elsewhere(call.id)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    # -- on the event loop --

    def _relay(self, event: BusEvent) -> None:
        if isinstance(event, CallStarted):
            self.remote_live[event.call_id] = event
        elif isinstance(event, CallEnded):
            self.remote_live.pop(event.call_id, None)
        self.relayed += 1
        self.bus.relay(event)

    def _to_loop(self, event: BusEvent) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._relay, event)
        except RuntimeError:  # the loop has closed: the service is stopping
            self._stop.set()

    # -- threads --

    def _listen(self) -> None:
        reassembly = Reassembly(self.store.node_id)
        heard_at = 0.0  # wall clock: when the channel last answered
        lost_at: float | None = None  # when the channel was lost; None while it is not
        while not self._stop.is_set():
            try:
                with psycopg.connect(str(self.store.location), autocommit=True) as db:
                    db.execute(f"LISTEN {EVENTS_CHANNEL}")
                    if lost_at is not None:  # listening again: what was missed is in the store
                        self._catch_up(lost_at)
                        log.warning("cluster: event channel back; missed events read back")
                        lost_at = None
                    self._listening.set()
                    while not self._stop.is_set():
                        heard_at = time.time()
                        for note in db.notifies(timeout=LISTEN_POLL_S):
                            data = reassembly.feed(note.payload)
                            if data is None:
                                continue
                            event = bus_event_from_json(data)
                            if self._shown.fresh(event, data.get("row")):
                                self._to_loop(event)
            except DB_ERRORS as exc:
                if lost_at is None:
                    lost_at = (heard_at or time.time()) - CATCH_UP_MARGIN_S
                    log.error("cluster: lost the event channel; reconnecting: %s", exc)
                self._stop.wait(RECONNECT_S)

    def _catch_up(self, since: float) -> None:
        """Other nodes' events the channel did not bring while it was away, from the store, in
        the order they were written, each call's start before its words and its end after."""
        for call in self.store.calls_elsewhere_since(since):
            if self._shown.done(call.id):
                continue
            started = CallStarted(
                call.id, call.front_end, tuple(call.legs), call.labels, call.started_at
            )
            if self._shown.fresh(started, None):
                self._to_loop(started)
            for row, leg, payload in self.store.rows_after(call.id, self._shown.last_row(call.id)):
                event = stored_event(call.id, leg, payload)
                if self._shown.fresh(event, row):
                    self.caught_up += 1
                    self._to_loop(event)
            if call.status != "live" and call.ended_at is not None:
                ended = CallEnded(
                    call.id, call.front_end, call.reason or "", call.ended_at, {}, call.dropped_s
                )
                if self._shown.fresh(ended, None):
                    self._to_loop(ended)

    def _lease(self) -> None:
        """On its own thread, so an event loop kept busy (a long step, a GC pass, a burst of
        calls) cannot make this node look dead: Python hands the GIL over every few ms."""
        period = self.store.lease_s / 4
        while not self._stop.wait(period):
            self._renew()

    def _renew(self, sweep: bool = True) -> None:
        was_away = bool(self.store.lease_problem)
        try:
            ended = self.store.heartbeat(sweep)  # a dropped connection is opened again there
        except DB_ERRORS as exc:
            if not was_away:  # once per outage: it is tried every lease_s / 4
                log.error("cluster: heartbeat failed: %s", exc)
            return
        for event in ended:  # a dead node's calls: this node's own view hears it here
            self._to_loop(event)
