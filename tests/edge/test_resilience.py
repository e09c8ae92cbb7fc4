"""Edges under stress: slow clients, Redis restarts, and draining on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest

from relay import wire
from relay.client import RelayClient
from relay.dev.embedded import EmbeddedServer
from relay.dev.stack import LocalStack, child_env
from relay.redis_conn import create_client
from relay.streams import ConversationLog, read_after
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import Listener, RawWebSocket, running_edge


def token(conversation_id: str) -> str:
    return mint_token(TEST_SECRET, conversation_id, ttl_s=300)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def flood(log: ConversationLog, conv: str, turn: str, entries: int, size: int) -> None:
    await log.open_turn(conv, turn, sample_rate=16000, owner="test")
    chunk = bytes(range(256)) * (size // 256)
    for start in range(0, entries, 200):
        batch = [
            wire.audio(turn, seq, chunk, end=False)
            for seq in range(start, min(start + 200, entries))
        ]
        await log.append(conv, turn, *batch)
    await log.end_turn(conv, turn, status=wire.STATUS_COMPLETE)


@pytest.mark.slow  # edge processes
async def test_slow_client_is_cut_off_edge_memory_stays_flat_and_resume_is_exact(
    settings, redis_client, keys, tmp_path
):
    # A 40 MB burst: a client that does not read must be disconnected with 4429 long before the
    # edge buffers it; the edge's memory stays flat; a reading client gets everything; the slow
    # one comes back with last_id and gets exactly the rest.
    limits = settings.with_overrides(client_queue_messages=256, client_queue_bytes=512 * 1024)
    env = child_env(limits, limits.redis_url, TEST_SECRET)
    env.update({"RELAY_CLIENT_QUEUE_MESSAGES": "256", "RELAY_CLIENT_QUEUE_BYTES": str(512 * 1024),
                # The stalled client neither reads nor answers pings for the whole burst; the
                # edge keeps its connection (a bounded backlog) a heartbeat interval past the close.
                "RELAY_HEARTBEAT_S": "120"})
    stack = LocalStack(env, tmp_path / "logs")
    try:
        edge, url = await stack.start_edge("edge-slow")
        conv = "slow-conv"
        log = ConversationLog(redis_client, keys, maxlen=100_000, ttl_s=300)
        fast = Listener(RelayClient(url, conv, token(conv)))
        await fast.joined()
        slow = await RawWebSocket.connect(f"{url}/v1/conversations/{conv}/ws?token={token(conv)}")
        before = rss_kb(edge.proc.pid)
        peak = before
        writer = asyncio.create_task(flood(log, conv, "t-flood", entries=32_000, size=1280))
        while not writer.done():
            peak = max(peak, rss_kb(edge.proc.pid))
            await asyncio.sleep(0.05)
        await writer
        received = await fast.wait_for(lambda ms: ms and ms[-1].kind == "turn_end", timeout=60)
        truth = [i for i, _ in await read_after(redis_client, keys, conv, "0-0", count=100_000)]
        assert [m.id for m in received] == truth  # the reading client lost nothing

        # Now the slow client reads: what the edge had sent, then the 4429 close.
        got, code = [], None
        while code is None:
            opcode, payload = await asyncio.wait_for(slow.frame(), 10)
            if opcode == 0x2:
                got.append(wire.decode_server(payload))
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big")
        assert code == wire.CloseCode.SLOW_CONSUMER
        last_id = [m.id for m in got if m.id][-1]
        resumed = Listener(RelayClient(url, conv, token(conv), last_id=last_id))
        rest = await resumed.wait_for(lambda ms: ms and ms[-1].kind == "turn_end", timeout=60)
        assert [m.id for m in got if m.id] + [m.id for m in rest] == truth
        assert resumed.client.welcomes[0].get("recovered") is True
        growth_mb = (peak - before) / 1024
        print(
            f"edge RSS before {before} kB, peak {peak} kB, growth {growth_mb:.1f} MB for a "
            f"{32_000 * 1280 / 1e6:.0f} MB burst"
        )
        assert growth_mb < 25, "the edge buffered the slow client's backlog"
        slow.close()
        await fast.close()
        await resumed.close()
    finally:
        await stack.stop()


async def test_edge_survives_a_redis_restart(settings, keys):
    server = EmbeddedServer().start()
    try:
        local = settings.with_overrides(redis_url=server.url, redis_unavailable_s=60.0)
        client = create_client(server.url)
        log = ConversationLog(client, keys, maxlen=1000, ttl_s=300)
        async with running_edge(local, "edge-restart") as url:
            base = url.replace("ws://", "http://")
            conv = "restart-conv"
            listener = Listener(RelayClient(url, conv, token(conv), max_backoff_s=0.2))
            await listener.joined()
            await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
            await log.append(conv, "t1", wire.audio("t1", 0, b"before", end=False))
            await listener.wait_for(lambda ms: len(ms) == 2)

            server.stop()
            assert await _readiness(base) == 503
            server.start()  # same port, empty: the old stream is gone
            await _wait_ready(base)
            await log.open_turn(conv, "t2", sample_rate=16000, owner="test")
            await log.append(conv, "t2", wire.audio("t2", 0, b"after", end=True))
            received = await listener.wait_for(
                lambda ms: any(m.turn == "t2" and m.kind == "audio" for m in ms), timeout=30
            )
            assert [m.get("data") for m in received if m.kind == "audio"] == [b"before", b"after"]
            # The live client was told its history is gone, as a resuming one would be.
            assert listener.client.close_codes[0] == wire.CloseCode.EDGE_RESTARTING
            assert [w.get("recovered") for w in listener.client.welcomes] == [None, False]
            await listener.close()

            # A client resuming from before the loss is told recovery failed, not given a gap.
            late = Listener(RelayClient(url, conv, token(conv), last_id=received[0].id))
            await late.joined()
            assert late.client.welcomes[0].get("recovered") is False
            await late.close()
        await client.aclose()
    finally:
        server.stop()


async def test_clients_move_when_redis_stays_down(settings, keys):
    server = EmbeddedServer().start()
    try:
        local = settings.with_overrides(redis_url=server.url, redis_unavailable_s=1.0)
        async with running_edge(local, "edge-down") as url:
            conv = "down-conv"
            client = RelayClient(url, conv, token(conv), reconnect=False)
            listener = Listener(client)
            await listener.joined()
            server.stop()
            await asyncio.wait_for(listener._task, 15)  # the edge closes the connection
            assert client.close_codes[-1] == wire.CloseCode.UNAVAILABLE
    finally:
        server.stop()


async def test_frozen_redis_moves_clients_within_the_unavailable_bound(settings):
    """RELAY_REDIS_UNAVAILABLE_S counts from the first stalled read: with Redis frozen (SIGSTOP:
    connections open, no answers), attached clients get 4503 within the bound +-2 s, and so does
    a client that tries to join meanwhile (it was ~90 s: socket timeouts with retries first)."""
    bound = 4.0
    server = EmbeddedServer().start()
    try:
        local = settings.with_overrides(redis_url=server.url, redis_unavailable_s=bound)
        async with running_edge(local, "edge-frozen") as url:
            conv = "frozen-conv"
            attached = RelayClient(url, conv, token(conv), reconnect=False)
            listener = Listener(attached)
            await listener.joined()
            loop = asyncio.get_running_loop()
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            frozen_at = loop.time()
            try:
                await asyncio.sleep(1.0)
                joiner = RelayClient(url, conv, token(conv), reconnect=False)
                joined_at = loop.time()
                joining = asyncio.ensure_future(collect_codes(joiner))
                await asyncio.wait_for(listener._task, bound + 5)
                attached_s = loop.time() - frozen_at
                await asyncio.wait_for(joining, bound + 5)
                joiner_s = loop.time() - joined_at
            finally:
                os.kill(server.pid, signal.SIGCONT)
            print(f"4503 after {attached_s:.2f} s (attached), {joiner_s:.2f} s (joining)")
            assert attached.close_codes[-1] == wire.CloseCode.UNAVAILABLE
            assert joiner.close_codes[-1] == wire.CloseCode.UNAVAILABLE
            assert bound - 2 <= attached_s <= bound + 2
            assert joiner_s <= bound + 2
            await joiner.close()
    finally:
        server.stop()


async def collect_codes(client: RelayClient) -> None:
    async for _ in client.messages():
        pass


@pytest.mark.slow  # edge processes
async def test_sigterm_drains_clients_to_another_edge(settings, redis_client, keys, tmp_path):
    stack = LocalStack(child_env(settings, settings.redis_url, TEST_SECRET), tmp_path / "logs")
    try:
        edge1, url1 = await stack.start_edge("edge-d1")
        _, url2 = await stack.start_edge("edge-d2")
        log = ConversationLog(redis_client, keys, maxlen=10_000, ttl_s=300)
        convs = [f"drain-{n}" for n in range(6)]
        listeners = [
            Listener(RelayClient([url1, url2], c, token(c), max_backoff_s=0.1)) for c in convs
        ]
        for listener in listeners:
            await listener.joined()

        async def speak(conv: str) -> None:
            await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
            for seq in range(150):
                await log.append(conv, "t1", wire.audio("t1", seq, b"x" * 640, end=False))
                await asyncio.sleep(0.01)
            await log.end_turn(conv, "t1", status=wire.STATUS_COMPLETE)

        writers = asyncio.gather(*(speak(c) for c in convs))
        await asyncio.sleep(0.5)
        edge1.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(edge1.proc.wait(), 15) == 0
        await writers
        for conv, listener in zip(convs, listeners, strict=True):
            received = await listener.wait_for(lambda ms: ms and ms[-1].kind == "turn_end")
            truth = [i for i, _ in await read_after(redis_client, keys, conv, "0-0", count=10_000)]
            assert [m.id for m in received] == truth
            assert wire.CloseCode.EDGE_RESTARTING in listener.client.close_codes
            assert listener.client.welcomes[-1].get("edge") == "edge-d2"
            await listener.close()
    finally:
        await stack.stop()


async def _readiness(base: str) -> int:
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.get(f"{base}/readyz") as response:
                if response.status != 200:
                    return response.status
            await asyncio.sleep(0.05)
    return 200


async def _wait_ready(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            async with http.get(f"{base}/readyz") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("edge never became ready again")
