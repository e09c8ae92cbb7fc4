"""The whole system as separate OS processes: simulator, producers and edges started with
``python -m relay``, one real Valkey, the unmodified SDK, real WebSocket clients."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import aiohttp
import pytest

from relay import wire
from relay.client import RelayClient
from relay.dev.demo import run_demo, speech_like_pcm
from relay.dev.stack import LocalStack, child_env
from relay.redis_conn import client_for
from relay.streams import read_after
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import Listener

pytestmark = pytest.mark.slow


@pytest.fixture(params=["single", "cluster"])
def backend(request, settings):
    """Every test here runs on one Redis server and again on a 3-master Redis Cluster."""
    if request.param == "cluster":
        url = request.getfixturevalue("cluster_url")
        return settings.with_overrides(redis_url=url, redis_cluster=True)
    return settings


@pytest.fixture
async def redis_client(backend):
    client = client_for(backend, block_ms=2000)
    yield client
    await client.aclose()


@pytest.fixture
async def stack(backend, tmp_path):
    local = LocalStack(child_env(backend, backend.redis_url, TEST_SECRET), tmp_path / "logs")
    await local.start_sim()
    try:
        yield local
    finally:
        await local.stop()


async def submit(queue):
    async def run(conversation_id, pcm, sample_rate):
        return await queue.submit_clip(conversation_id, pcm, sample_rate=sample_rate)
    return run


async def test_separate_processes_carry_concurrent_conversations(stack, queue, redis_client, keys):
    await stack.start_producer("producer-1")
    await stack.start_producer("producer-2")
    edges = [(await stack.start_edge("edge-1"))[1], (await stack.start_edge("edge-2"))[1]]
    report = await run_demo(redis_client, keys, TEST_SECRET, edges, await submit(queue),
                            conversations=12, turns=2, sample_rate=16000, simulated=True)
    print(report.render())
    assert report.ok, report.render()
    assert len(report.clients) == 24
    assert {c.edge for c in report.clients} == set(edges)
    assert report.frames_messages > 0 and report.keyframes > 0


async def test_client_resumes_on_other_edge_after_sigkill(stack, queue, redis_client, keys):
    await stack.start_producer("producer-1")
    edge1, url1 = await stack.start_edge("edge-1")
    _, url2 = await stack.start_edge("edge-2")
    conv = "e2e-failover"
    client = RelayClient([url1, url2], conv, mint_token(TEST_SECRET, conv), max_backoff_s=0.2)
    received: list[wire.Message] = []
    killed = False

    async def listen():
        nonlocal killed
        async for message in client.messages():
            if message.kind == "welcome":
                continue
            received.append(message)
            if len(received) == 30 and not killed:
                killed = True
                edge1.kill()
            if message.kind == "turn_end":
                return

    task = asyncio.create_task(asyncio.wait_for(listen(), 60))
    while not client.welcomes:
        await asyncio.sleep(0.02)
    clip = speech_like_pcm(4.0, 16000, seed=5)
    await queue.submit_clip(conv, clip, sample_rate=16000)
    await task
    await client.close()
    truth = [i for i, _ in await read_after(redis_client, keys, conv, "0-0", count=100_000)]
    assert killed
    assert [m.id for m in received] == truth
    assert b"".join(m.get("data") for m in received if m.kind == "audio") == clip
    assert client.welcomes[-1].get("start") == "resume" and client.welcomes[-1].get("recovered")


def count(kind):
    return lambda messages: sum(m.kind == kind for m in messages)


async def test_audio_only_fallback_and_interrupt_reach_clients(stack, queue, redis_client, keys):
    await stack.start_producer("producer-1")
    _, url = await stack.start_edge("edge-1")
    conv = "e2e-faults"
    listener = Listener(RelayClient(url, conv, mint_token(TEST_SECRET, conv)))
    await listener.joined()

    # Turn 1: the Motion Server fails mid-turn; the audio must still arrive, marked audio-only.
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.sim_url}/_sim/faults",
                             json={"kind": "server_error", "after_keyframes": 10}) as r:
            assert r.status == 201
    clip1 = speech_like_pcm(2.0, 16000, seed=1)
    await queue.submit_clip(conv, clip1, sample_rate=16000)
    await listener.wait_for(lambda ms: count("turn_end")(ms) == 1)

    # Turn 2: streamed, interrupted midway while audio is still coming.
    streamed = await queue.open_streamed(conv, sample_rate=16000)
    clip2 = speech_like_pcm(3.0, 16000, seed=2)
    for offset in range(0, 32_000, 1280):
        await streamed.send(clip2[offset:offset + 1280])
    await listener.wait_for(lambda ms: any(m.kind == "frames" and m.turn == ms[-1].turn
                                           for m in ms) and ms[-1].turn != ms[0].turn)
    assert await queue.interrupt(conv) is not None
    await listener.wait_for(lambda ms: count("interrupt")(ms) == 1)

    # Turn 3: a clean turn after the interrupt.
    clip3 = speech_like_pcm(1.0, 16000, seed=3)
    await queue.submit_clip(conv, clip3, sample_rate=16000)
    received = await listener.wait_for(lambda ms: count("turn_end")(ms) == 2, timeout=60)
    await listener.close()

    turns: dict[str, list[wire.Message]] = {}
    for m in received:
        turns.setdefault(m.turn, []).append(m)
    t1, t2, t3 = turns.values()
    assert [m.kind for m in t1].count("audio_only") == 1
    assert b"".join(m.get("data") for m in t1 if m.kind == "audio") == clip1
    assert t1[-1].kind == "turn_end" and t1[-1].get("status") == "audio_only"
    assert all(m.get("data") for m in t1 if m.kind == "frames")
    assert t2[-1].kind == "interrupt"
    assert [m.kind for m in t2].count("interrupt") == 1
    assert t3[-1].kind == "turn_end" and t3[-1].get("status") == "complete"
    assert b"".join(m.get("data") for m in t3 if m.kind == "audio") == clip3
    truth = [i for i, _ in await read_after(redis_client, keys, conv, "0-0", count=100_000)]
    assert [m.id for m in received] == truth


def test_relay_demo_command_exits_zero(tmp_path):
    env = dict(os.environ)
    for name in ("SPATIUS_API_KEY", "SPATIUS_APP_ID", "RELAY_TOKEN_SECRET"):
        env.pop(name, None)  # the demo must run on the simulator with a secret of its own
    result = subprocess.run(
        [sys.executable, "-m", "relay", "demo", "--edge-port", "0", "--conversations", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT: every message arrived exactly once and in order" in result.stdout
