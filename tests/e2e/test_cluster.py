"""A cluster on loopback, as deploy/ ships it: three `stt-bridge serve` processes on 127.0.0.2-4
(same ports, distinct addresses) sharing a PostgreSQL store, Kamailio (deploy/kamailio) in
front of their SIP, HAProxy (deploy/haproxy) in front of their WebSockets; one node killed
with kill -9 mid-call; and a rolling upgrade, every node drained (SIGTERM) and started again in
turn under calls. Everything comes from Debian's packages and is started, and ended by its PID,
here.

Sized for a small shared machine (two cores): calls of one short sentence, staggered, a few
at a time (13 SIP calls through Kamailio, 10 WebSocket calls through HAProxy in all).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psycopg
import pytest

from api.app import Service
from telephony.audio import ulaw_decode
from tests.api.test_cluster import Hooks
from tests.conftest import ServiceFactory
from tests.e2e.frontends import offline_words, paced
from tests.e2e.server_process import ServerProcess
from tests.e2e.sip_peers import SCENARIOS, _run_sipp, free_port, sipp_dir, write_rtp_pcap
from tests.pg import Postgres
from tests.speech import SENTENCES, phone_bytes, read_pcm, speech_wav

pytestmark = [pytest.mark.solo, pytest.mark.timeout(300)]

NODES = {"n1": "127.0.0.2", "n2": "127.0.0.3", "n3": "127.0.0.4"}
VICTIM = "n2"
PROBE_S = 1  # Kamailio's OPTIONS probe interval (ds_ping_interval)
LEASE_S = 2.0
CAPACITY = 6  # engine slots per node: two nodes hold the calls of three
SENTENCE = SENTENCES[5]
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def port_free_everywhere(kind: int) -> int:
    """A port free on 127.0.0.1 (HAProxy, Kamailio) and on every node's address."""
    while True:
        port = free_port(kind)
        try:
            for host in NODES.values():
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue


