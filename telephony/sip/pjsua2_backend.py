"""The PJSIP backend, service side: admission here, PJSIP in its own agent process.

The agent (`pjsua2_agent`, spawned) runs the `pjsua2-python` wheel: SIP, RTP, jitter buffer and
G.711 decoding. It reports each INVITE, each call's 8 kHz audio and its events over a pipe
(`pjsua2_messages`); admission (allow-list, digest, engine slot, the wheel's cap of
`PJSUA2_CALL_CAP` calls per process) is decided here, on the event loop, and the answer goes
back as a command. This process never imports pjsua2, so a fault in PJSIP ends only the SIP
calls (their transcripts kept, reason "sip agent failed"), and a new agent takes the port.
No SIPREC here: PJSIP answers one audio stream per call, so multipart offers get 488.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import threading
from multiprocessing.connection import Connection
from typing import Any

from engine.base import BridgeError, EngineFull
from telephony.audio import pcm16_decode
from telephony.call import CallHub
from telephony.sip import digest
from telephony.sip import pjsua2_messages as msg
from telephony.sip.config import PJSUA2_CALL_CAP, SipConfig
from telephony.sip.core import (
    AllowList,
    LegPlan,
    SipCall,
    authorized,
    call_labels,
    sip_rejection,
)
from telephony.sip.sdp import NoCommonCodec

AGENT_START_TIMEOUT_S = 30.0
AGENT_STOP_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


class AgentFailed(RuntimeError):
    """The PJSIP agent process did not start, or died."""


def _headers(message: str) -> list[tuple[str, str]]:
    head = message.replace("\r\n", "\n").split("\n\n", 1)[0]
    out: list[tuple[str, str]] = []
    for line in head.split("\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out.append((name.strip(), value.strip()))
    return out


class Pjsua2Backend:
    name: str = "pjsua2"
    call_cap: int | None = PJSUA2_CALL_CAP
    siprec: bool = False

    def __init__(self, config: SipConfig, hub: CallHub) -> None:
        self.config = config
        self.hub = hub
        self.allow = AllowList(config.allow)
        self.loop = asyncio.get_running_loop()
        self.sip_calls: dict[str, SipCall] = {}
        self.nonces = digest.NonceBook()
        self.port = 0
        self.restarts = 0  # agents started after one died
        self._agent: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._started: asyncio.Future[int] | None = None
        self._stopping = False

    @property
    def live_calls(self) -> int:
        return len(self.sip_calls)

    @property
    def agent_pid(self) -> int | None:
        return None if self._agent is None else self._agent.pid

    def status(self) -> dict[str, Any]:
        return {"agent_pid": self.agent_pid, "agent_restarts": self.restarts}

    async def start(self) -> int:
        self.port = await self._start_agent(self.config)
        log.info("SIP user agent listening", extra={"port": self.port, "backend": self.name})
        return self.port

    async def stop(self) -> None:
        self._stopping = True
        for key, sip_call in list(self.sip_calls.items()):
            self._send(msg.Hangup(key))
            await sip_call.end("shutdown")
        self._send(msg.Stop())
        await self._reap()

    # -- the agent process --

    async def _start_agent(self, config: SipConfig) -> int:
        # spawn, not fork: this process has threads (and maybe torch) that fork copies badly.
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        agent = context.Process(
            target=_agent_main,
            args=(config, PJSUA2_CALL_CAP, theirs),
            name="stt-bridge-pjsua2",
            daemon=True,  # never outlives the service
        )
        agent.start()
        theirs.close()  # the agent's end: ours reads EOF once the agent is gone
        self._agent, self._conn = agent, ours
        self._started = self.loop.create_future()
        self._reader = threading.Thread(
            target=self._read, args=(ours,), name="pjsua2-pipe", daemon=True
        )
        self._reader.start()
        try:
            return await asyncio.wait_for(self._started, AGENT_START_TIMEOUT_S)
        except BaseException:
            self._stopping = True
            await self._reap()
            raise

    def _read(self, conn: Connection) -> None:
        """The pipe reader thread: every message goes to the event loop, in order."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            self._to_loop(self._on_message, message)
        self._to_loop(self._agent_gone, conn)

    def _to_loop(self, function: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is left to tell
            self.loop.call_soon_threadsafe(function, *args)

    def _send(self, command: msg.Command) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(OSError):  # the agent is gone: _agent_gone ends its calls
            self._conn.send(command)

    async def _reap(self) -> None:
        agent, reader = self._agent, self._reader
        if agent is not None:
            await asyncio.to_thread(agent.join, AGENT_STOP_TIMEOUT_S)
            if agent.is_alive():
                log.error("the pjsua2 agent did not stop: killing it", extra={"pid": agent.pid})
                agent.kill()
                await asyncio.to_thread(agent.join, AGENT_STOP_TIMEOUT_S)
            if agent.exitcode:
                log.error("the pjsua2 agent exited with %s", agent.exitcode)
        if reader is not None:
            await asyncio.to_thread(reader.join, AGENT_STOP_TIMEOUT_S)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _agent_gone(self, conn: Connection) -> None:
        if conn is not self._conn:
            return  # an earlier agent's reader, finishing late
        if self._starting():
            exitcode = None if self._agent is None else self._agent.exitcode
            self._started_with(AgentFailed(f"the pjsua2 agent exited ({exitcode})"))
            return
        if self._stopping:
            return
        log.error("the pjsua2 agent died: ending its calls and starting a new one")
        calls, self.sip_calls = list(self.sip_calls.values()), {}
        for sip_call in calls:
            self.loop.create_task(sip_call.end("sip agent failed"))
        self.loop.create_task(self._restart())

    async def _restart(self) -> None:
        await self._reap()
        self.restarts += 1
        try:
            # The same port as before, even where the config asked for any (0).
            await self._start_agent(dataclasses.replace(self.config, port=self.port))
        except Exception as exc:
            log.error("the pjsua2 agent could not be restarted: %s", exc)

    def _on_message(self, message: msg.AgentMessage) -> None:
        match message:
            case msg.Audio(key, pcm):
                if (sip_call := self.sip_calls.get(key)) is not None:
                    sip_call.feed_pcm("caller", pcm16_decode(pcm))
            case msg.MediaSeen(key):
                if (sip_call := self.sip_calls.get(key)) is not None:
                    sip_call.media_seen()
            case msg.Hold(key, held):
                if (sip_call := self.sip_calls.get(key)) is not None:
                    sip_call.set_hold(held)
            case msg.Dtmf(key, digit):
                if (sip_call := self.sip_calls.get(key)) is not None:
                    sip_call.dtmf("caller", digit)
            case msg.Incoming(key, sip_call_id, message_text, source):
                self.admit(key, sip_call_id, message_text, source)
            case msg.Ended(key, reason):
                self.ended(key, reason)
            case msg.Registered(status, reason):
                log.info("registration: %d %s", status, reason)
            case msg.Started(port):
                self._started_with(port)
            case msg.StartFailed(error):
                self._started_with(AgentFailed(error))

    def _starting(self) -> bool:
        return self._started is not None and not self._started.done()

    def _started_with(self, outcome: int | AgentFailed) -> None:
        """The agent's start-up is over: its port, or why it failed (only the first counts)."""
        if self._started is None or self._started.done():
            return
        if isinstance(outcome, AgentFailed):
            self._started.set_exception(outcome)
        else:
            self._started.set_result(outcome)

    # -- admission, on the event loop --

    def admit(self, key: str, sip_call_id: str, message: str, source: tuple[str, int]) -> None:
        headers = _headers(message)
        content = next((v.lower() for n, v in headers if n.lower() in ("content-type", "c")), "")
        try:
            self.allow.check(source[0])
            if self.config.auth_user and not self._authorized(headers):
                challenge = digest.challenge(self.config.auth_realm, self.nonces.issue())
                log.info("SIP call challenged (401)", extra={"call_id": sip_call_id})
                self._send(msg.Answer(key, 401, "Unauthorized", (("WWW-Authenticate", challenge),)))
                return
            if content.startswith("multipart/"):
                raise NoCommonCodec("SIPREC (multipart offers) is not supported by pjsua2")
            if len(self.sip_calls) >= PJSUA2_CALL_CAP:
                raise EngineFull(f"pjsua2 carries at most {PJSUA2_CALL_CAP} calls per process")
            labels = call_labels(headers, source)
            legs = [LegPlan("caller", {}, None)]
            sip_call = SipCall(
                self.hub,
                self.config,
                sip_call_id,
                legs,
                labels,
                lambda: self._send(msg.Hangup(key)),
            )
        except BridgeError as exc:
            reject = sip_rejection(exc, self.config)
            log.info("SIP call rejected %d: %s", reject.status, exc, extra={"call_id": sip_call_id})
            headers_out = tuple(reject.headers.items())
            self._send(msg.Answer(key, reject.status, reject.reason, headers_out))
            return
        self.sip_calls[key] = sip_call
        self._send(msg.Attach(key))
        self._send(msg.Answer(key, 180))  # admitted: now it rings

        async def answer() -> None:
            if self.config.answer_delay_s > 0:
                await asyncio.sleep(self.config.answer_delay_s)
            if not sip_call.ended:
                self._send(msg.Answer(key, 200))
                sip_call.answered()

        self.loop.create_task(answer())

    def _authorized(self, headers: list[tuple[str, str]]) -> bool:
        """True; or False: challenge (401); wrong credentials raise Forbidden (403)."""
        header = next((v for n, v in headers if n.lower() == "authorization"), None)
        return authorized(header, self.config, self.nonces)

    def ended(self, key: str, reason: str) -> None:
        sip_call = self.sip_calls.pop(key, None)
        if sip_call is not None:
            self.loop.create_task(sip_call.end(reason))


def _agent_main(config: SipConfig, max_calls: int, conn: Connection) -> None:
    """The agent process's target: pjsua2 is imported there, never in the service."""
    from telephony.sip import pjsua2_agent

    pjsua2_agent.main(config, max_calls, conn)
