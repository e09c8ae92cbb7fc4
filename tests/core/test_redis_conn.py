"""The relay's Redis client against a real server: what its batching of concurrent commands into
pipelines keeps (each caller's reply and error, order, blocking reads apart, cancellation) and
what it saves (one pipeline for many callers)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

from relay.redis_conn import (
    BatchingRedis,
    HiredisPacking,
    create_client,
    hiredis_packing,
    in_order,
    open_connections,
)
from tests.helpers.polling import eventually


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.Redis]:
    made = create_client(redis_url, block_ms=2000, max_connections=4)
    yield made
    await made.aclose()


@pytest.fixture
def pipelines(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every pipeline sent (by any client of the test)."""
    sizes: list[int] = []
    execute = Pipeline.execute

    async def counted(self: Pipeline, raise_on_error: bool = True) -> list[Any]:
        sizes.append(len(self.command_stack))
        return await execute(self, raise_on_error=raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", counted)
    return sizes


async def busy(client: redis.Redis) -> asyncio.Task[Any]:
    """A command in flight: commands issued meanwhile are batched (alone, one goes plain)."""
    task = asyncio.create_task(client.ping())
    await asyncio.sleep(0)
    return task


async def test_a_single_server_client_batches(client: redis.Redis) -> None:
    assert isinstance(client, BatchingRedis)


async def test_concurrent_callers_share_one_pipeline_and_get_their_own_replies(
        client: redis.Redis, key_prefix: str, pipelines: list[int]) -> None:
    names = [f"{key_prefix}:k{i}" for i in range(50)]
    ping = await busy(client)
    await asyncio.gather(*(client.set(name, str(i)) for i, name in enumerate(names)))
    assert pipelines == [50]
    assert await ping
    ping = await busy(client)
    values = await asyncio.gather(*(client.get(name) for name in names))
    assert values == [str(i).encode() for i in range(50)]
    assert pipelines == [50, 50]
    assert await ping


async def test_a_command_alone_goes_plain(client: redis.Redis, key_prefix: str,
                                          pipelines: list[int]) -> None:
    for i in range(3):
        await client.set(f"{key_prefix}:alone", i)
    assert pipelines == []
    assert await client.get(f"{key_prefix}:alone") == b"2"


async def test_one_callers_error_is_its_own(client: redis.Redis, key_prefix: str) -> None:
    text, count = f"{key_prefix}:text", f"{key_prefix}:count"
    await client.set(text, "not a number")
    await busy(client)
    results = await asyncio.gather(client.incr(count), client.incr(text), client.incr(count),
                                   return_exceptions=True)
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError)


async def test_a_batch_runs_in_the_order_it_was_issued(
        client: redis.Redis, key_prefix: str) -> None:
    name = f"{key_prefix}:list"
    await busy(client)
    await asyncio.gather(*(client.rpush(name, i) for i in range(30)))
    assert await client.lrange(name, 0, -1) == [str(i).encode() for i in range(30)]


@pytest.mark.parametrize("server", ["single", "cluster"])
async def test_in_order_runs_a_callers_commands_in_order_in_one_pipeline(
        server: str, request: pytest.FixtureRequest, key_prefix: str,
        pipelines: list[int]) -> None:
    # An idle batching client sends a lone command plain and the next ones batched, possibly on
    # another connection: in_order must not, or a script could run before the SET it reads.
    url = request.getfixturevalue("redis_url" if server == "single" else "cluster_url")
    made = create_client(url, cluster=server == "cluster")
    name = f"{key_prefix}:{{slot}}:ordered"
    try:
        replies = await in_order(made, [("SET", name, "a"), ("APPEND", name, "b"),
                                        ("INCR", name), ("APPEND", name, "c")])
        assert replies[:2] == [True, 2] and replies[3] == 3
        assert isinstance(replies[2], ResponseError)  # returned, not raised
        assert await made.get(name) == b"abc"
        if server == "single":
            assert pipelines == [4]  # one pipeline, all four in it
    finally:
        await made.delete(name)
        await made.aclose()


async def test_scripts_reload_after_a_script_flush(client: redis.Redis, key_prefix: str) -> None:
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    name = f"{key_prefix}:n"
    assert await script(keys=[name]) == 1
    await client.script_flush()
    await busy(client)
    # Every caller of the batch gets NOSCRIPT, loads the script and runs it once: no run lost.
    await asyncio.gather(*(script(keys=[name]) for _ in range(10)))
    assert int(await client.get(name) or 0) == 11


async def test_a_blocking_read_does_not_hold_up_other_commands(
        client: redis.Redis, key_prefix: str, pipelines: list[int]) -> None:
    stream = f"{key_prefix}:s"
    read = asyncio.create_task(client.xread({stream: "$"}, block=1500))
    await asyncio.sleep(0.05)  # the read is in Redis, blocked
    assert await client.set(f"{key_prefix}:x", "1")
    assert not read.done()  # the SET was answered while the read still waits
    await client.xadd(stream, {"f": "v"})
    reply = await asyncio.wait_for(read, 5)
    assert reply and reply[0][1][0][1] == {b"f": b"v"}
    assert all(size == 1 for size in pipelines)  # the XREAD BLOCK never went into one


