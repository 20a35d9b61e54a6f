#!/usr/bin/env python3
"""Print stt-bridge transcripts as FreeSWITCH fires them (mod_audio_fork::transcription).

stt-bridge answers each fork with JSON text frames of type "transcription"; mod_audio_fork
turns each into a CUSTOM event whose body is our JSON: {"call_id", "leg", "type", "text", ...}.
This listens on the event socket (ESL, :8021) with nothing but the standard library.

    python3 esl_transcripts.py [--host 127.0.0.1] [--port 8021] [--password ClueCon]
"""

from __future__ import annotations

import argparse
import json
import socket


def read_message(stream) -> tuple[dict[str, str], str]:  # type: ignore[no-untyped-def]
    headers: dict[str, str] = {}
    while (line := stream.readline().decode().rstrip("\n")) != "":
        name, _, value = line.partition(": ")
        headers[name] = value
    body = stream.read(int(headers.get("Content-Length", "0"))).decode()
    return headers, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8021)
    parser.add_argument("--password", default="ClueCon")
    args = parser.parse_args()
    with socket.create_connection((args.host, args.port)) as sock:
        stream = sock.makefile("rb")
        read_message(stream)  # auth/request
        sock.sendall(f"auth {args.password}\n\n".encode())
        read_message(stream)
        sock.sendall(b"event json CUSTOM mod_audio_fork::transcription mod_audio_fork::error\n\n")
        read_message(stream)
        while True:
            _, body = read_message(stream)
            if not body:
                continue
            event = json.loads(body)
            data = json.loads(event.get("_body", "{}") or "{}")
            if data.get("type") == "segment":
                print(f"[{data['call_id']} {data['leg']}] {data['start']:7.2f}s  {data['text']}")


if __name__ == "__main__":
    main()