class Cluster:
    def __init__(self, root: Path, url: str, hook: str, **settings: str) -> None:
        self.root = root
        self.url = url
        self.ports = {
            name: port_free_everywhere(socket.SOCK_STREAM)
            for name in ("audio", "health", "web", "audiosocket")
        }
        self.ports["sip"] = port_free_everywhere(socket.SOCK_DGRAM)
        self.kamailio_port = free_port(socket.SOCK_DGRAM)
        self.nodes: dict[str, ServerProcess] = {}
        for n, (name, host) in enumerate(NODES.items()):
            low = 31000 + n * 200 + (os.getpid() % 50) * 600 % 20000
            env = {
                "STT_BRIDGE_SERVER_HOST": host,
                "STT_BRIDGE_SERVER_PORT": str(self.ports["audio"]),
                "STT_BRIDGE_SERVER_HEALTH_PORT": str(self.ports["health"]),
                "STT_BRIDGE_SERVER_WEB_PORT": str(self.ports["web"]),
                "STT_BRIDGE_SERVER_NODE_ID": name,
                "STT_BRIDGE_SERVER_DRAIN_TIMEOUT_S": "5",
                "STT_BRIDGE_AUDIOSOCKET_HOST": host,
                "STT_BRIDGE_AUDIOSOCKET_PORT": str(self.ports["audiosocket"]),
                "STT_BRIDGE_SIP_ENABLED": "true",
                "STT_BRIDGE_SIP_HOST": host,
                "STT_BRIDGE_SIP_PORT": str(self.ports["sip"]),
                "STT_BRIDGE_SIP_TCP": "false",
                "STT_BRIDGE_SIP_RTP_PORT_MIN": str(low),
                "STT_BRIDGE_SIP_RTP_PORT_MAX": str(low + 199),
                "STT_BRIDGE_ENGINE_CAPACITY": str(CAPACITY),
                "STT_BRIDGE_SERVER_WORKERS": "1",
                "STT_BRIDGE_DATA_URL": url,
                "STT_BRIDGE_DATA_LEASE_S": str(LEASE_S),
                "STT_BRIDGE_WEBHOOK_URL": hook,
                "STT_BRIDGE_WEBHOOK_TIMEOUT_S": "2",
                **settings,
            }
            node = ServerProcess(root / name, **env)
            node.log_to = root / f"{name}.log"
            self.nodes[name] = node
        self.processes: list[subprocess.Popen[bytes]] = []
        self.kamailio_log = root / "kamailio.log"

    def start(self) -> None:
        for node in self.nodes.values():  # one at a time: each loads its model
            node.start()
        dispatcher = self.root / "dispatcher.list"
        dispatcher.write_text(
            "".join(f"1 sip:{host}:{self.ports['sip']} 0 0\n" for host in NODES.values())
        )
        run_dir = self.root / "kamailio"
        run_dir.mkdir()
        defines = {
            "LISTEN": f"udp:127.0.0.1:{self.kamailio_port}",
            "DISPATCHER_LIST": f'"{dispatcher}"',
            "PING_INTERVAL": str(PROBE_S),
            "CTL_SOCKET": f'"unix:{run_dir}/ctl"',
            "NODE_TIMEOUT_MS": "1500",
        }
        args = [a for k, v in defines.items() for a in ("-A", f"{k}={v}")]
        self._spawn(
            [
                "kamailio",
                "-f",
                str(DEPLOY / "kamailio/kamailio.cfg"),
                "-DD",
                "-E",
                "-m",
                "64",
                "-M",
                "8",
                "-Y",
                str(run_dir),
                *args,
            ],
            self.kamailio_log,
        )
        env = {
            **os.environ,
            **{f"NODE{n}": host for n, host in enumerate(NODES.values(), start=1)},
            "LISTEN_ADDR": "127.0.0.1",
            "BRIDGE_AUDIO_PORT": str(self.ports["audio"]),
            "BRIDGE_HEALTH_PORT": str(self.ports["health"]),
            "BRIDGE_AUDIOSOCKET_PORT": str(self.ports["audiosocket"]),
        }
        self._spawn(
            ["haproxy", "-db", "-f", str(DEPLOY / "haproxy/haproxy.cfg")],
            self.root / "haproxy.log",
            env,
        )

    def _spawn(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        with log.open("ab") as out:
            self.processes.append(
                subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            )

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for node in self.nodes.values():
            node.cleanup()

    def api(self, node: str, path: str) -> str:
        return f"http://{NODES[node]}:{self.ports['audio']}{path}"

    @property
    def haproxy(self) -> str:
        return f"ws://127.0.0.1:{self.ports['audio']}"

    def calls(self) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as db:
            return db.execute(
                "SELECT id, front_end, node, status FROM calls ORDER BY started_at"
            ).fetchall()

    def marked_up(self, node: str) -> int:
        """How many times Kamailio's probe has put `node` back in rotation so far."""
        lines = self.kamailio_log.read_text(errors="replace").splitlines()
        mark = f"stt-bridge node up: OPTIONS sip:{NODES[node]}:"
        return sum(mark in line for line in lines)

    def haproxy_up(self, node: str) -> int:
        """How many times HAProxy's /ready check has put `node` back in rotation so far (it
        starts with every server up, so only a return is counted: each is logged twice)."""
        number = list(NODES).index(node) + 1
        text = (self.root / "haproxy.log").read_text(errors="replace")
        return text.count(f"stt_bridge_nodes/node{number} is UP")

    def marked_down(self, node: str) -> int:
        """How many times Kamailio's probe has taken `node` out of rotation so far."""
        lines = self.kamailio_log.read_text(errors="replace").splitlines()
        mark = f"stt-bridge node down: OPTIONS sip:{NODES[node]}:"
        return sum(mark in line for line in lines)


@pytest.fixture
def cluster(tmp_path: Path, postgres: Postgres, hooks: Hooks) -> Iterator[Cluster]:
    running = Cluster(tmp_path, postgres.fresh_database(), hooks.url)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    async with Hooks() as receiver:
        yield receiver


@pytest.fixture
async def reference(start_service: ServiceFactory) -> Service:
    """An in-process service with the same engine: the offline transcripts."""
    return await start_service()


async def sip_calls(
    cluster: Cluster, cwd: Path, calls: int, hold_ms: int, rate_per_s: float = 2.0
) -> Any:
    """sipp places `calls` calls through Kamailio, `rate_per_s` a second."""
    cmd = [
        "sipp", f"127.0.0.1:{cluster.kamailio_port}", "-sf", str(cwd / "uac_cluster.xml"),
        "-i", "127.0.0.1", "-p", str(free_port()), "-mp", str(free_port()),
        "-s", "bridge", "-m", str(calls), "-r", str(int(rate_per_s * 10)), "-rp", "10000",
        "-d", str(hold_ms), "-nostdin", "-trace_err", "-error_file", str(cwd / "errors.log"),
        "-trace_stat", "-stf", str(cwd / "stat.csv"),
    ]  # fmt: skip
    return await _run_sipp(cmd, cwd, cwd / "errors.log", 120)


async def ws_call(
    cluster: Cluster, call_id: str, pcm: bytes, delay_s: float = 0.0, tail_s: float = 0.0
) -> list[str]:
    """A WebSocket call through HAProxy, `delay_s` from now, at real-time pace, `tail_s` of
    silence after the speech; the words it got back. A call cut off (its node killed) ends
    early: what it got until then."""
    await asyncio.sleep(delay_s)
    words: list[str] = []
    url = f"{cluster.haproxy}/v1/stream?call_id={call_id}&encoding=pcm16&sample_rate=24000"
    chunk = 4800  # 100 ms
    frames = [pcm[i : i + chunk] for i in range(0, len(pcm), chunk)]
    frames += [bytes(chunk)] * int(tail_s * 10)
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:

        async def read() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    message = json.loads(msg.data)
                    if message["type"] == "word":
                        words.append(message["text"])

        reader = asyncio.create_task(read())
        try:
            async for frame in paced(frames, 0.1):
                if ws.closed:
                    break
                await ws.send_bytes(frame)
            if not ws.closed:
                await ws.send_str('{"type": "stop"}')
            await asyncio.wait_for(reader, 60)
        except (aiohttp.ClientError, ConnectionError):
            pass
    return words


async def transcript(cluster: Cluster, node: str, call_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(cluster.api(node, f"/v1/calls/{call_id}/transcript")) as r:
            assert r.status == 200, (node, call_id, r.status)
            body: dict[str, Any] = await r.json()
            return body


async def wait_until(condition: Any, timeout: float, step: float = 0.05) -> float:
    """Poll until `condition()` holds; the monotonic time it first did."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(step)
    return time.monotonic()


async def test_a_cluster_survives_a_node_killed_mid_call(
    cluster: Cluster, hooks: Hooks, reference: Service, tmp_path: Path
) -> None:
    (tmp_path / "sipp").mkdir()
    cwd = sipp_dir(tmp_path / "sipp")
    (cwd / "uac_cluster.xml").write_text((SCENARIOS / "uac_cluster.xml").read_text())
    wire = b"\xff" * 800 + phone_bytes(SENTENCE, "mulaw", 8000)
    write_rtp_pcap(cwd / "pcap" / "speech.pcap", wire, 0)
    speech_ms = len(wire) // 8
    pcm24, _ = read_pcm(speech_wav(SENTENCE))
    pcm = np.asarray(pcm24, dtype="<i2").tobytes()
    sip_words = [w["text"] for w in await offline_words(reference, ulaw_decode(wire), 8000)]
    ws_words = [w["text"] for w in await offline_words(reference, pcm24, 24000)]
    assert sip_words and ws_words
    await asyncio.sleep(PROBE_S * 2)  # Kamailio has probed every node once

    # 1. All three nodes up: calls spread over every node. With the later phases, 30 SIP
    # calls through Kamailio and 30 WebSocket calls through HAProxy, paced so that about
    # eleven are live at once (the machine has two cores for three nodes and their peers).
    sip = asyncio.create_task(sip_calls(cluster, cwd, 21, speech_ms + 300, rate_per_s=1))
    ws = [
        asyncio.create_task(ws_call(cluster, f"ws-a{n}", pcm, delay_s=n * 0.8)) for n in range(24)
    ]
    result = await sip
    assert result.returncode == 0, result.errors + result.stdout
    for words in await asyncio.gather(*ws):
        assert words == ws_words
    assert {node for _, _, node, _ in cluster.calls()} == set(NODES)

    # 2. Calls in progress everywhere; the webhook receiver goes down (the victim's webhooks
    # stay pending); the victim is killed once its calls have said something.
    hooks.down = True
    long_sip = asyncio.create_task(sip_calls(cluster, cwd, 3, speech_ms + 4000, rate_per_s=4))
    long_ws = [
        asyncio.create_task(ws_call(cluster, f"ws-b{n}", pcm, delay_s=n * 0.3, tail_s=4.0))
        for n in range(3)
    ]

    def victim_speaking() -> bool:
        with psycopg.connect(cluster.url) as db:
            return bool(
                db.execute(
                    "SELECT 1 FROM calls JOIN events ON events.call_id = calls.id "
                    "WHERE calls.node = %s AND calls.status = 'live' AND events.type = 'word'",
                    (VICTIM,),
                ).fetchone()
            )

    await wait_until(victim_speaking, 60, 0.2)
    victim_calls = {
        call_id
        for call_id, _, node, status in cluster.calls()
        if node == VICTIM and status == "live"
    }
    with psycopg.connect(cluster.url) as db:
        said_before_kill: dict[str, int] = dict(
            db.execute(
                "SELECT call_id, COUNT(*) FROM events WHERE type = 'word' "
                "AND call_id = ANY(%s) GROUP BY call_id",
                (list(victim_calls),),
            ).fetchall()
        )
    downs = cluster.marked_down(VICTIM)
    cluster.nodes[VICTIM].kill()
    killed_at = time.monotonic()
    probe_saw = await wait_until(lambda: cluster.marked_down(VICTIM) > downs, 30)

    # 3. New calls after the probe: all answered, none by the victim.
    before = {c[0] for c in cluster.calls()}
    new_sip = asyncio.create_task(sip_calls(cluster, cwd, 3, speech_ms + 300, rate_per_s=4))
    new_ws = [
        asyncio.create_task(ws_call(cluster, f"ws-c{n}", pcm, delay_s=n * 0.3)) for n in range(3)
    ]
    first_new = await wait_until(lambda: len({c[0] for c in cluster.calls()} - before) > 0, 30)
    result = await new_sip
    assert result.returncode == 0, result.errors + result.stdout
    for words in await asyncio.gather(*new_ws):
        assert words == ws_words
    await long_sip
    await asyncio.gather(*long_ws)
    new_calls = [c for c in cluster.calls() if c[0] not in before]
    assert len(new_calls) == 6 and all(node != VICTIM for _, _, node, _ in new_calls)

    # 4. The victim's calls: interrupted, with their words, on every live node.
    await wait_until(
        lambda: all(s == "interrupted" for i, _, _, s in cluster.calls() if i in victim_calls),
        LEASE_S * 10,
    )
    for call_id in victim_calls:
        seen = [await transcript(cluster, node, call_id) for node in ("n1", "n3")]
        assert seen[0] == seen[1]
        assert seen[0]["call"]["status"] == "interrupted"
        assert len(seen[0]["words"]) >= said_before_kill.get(call_id, 0)
    assert any(said_before_kill.values())  # the victim was killed mid-sentence

    # 5. Its pending webhooks go out from the others once the receiver is back; each once.
    hooks.down = False
    with psycopg.connect(cluster.url) as db:
        pending = db.execute(
            "SELECT id FROM outbox WHERE node = %s AND delivered_at IS NULL", (VICTIM,)
        ).fetchall()
    assert pending

    def all_delivered() -> bool:
        with psycopg.connect(cluster.url) as db:
            row = db.execute("SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL").fetchone()
            return bool(row and row[0] == 0)

    await wait_until(all_delivered, 90, 0.5)
    with psycopg.connect(cluster.url) as db:
        delivered_by = {
            r[0]
            for r in db.execute(
                "SELECT delivered_by FROM outbox WHERE id = ANY(%s)", ([p[0] for p in pending],)
            ).fetchall()
        }
    assert delivered_by and VICTIM not in delivered_by
    bodies = [json.dumps(b, sort_keys=True) for b in hooks.bodies]
    assert len(bodies) == len(set(bodies))

    # 6. Every finished call's transcript, from either live node, is the offline one.
    for call_id, front_end, _, status in cluster.calls():
        if status != "ended":
            continue
        seen = [await transcript(cluster, node, call_id) for node in ("n1", "n3")]
        assert seen[0] == seen[1]
        expected = sip_words if front_end == "sip" else ws_words
        assert [w["text"] for w in seen[0]["words"]] == expected, call_id

    # 7. A full node answers OPTIONS 503: SIP calls go to the other node, none refused.
    full_node = "n3"
    downs = cluster.marked_down(full_node)
    async with aiohttp.ClientSession() as http:
        fillers = []
        for n in range(CAPACITY):
            filler = await http.ws_connect(
                f"ws://{NODES[full_node]}:{cluster.ports['audio']}/v1/stream?call_id=fill-{n}"
            )
            await filler.send_bytes(bytes(9600))
            fillers.append(filler)
        await wait_until(lambda: cluster.marked_down(full_node) > downs, PROBE_S * 6)
        before = {c[0] for c in cluster.calls()}
        result = await sip_calls(cluster, cwd, 3, 1000, rate_per_s=4)
        assert result.returncode == 0, result.errors + result.stdout
        placed = [c for c in cluster.calls() if c[0] not in before and c[1] == "sip"]
        assert len(placed) == 3 and {node for _, _, node, _ in placed} == {"n1"}
        for filler in fillers:
            await filler.close()

    print(
        f"\nnode death → Kamailio probe marks it down: {probe_saw - killed_at:.2f} s "
        f"(ds_ping_interval {PROBE_S} s); → first new call placed on a live node: "
        f"{first_new - killed_at:.2f} s; SIP calls {4 + 3 + 3 + 3}, WebSocket calls 10"
    )


DRAIN_NOTICE_S = 4.0  # above HAProxy's `fall 2` × 1 s check and Kamailio's 1 s probe
RATE = 0.3  # calls a second on each road: two or three live at once, two cores for three nodes
SIP_BATCH = 3
BURST = 6  # WebSocket calls placed in the first 1.5 s of each node's drain


@pytest.fixture
def rolling_cluster(tmp_path: Path, postgres: Postgres, hooks: Hooks) -> Iterator[Cluster]:
    """Nodes set as docs/deployment.md "Upgrading" says: a drain notice, a drain deadline
    above a call."""
    running = Cluster(
        tmp_path,
        postgres.fresh_database(),
        hooks.url,
        STT_BRIDGE_SERVER_DRAIN_NOTICE_S=str(DRAIN_NOTICE_S),
        STT_BRIDGE_SERVER_DRAIN_TIMEOUT_S="30",
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.mark.timeout(480)  # a node loads its model again: slow when the machine is loaded
async def test_a_rolling_upgrade_loses_no_call_and_no_word(
    rolling_cluster: Cluster, reference: Service, tmp_path: Path
) -> None:
    """Every node in turn gets SIGTERM (drain notice, drain, exit 0) and is started again on
    the code on disk, while SIP calls (through Kamailio) and WebSocket calls (through HAProxy)
    keep coming: no call is refused, every call ends, and every transcript is the offline one."""
    cluster = rolling_cluster
    (tmp_path / "sipp").mkdir()
    cwd = sipp_dir(tmp_path / "sipp")
    (cwd / "uac_cluster.xml").write_text((SCENARIOS / "uac_cluster.xml").read_text())
    wire = b"\xff" * 800 + phone_bytes(SENTENCE, "mulaw", 8000)
    write_rtp_pcap(cwd / "pcap" / "speech.pcap", wire, 0)
    speech_ms = len(wire) // 8
    pcm24, _ = read_pcm(speech_wav(SENTENCE))
    pcm = np.asarray(pcm24, dtype="<i2").tobytes()
    sip_words = [w["text"] for w in await offline_words(reference, ulaw_decode(wire), 8000)]
    ws_words = [w["text"] for w in await offline_words(reference, pcm24, 24000)]
    assert sip_words and ws_words
    await asyncio.sleep(PROBE_S * 2)  # Kamailio has probed every node once

    # A steady stream: a SIP call (sipp, in batches) and a WebSocket call every 1 / RATE s,
    # each one sentence long, for as long as the upgrade takes.
    upgrading = True
    sip_batches: list[Any] = []
    ws_calls: list[asyncio.Task[list[str]]] = []

    async def sip_stream() -> None:
        while upgrading:
            batch = await sip_calls(cluster, cwd, SIP_BATCH, speech_ms + 300, rate_per_s=RATE)
            sip_batches.append(batch)

    async def ws_caller(call_id: str) -> list[str]:
        """A refused upgrade (HAProxy or the node said 503) is a call with no words."""
        try:
            return await ws_call(cluster, call_id, pcm)
        except aiohttp.WSServerHandshakeError:
            return []

    async def ws_stream() -> None:
        while upgrading:
            call = ws_caller(f"ws-up{len(ws_calls)}")
            ws_calls.append(asyncio.create_task(call))
            await asyncio.sleep(1 / RATE)

    streams = [asyncio.create_task(sip_stream()), asyncio.create_task(ws_stream())]
    await asyncio.sleep(5)  # calls live on every node before the first one goes

    def taken_by(node: str) -> int:
        return sum(n == node for _, _, n, _ in cluster.calls())

    timings: list[str] = []
    for name, node in cluster.nodes.items():
        assert node.process is not None
        old_pid = node.process.pid
        ups, haproxy_ups = cluster.marked_up(name), cluster.haproxy_up(name)
        began = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(node.terminate))
        # A burst of calls as the drain begins: HAProxy still sends this node its share until
        # its checks fail; the notice is what lets the node take them, not refuse them.
        for _ in range(BURST):
            ws_calls.append(asyncio.create_task(ws_caller(f"ws-up{len(ws_calls)}")))
            await asyncio.sleep(0.25)
        assert await stopping == 0  # drained cleanly
        exited = time.monotonic()
        await asyncio.to_thread(node.start)  # the code on disk now: the upgrade
        assert node.process.pid != old_pid
        serving = time.monotonic()
        await wait_until(
            lambda: cluster.marked_up(name) > ups and cluster.haproxy_up(name) > haproxy_ups,  # noqa: B023
            60,
            0.2,
        )
        back = time.monotonic()
        before = taken_by(name)
        await wait_until(lambda: taken_by(name) > before, 30, 0.2)  # noqa: B023  # takes calls
        timings.append(
            f"{name}: SIGTERM → exit {exited - began:.1f} s, → serving again "
            f"{serving - exited:.1f} s, → back in both balancers {back - serving:.1f} s"
        )

    upgrading = False
    await asyncio.gather(*streams)
    ws_results = await asyncio.gather(*ws_calls)

    # No call refused or cut short: sipp saw every call through, every WebSocket got every word.
    for batch in sip_batches:
        assert batch.returncode == 0, batch.errors + batch.stdout
    refused = [n for n, words in enumerate(ws_results) if not words]
    assert not refused, refused
    for n, words in enumerate(ws_results):
        assert words == ws_words, n
    # Every call placed is stored, ended (none `interrupted` or flushed at a deadline), and
    # its stored transcript is the offline one. (A node's store writer is a batch behind its
    # calls: the last call's end may still be on its way.)
    await wait_until(lambda: all(c[3] != "live" for c in cluster.calls()), 10, 0.2)
    calls = cluster.calls()
    sip_placed = SIP_BATCH * len(sip_batches)
    assert sum(front_end == "sip" for _, front_end, _, _ in calls) == sip_placed
    assert sum(front_end != "sip" for _, front_end, _, _ in calls) == len(ws_results)
    lost_words = 0
    for call_id, front_end, _, status in calls:
        assert status == "ended", (call_id, status)
        got = [w["text"] for w in (await transcript(cluster, "n1", call_id))["words"]]
        expected = sip_words if front_end == "sip" else ws_words
        lost_words += max(0, len(expected) - len(got))
        assert got == expected, call_id
    print(
        f"\nrolling upgrade: {sip_placed} SIP + {len(ws_results)} WebSocket calls placed, "
        f"{len(refused)} refused, {lost_words} words lost; " + "; ".join(timings)
    )