async def test_a_caller_cancelled_before_its_batch_is_sent_is_left_out(
        client: redis.Redis, key_prefix: str) -> None:
    name = f"{key_prefix}:cancelled"
    await busy(client)
    setter = asyncio.create_task(client.set(name, "1"))
    await asyncio.sleep(0)  # the setter has queued its command; the batch goes out next turn
    setter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await setter
    assert await client.exists(name) == 0


async def test_a_connection_failure_reaches_every_caller_of_the_batch(
        pipelines: list[int]) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = create_client(f"redis://127.0.0.1:{port}", retries=0)
    try:
        ping = await busy(client)
        results = await asyncio.gather(*(client.get(f"k{i}") for i in range(5)),
                                       return_exceptions=True)
        with pytest.raises(RedisConnectionError):
            await ping
    finally:
        await client.aclose()
    assert pipelines == [5]
    assert all(isinstance(r, RedisConnectionError) for r in results)
    assert len({id(r) for r in results}) == 5  # each caller raises its own instance


async def test_closing_a_client_closes_its_connections(redis_url: str, redis_client) -> None:
    # Every client the relay makes owns its pool: a role that closes its client leaves no
    # connection open on the server (and no ResourceWarning for an unclosed socket behind).
    async def connected() -> int:
        return int((await redis_client.info("clients"))["connected_clients"])

    before = await connected()
    client = create_client(redis_url, max_connections=4)
    await asyncio.gather(*(client.ping() for _ in range(4)))  # several pooled connections
    assert await connected() > before
    await client.aclose()
    await eventually(lambda: _back_to(connected, before), what="connections closed")


async def _back_to(connected: Any, count: int) -> bool:
    return await connected() == count


async def test_open_connections_opens_them_now_and_pools_them(redis_url: str, redis_client) -> None:
    # Concurrent commands through the batching client share one pipeline, so they open about one
    # connection; open_connections takes them from the pool, so a busy moment later opens none.
    async def connected() -> int:
        return int((await redis_client.info("clients"))["connected_clients"])

    batched = create_client(redis_url, max_connections=8)
    before = await connected()
    await asyncio.gather(*(batched.ping() for _ in range(6)))
    assert await connected() - before <= 2
    await batched.aclose()
    await eventually(lambda: _back_to(connected, before), what="connections closed")

    client = create_client(redis_url, max_connections=8)
    assert await open_connections(client, 6) == 6
    assert await connected() - before == 6
    await asyncio.gather(*(client.ping() for _ in range(40)))  # pooled ones reused: none new
    assert await connected() - before == 6
    assert await open_connections(client, 20) == 8  # bounded by the pool
    assert await connected() - before == 8
    await client.aclose()


@pytest.mark.parametrize("args", [
    ("SET", "k", b"v"),
    ("EVALSHA", "a" * 40, 2, "relay:{c}:q", "relay:{c}:s", "turn-é", -7, 2**40, bytes(70_000)),
    (b"XADD", b"s", b"*", b"d", bytes(300)),
    ("SET", "k", 1.5),  # a float: redis-py's packer formats it, as before
    ("SET", "k", memoryview(b"v")),  # a memoryview: redis-py keeps it uncopied
    ("CLIENT SETNAME", "name"),  # a command of two words: redis-py splits it
])
def test_hiredis_packing_puts_the_same_bytes_on_the_wire(args: tuple[Any, ...]) -> None:
    fast = hiredis_packing(Connection)()
    assert b"".join(fast.pack_command(*args)) == b"".join(Connection().pack_command(*args))


def test_hiredis_packing_refuses_what_redis_py_refuses() -> None:
    with pytest.raises(DataError):
        hiredis_packing(Connection)().pack_command("SET", "k", True)


async def test_the_relays_clients_pack_with_hiredis(client: redis.Redis, key_prefix: str
                                                    ) -> None:
    assert issubclass(client.connection_pool.connection_class, HiredisPacking)
    await client.set(f"{key_prefix}:packed", bytes(range(256)) * 40)  # through hiredis's packer
    assert await client.get(f"{key_prefix}:packed") == bytes(range(256)) * 40


async def test_the_relays_clients_speak_resp2_whatever_the_librarys_default(
        client: redis.Redis, redis_url: str) -> None:
    # redis-py 8 defaults to RESP3; the edge's push parsing and every reply shape assume RESP2.
    from relay.redis_conn import node_client

    host, port = redis_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    node = node_client(host, int(port), block_ms=0, like=client)
    try:
        for made in (client, node):
            info = await made.execute_command("CLIENT", "INFO")
            assert b" resp=2 " in info
    finally:
        await node.aclose()
