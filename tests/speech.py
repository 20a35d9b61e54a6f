"""Real speech for tests: hibari-tts sentences, taken through the phone path with sox.

Audio is cached under .cache/speech (keyed by text, seed and format), so a sentence is
synthesized once per machine. See ../shared/protocols/test-speech.md for why hibari-tts
and not espeak-ng wherever a test checks words.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Final

import numpy as np
import soundfile

from telephony.audio import PcmArray

CACHE: Final = Path(__file__).resolve().parent.parent / ".cache" / "speech"
SEED: Final = 1

# Call-centre sentences; every test that checks words draws from here.
SENTENCES: Final = (
    "Thank you for calling. Please hold while I transfer you to the billing department.",
    "I would like to check the status of my order from last week.",
    "My account number is four five six seven and I need help with my bill.",
    "Can you please repeat that? The line is very bad today.",
    "I want to cancel my subscription and get a refund.",
    "Your call is important to us. An agent will be with you shortly.",
)


def _key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def speech_wav(text: str) -> Path:
    """24 kHz mono 16-bit WAV of `text` spoken by hibari-tts (reproducible: fixed seed)."""
    path = CACHE / f"{_key('hibari', text, SEED)}.wav"
    if not path.exists():
        from hibari import Hibari

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.wav")
        Hibari().save(text, str(tmp), seed=SEED)
        os.replace(tmp, path)
    return path


def sox_convert(
    src: Path, *out_args: str, suffix: str = ".wav", effects: tuple[str, ...] = ()
) -> Path:
    """`sox src <out_args> dst <effects>`, cached; returns dst."""
    dst = CACHE / f"{_key(src.name, *out_args, *effects)}{suffix}"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"{dst.stem}.{os.getpid()}{suffix}")
        subprocess.run(["sox", str(src), *out_args, str(tmp), *effects], check=True)
        os.replace(tmp, dst)
    return dst


def phone_bytes(text: str, encoding: str = "mulaw", rate: int = 8000) -> bytes:
    """`text` as raw wire audio: mulaw / alaw (8-bit) or pcm16 (signed 16-bit LE), mono."""
    sox_encoding = {"mulaw": ["-e", "mu-law", "-b", "8"], "alaw": ["-e", "a-law", "-b", "8"]}
    args = ["-r", str(rate), "-c", "1", *sox_encoding.get(encoding, ["-e", "signed", "-b", "16"])]
    return sox_convert(speech_wav(text), *args, "-t", "raw", suffix=".raw").read_bytes()


def read_pcm(path: Path) -> tuple[PcmArray, int]:
    data, rate = soundfile.read(str(path), dtype="int16")
    return np.asarray(data, dtype=np.int16), int(rate)


def write_wav(path: Path, pcm: PcmArray, rate: int) -> Path:
    soundfile.write(str(path), pcm, rate, subtype="PCM_16")
    return path


_DIGITS: Final = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_OF: Final = {**{name: str(d) for d, name in enumerate(_DIGITS)}, "oh": "0"}


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation; numbers as digits, each digit its own word
    ("4567" and "four five six seven" both count as four words), so the same digits read out
    or written match (Moonshine writes digits)."""
    cleaned = "".join(c.lower() if c.isalnum() or c == "'" else " " for c in text)
    words: list[str] = []
    for word in cleaned.split():
        if word.isdigit():
            words.extend(word)
        else:
            words.append(_DIGIT_OF.get(word, word))
    return words


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = normalize(reference), normalize(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[len(hyp)] / max(1, len(ref))


def words_right(reference: str, words: list[str]) -> list[bool]:
    """For each transcript word, whether a minimum-edit alignment with `reference` matches it
    (`normalize` on both: "4567" is right if all four digits are). Punctuation-only words
    say nothing and count as right."""
    ref = normalize(reference)
    pieces = [normalize(w) for w in words]
    hyp = [p for piece in pieces for p in piece]
    owner = [i for i, piece in enumerate(pieces) for _ in piece]
    cost = [
        [i + j if i == 0 or j == 0 else 0 for j in range(len(hyp) + 1)] for i in range(len(ref) + 1)
    ]
    for i in range(1, len(ref) + 1):
        for j in range(1, len(hyp) + 1):
            cost[i][j] = min(
                cost[i - 1][j] + 1,
                cost[i][j - 1] + 1,
                cost[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]),
            )
    matched = [False] * len(hyp)
    i, j = len(ref), len(hyp)
    while i > 0 and j > 0:  # a match first, so ties leave right words right
        if ref[i - 1] == hyp[j - 1] and cost[i][j] == cost[i - 1][j - 1]:
            matched[j - 1] = True
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i][j - 1] + 1:
            j -= 1
        elif cost[i][j] == cost[i - 1][j] + 1:
            i -= 1
        else:
            i, j = i - 1, j - 1
    right = [True] * len(words)
    for n, ok in enumerate(matched):
        if not ok:
            right[owner[n]] = False
    return right
