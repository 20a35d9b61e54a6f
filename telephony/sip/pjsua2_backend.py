"""The PJSIP backend: pjsua2 (the `pjsua2-python` wheel) on its own thread.

PJSIP does the SIP and RTP (jitter buffer, G.711 decoding, OPTIONS, CANCEL, re-INVITE); each
call's decoded 8 kHz audio comes out of an `AudioMediaPort` and is handed to the event loop
with `call_soon_threadsafe`. Admission (allow-list, engine slot, the wheel's cap of
`PJSUA2_CALL_CAP` calls per process) is decided on the event loop by `core`, and the answer
goes back to the PJSIP thread as a command: PJSIP objects are only touched on that thread.
No SIPREC here: PJSIP answers one audio stream per call, so multipart offers get 488.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pjsua2 as pj

from api.config import SipConfig
from engine.base import BridgeError
from telephony.session import CallHub
from telephony.sip.backend import PJSUA2_CALL_CAP
from telephony.sip.core import (
    AllowList,
    LegPlan,
    SipCall,
    call_labels,
    sip_rejection,
)
from telephony.sip.sdp import NoCommonCodec

log = logging.getLogger(__name__)

Command = Callable[[], None]


class _AudioPort(pj.AudioMediaPort):  # type: ignore[misc]
    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        super().__init__()
        self.deliver = deliver

    def onFrameReceived(self, frame: Any) -> None:
        if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and frame.size:
            self.deliver(bytes(frame.buf))


class _Call(pj.Call):  # type: ignore[misc]
    def __init__(self, backend: Pjsua2Backend, account: Any, call_id: int) -> None:
        super().__init__(account, call_id)
        self.backend = backend
        self.sip_call: SipCall | None = None
        self.port: _AudioPort | None = None
        self.key = ""

    def onCallMediaState(self, prm: Any) -> None:
        info = self.getInfo()
        for index, media in enumerate(info.media):
            if media.type != pj.PJMEDIA_TYPE_AUDIO or self.port is not None:
                continue
            if media.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            fmt = pj.MediaFormatAudio()
            fmt.type = pj.PJMEDIA_TYPE_AUDIO
            fmt.clockRate = 8000
            fmt.channelCount = 1
            fmt.bitsPerSample = 16
            fmt.frameTimeUsec = 20000
            self.port = _AudioPort(self._audio)
            self.port.createPort(f"stt{self.getId()}", fmt)
            self.getAudioMedia(index).startTransmit(self.port)

    def _audio(self, data: bytes) -> None:
        sip_call = self.sip_call
        if sip_call is not None:
            pcm = np.frombuffer(data, dtype="<i2").astype(np.int16)
            self.backend.loop.call_soon_threadsafe(sip_call.feed_pcm, "caller", pcm)

    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            reason = "remote hangup" if info.lastStatusCode in (200, 0) else info.lastReason
            if info.lastStatusCode == 487:
                reason = "cancelled"
            self.backend.loop.call_soon_threadsafe(self.backend.ended, self.key, reason)


class _Account(pj.Account):  # type: ignore[misc]
    def __init__(self, backend: Pjsua2Backend) -> None:
        super().__init__()
        self.backend = backend

    def onIncomingCall(self, prm: Any) -> None:
        if prm.callId < 0:
            return  # PJSIP already refused it; Call(acc, -1) would abort the process
        call = _Call(self.backend, self, prm.callId)
        info = call.getInfo()
        call.key = info.callIdString
        self.backend.calls[call.key] = call
        message = prm.rdata.wholeMsg
        source = prm.rdata.srcAddress.rsplit(":", 1)
        offer = _sdp_kind(message)
        reply = pj.CallOpParam()
        reply.statusCode = 180
        call.answer(reply)
        # Only plain values cross to the event loop: a PJSIP object freed on a thread PJSIP
        # does not know aborts the process.
        self.backend.loop.call_soon_threadsafe(
            self.backend.admit, call.key, message, (source[0].strip("[]"), int(source[1])), offer
        )


def _sdp_kind(message: str) -> str:
    for line in message.split("\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() in ("content-type", "c"):
            return value.strip().lower()
    return ""


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
        self.calls: dict[str, _Call] = {}
        self.sip_calls: dict[str, SipCall] = {}
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._started: asyncio.Future[int] = self.loop.create_future()
        self._running = False
        self.port = 0

    @property
    def live_calls(self) -> int:
        return len(self.sip_calls)

    async def start(self) -> int:
        self._running = True
        self._thread = threading.Thread(target=self._run, name="pjsua2", daemon=True)
        self._thread.start()
        self.port = await self._started
        log.info("SIP user agent listening", extra={"port": self.port, "backend": self.name})
        return self.port

    async def stop(self) -> None:
        for key, sip_call in list(self.sip_calls.items()):
            self._post(functools.partial(self._hangup, key))
            await sip_call.end("shutdown")
        self._running = False
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # -- the PJSIP thread --

    def _run(self) -> None:
        ep = pj.Endpoint()
        try:
            ep.libCreate()
            ep_cfg = pj.EpConfig()
            ep_cfg.uaConfig.maxCalls = PJSUA2_CALL_CAP
            ep_cfg.uaConfig.threadCnt = 0  # events are polled on this thread only
            ep_cfg.uaConfig.mainThreadOnly = False
            ep_cfg.uaConfig.userAgent = self.config.user_agent
            ep_cfg.logConfig.level = 1
            ep_cfg.logConfig.consoleLevel = 1
            ep_cfg.medConfig.noVad = True
            ep.libInit(ep_cfg)
            for codec in ep.codecEnum2():  # G.711 only: anything else must end in 488
                keep = codec.codecId.split("/")[0] in ("PCMU", "PCMA")
                ep.codecSetPriority(codec.codecId, 200 if keep else 0)
            transport_cfg = pj.TransportConfig()
            transport_cfg.port = self.config.port
            if self.config.host not in ("", "0.0.0.0"):
                transport_cfg.boundAddress = self.config.host
                transport_cfg.publicAddress = self.config.advertised_host or self.config.host
            transport = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, transport_cfg)
            port = int(ep.transportGetInfo(transport).localName.rsplit(":", 1)[1])
            ep.audDevManager().setNullDev()
            ep.libStart()
            acc_cfg = pj.AccountConfig()
            acc_cfg.idUri = f"sip:stt-bridge@{self.config.advertised_host or '127.0.0.1'}"
            acc_cfg.mediaConfig.transportConfig.port = self.config.rtp_port_min
            acc_cfg.mediaConfig.transportConfig.portRange = (
                self.config.rtp_port_max - self.config.rtp_port_min
            )
            if self.config.host not in ("", "0.0.0.0"):
                acc_cfg.mediaConfig.transportConfig.boundAddress = self.config.host
            account = _Account(self)
            account.create(acc_cfg)
        except Exception as exc:
            self.loop.call_soon_threadsafe(self._started.set_exception, exc)
            return
        self.loop.call_soon_threadsafe(self._started.set_result, port)
        try:
            while self._running:
                ep.libHandleEvents(10)
                while True:
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        command()
                    except Exception:
                        log.exception("pjsua2 command failed")
        finally:
            ep.hangupAllCalls()
            for _ in range(20):
                ep.libHandleEvents(10)
            for key in list(self.calls):
                self._forget(key)
            del account
            gc.collect()  # free every PJSIP object here, on its own thread, before libDestroy
            ep.libDestroy()

    def _post(self, command: Command) -> None:
        self._commands.put(command)

    def _answer(self, key: str, status: int, reason: str = "") -> None:
        call = self.calls.get(key)
        if call is None:
            return
        prm = pj.CallOpParam()
        prm.statusCode = status
        if reason:
            prm.reason = reason
        if status >= 300:
            call.hangup(prm)
        else:
            call.answer(prm)

    def _attach(self, key: str, sip_call: SipCall) -> None:
        call = self.calls.get(key)
        if call is not None:
            call.sip_call = sip_call

    def _forget(self, key: str) -> None:
        call = self.calls.pop(key, None)
        if call is not None:  # break the call <-> port cycle: it must not reach the GC later
            call.sip_call = None
            call.port = None

    def _hangup(self, key: str) -> None:
        call = self.calls.get(key)
        if call is not None:
            call.hangup(pj.CallOpParam(True))

    # -- the event loop --

    def admit(self, key: str, message: str, source: tuple[str, int], content: str) -> None:
        try:
            self.allow.check(source[0])
            if content.startswith("multipart/"):
                raise NoCommonCodec("SIPREC (multipart offers) is not supported by pjsua2")
            if len(self.sip_calls) >= PJSUA2_CALL_CAP:
                from engine.base import EngineFull

                raise EngineFull(f"pjsua2 carries at most {PJSUA2_CALL_CAP} calls per process")
            labels = call_labels(_headers(message), source)
            legs = [LegPlan("caller", {}, None)]
            sip_call = SipCall(
                self.hub,
                self.config,
                key,
                legs,
                labels,
                lambda: self._post(lambda: self._hangup(key)),
            )
        except BridgeError as exc:
            reject = sip_rejection(exc, self.config)
            log.info("SIP call rejected %d: %s", reject.status, exc, extra={"call_id": key})
            self._post(lambda: self._answer(key, reject.status, reject.reason))
            return
        self.sip_calls[key] = sip_call
        self._post(functools.partial(self._attach, key, sip_call))

        async def answer() -> None:
            if self.config.answer_delay_s > 0:
                await asyncio.sleep(self.config.answer_delay_s)
            if not sip_call.ended:
                self._post(lambda: self._answer(key, 200))
                sip_call.answered()

        self.loop.create_task(answer())

    def ended(self, key: str, reason: str) -> None:
        sip_call = self.sip_calls.pop(key, None)
        self._post(functools.partial(self._forget, key))
        if sip_call is not None:
            self.loop.create_task(sip_call.end(reason))
