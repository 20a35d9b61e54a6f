"""Transcripts survive: kill -9 and restart, SIGTERM with live calls, webhook retries, TLS."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import sqlite3
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.e2e.server_process import ServerProcess, alive, free_port
from tests.speech import SENTENCES, read_pcm, speech_wav

pytestmark = pytest.mark.xdist_group("durability")
SECRET = "webhook-secret"


class Receiver:
    """A real webhook endpoint on loopback that can be down, slow or failing."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[dict[str, Any]] = []
        self.failures_left = 0
        self.delay_s = 0.0
        self.bad_signatures = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("X-STT-Bridge-Signature", "")):
            self.bad_signatures += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.failures_left > 0:
            self.failures_left -= 1
            return web.Response(status=500)
        self.received.append(json.loads(body))
        return web.Response(status=204)

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def events(self, name: str, call_id: str) -> list[dict[str, Any]]:
        out = []
        for e in self.received:
            cid = e.get("call_id") or (e.get("call") or {}).get("id")
            if e["event"] == name and cid == call_id:
                out.append(e)
        return out

    async def wait_for(self, name: str, call_id: str, timeout: float = 60) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while not self.events(name, call_id):
                await asyncio.sleep(0.1)
        return self.events(name, call_id)[-1]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    yield r
    await r.down()


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.cleanup()


def speech(n: int) -> bytes:
    return read_pcm(speech_wav(SENTENCES[n]))[0].tobytes()


async def send_audio(ws: aiohttp.ClientWebSocketResponse, data: bytes, pace: float = 0.0) -> None:
    for i in range(0, len(data), 4800):
        await ws.send_bytes(data[i : i + 4800])
        if pace:
            await asyncio.sleep(pace)


async def test_kill_9_leaves_no_worker_process_behind(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """The PJSIP agent ends with a killed server: it is not left holding the SIP port."""
    sip = {"ENABLED": "true", "BACKEND": "pjsua2", "HOST": "127.0.0.1", "PORT": "0"}
    server = ServerProcess(tmp_path / "data", **{f"STT_BRIDGE_SIP_{k}": v for k, v in sip.items()})
    servers.append(server.start())
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.ports['health']}/info") as response:
            info = await response.json()
    workers = server.children()
    assert info["sip"]["agent_pid"] in workers
    server.kill()
    for _ in range(50):
        if not any(alive(pid) for pid in workers):
            break
        await asyncio.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)]


