"""The transcript stage: a leg's engine events on their way out, with redaction applied.

Every event that leaves a leg (to its connection, live subscribers, the store, webhooks) goes
through one `TranscriptStage` (telephony/call.py), so nothing sensitive passes this point.
No I/O: events in (`feed`), events out, plus `expire` as the leg's audio settles.

A number run is judged whole: a card read as "4242 4242" [pause] "4242 4242" is one run of 16
digits. So while the last words of a leg end in a run of two or more digits, those words and
every event after them (their `Segment`, `EndOfTurn`) are held, until a word that is not a
number follows, a number starts more than `hold_s` after the run ended, the engine has settled
`hold_s` of audio past it with no word (`expire`), or the stream closes. Then the run is judged
and everything held goes out in order. A span that crosses segments becomes one placeholder per
segment, each with the times of what it replaced there. Partials go out at once, with every
number run and sensitive span masked (telephony/redaction.py `mask_partial`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final

from engine.base import BridgeError, Closed, EngineEvent, Partial, Segment, Word
from engine.keyterms import InvalidKeyterms, check_keyterms
from telephony.redaction import (
    CONTEXT_WORDS,
    DIGIT_KINDS,
    PII,
    InvalidRedaction,
    NameBook,
    Span,
    find_spans,
    mask_partial,
    parse_kinds,
    placeholder,
    trailing_run,
)

HOLD_S: Final = 4.0  # a caller reading a card pauses between groups for up to this long
DECIDED_KEPT: Final = 2000  # words whose outcome is remembered until their Segment comes

WordKey = tuple[str, float, float]


@dataclass(frozen=True)
class TranscriptOptions:
    """What one stream asks of its transcript (its front end's `redact=` and `keyterm=`)."""

    redact: frozenset[str] = frozenset()
    keyterms: tuple[str, ...] = ()


class InvalidOptions(BridgeError):
    """A stream's `redact=` or `keyterm=` that cannot be served: the front end answers with
    its protocol's own 400 before the upgrade (telephony/errors.py)."""


def transcript_options(redact: Iterable[str], keyterms: Iterable[str]) -> TranscriptOptions:
    """A stream's options from its wire values (`redact=pci,ssn`, repeated `keyterm=`)."""
    try:
        return TranscriptOptions(parse_kinds(redact), check_keyterms(keyterms))
    except (InvalidRedaction, InvalidKeyterms) as exc:
        raise InvalidOptions(str(exc)) from exc


NO_OPTIONS: Final = TranscriptOptions()


def _key(word: Word) -> WordKey:
    return (word.text, word.start_s, word.end_s)


class TranscriptStage:
    """One leg's redaction: `feed` each engine event, send on what it returns."""

    def __init__(
        self, kinds: frozenset[str], hold_s: float = HOLD_S, names: NameBook | None = None
    ) -> None:
        self.kinds = kinds
        self.hold_s = hold_s
        self._names = names
        self._queue: deque[EngineEvent] = deque()  # held, in order
        self._open: list[Word] = []  # words not judged yet, in order
        self._segment_starts: set[WordKey] = set()  # open words that begin a new segment
        self._next_starts_segment = False
        self._history: deque[str] = deque(maxlen=CONTEXT_WORDS)  # judged words: context
        self._decided: OrderedDict[WordKey, tuple[Word, ...]] = OrderedDict()

    @property
    def holding(self) -> bool:
        return bool(self._queue)

    def feed(self, event: EngineEvent) -> list[EngineEvent]:
        if isinstance(event, Partial):
            return [replace(event, text=mask_partial(event.text, self.kinds, self._names))]
        if isinstance(event, Word):
            if self._open and event.start_s - self._open[-1].end_s > self.hold_s:
                self._judge(len(self._open))  # too long a pause: the held run is over
            if self._next_starts_segment:
                self._segment_starts.add(_key(event))
                self._next_starts_segment = False
            self._open.append(event)
        elif isinstance(event, Segment):
            self._next_starts_segment = True
        self._queue.append(event)
        if isinstance(event, Closed):
            self._judge(len(self._open))
        else:
            held = None
            if PII in self.kinds and isinstance(event, Word):
                # Names and e-mail addresses span words ("Jennifer Walsh", "john at example
                # dot com"): under pii an utterance is judged whole, once its segment is in.
                held = 0
            elif self.kinds & DIGIT_KINDS:
                # Mid-utterance any number may be the start of a run; once the utterance is
                # over, only a group of two digits or more is worth waiting on.
                in_utterance = isinstance(event, Word)
                texts = [w.text for w in self._open]
                held = trailing_run(texts, 1 if in_utterance else 2)
            self._judge(len(self._open) if held is None else held)
        return self._release()

    def expire(self, settled_s: float) -> list[EngineEvent]:
        """The engine has given every word of the leg's first `settled_s` seconds: a held run
        that nothing followed for `hold_s` is over."""
        if self._open and settled_s >= self._open[-1].end_s + self.hold_s:
            self._judge(len(self._open))
        return self._release()

    def flush(self) -> list[EngineEvent]:
        """Judge and release everything now (the client asked for its finals: Finalize)."""
        self._judge(len(self._open))
        return self._release()

    # -- judging --

    def _judge(self, count: int) -> None:
        """Decide the first `count` open words: each becomes itself, a placeholder, or
        nothing (a later word of a placeholder's span)."""
        if count <= 0:
            return
        words, self._open = self._open[:count], self._open[count:]
        spans = find_spans([w.text for w in words], self.kinds, tuple(self._history), self._names)
        for key, out in self._outcomes(words, spans):
            self._decided[key] = out
            # The context of later runs is what went out: a placeholder says what came before
            # ("[CARD_NUMBER]" makes the next group of digits part of the card).
            self._history.extend(w.text for w in out)
        while len(self._decided) > DECIDED_KEPT:
            self._decided.popitem(last=False)
        self._segment_starts.difference_update(_key(w) for w in words)

    def _outcomes(
        self, words: Sequence[Word], spans: Sequence[Span]
    ) -> list[tuple[WordKey, tuple[Word, ...]]]:
        out: list[tuple[WordKey, tuple[Word, ...]]] = [(_key(w), (w,)) for w in words]
        for span in spans:
            first = span.first
            for i in range(span.first, span.last + 1):
                # A span is cut where a new segment begins: each part is its segment's own.
                ends_part = i == span.last or _key(words[i + 1]) in self._segment_starts
                if not ends_part:
                    out[i] = (out[i][0], ())
                    continue
                last = words[i]
                text = placeholder(span.label, last.text)
                out[first] = (out[first][0], (replace(words[first], text=text, end_s=last.end_s),))
                if i != first:
                    out[i] = (out[i][0], ())
                first = i + 1
        return out

    # -- releasing --

    def _release(self) -> list[EngineEvent]:
        out: list[EngineEvent] = []
        while self._queue:
            event = self._queue[0]
            if isinstance(event, Word):
                decided = self._decided.get(_key(event))
                if decided is None:
                    break
                out.extend(decided)
            elif isinstance(event, Segment):
                waiting = {_key(w) for w in self._open}
                if any(_key(w) in waiting for w in event.words):
                    break
                out.append(self._segment(event))
            else:
                out.append(event)
            self._queue.popleft()
        return out

    def _segment(self, segment: Segment) -> Segment:
        unknown = [w for w in segment.words if _key(w) not in self._decided]
        if unknown:  # words the engine did not send one by one: judged here, on their own
            spans = find_spans([w.text for w in unknown], self.kinds, names=self._names)
            self._decided.update(self._outcomes(unknown, spans))
        words = tuple(w for word in segment.words for w in self._decided[_key(word)])
        if words == segment.words:
            return segment
        return replace(segment, text=" ".join(w.text for w in words), words=words)
