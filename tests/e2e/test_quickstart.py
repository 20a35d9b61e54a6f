"""README's quick start, run as written: its commands against `stt-bridge serve` on the
default ports, so the first thing a newcomer reads cannot rot.

The block between `<!-- quickstart ... -->` and `<!-- /quickstart -->` is read from README.md;
`make run` is the set-up `make test` has already done, then `stt-bridge serve` (started here,
listening on loopback only); every `curl` line runs in a folder holding `call.wav`, with the
call's id put where the text says `ID`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.speech import SENTENCES, speech_wav, word_error_rate

README = Path(__file__).resolve().parent.parent.parent / "README.md"
pytestmark = pytest.mark.solo  # the default ports: nothing else may hold them


def quickstart_commands() -> list[str]:
    text = README.read_text()
    block = text.split("<!-- quickstart", 1)[1].split("-->", 1)[1]
    block = block.split("<!-- /quickstart -->", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith(("make ", "curl "))]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Path]:
    env = {
        **os.environ,
        # Loopback only; the ports are the defaults the commands use.
        "STT_BRIDGE_SERVER_HOST": "127.0.0.1",
        "STT_BRIDGE_AUDIOSOCKET_HOST": "127.0.0.1",
        "STT_BRIDGE_SIP_HOST": "127.0.0.1",
        "XDG_DATA_HOME": str(tmp_path / "share"),  # a fresh store, where the default puts it
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert ":8000/ (the page)" in banner, banner  # the startup line says what to open
        shutil.copy(speech_wav(SENTENCES[1]), tmp_path / "call.wav")
        yield tmp_path
    finally:
        process.terminate()
        process.wait(timeout=60)


def run(command: str, cwd: Path) -> str:
    done = subprocess.run(
        ["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (command, done.stderr)
    return done.stdout


def test_the_quick_start_runs_as_written(served: Path) -> None:
    commands = quickstart_commands()
    assert commands[0] == "make run"  # the one set-up command; make test has run its set-up
    send, listed, read_back = commands[1:]
    answer = json.loads(run(send, served))
    assert word_error_rate(SENTENCES[1], answer["text"]) <= 0.1, answer
    calls = json.loads(run(listed, served))["calls"]
    assert len(calls) == 1 and calls[0]["status"] == "ended", calls
    assert "ID" in read_back
    transcript = run(read_back.replace("ID", calls[0]["id"]), served)
    lines = [line for line in transcript.splitlines() if re.match(r"\[\d\d:\d\d:\d\d", line)]
    assert lines, transcript
    spoken = " ".join(line.split(": ", 1)[1] for line in lines)
    assert word_error_rate(SENTENCES[1], spoken) <= 0.1, transcript
