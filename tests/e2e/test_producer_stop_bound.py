"""A producer process exits within its documented stop bound (RELAY_PRODUCER_STOP_S + 10 s) even
when Redis does not answer at all: SIGTERM arrives while Redis is frozen (SIGSTOP) and streamed
turns are blocked reading their input."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from relay.dev.demo import speech_like_pcm
from relay.dev.embedded import EmbeddedServer
from relay.dev.stack import LocalStack, child_env
from relay.redis_conn import create_client
from relay.streams import ACTIVE, read_turn
from tests.conftest import TEST_SECRET
from workers.queue.submit import TurnQueue
from workers.run import STOP_MARGIN_S

pytestmark = pytest.mark.slow

STOP_S = 1.0


async def test_producer_stops_within_its_bound_while_redis_is_frozen(settings, keys, tmp_path):
    server = EmbeddedServer().start()
    client = create_client(server.url)
    local = LocalStack(child_env(settings.with_overrides(redis_url=server.url), server.url,
                                 TEST_SECRET), tmp_path / "logs")
    try:
        await local.start_sim()
        producer = await local.start_producer(
            "producer-frozen", RELAY_PRODUCER_STOP_S=str(STOP_S), RELAY_JOBS_BLOCK_MS="200",
            RELAY_TURN_INPUT_TIMEOUT_S="60")
        queue = TurnQueue(client, keys, input_ttl_s=300)
        feeds = [await queue.open_streamed(f"frozen-{n}", sample_rate=16000) for n in range(3)]
        for feed in feeds:  # some audio, then nothing: each turn blocks reading its input
            await feed.send(speech_like_pcm(0.4, 16000, seed=1))
        async with asyncio.timeout(15):
            while not all([(s := await read_turn(client, keys, f.conversation_id)) is not None
                           and s.status == ACTIVE for f in feeds]):
                await asyncio.sleep(0.05)
        assert server._proc is not None
        os.kill(server._proc.pid, signal.SIGSTOP)  # Redis frozen: every command hangs
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert producer.proc is not None
            producer.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(producer.proc.wait(), STOP_S + STOP_MARGIN_S + 5)
            took = loop.time() - started
        finally:
            os.kill(server._proc.pid, signal.SIGCONT)
        print(f"producer exited {took:.1f}s after SIGTERM with Redis frozen "
              f"(bound {STOP_S + STOP_MARGIN_S:g}s), code {producer.proc.returncode}")
        assert took <= STOP_S + STOP_MARGIN_S + 1.0  # the bound, plus process teardown
    finally:
        await local.stop()
        await client.aclose()
        server.stop()
