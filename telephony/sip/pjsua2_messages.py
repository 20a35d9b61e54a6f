"""What the service and its PJSIP agent process say to each other over their pipe.

Plain frozen dataclasses (pickled by `multiprocessing.connection`), so that the service's
process never imports pjsua2: PJSIP lives in the agent (`pjsua2_agent`), and a crash there ends
only the SIP calls, never the service. Calls are named by the agent's own key, not the
Call-ID: a retry after a 401 reuses the Call-ID while the first INVITE is still ending.
"""

from __future__ import annotations

from dataclasses import dataclass

# -- agent → service --


@dataclass(frozen=True, slots=True)
class Started:
    port: int  # the SIP port PJSIP bound (UDP, and TCP on the same number when enabled)


@dataclass(frozen=True, slots=True)
class StartFailed:
    error: str


@dataclass(frozen=True, slots=True)
class Incoming:
    """An INVITE PJSIP has taken; the service decides its answer."""

    key: str
    sip_call_id: str
    message: str  # the whole request, headers and body
    source: tuple[str, int]


@dataclass(frozen=True, slots=True)
class Audio:
    key: str
    pcm: bytes  # 16-bit little-endian 8 kHz mono, from the first sound on


@dataclass(frozen=True, slots=True)
class Hold:
    key: str
    held: bool


@dataclass(frozen=True, slots=True)
class Dtmf:
    key: str
    digit: str


@dataclass(frozen=True, slots=True)
class MediaSeen:
    """RTP packets arrived since the last report (PJSIP's clock plays silence without them)."""

    key: str


@dataclass(frozen=True, slots=True)
class Ended:
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class Registered:
    status: int  # the registrar's last answer (200 once registered)
    reason: str


AgentMessage = (
    Started | StartFailed | Incoming | Audio | Hold | Dtmf | MediaSeen | Ended | Registered
)

# -- service → agent --


@dataclass(frozen=True, slots=True)
class Answer:
    key: str
    status: int
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Attach:
    """The call is admitted: send its audio, DTMF and media state from now on."""

    key: str


@dataclass(frozen=True, slots=True)
class Hangup:
    key: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Hang up what is left, unregister, free PJSIP and exit."""


Command = Answer | Attach | Hangup | Stop
