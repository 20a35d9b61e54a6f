"""Silero VAD judged for many streams in one model call (engine/vad.py): the same
probabilities and the same cuts as each stream alone, on real speech through the phone path."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np

from engine.endpointing import Cut, EndpointConfig, Utterances
from engine.vad import WINDOW, SileroVad, VadJob, VadThread, judge_together
from telephony.audio import PcmArray, resample_whole, ulaw_decode
from tests.speech import SENTENCES, phone_bytes

RATE = 16000


def phone_pcm(text: str) -> PcmArray:
    speech = resample_whole(ulaw_decode(phone_bytes(text)), 8000, RATE)
    quiet = np.zeros(RATE // 2, dtype=np.int16)
    return np.concatenate([quiet, speech, quiet, speech, quiet])


def windows_of(pcm: PcmArray) -> list[np.ndarray]:
    audio = pcm.astype(np.float32) / np.float32(32768.0)
    return [audio[at : at + WINDOW] for at in range(0, len(audio) - WINDOW + 1, WINDOW)]


def test_streams_judged_together_get_each_ones_own_probabilities() -> None:
    streams = [windows_of(phone_pcm(text)) for text in SENTENCES[:3]]
    streams.append([])  # a stream with nothing to judge this time
    streams.append(streams[0][:5])  # one that runs out early
    alone = []
    for windows in streams:
        vad = SileroVad()
        alone.append([vad.process(w) for w in windows])
    together = [SileroVad() for _ in streams]
    calls = judge_together(list(zip(together, streams, strict=True)))
    assert calls == max(len(w) for w in streams)
    for vad, windows, expected in zip(together, streams, alone, strict=True):
        assert [vad.process(w) for w in windows] == expected
    # Past what was judged ahead, each goes on alone from the state the batch left it in.
    extra = windows_of(phone_pcm(SENTENCES[4]))[:20]
    vad = SileroVad()
    for w in streams[0]:
        vad.process(w)
    assert [together[0].process(w) for w in extra] == [vad.process(w) for w in extra]
    assert max(alone[0]) > 0.9 > 0.1 > min(alone[0])  # it heard the speech and the pauses


def test_streams_waiting_together_share_model_calls_and_keep_their_cuts() -> None:
    pcms = [phone_pcm(text) for text in SENTENCES]
    alone: list[list[tuple[int, int]]] = []
    for pcm in pcms:
        utterances = Utterances(SileroVad(), EndpointConfig())
        cuts = [c for at in range(0, len(pcm), RATE) for c in utterances.feed(pcm[at : at + RATE])]
        alone.append([(c.start, len(c.audio)) for c in cuts])
        assert len(alone[-1]) >= 2  # the sentence, twice (some have a pause of their own)

    thread = VadThread("test-vad")
    try:
        vads = [SileroVad() for _ in pcms]
        streams = [Utterances(vad, EndpointConfig()) for vad in vads]
        got: list[list[Cut]] = [[] for _ in pcms]
        for at in range(0, max(len(p) for p in pcms), RATE):
            # Every stream's second is queued while the thread is held, as under load.
            held = threading.Event()
            gate = thread.submit(VadJob(SileroVad(), held.wait))
            futures: list[Future[list[Cut]]] = []
            for vad, utterances, pcm in zip(vads, streams, pcms, strict=True):
                chunk = pcm[at : at + RATE]
                futures.append(
                    thread.submit(
                        VadJob(
                            vad,
                            lambda u=utterances, c=chunk: u.feed(c),
                            lambda u=utterances, c=chunk: u.windows_of(c),
                        )
                    )
                )
            held.set()
            gate.result(timeout=10)
            for cuts, future in zip(got, futures, strict=True):
                cuts.extend(future.result(timeout=10))
        assert [[(c.start, len(c.audio)) for c in cuts] for cuts in got] == alone
        # Six streams' windows took about a sixth of the calls they take alone.
        assert thread.calls * 5 <= thread.windows
    finally:
        thread.shutdown()


def test_feed_after_windows_of_cuts_as_feed_alone() -> None:
    """`feed` takes the windows `windows_of` cut for that same chunk instead of cutting them
    again; for any other chunk, or after the carry moved, it cuts its own."""
    pcm = phone_pcm(SENTENCES[2])
    chunks = [pcm[at : at + 1000] for at in range(0, len(pcm), 1000)]  # windows straddle chunks

    def cuts(prepare: str) -> list[tuple[int, int, bool]]:
        utterances = Utterances(SileroVad(), EndpointConfig())
        got: list[Cut] = []
        for n, chunk in enumerate(chunks):
            if prepare == "same":
                utterances.windows_of(chunk)
            elif prepare == "other" and n + 1 < len(chunks):
                utterances.windows_of(chunks[n + 1])  # not this chunk: its windows are other
            got += utterances.feed(chunk)
        got += utterances.cut_now()
        return [(c.start, len(c.audio), c.ends_turn) for c in got]

    alone = cuts("none")
    assert len(alone) >= 2
    assert cuts("same") == alone
    assert cuts("other") == alone
