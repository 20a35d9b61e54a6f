"""People's names for `pii` redaction, from the `names-dataset` wheel (no download).

The wheel holds 727 000 first and 980 000 last names from 106 countries, with each name's
rank per country; loading it takes about 12 s and 2 GB. So it is read once per machine, in a
child process that gives that memory back, and the names common enough to matter (rank within
3 000 (first) / 5 000 (last) in an English-speaking country, or within 300 anywhere: about
60 000 names, 0.5 MB) go to a text file in the user's cache; every later start reads that file
in milliseconds. telephony/redaction.py takes a capitalised word in mid-sentence that is on
this list for a name.
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

VERSION: Final = 1  # of the selection below: a new one builds a new file
ENGLISH_SPEAKING: Final = frozenset({"US", "GB", "CA", "AU", "IE", "NZ", "ZA", "IN", "PH"})
RANKS: Final = {"first_names": (3000, 300), "last_names": (5000, 300)}  # (English, anywhere)


class NamesUnavailable(RuntimeError):
    """The names list could not be built (the wheel missing or broken, the cache unwritable)."""


def cache_dir() -> Path:
    """The user's cache for stt-bridge (XDG): the same wherever the service is started."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stt-bridge"


def load(directory: Path | None = None) -> frozenset[str]:
    """The lower-cased names, building the list on first use (under a lock: processes that
    start together build it once)."""
    directory = directory or cache_dir()
    path = directory / f"names-v{VERSION}.txt"
    if not path.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / f"names-v{VERSION}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not path.exists():
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
    return frozenset(path.read_text().split())


def build(path: Path) -> int:
    """Select the names from the wheel into `path` (atomically); returns how many."""
    names: set[str] = set()
    for part, (english, anywhere) in RANKS.items():
        source = importlib.resources.files("names_dataset") / "v3" / f"{part}.pkl.gz"
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
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("\n".join(sorted(names)) + "\n")
    os.replace(tmp, path)
    return len(names)


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
