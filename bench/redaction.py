"""Redaction on real speech: recall on spoken card numbers, SSNs, phone numbers and names, false
redactions on sentences with harmless numbers, and how long finals wait.

    python bench/redaction.py

Each sentence is spoken by hibari-tts, taken through 8 kHz mu-law (the phone path), decoded
by the Moonshine engine, and its events passed through the transcript stage exactly as a live
leg's are (telephony/transcript.py). A sensitive item counts as caught when none of its
digits is left in the output, in any form (digits or number words); a harmless sentence counts
as falsely redacted when any placeholder appears in it.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.base import Closed, Engine, EngineEvent, Segment
from engine.moonshine import MoonshineEngine
from telephony import names
from telephony.audio import resample_whole, ulaw_decode
from telephony.redaction import parse_kinds
from telephony.transcript import TranscriptStage
from tests.conftest import MODEL_CACHE
from tests.speech import phone_bytes

CARDS = (
    "My card number is 4111 1111 1111 1111.",
    "My card number is four one one one, one one one one, one one one one, one one one one.",
    "The card is five five oh oh, double four one two, three three three three, nine eight "
    "seven six.",
    "It's a Visa, forty one eleven, eleven eleven, eleven eleven, eleven eleven.",
    "The number on the card is 5500 0000 0000 0004.",
    "Card number three seven eight two, eight two two four six, three one double oh five.",
)
SPLIT_CARDS = (  # read in two groups with a pause of 2 s between them
    ("My card number is four one one one, one one one one.", "One one one one, one one one one."),
    ("The card is 5500 0000.", "0000 0004."),
)
SSNS = (
    "My social security number is 123-45-6789.",
    "My social security number is one two three, four five, six seven eight nine.",
    "My SSN is oh seven eight, oh five, one one two oh.",
    "The last four of my social are six seven eight nine.",
)
PHONES = (
    "You can reach me at 555-123-4567.",
    "My phone number is five five five, one two three, four five six seven.",
    "Call me back on oh two oh seven nine four six oh nine five eight.",
)
NAMES = (
    "My name is Siobhan Nguyen.",
    "Hi, this is Jennifer Walsh calling about my order.",
    "I spoke to Michael yesterday and he said it was fixed.",
    "Can I speak with Maria Gonzalez please?",
    "My husband Robert will call back tomorrow.",
)
HARMLESS = (
    "I have 2 kids and I called 3 times.",
    "My zip code is 30319.",
    "The total was 45 dollars and 99 cents.",
    "Please call me back at 3 pm.",
    "I was born in 1985.",
    "I'm in room 12 on the 4th floor.",
    "Flight 447 to Boston was delayed.",
    "I need three tickets for the fifteenth of May.",
    "My order from last week has 2 items missing.",
    "It's been about 10 minutes, can you hurry?",
    "Thank you for calling. Please hold while I transfer you to the billing department.",
    "I want to cancel my subscription and get a refund.",
)
NUMBER_WORD = re.compile(
    r"\b(zero|oh|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
    r"twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|double|triple)\b",
    re.I,
)


@dataclass
class Outcome:
    text: str
    finals: int
    held: int  # finals that did not go out with their own events: they waited on a number run


def wire(*parts: str, pause_s: float = 2.0) -> np.ndarray:
    audio = (b"\xff" * int(8000 * pause_s)).join(phone_bytes(p, "mulaw", 8000) for p in parts)
    return ulaw_decode(audio + b"\xff" * 4000).astype(np.int16)


async def events_of(engine: Engine, pcm8k: np.ndarray) -> list[EngineEvent]:
    stream = engine.open("bench", "caller")
    await stream.write(resample_whole(pcm8k, 8000, engine.sample_rate))
    stream.close()
    out: list[EngineEvent] = []
    async for event in stream.events():
        out.append(event)
        if isinstance(event, Closed):
            break
    return out


def redact(events: list[EngineEvent], kinds: frozenset[str], hold_s: float) -> Outcome:
    """The stage's output text, and how many finals waited: a segment that does not come out
    while its own events are fed waits for the next utterance (decoded about min_silence_s
    after it ends) or for hold_s of audio, whichever comes first."""
    stage = TranscriptStage(kinds, hold_s, names.load())
    texts: list[str] = []
    finals = held = 0
    for event in events:
        released = stage.feed(event)
        if isinstance(event, Segment):
            finals += 1
            held += not any(isinstance(e, Segment) and e.end_s == event.end_s for e in released)
        texts += [e.text for e in released if isinstance(e, Segment)]
    return Outcome(" ".join(texts), finals, held)


def caught(text: str) -> bool:
    """No digit left, nor two number words in a row, nor one beside a placeholder ("O,
    [SSN]"); a lone number word elsewhere is the sentence's own ("the last four of")."""
    words = text.split()
    for a, b in itertools.pairwise(words):
        pair = [NUMBER_WORD.fullmatch(w.strip(".,?!")) for w in (a, b)]
        beside = [w.startswith("[") for w in (a, b)]
        if all(pair) or (pair[0] and beside[1]) or (beside[0] and pair[1]):
            return False
    return not re.search(r"\d", text)


async def main() -> None:
    engine = MoonshineEngine(cache_dir=MODEL_CACHE, capacity=2, partial_interval_s=0)
    await engine.start()
    names.load()
    hold_s = 4.0
    try:
        rows: list[tuple[str, str, int, int, str]] = []
        for label, kinds_text, items in (
            ("card numbers (one breath)", "pci", [(c,) for c in CARDS]),
            ("card numbers (two groups, 2 s apart)", "pci", list(SPLIT_CARDS)),
            ("SSNs", "ssn", [(s,) for s in SSNS]),
            ("phone numbers", "pii", [(p,) for p in PHONES]),
        ):
            kinds = parse_kinds([kinds_text])
            hits = finals = held = 0
            for parts in items:
                out = redact(await events_of(engine, wire(*parts)), kinds, hold_s)
                ok = caught(out.text)
                hits += ok
                finals += out.finals
                held += out.held
                print(f"  [{'ok' if ok else 'MISSED'}] {out.text}", file=sys.stderr)
            rows.append((label, kinds_text, hits, len(items), f"{held} of {finals}"))
        name_hits = 0
        pii = parse_kinds(["pii"])
        for sentence in NAMES:
            out = redact(await events_of(engine, wire(sentence)), pii, hold_s)
            name_hits += "[NAME]" in out.text
            print(f"  [names] {out.text}", file=sys.stderr)
        false: dict[str, int] = {"pci,ssn": 0, "pii": 0}
        harmless_finals = harmless_held = 0
        for sentence in HARMLESS:
            events = await events_of(engine, wire(sentence))
            for kinds_text in false:
                out = redact(events, parse_kinds([kinds_text]), hold_s)
                false[kinds_text] += "[" in out.text
                if kinds_text == "pci,ssn":
                    harmless_finals += out.finals
                    harmless_held += out.held
                if "[" in out.text:
                    print(f"  [false {kinds_text}] {out.text}", file=sys.stderr)
    finally:
        await engine.stop()
    print(f"hold_s = {hold_s}: a held final waits for the next utterance or hold_s of audio")
    print()
    print("| what | kinds | caught | items | finals held for a number run |")
    print("|---|---|---|---|---|")
    for label, kinds_text, hits, total, held_text in rows:
        print(f"| {label} | {kinds_text} | {hits} | {total} | {held_text} |")
    print(f"| people's names | pii | {name_hits} | {len(NAMES)} | - |")
    print()
    print("| harmless sentences | kinds | falsely redacted | finals held (pci,ssn) |")
    print("|---|---|---|---|")
    for kinds_text, count in false.items():
        print(
            f"| {len(HARMLESS)} | {kinds_text} | {count} | {harmless_held} of {harmless_finals} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