async def test_kill_9_then_restart_keeps_every_transcript(
    tmp_path: Path, receiver: Receiver, servers: list[ServerProcess]
) -> None:
    env = {"STT_BRIDGE_WEBHOOK_URL": receiver.url, "STT_BRIDGE_WEBHOOK_SECRET": SECRET}
    first = ServerProcess(tmp_path / "data", **env).start()
    servers.append(first)
    async with aiohttp.ClientSession() as http:
        # A finished call, while the webhook receiver is down.
        done = await http.ws_connect(first.url("/v1/stream?call_id=finished"))
        await send_audio(done, speech(1))
        await done.send_str('{"type": "stop"}')
        finished_words = [json.loads(m.data) async for m in done]
        # A live call: its first utterance is transcribed, then the bridge dies mid-sentence.
        live = await http.ws_connect(first.url("/v1/stream?call_id=cut-off"))
        audio = speech(0)
        await send_audio(live, audio[: len(audio) // 2], pace=0.01)
        first_word = await live.receive_json(timeout=30)
        while first_word["type"] == "partial":  # the hypotheses before it
            first_word = await live.receive_json(timeout=30)
        assert first_word["type"] == "word"
        await asyncio.sleep(0.5)
        first.kill()
    await receiver.up()
    second = ServerProcess(tmp_path / "data", **env).start()
    servers.append(second)
    async with aiohttp.ClientSession() as http:
        async with http.get(second.url("/v1/calls/finished/transcript", "http")) as r:
            finished = await r.json()
        async with http.get(second.url("/v1/calls/cut-off/transcript", "http")) as r:
            cut_off = await r.json()
    assert finished["call"]["status"] == "ended"
    assert [w["text"] for w in finished["words"]] == [
        m["text"] for m in finished_words if m["type"] == "word"
    ]
    assert cut_off["call"]["status"] == "interrupted"
    assert cut_off["words"][0]["text"] == first_word["text"]
    # The webhooks queued while the receiver was down are delivered after the restart.
    ended = await receiver.wait_for("call.ended", "finished")
    assert " ".join(s["text"] for s in ended["transcript"]) == " ".join(
        w["text"] for w in finished["words"]
    )
    await receiver.wait_for("call.started", "cut-off")
    assert receiver.events("segment", "finished")
    assert receiver.bad_signatures == 0


async def test_failing_and_slow_webhooks_are_retried_without_slowing_audio(
    tmp_path: Path, receiver: Receiver, servers: list[ServerProcess]
) -> None:
    await receiver.up()
    receiver.failures_left = 3  # 500, 500, 500, then accepted
    receiver.delay_s = 1.0  # and slow
    env = {"STT_BRIDGE_WEBHOOK_URL": receiver.url, "STT_BRIDGE_WEBHOOK_SECRET": SECRET}
    server = ServerProcess(tmp_path / "data", **env).start()
    servers.append(server)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(server.url("/v1/stream?call_id=hooked"))
        started = time.monotonic()
        await send_audio(ws, speech(3))
        await ws.send_str('{"type": "stop"}')
        messages = [json.loads(m.data) async for m in ws]
        elapsed = time.monotonic() - started
    assert messages[-1]["type"] == "closed"
    # The transcript came back at engine speed, not after the webhook's retries (≥ 1+2+4 s).
    assert elapsed < 5, elapsed
    ended = await receiver.wait_for("call.ended", "hooked", timeout=90)
    assert ended["call"]["status"] == "ended"
    assert receiver.bad_signatures == 0
    # The retries are visible in /metrics: 3 failures, every webhook delivered, none pending.
    async with aiohttp.ClientSession() as http:
        metrics = f"http://127.0.0.1:{server.ports['health']}/metrics"
        async with asyncio.timeout(30):
            while True:
                async with http.get(metrics) as r:
                    text = await r.text()
                if "stt_bridge_webhooks_pending 0.0" in text:
                    break
                await asyncio.sleep(0.2)
    assert 'stt_bridge_webhook_deliveries_total{result="failed"} 3.0' in text
    delivered = len(receiver.received)
    assert f'stt_bridge_webhook_deliveries_total{{result="delivered"}} {delivered}.0' in text


async def test_sigterm_with_twenty_live_calls_stores_all_twenty(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    server = ServerProcess(
        tmp_path / "data",
        STT_BRIDGE_ENGINE_CAPACITY="24",
        STT_BRIDGE_SERVER_DRAIN_TIMEOUT_S="60",
    ).start()
    servers.append(server)
    received: dict[str, list[str]] = {}

    async def caller(n: int) -> None:
        call_id = f"drain-{n}"
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.url(f"/v1/stream?call_id={call_id}"))
            await send_audio(ws, speech(n % 6), pace=0.1)  # about real time
            await ws.send_str('{"type": "stop"}')
            received[call_id] = [
                json.loads(m.data)["text"] async for m in ws if json.loads(m.data)["type"] == "word"
            ]

    calls = [asyncio.create_task(caller(n)) for n in range(20)]
    await asyncio.sleep(2.0)  # every call is live and mid-sentence
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    # While it drains: not ready for load balancers, and a new call is refused (1013).
    async with aiohttp.ClientSession() as http:
        ready = f"http://127.0.0.1:{server.ports['health']}/ready"
        async with asyncio.timeout(10):
            while True:
                async with http.get(ready) as r:
                    if r.status == 503:
                        assert (await r.json())["reason"] == "draining"
                        break
                await asyncio.sleep(0.05)
        late = await http.ws_connect(server.url("/v1/stream?call_id=too-late"))
        refused = await late.receive(timeout=10)
        assert refused.type == aiohttp.WSMsgType.CLOSE and refused.data == 1013
    exit_code = await asyncio.to_thread(server.process.wait, 120)
    await asyncio.gather(*calls)
    assert exit_code == 0
    db = sqlite3.connect(tmp_path / "data" / "stt-bridge.sqlite3")
    rows = dict(db.execute("SELECT id, status FROM calls").fetchall())
    assert rows == {f"drain-{n}": "ended" for n in range(20)}
    for call_id, words in received.items():
        stored = [
            r[0]
            for r in db.execute(
                "SELECT text FROM events WHERE call_id = ? AND type = 'word' ORDER BY start_s, id",
                (call_id,),
            )
        ]
        assert words and stored == words, call_id


async def test_tls_round_trip_with_a_self_signed_certificate(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server = ServerProcess(
        tmp_path / "data", STT_BRIDGE_TLS_CERT=str(cert), STT_BRIDGE_TLS_KEY=str(key)
    ).start()
    servers.append(server)
    context = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession() as http:
        health = f"https://127.0.0.1:{server.ports['health']}/health"
        async with http.get(health, ssl=context) as r:
            assert (await r.json())["status"] == "healthy"
        ws = await http.ws_connect(server.url("/v1/stream", "wss"), ssl=context)
        await send_audio(ws, speech(5))
        await ws.send_str('{"type": "stop"}')
        messages = [json.loads(m.data) async for m in ws]
        with pytest.raises(aiohttp.ClientError):  # plain http on the TLS port fails
            async with http.get(f"http://127.0.0.1:{server.ports['health']}/health") as r:
                await r.read()
    assert any(m["type"] == "word" for m in messages) and messages[-1]["type"] == "closed"


async def test_secrets_never_reach_the_log_and_log_lines_are_json(
    tmp_path: Path, receiver: Receiver, servers: list[ServerProcess]
) -> None:
    secrets = {
        "key": "key-alpha-7f3a91",
        "other_key": "key-beta-22c0d4",
        "webhook_secret": "whsec-5e1b77",
        "webhook_password": "hookpass-90ab",
        "webhook_token": "hooktoken-31f2",
        "twilio_token": "twilio-token-c4d9",
        "wrong_key": "not-a-key-e6a2",
    }
    await receiver.up()
    receiver.failures_left = 2  # two failed deliveries get logged as warnings
    hook = (
        f"http://hookuser:{secrets['webhook_password']}@127.0.0.1:{receiver.port}/hook"
        f"?token={secrets['webhook_token']}"
    )
    log_file = tmp_path / "server.log"
    server = ServerProcess(
        tmp_path / "data",
        STT_BRIDGE_LOG_JSON="true",
        STT_BRIDGE_LOG_LEVEL="debug",
        STT_BRIDGE_API_KEYS=f"{secrets['key']},{secrets['other_key']}",
        STT_BRIDGE_WEBHOOK_URL=hook,
        STT_BRIDGE_WEBHOOK_SECRET=secrets["webhook_secret"],
        STT_BRIDGE_TWILIO_AUTH_TOKEN=secrets["twilio_token"],
    )
    server.log_to = log_file
    server.start()
    servers.append(server)
    api = f"http://127.0.0.1:{server.ports['audio']}/v1/calls"
    async with aiohttp.ClientSession() as http:
        async with http.get(api, headers={"Authorization": f"Bearer {secrets['wrong_key']}"}) as r:
            assert r.status == 401
        async with http.get(f"{api}?token={secrets['key']}") as r:
            assert r.status == 200
        refused = await http.ws_connect(server.url(f"/v1/stream?token={secrets['wrong_key']}"))
        assert (await refused.receive(timeout=10)).data == 1008
        ws = await http.ws_connect(
            server.url(f"/v1/stream?call_id=secret-call&token={secrets['other_key']}")
        )
        await send_audio(ws, speech(2))
        await ws.send_str('{"type": "stop"}')
        assert [json.loads(m.data) async for m in ws][-1]["type"] == "closed"
    await receiver.wait_for("call.ended", "secret-call", timeout=60)
    assert await asyncio.to_thread(server.terminate) == 0

    text = log_file.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    for name, secret in secrets.items():
        assert secret not in text, f"{name} was logged"
    assert any(e["msg"] == "call started" and e.get("call_id") == "secret-call" for e in lines)
    failed = [e for e in lines if e["msg"].startswith("webhook failed")]
    assert len(failed) == 2
    assert {e["url"] for e in failed} == {f"http://127.0.0.1:{receiver.port}/hook"}
    assert any(e["msg"] == "unauthorized request" for e in lines)
