"""SIP is on by default; a taken port turns it off with one log line, and the service goes on."""

from __future__ import annotations

import dataclasses
import logging
import socket

import aiohttp
import pytest

from api.config import SipConfig
from telephony.sip.backend import port_problem
from tests.conftest import ServiceFactory, make_config


def test_sip_is_on_by_default() -> None:
    assert SipConfig().enabled and SipConfig().port == 5060 and SipConfig().tcp


def test_a_held_port_is_named_as_taken() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        problem = port_problem("127.0.0.1", port, tcp=True)
    assert problem == f"UDP port {port} on 127.0.0.1 is taken by another program"
    assert port_problem("127.0.0.1", 0, tcp=True) == ""  # an ephemeral port is always there


async def test_taken_port_leaves_sip_off_and_says_so(
    start_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        base = make_config()
        config = dataclasses.replace(
            base, sip=dataclasses.replace(base.sip, enabled=True, host="127.0.0.1", port=port)
        )
        with caplog.at_level(logging.ERROR, logger="telephony.sip.backend"):
            service = await start_service(config)
        lines = [r.getMessage() for r in caplog.records if r.name == "telephony.sip.backend"]
        assert len(lines) == 1 and f"TCP port {port} on 127.0.0.1 is taken" in lines[0]
        assert "sip" not in service.ports
        health = f"http://127.0.0.1:{service.ports['health']}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{health}/info") as response:
                sip = (await response.json())["sip"]
            async with http.get(f"{health}/ready") as response:
                assert response.status == 200  # the other front ends still take calls
                ready = await response.json()
            async with http.ws_connect(f"ws://127.0.0.1:{service.ports['audio']}/") as ws:
                await ws.send_str('{"type": "stop"}')
                assert (await ws.receive_json(timeout=10))["type"] == "closed"
    assert sip["enabled"] and not sip["listening"] and "is taken" in sip["reason"]
    assert ready["sip"].startswith(f"not listening: TCP port {port}")


async def test_free_port_listens_and_ready_says_where(start_service: ServiceFactory) -> None:
    base = make_config()
    config = dataclasses.replace(
        base,
        sip=dataclasses.replace(
            base.sip,
            enabled=True,
            host="127.0.0.1",
            port=0,
            rtp_port_min=41000,
            rtp_port_max=41099,
        ),
    )
    service = await start_service(config)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/ready") as response:
            ready = await response.json()
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/info") as response:
            sip = (await response.json())["sip"]
    assert ready["sip"] == f"listening on {service.ports['sip']}"
    assert sip["listening"] and "reason" not in sip
