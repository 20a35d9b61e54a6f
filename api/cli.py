"""`stt-bridge`: serve the bridge, or transcribe files offline through the same engine."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from api import __version__, logs
from api.config import Config, ConfigError, load_config
from api.preflight import engine_problem, serve_problem
from api.transcribe import (
    EXTENSIONS,
    FORMATS,
    AudioFileError,
    file_problem,
    read_audio,
    transcribe_pcm,
)
from engine.config import ENGINE_NAMES
from engine.registry import build_engine
from telephony.call import CallHub

PROGRESS_MIN_S = 30.0  # files shorter than this finish before a bar is worth drawing
ENGINE_CHOICES = ", ".join(ENGINE_NAMES)
EXIT_USAGE = 2  # a setting, a port or a file to fix before anything runs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stt-bridge",
        description="Real-time transcription bridge for telephony: SIP, Asterisk, FreeSWITCH, "
        "Twilio and WebSocket audio in; live, timestamped transcripts out.",
    )
    parser.add_argument("--version", action="version", version=f"stt-bridge {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        help="TOML configuration file (default: configs/default.toml); "
        "STT_BRIDGE_<SECTION>_<KEY> environment variables override it",
    )
    parser.add_argument("--log-level", help="debug, info, warning or error (default: from config)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the service (audio WebSockets + API, health, web client)",
        description="Run the service until SIGTERM or Ctrl-C, then drain live calls.",
    )
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="audio WebSocket + API port (default: 8080)")
    serve.add_argument("--health-port", type=int, help="health/ready/info port (default: 8001)")
    serve.add_argument("--web-port", type=int, help="browser client port (default: 8000)")
    serve.add_argument("--engine", help=f"{ENGINE_CHOICES} (default: engine.name)")
    serve.add_argument(
        "--workers",
        type=int,
        help="front-end processes sharing the ports, 0 = one per core (default: server.workers)",
    )

    transcribe = commands.add_parser(
        "transcribe",
        help="transcribe audio files offline and print words with timestamps",
        description="Transcribe audio files (wav, flac, ogg, mp3, ... anything libsndfile "
        "reads) through the configured engine, as fast as it goes.",
    )
    transcribe.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audio files")
    transcribe.add_argument(
        "-f",
        "--format",
        choices=sorted(FORMATS),
        default="text",
        help="text: one word per line with start and end seconds; json: one object per file "
        "(words, segments, text); vtt: WebVTT cues, one per segment; srt: SubRip cues, one per "
        "segment (default: text)",
    )
    transcribe.add_argument(
        "-o",
        "--output-dir",
        type=Path,
        help="write FILE's transcript to OUTPUT_DIR/<name>.<txt|json|vtt|srt> instead of stdout",
    )
    transcribe.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"progress bar on stderr (default: for files of {PROGRESS_MIN_S:.0f} s or more "
        "when stderr is a terminal)",
    )
    transcribe.add_argument(
        "--engine", help="auto, moonshine (the CPU engine) or kyutai (default: engine.name)"
    )
    return parser


def _override(config: Config, args: argparse.Namespace) -> Config:
    import dataclasses

    server = config.server
    for key in ("host", "port", "health_port", "web_port", "workers"):
        value = getattr(args, key, None)
        if value is not None:
            server = dataclasses.replace(server, **{key: value})
    engine = config.engine
    if getattr(args, "engine", None):
        engine = dataclasses.replace(engine, name=args.engine)
    log = config.log
    if args.log_level:
        log = dataclasses.replace(log, level=args.log_level)
    return dataclasses.replace(config, server=server, engine=engine, log=log)


async def _transcribe(config: Config, args: argparse.Namespace) -> int:
    engine, _ = build_engine(config.engine)
    await engine.start()
    hub = CallHub(engine)
    render = FORMATS[args.format]
    failures = 0
    try:
        for path in args.files:
            try:
                pcm = read_audio(path, hub.engine.sample_rate)
            except AudioFileError as exc:
                print(f"stt-bridge: {exc}", file=sys.stderr)
                failures += 1
                continue
            seconds = len(pcm) / hub.engine.sample_rate
            show = args.progress
            if show is None:
                show = seconds >= PROGRESS_MIN_S and sys.stderr.isatty()
            # Log lines (a call started, the model prepared) go above the bar, not into it.
            with (
                logging_redirect_tqdm(),
                tqdm(
                    total=round(seconds, 2),
                    unit="s",
                    desc=path.name,
                    disable=not show,
                    file=sys.stderr,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s "
                    "[{elapsed}<{remaining}]",
                ) as bar,
            ):
                transcript = await transcribe_pcm(hub, pcm, str(path), progress=bar.update)
            text = render(transcript)
            if args.output_dir:
                args.output_dir.mkdir(parents=True, exist_ok=True)
                out = args.output_dir / f"{path.stem}.{EXTENSIONS[args.format]}"
                out.write_text(text)
            else:
                sys.stdout.write(text)
                sys.stdout.flush()
    finally:
        await engine.stop()
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _override(load_config(args.config), args)
    except ConfigError as exc:
        print(f"stt-bridge: config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(config.log.level, config.log.json)
    # Every mistake a user can fix is found here, one line each, before a model loads.
    if args.command == "serve":
        problems = [serve_problem(config)]
    else:
        problems = [file_problem(path) for path in args.files] + [engine_problem(config.engine)]
    if any(problems):
        for problem in filter(None, problems):
            print(f"stt-bridge: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "serve":
        from api import workers

        problem = workers.devices_problem(config.engine)
        if problem:
            print(f"stt-bridge: config: {problem}", file=sys.stderr)
            return EXIT_USAGE
        if workers.supervised(config):  # workers, or several engine.devices
            return run_loop(workers.supervise(config))  # workers, engines (docs/deployment.md)
        from api.app import run

        # 70: the engine failed, restart the service
        return run_loop(run(workers.single_process_config(config)))
    return run_loop(_transcribe(config, args))


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where it is installed (a drop-in event loop, about twice as fast at
    socket reads and timers), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main())
