"""PJSIP (the `pjsua2-python` wheel) in a process of its own: the pjsua2 backend's agent.

PJSIP does the SIP and RTP (jitter buffer, G.711 decoding, OPTIONS, CANCEL, re-INVITE); each
call's decoded 8 kHz audio comes out of an `AudioMediaPort` and goes to the service over the
pipe, with every other event, as a `pjsua2_messages` dataclass. The service decides admission
and answers with commands. Why a process: PJSIP is C, and a fault in it (or in freeing one of
its objects on the wrong thread, after libDestroy) kills the whole process; here it kills
only this one, whose calls the service then ends with their transcripts kept.

`main` runs the endpoint on this process's main thread and polls the pipe between events;
PJSIP's media clock thread also sends (audio), so sends take a lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import functools
import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import pjsua2 as pj

from engine.children import exit_with_parent
from telephony.sip import pjsua2_messages as msg
from telephony.sip.config import SipConfig

STATS_EVERY_S = 0.25  # how often each call's RTP packet count is read
POLL_MS = 10  # the longest PJSIP waits for network events before the pipe is read again
JITTER_BUFFER_MS = 200  # network jitter a call absorbs without its timeline moving
JITTER_BUFFER_MAX_MS = 2000  # a burst beyond this is dropped
CLOCK_RATE = 8000  # G.711's: the bridge resamples nothing (see Agent._start)
JB_DISCARD_NONE = 0  # pjmedia_jb_discard_algo: NONE, STATIC, PROGRESSIVE (the default)

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., None])


def _callback(method: F) -> F:
    """PJSIP calls these from C++: an exception escaping one aborts the whole process."""

    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            method(*args, **kwargs)
        except Exception as exc:
            log.error("pjsua2 callback %s failed: %s", method.__name__, _describe(exc))

    return guarded  # type: ignore[return-value]


def _describe(exc: BaseException) -> str:
    """The error as text for a log record, never the exception: its traceback's frames hold
    PJSIP objects, which a kept record would free later on another thread, after libDestroy."""
    return repr(exc)


def _jitter_buffer_for_transcription(media: Any) -> None:
    """PJSIP's jitter buffer is tuned for playback: a shallow buffer that runs dry on a burst
    of jitter (each underflow inserts silence, so every later word is late by the stall) and
    a progressive discard that drops real audio to keep latency low (later words early, some
    lost). Transcription wants the caller's audio whole and on its timeline more than it wants
    200 ms less latency: prefetch JITTER_BUFFER_MS, keep up to JITTER_BUFFER_MAX_MS, discard
    nothing.
    """
    media.jbInit = media.jbMinPre = JITTER_BUFFER_MS
    media.jbMax = JITTER_BUFFER_MAX_MS
    # The wheel's SWIG binding has no constants for pjmedia_jb_discard_algo and takes only a
    # pointer to one: write PJMEDIA_JB_DISCARD_NONE (0) into the copy its getter hands out.
    algo = media.jbDiscardAlgo
    ctypes.c_int.from_address(int(algo)).value = JB_DISCARD_NONE
    media.jbDiscardAlgo = algo


class _Pipe:
    """The agent's end of the pipe; sends come from PJSIP's thread and its media clock."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self.broken = False

    def send(self, message: msg.AgentMessage) -> None:
        with self._lock:
            if self.broken:
                return
            try:
                self.conn.send(message)
            except OSError:  # the service is gone: the main loop stops on its next read
                self.broken = True


def _unwanted(pcm: bytes) -> None:
    """A spare port's audio: its call is over (a frame may still come as the bridge unlinks it)."""


class _AudioPort(pj.AudioMediaPort):  # type: ignore[misc]
    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        super().__init__()
        self.deliver = deliver

    @_callback
    def onFrameReceived(self, frame: Any) -> None:
        if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and frame.size:
            self.deliver(bytes(frame.buf))


