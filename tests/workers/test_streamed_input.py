"""StreamedInput across Redis stalls: every chunk and the end marker in the input stream exactly
once, whether redis-py retried the write or the caller did after an error."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import RedisError

from relay.dev.embedded import EmbeddedServer
from workers.errors import QueueError, SendPending
from workers.queue.input import StreamedInput, read_input


@pytest.fixture
def server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer() as own:  # its own: these tests freeze it
        yield own


def frozen(server: EmbeddedServer):
    pid = server.pid
    assert pid is not None

    class Freeze:
        def __enter__(self) -> None:
            os.kill(pid, signal.SIGSTOP)

        def __exit__(self, *exc: object) -> None:
            os.kill(pid, signal.SIGCONT)

    return Freeze()


async def entries(client, keys, turn_id):
    batch = await read_input(client, keys, "conv", turn_id, after="0-0", block_ms=1, count=100)
    return batch.chunks, batch.ended


def feed(client, keys, turn_id: str) -> StreamedInput:
    return StreamedInput(client, keys.turn_input("conv", turn_id), conversation_id="conv",
                         turn_id=turn_id, ttl_ms=60_000)


async def test_client_retry_across_a_stall_writes_the_chunk_once(server, keys):
    client = redis.Redis.from_url(server.url, socket_timeout=0.3, retry_on_timeout=True,
                                  retry=Retry(ConstantBackoff(0.05), retries=10))
    try:
        stream = feed(client, keys, "t1")
        await stream.send(b"\x01\x00" * 4)
        with frozen(server):
            pending = asyncio.ensure_future(stream.send(b"\x02\x00" * 4))
            await asyncio.sleep(1.2)  # the write goes out again after each timeout
        await pending
        await stream.end()
        assert await entries(client, keys, "t1") == ([b"\x01\x00" * 4, b"\x02\x00" * 4], True)
    finally:
        await client.aclose()


async def test_send_and_end_that_raised_are_written_once_on_the_next_call(server, keys):
    client = redis.Redis.from_url(server.url, socket_timeout=0.3)  # no retries: errors surface
    try:
        stream = feed(client, keys, "t2")
        with frozen(server):
            with pytest.raises(RedisError):
                await stream.send(b"\x03\x00" * 4)
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.2)  # the frozen write ran when Redis resumed
        with pytest.raises(SendPending):  # sending the chunk again would play it twice
            await stream.send(b"\x03\x00" * 4)
        await stream.flush()  # the failed chunk, at most once: a no-op here
        await stream.send(b"\x04\x00" * 4)
        with frozen(server):
            with pytest.raises(RedisError):
                await stream.end()
        assert not stream.ended
        with pytest.raises(QueueError):
            await stream.send(b"\x05\x00" * 4)  # the end was asked for
        await stream.end()  # retried: the earlier end marker may be in Redis already
        await stream.end()  # and a no-op once it returned
        assert stream.ended
        assert await entries(client, keys, "t2") == ([b"\x03\x00" * 4, b"\x04\x00" * 4], True)
        xlen = await client.xlen(keys.turn_input("conv", "t2"))
        assert xlen == 3
    finally:
        await client.aclose()
