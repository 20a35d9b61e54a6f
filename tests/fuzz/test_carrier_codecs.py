"""Property tests of the carriers' codecs: arbitrary frames and mutations of each carrier's own
messages (from tests/telephony/test_carriers.py, the note's) raise nothing but
`CarrierStreamError`, and what a start yields opens a call's options or refuses them cleanly."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telephony.carriers.events import CarrierStreamError, Started
from telephony.carriers.handler import CARRIERS, labels_of, options_of
from telephony.transcript import InvalidOptions
from tests.fuzz.test_codecs import json_values, replace_somewhere
from tests.telephony.test_carriers import (
    EXOTEL_START,
    JAMBONZ_METADATA,
    PLIVO_START,
    SIGNALWIRE_START,
    TELNYX_DTMF,
    TELNYX_MEDIA,
    TELNYX_START,
    TELNYX_STOP,
    VONAGE_CONNECTED,
)

FAST = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
FIRST = {
    "telnyx": TELNYX_START,
    "plivo": PLIVO_START,
    "vonage": VONAGE_CONNECTED,
    "exotel": EXOTEL_START,
    "signalwire": SIGNALWIRE_START,
    "jambonz": JAMBONZ_METADATA,
}
LATER = [TELNYX_MEDIA, TELNYX_DTMF, TELNYX_STOP, '{"event":"websocket:dtmf","digit":"5"}']
frames = st.lists(
    st.one_of(st.text(max_size=200), json_values.map(json.dumps), st.binary(max_size=64)),
    max_size=6,
)


def feed(name: str, frames: list[str | bytes]) -> None:
    carrier = next(c for c in CARRIERS if c.front_end == name)
    codec = carrier.codec({"track": "both_tracks"})
    for frame in frames:
        with contextlib.suppress(CarrierStreamError):
            event = codec.receive(frame) if isinstance(frame, str) else codec.receive_binary(frame)
            if isinstance(event, Started):
                labels_of(event)
                with contextlib.suppress(InvalidOptions):
                    options_of(event.parameters)


@FAST
@given(st.sampled_from(sorted(FIRST)), frames)
def test_arbitrary_frames(name: str, sent: list[str | bytes]) -> None:
    feed(name, sent)


@FAST
@given(
    st.sampled_from(sorted(FIRST)),
    st.lists(st.tuples(json_values, st.lists(st.integers(0, 9), max_size=4)), max_size=5),
)
def test_mutated_messages(name: str, mutations: list[tuple[Any, list[int]]]) -> None:
    messages = [FIRST[name], *LATER]
    sent: list[str | bytes] = []
    for message, (replacement, path) in zip(messages, mutations, strict=False):
        sent.append(json.dumps(replace_somewhere(json.loads(message), replacement, [0, *path])))
    feed(name, [FIRST[name], *sent])
    feed(name, sent)
