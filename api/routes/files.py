"""Files over HTTP, in the protocols tools already speak.

- `POST /v1/listen` (and any path ending in it): Deepgram's pre-recorded API. The body is the
  audio, or JSON `{"url": ...}` fetched from a host in `[api] fetch_hosts` only (none by
  default). The live WebSocket `GET /v1/listen` is telephony/deepgram.py's.
- `POST /v1/audio/transcriptions`: OpenAI's, a multipart form with the file.

Either file goes through `api.transcribe.transcribe_legs`, the path `stt-bridge transcribe`
takes: one call (front end `file`, stored and announced like any other), a leg per channel, as
fast as the engine takes it. A body or fetched file over `[api] file_max_bytes` is refused
(413) as soon as that is known; decoding runs off the event loop, so live calls are not held
up by a big file.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from api import deepgram_files, openai_files
from api.deepgram_files import PrerecordedParams
from api.file_audio import FileAudio, decode_container, decode_raw, looks_like_container
from api.openai_files import TRANSCRIPTIONS_PATH, OpenAIRequestError, TranscriptionRequest
from api.transcribe import AudioFileError, Transcript, transcribe_legs
from engine.base import BridgeError
from telephony.call import CallHub
from telephony.deepgram import PATH as LISTEN_PATH
from telephony.deepgram import BadParameters, ModelInfo, rejection_body
from telephony.errors import rejection_for
from telephony.transcript import InvalidOptions, TranscriptOptions, transcript_options

log = logging.getLogger(__name__)

JSON_MAX_BYTES: Final = 64 * 1024  # a `{"url": ...}` body, or one text field of a form
FORM_FIELDS_BYTES: Final = 1024 * 1024  # what a form may hold besides its file
FETCH_REDIRECTS: Final = 5
FETCH_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
CHUNK: Final = 1 << 16
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class TooLarge(Exception):
    """A body, form field or fetched file over its cap: 413."""


class FetchRefused(Exception):
    """A URL the bridge will not or could not fetch: 400, with the reason."""


class UploadAborted(Exception):
    """The client stopped sending mid-body."""


class FileRoutes:
    """The two routes, with what they need from the service."""

    def __init__(self, hub: CallHub, max_bytes: int, fetch_hosts: tuple[str, ...]) -> None:
        self.hub = hub
        self.max_bytes = max_bytes
        self.fetch_hosts = tuple(h.strip().lower() for h in fetch_hosts if h.strip())
        self.model = ModelInfo(f"stt-bridge-{hub.engine.name}", _version())

    # -- Deepgram --

    async def deepgram(self, request: web.Request) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        headers = {"dg-request-id": request_id}

        def refuse(status: int, code: str, message: str) -> web.Response:
            body = rejection_body(code, message, request_id)
            # The header quotes the client's own values: ASCII only, no line breaks.
            header = _CONTROL.sub(" ", message.encode("ascii", "backslashreplace").decode())
            return web.json_response(body, status=status, headers={**headers, "dg-error": header})

        try:
            params = deepgram_files.parse_prerecorded(request.query.items())
        except BadParameters as exc:
            return refuse(400, "Bad Request", str(exc))
        try:
            if request.content_type == "application/json":
                url = _url_of(await read_body(request.content, JSON_MAX_BYTES, request))
                data = await self.fetch(url)
                source = _safe_url(url)
            else:
                data = await read_body(request.content, self.max_bytes, request)
                source = "upload"
            audio = await _off_loop(lambda: self._decode(params, data))
        except TooLarge as exc:
            return refuse(413, "Payload Too Large", str(exc))
        except (FetchRefused, AudioFileError, UploadAborted) as exc:
            return refuse(400, "Bad Request", str(exc))
        labels = {"api": "deepgram", **_deepgram_labels(params)}
        try:
            transcripts = await self._transcribe(
                audio, source, labels, params.live.options, request_id
            )
        except BridgeError as exc:
            status = rejection_for(exc).http_status
            response = refuse(status, _reason(status), str(exc))
            response.headers["Retry-After"] = "1"
            return response
        body = deepgram_files.response(
            params,
            transcripts,
            request_id=request_id,
            sha256=audio.sha256,
            created=datetime.now(UTC),
            duration_s=audio.duration_s,
            channels=audio.channels,
            model=self.model,
        )
        return web.json_response(body, headers=headers, dumps=_dumps)

    def _decode(self, params: PrerecordedParams, data: bytes) -> FileAudio:
        rate = self.hub.engine.sample_rate
        split = params.live.multichannel
        if params.raw and not looks_like_container(data):
            live = params.live
            return decode_raw(data, live.encoding, live.sample_rate, live.channels, rate, split)
        return decode_container(data, rate, split)

    async def fetch(self, url: URL) -> bytes:
        """The file at `url`, following redirects only to allowed hosts."""
        async with aiohttp.ClientSession(timeout=FETCH_TIMEOUT) as http:
            for _ in range(FETCH_REDIRECTS + 1):
                self._check_host(url)
                try:
                    async with http.get(url, allow_redirects=False) as response:
                        if response.status in (301, 302, 303, 307, 308):
                            url = url.join(URL(response.headers.get("Location", "")))
                            continue
                        if response.status != 200:
                            raise FetchRefused(
                                f"fetching {_safe_url(url)} answered HTTP {response.status}"
                            )
                        return await read_body(response.content, self.max_bytes)
                except (aiohttp.ClientError, TimeoutError, UploadAborted) as exc:
                    reason = str(exc) or type(exc).__name__
                    raise FetchRefused(f"fetching {_safe_url(url)} failed: {reason}") from None
        raise FetchRefused(f"fetching the URL took more than {FETCH_REDIRECTS} redirects")

    def _check_host(self, url: URL) -> None:
        if url.scheme not in ("http", "https") or not url.host:
            raise FetchRefused(f"the url must be http:// or https://, not {_safe_url(url)}")
        host = url.host.lower()
        with_port = f"{host}:{url.port}" if ":" not in host else f"[{host}]:{url.port}"
        if host not in self.fetch_hosts and with_port not in self.fetch_hosts:
            hint = "no host is allowed: [api] fetch_hosts is empty"
            if self.fetch_hosts:
                hint = "not among [api] fetch_hosts"
            raise FetchRefused(f"the url's host {host} may not be fetched from ({hint})")

    # -- OpenAI --

    async def openai(self, request: web.Request) -> web.StreamResponse:
        call_id = uuid.uuid4().hex
        headers = {"x-request-id": call_id}

        def refuse(status: int, message: str, param: str | None = None, **kw: Any) -> web.Response:
            body = openai_files.error_body(message, param=param, **kw)
            return web.json_response(body, status=status, headers=headers)

        if not request.content_type.startswith("multipart/form-data"):
            return refuse(400, "The request must be multipart/form-data with a file", "file")
        declared = request.content_length
        if declared is not None and declared > self.max_bytes + FORM_FIELDS_BYTES:
            message = f"the body is {declared} bytes, over the limit of {self.max_bytes}"
            return refuse(413, message, "file", code="file_too_large")
        try:
            fields, filename, data = await self._read_form(request)
            ask = openai_files.parse_fields(fields)
            if data is None:
                return refuse(400, "'file' is a required property", "file", code="missing")
            options = _openai_options(ask)
            audio = await _off_loop(lambda: decode_container(data, self._rate, False))
        except OpenAIRequestError as exc:
            return refuse(400, str(exc), exc.param, code=exc.code)
        except TooLarge as exc:
            return refuse(413, str(exc), "file", code="file_too_large")
        except AudioFileError as exc:
            message = f"Invalid file format: {exc}"
            return refuse(400, message, "file", code="invalid_file_format")
        except UploadAborted as exc:
            return refuse(400, str(exc), "file")
        labels = {"api": "openai", "model": ask.model, "language": ask.language}
        try:
            (transcript,) = await self._transcribe(
                audio, filename or "upload", labels, options, call_id
            )
        except BridgeError as exc:
            status = rejection_for(exc).http_status
            response = refuse(status, str(exc), kind="server_error", code="engine_unavailable")
            response.headers["Retry-After"] = "1"
            return response
        body, content_type = openai_files.render(ask, transcript)
        if isinstance(body, dict):
            return web.json_response(body, headers=headers, dumps=_dumps)
        return web.Response(text=body, content_type=content_type, headers=headers)

    async def _read_form(
        self, request: web.Request
    ) -> tuple[dict[str, list[str]], str, bytes | None]:
        """Text fields (each capped), and the `file` part (capped at `max_bytes`)."""
        fields: dict[str, list[str]] = {}
        filename = ""
        data: bytes | None = None
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, MultipartReader) or part.name is None:
                    raise OpenAIRequestError("nested or unnamed form parts are not taken")
                if part.name == "file":
                    filename = part.filename or ""
                    data = await _read_part(part, self.max_bytes)
                else:
                    text = await _read_part(part, JSON_MAX_BYTES)
                    fields.setdefault(part.name, []).append(text.decode("utf-8", "replace"))
        except (ValueError, AssertionError) as exc:  # a malformed form (aiohttp's own checks)
            if isinstance(exc, OpenAIRequestError):
                raise
            raise OpenAIRequestError(f"malformed multipart form: {exc}") from None
        except (ConnectionError, HttpProcessingError):
            raise UploadAborted("the upload was aborted") from None
        return fields, filename, data

    @property
    def _rate(self) -> int:
        return self.hub.engine.sample_rate

    async def _transcribe(
        self,
        audio: FileAudio,
        source: str,
        labels: dict[str, str],
        options: TranscriptOptions,
        call_id: str,
    ) -> list[Transcript]:
        started = asyncio.get_running_loop().time()
        transcripts = await transcribe_legs(
            self.hub,
            audio.legs,
            source,
            labels={k: v for k, v in labels.items() if v},
            options=options,
            call_id=call_id,
        )
        took = asyncio.get_running_loop().time() - started
        log.info(
            "file transcribed",
            extra={
                "call_id": call_id,
                "front_end": "file",
                "audio_s": round(audio.duration_s, 2),
                "x_real_time": round(audio.duration_s / max(took, 1e-6), 1),
            },
        )
        return list(transcripts.values())


async def read_body(stream: StreamReader, cap: int, request: web.Request | None = None) -> bytes:
    """A whole body, refused as soon as it is known to be over `cap` bytes (its
    Content-Length first, else as it arrives)."""
    declared = request.content_length if request is not None else None
    if declared is not None and declared > cap:
        raise TooLarge(f"the body is {declared} bytes, over the limit of {cap}")
    body = bytearray()
    try:
        while chunk := await stream.read(CHUNK):
            body += chunk
            if len(body) > cap:
                raise TooLarge(f"the file is over the limit of {cap} bytes")
    except (ConnectionError, HttpProcessingError, aiohttp.ClientPayloadError):
        raise UploadAborted("the upload was aborted") from None
    return bytes(body)


async def _read_part(part: BodyPartReader, cap: int) -> bytes:
    body = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        body += chunk
        if len(body) > cap:
            raise TooLarge(f"the form part {part.name!r} is over the limit of {cap} bytes")
    return bytes(body)


def _url_of(body: bytes) -> URL:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FetchRefused('the JSON body must be {"url": "..."}') from None
    url = doc.get("url") if isinstance(doc, dict) else None
    if not isinstance(url, str) or not url:
        raise FetchRefused('the JSON body must be {"url": "..."}')
    try:
        return URL(url)
    except ValueError:
        raise FetchRefused("the url is not a URL") from None


def _safe_url(url: URL) -> str:
    """A URL for messages and the call's label: no credentials, no query (signed URLs carry
    their secret there)."""
    return str(url.with_user(None).with_query(None).with_fragment(None))


def _deepgram_labels(params: PrerecordedParams) -> dict[str, str]:
    labels = params.live.labels()
    if not params.raw:  # the parser's neutral values, not the file's
        for key in ("encoding", "sample_rate", "channels"):
            labels.pop(key, None)
    return labels


def _openai_options(ask: TranscriptionRequest) -> TranscriptOptions:
    try:
        return transcript_options((), ask.keyterms)
    except InvalidOptions as exc:
        raise OpenAIRequestError(f"prompt: {exc}", "prompt") from None


def _reason(status: int) -> str:
    return {503: "Service Unavailable", 409: "Conflict"}.get(status, "Bad Request")


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


async def _off_loop(work: Callable[[], FileAudio]) -> FileAudio:
    return await asyncio.get_running_loop().run_in_executor(None, work)


def _version() -> str:
    try:
        return importlib.metadata.version("stt-bridge")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def add_routes(
    app: web.Application, hub: CallHub, max_bytes: int, fetch_hosts: tuple[str, ...]
) -> None:
    routes = FileRoutes(hub, max_bytes, fetch_hosts)
    app.router.add_post(LISTEN_PATH, routes.deepgram)
    app.router.add_post("/{prefix:.+}" + LISTEN_PATH, routes.deepgram)
    app.router.add_post(TRANSCRIPTIONS_PATH, routes.openai)
