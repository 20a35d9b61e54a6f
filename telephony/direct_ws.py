"""Audio frames handled where aiohttp parses them, not one task wake-up later.

aiohttp hands every WebSocket message to its handler through a queue: the parser (in the
protocol's `data_received`) puts the message there and wakes the handler's task, which takes it
out on its next turn. For a 20 ms audio frame that hop is a large part of the cost: a bare
aiohttp server goes from 9.5 to 6 µs per frame without it, `/v1/stream` from 24 to 20.5 µs
(200 calls, bench/ws_floor.py and bench/load.py).

`DirectWebSocket` gives aiohttp's parser a queue that first offers each message to the
handler's `direct` function (see `telephony.ws_front.messages`), synchronously, when the handler
is waiting for a message and nothing is queued ahead of it, so order is kept. The function
returns True when it has handled the message (pushed the audio), False to let the message go
through the queue to the handler's loop as before. An exception it raises comes out of the
handler's loop in place of that message.

aiohttp has no public hook for this: the class replaces the queue and parser that
`WebSocketResponse._post_start` built, whose shape changes between aiohttp's minor versions.
`DIRECT_SUPPORTED` says whether the installed aiohttp is the 3.14 this was written against
(pyproject pins it); on another 3.x that still has `aiohttp._websocket.reader`,
`open_websocket` returns a plain `WebSocketResponse` and every message goes through the loop,
which handles it the same way, only slower.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import aiohttp
from aiohttp import WSMessage, web
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.helpers import DEFAULT_CHUNK_SIZE

DIRECT_SUPPORTED: Final = aiohttp.__version__.startswith("3.14.")

DirectHandler = Callable[[WSMessage], bool]


class _DirectQueue(WebSocketDataQueue):
    """aiohttp's message queue, with a synchronous way past it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direct: DirectHandler | None = None
        self.waiting = False  # the handler waits in receive(): nothing of its is in flight
        self.error: Exception | None = None  # raised by `direct`: for the handler's loop

    def feed_data(self, data: Any, size: int) -> None:
        direct = self.direct
        if direct is not None and self.waiting and not self._buffer:
            try:
                if direct(data):
                    return
            except Exception as exc:  # the handler's own error, raised in its own loop
                self.error, self.direct = exc, None
        super().feed_data(data, size)


class DirectWebSocket(web.WebSocketResponse):
    """A `WebSocketResponse` whose messages may be handled as they are parsed."""

    def _post_start(self, request: Any, protocol: str | None, writer: Any) -> None:
        http = request.protocol
        # Bytes that came with or right after the upgrade request (a client that pipelines
        # its first frames, even its stop, behind the handshake) wait in the protocol's tail
        # for a parser: the one super() sets would take them into the queue replaced below,
        # where nobody reads them. They go to ours instead, ahead of anything later.
        tail, http._message_tail = http._message_tail, b""
        super()._post_start(request, protocol, writer)
        # What aiohttp 3.14's _post_start built, again, around our queue.
        queue = _DirectQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=self._loop)
        self._reader = queue
        self._parser = WebSocketReader(
            queue,
            self._max_msg_size,
            compress=bool(self._compress),
            decode_text=self._decode_text,
        )
        http._payload_parser = None
        http._message_tail = tail  # set_parser feeds it to our parser
        on_data = None if self._heartbeat is None else self._on_data_received
        http.set_parser(self._parser, data_received_cb=on_data)

    @property
    def direct_queue(self) -> _DirectQueue | None:
        """The queue, once prepared."""
        reader = self._reader
        return reader if isinstance(reader, _DirectQueue) else None
