"""The `stt-bridge` command as a user runs it: help, offline transcription, serve + SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import MODEL_CACHE
from tests.speech import SENTENCES, read_pcm, sox_convert, speech_wav, word_error_rate

CLI = [sys.executable, "-m", "api.cli"]
# Measured on these sentences through the Moonshine engine: WER 0.00 for every file kind.
FILE_WER_BOUND = 0.05


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The command, with the prepared model of the test run unless `env` says otherwise."""
    if env is None:
        env = {**os.environ, "STT_BRIDGE_ENGINE_CACHE_DIR": str(MODEL_CACHE)}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd, check=False
    )


@pytest.mark.parametrize("command", [[], ["serve"], ["transcribe"]])
def test_every_command_explains_its_options(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert "usage: stt-bridge" in result.stdout
    for option in {
        "": ["--config", "serve", "transcribe"],
        "serve": ["--port", "--engine"],
        "transcribe": ["--format", "--output-dir", "--progress"],
    }["".join(command)]:
        assert option in result.stdout
    if command:  # each command's --engine names the CPU engine by its name
        assert "moonshine" in " ".join(result.stdout.split())


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    wav = speech_wav(SENTENCES[0])
    return {
        "wav": wav,
        "flac": sox_convert(wav, suffix=".flac"),
        "mp3": sox_convert(wav, "-C", "128", suffix=".mp3"),
        "ogg": sox_convert(wav, suffix=".ogg"),
    }


def test_transcribe_common_formats(audio_files: dict[str, Path]) -> None:
    result = run_cli("transcribe", "-f", "json", *map(str, audio_files.values()))
    assert result.returncode == 0, result.stderr
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(d["source"]).suffix[1:] for d in docs] == list(audio_files)
    by_kind = dict(zip(audio_files, docs, strict=True))
    # Lossless formats decode to the same samples, so the words are identical.
    assert by_kind["wav"]["words"] == by_kind["flac"]["words"]
    for kind, doc in by_kind.items():
        assert word_error_rate(SENTENCES[0], doc["text"]) <= FILE_WER_BOUND, (kind, doc["text"])
        pcm, rate = read_pcm(audio_files["wav"])
        assert abs(doc["duration"] - len(pcm) / rate) < 0.1
        assert all(0 <= w["start"] < w["end"] <= doc["duration"] for w in doc["words"])


def test_transcribe_text_and_webvtt(audio_files: dict[str, Path], tmp_path: Path) -> None:
    text = run_cli("transcribe", str(audio_files["wav"]))
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].startswith("# ")
    words = [line.split() for line in lines[1:]]
    assert all(len(w) == 3 and float(w[0]) < float(w[1]) for w in words)

    vtt = run_cli("transcribe", "-f", "vtt", "-o", str(tmp_path), str(audio_files["flac"]))
    assert vtt.returncode == 0 and vtt.stdout == ""
    cues = (tmp_path / f"{audio_files['flac'].stem}.vtt").read_text()
    assert cues.startswith("WEBVTT\n")
    assert "-->" in cues
    spoken = " ".join(w[2] for w in words)
    cue_text = " ".join(
        line for line in cues.splitlines()[2:] if line and "-->" not in line and not line.isdigit()
    )
    assert cue_text == spoken


def test_transcribe_subrip(audio_files: dict[str, Path]) -> None:
    srt = run_cli("transcribe", "-f", "srt", str(audio_files["wav"]))
    vtt = run_cli("transcribe", "-f", "vtt", str(audio_files["wav"]))
    assert srt.returncode == 0 and vtt.returncode == 0
    cues = [cue.splitlines() for cue in srt.stdout.strip().split("\n\n")]
    assert [cue[0] for cue in cues] == [str(n) for n in range(1, len(cues) + 1)]
    for cue in cues:  # SubRip times: HH:MM:SS,mmm --> HH:MM:SS,mmm
        start, arrow, end = cue[1].split()
        assert arrow == "-->" and start < end and start[8] == "," and end[8] == ","
    vtt_text = [line for line in vtt.stdout.splitlines()[2:] if line and "-->" not in line]
    assert [" ".join(cue[2:]) for cue in cues] == [t for t in vtt_text if not t.isdigit()]
    assert word_error_rate(SENTENCES[0], " ".join(" ".join(c[2:]) for c in cues)) <= FILE_WER_BOUND


def test_transcribe_reports_unreadable_files_and_goes_on(
    audio_files: dict[str, Path], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really a wave file")
    result = run_cli("transcribe", str(junk), str(audio_files["wav"]))
    assert result.returncode == 1
    assert f"stt-bridge: {junk}: not audio that libsndfile reads" in result.stderr
    assert result.stdout.count("# ") == 1  # the good file was still transcribed


def test_a_missing_file_is_named_before_the_model_loads(
    audio_files: dict[str, Path], tmp_path: Path
) -> None:
    missing = tmp_path / "nope.wav"
    result = run_cli("transcribe", str(missing), str(tmp_path), str(audio_files["wav"]))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"stt-bridge: no such file: {missing}",
        f"stt-bridge: a folder, not an audio file: {tmp_path}",
    ]
    assert result.stdout == ""  # nothing transcribed: the command line is to be fixed first


