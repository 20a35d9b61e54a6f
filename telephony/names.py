"""People's names for `pii` redaction, from the `names-dataset` wheel (no download).

The wheel holds 727 000 first and 980 000 last names from 106 countries, with each name's
rank per country; loading it takes about 12 s and 2 GB. So it is read once per machine, in a
child process that gives that memory back, and the names common enough to matter go to two
text files in the user's cache: first names ranked within 1 000 in an English-speaking country
or 100 anywhere (a wider net takes in places: Paris, Dallas, Sydney), surnames within 5 000 /
300. Every later start reads them in milliseconds. telephony/redaction.py takes a capitalised
first name in mid-sentence, or a first name and a surname, for a person.
"""

from __future__ import annotations

import fcntl
import gzip
import importlib.resources
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

from telephony.redaction import NameBook

VERSION: Final = 2  # of the selection below: a new one builds new files
ENGLISH_SPEAKING: Final = frozenset({"US", "GB", "CA", "AU", "IE", "NZ", "ZA", "IN", "PH"})
RANKS: Final = {"first": (1000, 100), "last": (5000, 300)}  # (English-speaking, anywhere)


class NamesUnavailable(RuntimeError):
    """The names list could not be built (the wheel missing or broken, the cache unwritable)."""


def cache_dir() -> Path:
    """The user's cache for stt-bridge (XDG): the same wherever the service is started."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stt-bridge"


def load(directory: Path | None = None) -> NameBook:
    """The lower-cased names, building the lists on first use (under a lock: processes that
    start together build them once)."""
    directory = directory or cache_dir()
    path = directory / f"names-v{VERSION}"
    if not (path / "last.txt").exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / f"names-v{VERSION}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (path / "last.txt").exists():
                    done = subprocess.run(
                        [sys.executable, "-m", "telephony.names", str(path)],
                        capture_output=True,
                        text=True,
                        timeout=300,
                        check=False,
                    )
                    if done.returncode != 0:
                        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
                        raise NamesUnavailable(f"cannot build the names list: {reason}")
        except OSError as exc:
            raise NamesUnavailable(f"cannot build the names list in {directory}: {exc}") from exc
    return NameBook(*(frozenset((path / f"{part}.txt").read_text().split()) for part in RANKS))


def build(path: Path) -> int:
    """Select the names from the wheel into `path`/first.txt and last.txt (each written
    atomically, last.txt last: its presence says both are whole); returns how many."""
    path.mkdir(parents=True, exist_ok=True)
    count = 0
    for part, (english, anywhere) in RANKS.items():
        names: set[str] = set()
        source = importlib.resources.files("names_dataset") / "v3" / f"{part}_names.pkl.gz"
        with source.open("rb") as raw, gzip.open(raw) as f:
            table: dict[str, dict[str, Any]] = pickle.load(f)  # the wheel's own data
        for name, info in table.items():
            ranks: dict[str, int] = info.get("rank") or {}
            if name.isalpha() and any(
                rank <= (english if country in ENGLISH_SPEAKING else anywhere)
                for country, rank in ranks.items()
            ):
                names.add(name.lower())
        del table
        tmp = path / f"{part}.{os.getpid()}.tmp"
        tmp.write_text("\n".join(sorted(names)) + "\n")
        os.replace(tmp, path / f"{part}.txt")
        count += len(names)
    return count


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
