"""Messages handled as aiohttp parses them (telephony/direct_ws.py), on a real loopback socket:
the fast path is taken, order is kept against messages the handler's loop takes, an error in
it ends the loop, and frames it handles keep the idle watchdog quiet."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from telephony.config import LimitsConfig
from telephony.direct_ws import DIRECT_SUPPORTED
from telephony.limits import LIMITS
from telephony.ws_front import messages, open_websocket


@dataclass
class Seen:
    handled: list[tuple[str, bytes | str]] = field(default_factory=list)  # (path, payload)
    error: str = ""
    ended: asyncio.Event = field(default_factory=asyncio.Event)


def app_for(seen: Seen, limits: LimitsConfig | None = None) -> web.Application:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = open_websocket(request, read_by_messages=True)
        await ws.prepare(request)

        def direct(msg: WSMessage) -> bool:
            if msg.type != WSMsgType.BINARY:
                return False
            if msg.data == b"bad":
                raise ValueError("a frame the codec refuses")
            seen.handled.append(("direct", msg.data))
            return True

        try:
            async for msg in messages(ws, request, direct=direct):
                if msg.type == WSMsgType.BINARY:
                    seen.handled.append(("loop", msg.data))
                elif msg.data == "stop":
                    break
                elif msg.data == "slow":  # waits on the engine (backpressure): not idle
                    seen.handled.append(("loop", msg.data))
                    await asyncio.sleep(1.0)
                else:  # a control message that takes a while: frames queue meanwhile
                    seen.handled.append(("loop", msg.data))
                    await asyncio.sleep(0.05)
        except ValueError as exc:
            seen.error = str(exc)
            await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"refused")
        finally:
            seen.ended.set()
        if not ws.closed:
            await ws.close()
        return ws

    app = web.Application()
    if limits is not None:
        app[LIMITS] = limits
    app.router.add_get("/", handler)
    return app


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"ws://127.0.0.1:{port}/") as ws,
        ):
            yield ws
    finally:
        await runner.cleanup()


async def paced(ws: aiohttp.ClientWebSocketResponse, frames: list[bytes], gap_s: float) -> None:
    for frame in frames:
        await ws.send_bytes(frame)
        await asyncio.sleep(gap_s)


async def within(awaitable: Awaitable[object], seconds: float = 5.0) -> None:
    await asyncio.wait_for(awaitable, seconds)


def test_the_installed_aiohttp_has_the_hook() -> None:
    # pyproject pins the aiohttp this was written against; on another every frame takes the
    # queue (correct, slower), which this says loudly rather than in a benchmark.
    assert DIRECT_SUPPORTED, f"aiohttp {aiohttp.__version__}: check telephony/direct_ws.py"


async def test_frames_keep_their_order_around_the_loop() -> None:
    seen = Seen()
    first = [b"a%d" % n for n in range(20)]
    burst = [b"b%d" % n for n in range(20)]
    async with serve(app_for(seen)) as ws:
        await paced(ws, first, 0.005)  # one at a time: the handler waits for each
        await ws.send_str("control")  # the loop takes 50 ms over it...
        for frame in burst:  # ...while these arrive: they must come after it
            await ws.send_bytes(frame)
        await asyncio.sleep(0.2)
        await ws.send_str("stop")
        await within(seen.ended.wait())
    payloads = [payload for _, payload in seen.handled]
    assert payloads == [*first, "control", *burst]
    paths = {payload: path for path, payload in seen.handled}
    assert sum(paths[f] == "direct" for f in first) >= 15  # paced frames skip the queue
    assert paths["control"] == "loop"


async def test_an_error_in_the_direct_path_ends_the_loop_with_it() -> None:
    seen = Seen()
    async with serve(app_for(seen)) as ws:
        await paced(ws, [b"ok1", b"ok2"], 0.01)
        await ws.send_bytes(b"bad")
        await ws.send_bytes(b"after")
        closing = await asyncio.wait_for(ws.receive(), 5)
        await within(seen.ended.wait())
    assert closing.type == WSMsgType.CLOSE and closing.data == WSCloseCode.INTERNAL_ERROR
    assert seen.error == "a frame the codec refuses"
    assert [p for _, p in seen.handled] == [b"ok1", b"ok2"]  # nothing after the bad frame


async def test_frames_taken_directly_count_as_activity_for_the_idle_limit() -> None:
    seen = Seen()
    app = app_for(seen, LimitsConfig(idle_timeout_s=0.3))
    async with serve(app) as ws:
        await paced(ws, [b"x"] * 50, 0.02)  # 1 s of frames, over three idle limits
        assert not seen.ended.is_set() and not ws.closed
        closing = await asyncio.wait_for(ws.receive(), 2)  # then silence
    assert closing.type == WSMsgType.CLOSE and closing.data == WSCloseCode.POLICY_VIOLATION
    assert len(seen.handled) == 50


async def test_a_handler_at_work_on_a_message_does_not_make_its_client_idle() -> None:
    """While the handler waits (for room in a behind engine's buffer) it does not read, and
    the client's frames wait in the socket: over the idle limit, but the client is not idle."""
    seen = Seen()
    app = app_for(seen, LimitsConfig(idle_timeout_s=0.3))
    async with serve(app) as ws:
        await ws.send_str("slow")  # the handler is busy for 1 s, three idle limits
        await paced(ws, [b"y"] * 10, 0.02)
        await asyncio.sleep(1.0)
        assert not seen.ended.is_set() and not ws.closed
        closing = await asyncio.wait_for(ws.receive(), 2)  # then silence: idle, closed
    assert closing.type == WSMsgType.CLOSE and closing.data == WSCloseCode.POLICY_VIOLATION
    assert [p for _, p in seen.handled] == ["slow", *[b"y"] * 10]