def test_an_engine_that_cannot_start_here_is_named_before_anything_loads(
    audio_files: dict[str, Path],
) -> None:
    env = {
        **os.environ,
        "STT_BRIDGE_ENGINE_NAME": "kyutai",
        "STT_BRIDGE_ENGINE_DEVICE": "cuda:99",  # no machine has it, with CUDA or without
    }
    result = run_cli("transcribe", str(audio_files["wav"]), env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("stt-bridge: config: engine.device = 'cuda:99': ")
    assert len(result.stderr.splitlines()) == 1


def test_log_lines_do_not_break_the_progress_bar(audio_files: dict[str, Path]) -> None:
    result = run_cli("--log-level", "info", "transcribe", "--progress", str(audio_files["wav"]))
    assert result.returncode == 0
    pieces = re.split(r"[\r\n]", result.stderr)  # the bar redraws itself after a carriage return
    assert any("INFO" in piece and "call started" in piece for piece in pieces)
    assert any("100%|" in piece for piece in pieces)
    glued = [piece for piece in pieces if "%|" in piece and "INFO" in piece]
    assert glued == []  # every log line starts a line of its own, never after the bar


def test_the_model_cache_is_the_users_wherever_it_runs(
    audio_files: dict[str, Path], tmp_path: Path
) -> None:
    """No engine.cache_dir: the model is prepared in $XDG_CACHE_HOME/stt-bridge (about a second
    and 60 MB), not in a new ./data/cache of the working directory, nor anywhere in HOME."""
    elsewhere, home, xdg = tmp_path / "project", tmp_path / "home", tmp_path / "xdg-cache"
    for folder in (elsewhere, home, xdg):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STT_BRIDGE_")}
    env |= {"HOME": str(home), "XDG_CACHE_HOME": str(xdg), "STT_BRIDGE_ENGINE_NAME": "moonshine"}
    result = run_cli("transcribe", "-f", "json", str(audio_files["wav"]), env=env, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert word_error_rate(SENTENCES[0], json.loads(result.stdout)["text"]) <= FILE_WER_BOUND
    assert list((xdg / "stt-bridge").glob("moonshine-*/manifest.json"))
    assert list(elsewhere.iterdir()) == [] and list(home.iterdir()) == []


def test_transcribe_shows_progress_on_request(audio_files: dict[str, Path]) -> None:
    result = run_cli("transcribe", "--progress", str(audio_files["wav"]))
    assert result.returncode == 0
    assert "100%" in result.stderr and " s " in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, int]]]:
    ports = {"audio": free_port(), "health": free_port(), "web": free_port()}
    env = {
        **os.environ,
        "MOSHI_PORT": str(ports["audio"]),  # the seed's variables
        "HEALTH_PORT": str(ports["health"]),
        "WEB_PORT": str(ports["web"]),
        "STT_BRIDGE_SERVER_HOST": "127.0.0.1",
        # Not AudioSocket's 9092: another test's server (or the machine's) may hold it.
        "STT_BRIDGE_AUDIOSOCKET_HOST": "127.0.0.1",
        "STT_BRIDGE_AUDIOSOCKET_PORT": str(free_port()),
        "STT_BRIDGE_ENGINE_NAME": "cpu",  # the old name still selects the CPU engine
        "STT_BRIDGE_ENGINE_CACHE_DIR": str(MODEL_CACHE),
        "STT_BRIDGE_SERVER_DRAIN_TIMEOUT_S": "2",  # live calls may go on 2 s after SIGTERM
        "STT_BRIDGE_SIP_ENABLED": "false",  # on by default, on 5060: not in parallel tests
        "STT_BRIDGE_DATA_DIR": str(tmp_path / "data"),
    }
    process = subprocess.Popen([*CLI, "serve"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()  # printed once every port listens
        assert "engine moonshine" in banner, banner
        yield process, ports
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


async def test_serve_answers_then_drains_on_sigterm(
    served: tuple[subprocess.Popen[str], dict[str, int]],
) -> None:
    process, ports = served
    pcm, _ = read_pcm(speech_wav(SENTENCES[5]))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{ports['health']}/health") as r:
            assert (await r.json())["status"] == "healthy"
        async with http.get(f"http://127.0.0.1:{ports['web']}/config.json") as r:
            assert (await r.json())["port"] == ports["audio"]
        ws = await http.ws_connect(f"ws://127.0.0.1:{ports['audio']}/")
        data = pcm.tobytes()
        for i in range(0, len(data), 9600):
            await ws.send_bytes(data[i : i + 9600])
        await asyncio.sleep(0.5)
        # SIGTERM mid-call: the live call is flushed, its words arrive, then the process exits 0.
        process.send_signal(signal.SIGTERM)
        messages = [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]
    words = " ".join(m["text"] for m in messages if m["type"] == "word")
    assert messages[-1]["type"] == "closed"
    assert word_error_rate(SENTENCES[5], words) <= FILE_WER_BOUND, words
    assert await asyncio.to_thread(process.wait, 30) == 0