class _Call(pj.Call):  # type: ignore[misc]
    def __init__(self, agent: Agent, account: Any, call_id: int, key: str) -> None:
        super().__init__(account, call_id)
        self.agent = agent
        self.key = key
        self.attached = False  # admitted by the service: its audio and events are wanted
        self.port: _AudioPort | None = None
        self.audio_index: int | None = None
        self.rx_packets = 0
        self.heard = False  # a frame with sound has come

    @_callback
    def onCallMediaState(self, prm: Any) -> None:
        info = self.getInfo()
        for index, media in enumerate(info.media):
            if media.type != pj.PJMEDIA_TYPE_AUDIO:
                continue
            # A re-INVITE with sendonly/inactive/0.0.0.0: no RTP is due until it ends.
            held = media.status in (pj.PJSUA_CALL_MEDIA_REMOTE_HOLD, pj.PJSUA_CALL_MEDIA_NONE)
            if self.attached:
                self.agent.pipe.send(msg.Hold(self.key, held))
            if self.port is not None or media.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            self.audio_index = index
            self.port = self.agent.audio_port(self._audio)
            self.getAudioMedia(index).startTransmit(self.port)

    def _audio(self, pcm: bytes) -> None:
        if not self.attached:
            return
        if not self.heard:
            # PJSIP's media clock runs from the answer and plays digital silence until the
            # first packet is decoded: the leg's timeline starts at the first sound. At its
            # first sample, not at the clock tick's frame that holds it: where in a frame the
            # caller's audio begins is chance, and a recogniser can hear the same words
            # differently shifted by 5 ms.
            sound_at = len(pcm) - len(pcm.lstrip(b"\0"))
            if sound_at == len(pcm):
                return
            pcm = pcm[sound_at // 2 * 2 :]  # whole 16-bit samples
            self.heard = True
        self.agent.pipe.send(msg.Audio(self.key, pcm))

    @_callback
    def onDtmfDigit(self, prm: Any) -> None:
        if self.attached:
            self.agent.pipe.send(msg.Dtmf(self.key, str(prm.digit)))

    def poll_rtp(self) -> None:
        """PJSIP's media clock delivers frames (silence) with no RTP at all, so the RTP timeout
        watches the stream's received-packet count instead."""
        if not self.attached or self.audio_index is None:
            return
        packets = int(self.getStreamStat(self.audio_index).rtcp.rxStat.pkt)
        if packets != self.rx_packets:
            self.rx_packets = packets
            self.agent.pipe.send(msg.MediaSeen(self.key))

    @_callback
    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            reason = "remote hangup" if info.lastStatusCode in (200, 0) else info.lastReason
            if info.lastStatusCode == 487:
                reason = "cancelled"
            self.agent.pipe.send(msg.Ended(self.key, reason))
            # Let go of this object now, in its DISCONNECTED callback, where pjsua2 allows it:
            # its C++ destructor hangs up whatever call holds its pjsua id and takes that
            # call's callbacks away. Freed later (once the service had answered Ended), the
            # id could already belong to the next call, which then ended without a word.
            self.agent.forget(self.key)


class _Account(pj.Account):  # type: ignore[misc]
    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.agent = agent

    @_callback
    def onRegState(self, prm: Any) -> None:
        self.agent.pipe.send(msg.Registered(int(prm.code), str(prm.reason)))

    @_callback
    def onIncomingCall(self, prm: Any) -> None:
        if prm.callId < 0:
            return  # PJSIP already refused it; Call(acc, -1) would abort the process
        key = str(next(self.agent.keys))
        call = _Call(self.agent, self, prm.callId, key)
        self.agent.calls[key] = call
        message = str(prm.rdata.wholeMsg)
        host, _, port = str(prm.rdata.srcAddress).rpartition(":")
        self.agent.pipe.send(
            msg.Incoming(
                key,
                str(call.getInfo().callIdString),
                message,
                (host.strip("[]"), int(port)),
            )
        )


class Agent:
    """One PJSIP endpoint and its calls; every method runs on this process's main thread."""

    def __init__(self, config: SipConfig, max_calls: int, pipe: _Pipe) -> None:
        self.config = config
        self.max_calls = max_calls
        self.pipe = pipe
        self.calls: dict[str, _Call] = {}
        self.keys = itertools.count()
        self.spare_ports: list[_AudioPort] = []  # see audio_port
        self.port_names = itertools.count()
        self.running = True

    def run(self) -> None:
        ep = pj.Endpoint()
        try:
            ep.libCreate()
            port = self._start(ep)
            account = _Account(self)
            account.create(self._account_config())
        except Exception as exc:
            error = _describe(exc)
            del exc  # its frames hold PJSIP objects: free them before libDestroy
            with contextlib.suppress(Exception):
                ep.libDestroy()
            self.pipe.send(msg.StartFailed(f"pjsua2 did not start: {error}"))
            return
        self.pipe.send(msg.Started(port))
        try:
            self._serve(ep)
        finally:
            if self.config.register_uri:
                with contextlib.suppress(Exception):
                    account.setRegistration(False)  # unregister (Expires: 0)
            ep.hangupAllCalls()
            for _ in range(20):
                ep.libHandleEvents(POLL_MS)
            # Stop the media clock (the null device's thread) before the media ports go: one
            # freed while the conference bridge still calls into it crashes the process.
            with contextlib.suppress(Exception):
                ep.audDevManager().setNoDev()
            for key in list(self.calls):
                self.forget(key)
            self.spare_ports.clear()
            del account
            gc.collect()  # free every PJSIP object now, before libDestroy
            ep.libDestroy()

    def _start(self, ep: Any) -> int:
        ep_cfg = pj.EpConfig()
        ep_cfg.uaConfig.maxCalls = self.max_calls
        ep_cfg.uaConfig.threadCnt = 0  # events are polled on this thread only
        ep_cfg.uaConfig.mainThreadOnly = False
        ep_cfg.uaConfig.userAgent = self.config.user_agent
        ep_cfg.logConfig.level = 1
        ep_cfg.logConfig.consoleLevel = 1
        ep_cfg.medConfig.noVad = True
        # The conference bridge at G.711's own rate. At PJSUA's default 16 kHz every frame was
        # resampled twice (8 to 16 kHz into the bridge, 16 to 8 kHz out to our port): an error
        # 27 dB below the caller's speech, which a recogniser hears. At 8 kHz the port gets
        # the decoded G.711 samples as they came (measured on a 3.6 s call: every one of them
        # but 31 in its last packet).
        ep_cfg.medConfig.clockRate = CLOCK_RATE
        _jitter_buffer_for_transcription(ep_cfg.medConfig)
        ep.libInit(ep_cfg)
        for codec in ep.codecEnum2():  # G.711 only: anything else must end in 488
            keep = codec.codecId.split("/")[0] in ("PCMU", "PCMA")
            ep.codecSetPriority(codec.codecId, 200 if keep else 0)
        port = self._transports(ep)
        ep.audDevManager().setNullDev()
        ep.libStart()
        return port

    def _account_config(self) -> Any:
        acc_cfg = pj.AccountConfig()
        acc_cfg.idUri = f"sip:stt-bridge@{self.config.advertised_host or '127.0.0.1'}"
        acc_cfg.mediaConfig.transportConfig.port = self.config.rtp_port_min
        acc_cfg.mediaConfig.transportConfig.portRange = (
            self.config.rtp_port_max - self.config.rtp_port_min
        )
        if self.config.host not in ("", "0.0.0.0"):
            acc_cfg.mediaConfig.transportConfig.boundAddress = self.config.host
        if self.config.register_uri:
            self._registration(acc_cfg)
        return acc_cfg

    def _serve(self, ep: Any) -> None:
        next_poll = time.monotonic()
        while self.running:
            ep.libHandleEvents(POLL_MS)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + STATS_EVERY_S
                self._poll_rtp()
            try:
                while self.running and self.pipe.conn.poll():
                    self._obey(self.pipe.conn.recv())
            except (EOFError, OSError):  # the service is gone: end its calls and exit
                self.running = False

    def _obey(self, command: msg.Command) -> None:
        try:
            match command:
                case msg.Answer(key, status, reason, headers):
                    self._answer(key, status, reason, headers)
                case msg.Attach(key):
                    if (call := self.calls.get(key)) is not None:
                        call.attached = True
                case msg.Hangup(key):
                    if (call := self.calls.get(key)) is not None:
                        call.hangup(pj.CallOpParam(True))
                case msg.Stop():
                    self.running = False
        except Exception as exc:  # the call ended meanwhile, for one
            log.error("pjsua2 command %r failed: %s", command, _describe(exc))

    def _transports(self, ep: Any) -> int:
        """UDP, and TCP on the same port; with port 0, retry until both get one."""
        for attempt in range(10):
            cfg = pj.TransportConfig()
            cfg.port = self.config.port
            if self.config.host not in ("", "0.0.0.0"):
                cfg.boundAddress = self.config.host
                cfg.publicAddress = self.config.advertised_host or self.config.host
            udp = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, cfg)
            port = int(ep.transportGetInfo(udp).localName.rsplit(":", 1)[1])
            if not self.config.tcp:
                return port
            cfg.port = port
            try:
                ep.transportCreate(pj.PJSIP_TRANSPORT_TCP, cfg)
            except pj.Error:
                if self.config.port != 0 or attempt == 9:
                    raise
                ep.transportClose(udp)  # that number is taken for TCP: try another
                continue
            return port
        raise AssertionError("unreachable")

    def _poll_rtp(self) -> None:
        # Its own frame: a `Call` left in a local of `run` would outlive libDestroy.
        for call in list(self.calls.values()):
            try:
                call.poll_rtp()
            except Exception:  # the call ended between the list and the read
                continue

    def _registration(self, acc_cfg: Any) -> None:
        """REGISTER as an extension; PJSIP answers the digest challenge and refreshes."""
        from aiosipua.headers import parse_uri

        host = parse_uri(self.config.register_uri).host
        acc_cfg.idUri = f"sip:{self.config.register_user or 'stt-bridge'}@{host}"
        acc_cfg.regConfig.registrarUri = self.config.register_uri
        acc_cfg.regConfig.timeoutSec = self.config.register_expires_s
        # PJSIP refreshes 5 s (delayBeforeRefreshSec) before the granted interval runs out.
        if self.config.register_password:
            acc_cfg.sipConfig.authCreds.append(
                pj.AuthCredInfo(
                    "digest", "*", self.config.register_user, 0, self.config.register_password
                )
            )

    def _answer(
        self, key: str, status: int, reason: str, headers: tuple[tuple[str, str], ...]
    ) -> None:
        call = self.calls.get(key)
        if call is None:
            return
        prm = pj.CallOpParam()
        prm.statusCode = status
        if reason:
            prm.reason = reason
        for name, value in headers:
            header = pj.SipHeader()
            header.hName = name
            header.hValue = value
            prm.txOption.headers.append(header)
        if status >= 300:
            call.hangup(prm)
        else:
            call.answer(prm)

    def forget(self, key: str) -> None:
        call = self.calls.pop(key, None)
        if call is not None:  # break the call <-> port cycle: it must not reach the GC later
            call.attached = False
            if call.port is not None:
                call.port.deliver = _unwanted
                self.spare_ports.append(call.port)
                call.port = None

    def audio_port(self, deliver: Callable[[bytes], None]) -> _AudioPort:
        """A media port (8 kHz, 16-bit, 20 ms) for a call's audio: a spare one where there is.

        Ports are kept, never freed, while PJSIP's media clock runs: since pjproject 2.14 the
        conference bridge removes a port asynchronously, on its next tick, so a port freed at a
        call's end can still be called into from the clock thread. That use-after-free
        (pjproject #4200) killed the agent with SIGSEGV now and then as calls hung up.
        """
        if self.spare_ports:
            port = self.spare_ports.pop()
            port.deliver = deliver
            return port
        fmt = pj.MediaFormatAudio()
        fmt.type = pj.PJMEDIA_TYPE_AUDIO
        fmt.clockRate = CLOCK_RATE
        fmt.channelCount = 1
        fmt.bitsPerSample = 16
        fmt.frameTimeUsec = 20000
        port = _AudioPort(deliver)
        port.createPort(f"stt{next(self.port_names)}", fmt)
        return port


def main(config: SipConfig, max_calls: int, conn: Connection) -> None:
    """The agent process's entry point (multiprocessing, spawn)."""
    logging.basicConfig(level=logging.WARNING, format="pjsua2 agent: %(levelname)s %(message)s")
    exit_with_parent()  # the pipe's EOF stops it too, but only once PJSIP polls it
    # PJSIP's console log writes to fd 1; the service's stdout is its own (the CLI's banner).
    os.dup2(2, 1)
    faulthandler.enable(all_threads=True)  # a crash in PJSIP leaves each thread's stack in the log
    pipe = _Pipe(conn)
    try:
        Agent(config, max_calls, pipe).run()
    finally:
        conn.close()
