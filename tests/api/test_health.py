"""The health port: /health (the seed's JSON), /ready, /info."""

from __future__ import annotations

import datetime

import aiohttp

from tests.conftest import ServiceFactory


async def test_health_ready_info(start_service: ServiceFactory) -> None:
    service = await start_service(capacity=1)
    base = f"http://127.0.0.1:{service.ports['health']}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/health") as r:
            assert r.status == 200
            health = await r.json()
        assert health["status"] == "healthy"
        assert health["websocket_available"] is True
        assert health["service"] == "stt-bridge"
        datetime.datetime.fromisoformat(health["timestamp"])

        async with http.get(f"{base}/info") as r:
            info = await r.json()
        assert info["engine"]["name"] == "moonshine"
        assert info["engine"]["capacity"] == 1 and info["engine"]["free_slots"] == 1
        assert info["engine"]["model"] == "moonshine base-en (moonshine-cpp wheel)"
        assert info["version"]

        async with http.get(f"{base}/ready") as r:
            assert r.status == 200
        # Take the only slot: the node is no longer ready, and says why.
        ws = await http.ws_connect(f"ws://127.0.0.1:{service.ports['audio']}/")
        async with http.get(f"{base}/ready") as r:
            assert r.status == 503
            assert "slot" in (await r.json())["reason"]
        await ws.send_str('{"type": "stop"}')
        async for _ in ws:
            pass
        async with http.get(f"{base}/ready") as r:
            assert r.status == 200


async def test_web_client_is_served_on_both_ports(start_service: ServiceFactory) -> None:
    service = await start_service()
    async with aiohttp.ClientSession() as http:
        for port in (service.ports["web"], service.ports["audio"]):
            async with http.get(f"http://127.0.0.1:{port}/") as r:
                assert r.status == 200
                assert "text/html" in r.headers["Content-Type"]
            async with http.get(f"http://127.0.0.1:{port}/config.json") as r:
                assert (await r.json())["port"] == service.ports["audio"]
