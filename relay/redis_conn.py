"""Redis clients with the timeouts the relay's blocking reads need, and a bounded wait for start-up.

One function makes every client, for a single server or a Redis Cluster, so timeouts, retries
and pool bounds are the same everywhere.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
from collections.abc import Awaitable
from typing import Any, TypeAlias, TypeVar, cast

import hiredis
import redis.asyncio as redis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay.settings import Settings

log = structlog.get_logger(__name__)

RedisClient: TypeAlias = "redis.Redis | RedisCluster"
_T = TypeVar("_T")


async def answer(reply: Awaitable[_T] | _T) -> _T:
    """The reply of an async command that redis-py annotates with the sync client's union
    (``Awaitable[T] | T``, e.g. HGET, HGETALL): awaited, with its type kept for mypy."""
    if inspect.isawaitable(reply):
        return await cast(Awaitable[_T], reply)
    return reply

# Timeouts and retries, per use (docs/operations.md, "Redis timeouts and retries"):
# - Commands and scripts: a reply within _COMMAND_TIMEOUT_S, else the command is sent again, up to
#   _RETRIES times (50 ms backoff doubling to 1 s). A retry may run a command whose first attempt
#   did reach Redis (it was in Redis's socket buffer when the client gave up), so every write the
#   relay sends is idempotent by construction; each Lua script's header says what a second run
#   does. The caller sees the error after at most about 3 x 5 s.
# - Blocking reads (XREAD/XREADGROUP BLOCK): the socket timeout is the BLOCK time plus
#   _BLOCK_MARGIN_S, so a read that is merely waiting never times out. Producers' clients retry
#   them like commands (a repeated read returns the same entries; a repeated XREADGROUP may leave
#   a doorbell pending until it is claimed as idle, never lose it).
# - The edge's hub reads (``retries=0``): no retries; the hub bounds each read itself and counts
#   an outage from its first failed or stalled read (RELAY_REDIS_UNAVAILABLE_S).
_COMMAND_TIMEOUT_S = 5.0
_BLOCK_MARGIN_S = 3.0
_RETRIES = 2
_CONNECT_TIMEOUT_S = 5.0
# A caller waits this long for a free pooled connection before the command fails.
_POOL_WAIT_S = 10.0
# RESP2 on every connection, whatever the redis-py version's default (8.x speaks RESP3 unless
# told): the edge reads pub/sub pushes off its subscriber connection as RESP2 arrays
# (``relay.edge.hub``), and every reply parser here expects RESP2's shapes.
_PROTOCOL = 2


def socket_timeout_s(block_ms: int) -> float:
    """The socket timeout of a client whose longest BLOCK argument is ``block_ms``."""
    return max(_COMMAND_TIMEOUT_S, block_ms / 1000 + _BLOCK_MARGIN_S)


def _retry(retries: int) -> Retry:
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=retries)


class BoundedRedisCluster(RedisCluster):
    """A cluster client that waits for a free connection instead of failing.

    redis-py's cluster pool raises MaxConnectionsError when a node's pool runs dry. Bounding the
    commands in flight to the pool size makes callers queue instead, as the single-server
    BlockingConnectionPool does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight = asyncio.Semaphore(int(kwargs.get("max_connections", 100)))

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._in_flight:
            return await super().execute_command(*args, **kwargs)


# Commands that may wait in Redis for data. They never share a pipeline: every command behind
# one would wait for it.
_BLOCKING = frozenset({"BLPOP", "BRPOP", "BLMOVE", "BRPOPLPUSH", "BLMPOP", "BZPOPMIN",
                       "BZPOPMAX", "BZMPOP", "WAIT", "WAITAOF"})
_MAY_BLOCK = frozenset({"XREAD", "XREADGROUP"})  # only with a BLOCK argument
# Overflow policy "split": one pipeline carries at most this many commands; more go out as
# further pipelines of the same flush, in order.
_BATCH_MAX = 256


def _blocks(args: tuple[Any, ...]) -> bool:
    first = args[0]
    name = (first.decode() if isinstance(first, bytes) else str(first)).upper()
    if name in _BLOCKING:
        return True
    return name in _MAY_BLOCK and any(
        isinstance(a, (str, bytes)) and a in ("BLOCK", b"BLOCK") for a in args[1:])


# Argument types hiredis packs exactly as redis-py's Encoder does (str as UTF-8, int in decimal,
# bytes as they are). Anything else (float, bool, memoryview, an int subclass) takes redis-py's
# own packer, which formats or refuses it as it always did.
_HIREDIS_PACKS = frozenset((bytes, str, int))


class HiredisPacking(AbstractConnection):
    """A connection that packs commands with hiredis's C packer, as redis-py's sync client does
    when hiredis is installed; its asyncio client packs in Python. A submit script call of 39
    arguments (a 32 KB clip, six audio entries) took 64 us to pack in Python and 15 us in
    hiredis on the bench machine, and every script call of a producer and a backend pays it.

    The bytes on the wire are the same. Left to redis-py: a command name of several words
    ("CLIENT SETNAME"), which it splits; a client whose encoding is not strict UTF-8; any
    argument of another type (see ``_HIREDIS_PACKS``)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        head = args[0] if args else None
        single_word = ((isinstance(head, str) and " " not in head)
                       or (isinstance(head, bytes) and b" " not in head))
        encoder = self.encoder
        if (single_word and encoder.encoding == "utf-8" and encoder.encoding_errors == "strict"
                and all(type(arg) in _HIREDIS_PACKS for arg in args)):
            return [hiredis.pack_command(args)]
        return super().pack_command(*args)


_FAST_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def hiredis_packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` (TCP, TLS or Unix socket, as the URL chose) packing with hiredis."""
    if issubclass(connection_class, HiredisPacking):
        return connection_class
    fast = _FAST_PACKING.get(connection_class)
    if fast is None:
        fast = type(f"HiredisPacking{connection_class.__name__}",
                    (HiredisPacking, connection_class), {})
        _FAST_PACKING[connection_class] = fast
    return fast


class BatchingRedis(redis.Redis):
    """A single-server client that batches its callers' commands into pipelines
    (auto-pipelining); each caller still awaits its own reply or error. A command issued while
    nothing else is in flight on the client goes out as the plain command; those issued while
    others are in flight are sent together, as one pipeline, on the loop's next turn.

    Hand-written because redis-py has none, and there an awaited command costs a pool checkout,
    a liveness poll of the connection, a write task and a read timeout, four to six turns of the
    event loop: 100 to 230 us of client CPU per command on the 2-core bench machine, against 33
    to 63 us with 20 to 100 callers batched (docs/benchmarks.md, "Client CPU per command"). A
    producer's turns and a backend's submits are exactly that: many small commands from many
    tasks at once.

    What stays as with plain commands: replies and ResponseErrors per caller; the pool's bound
    on connections (each pipeline takes one pooled connection); timeouts and retries, which for a
    pipeline resend its whole batch (every write the relay sends is idempotent by construction, see
    the retry note above, so a resent batch is the same as resent commands). A batch runs in
    Redis in the order its commands were issued. A caller cancelled before its batch is sent is
    left out; once sent, a command runs, as with any client. Blocking reads (XREAD and XREADGROUP
    with BLOCK, the B*POP family, WAIT) are sent on their own, as plain commands.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch: list[tuple[tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._busy = 0  # plain commands and batches in flight (blocking reads not counted)

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        # redis-py leaves these untyped.
        if _blocks(args):
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        if not self._busy:
            # Nothing else in flight: a batch of one would only cost a pipeline and a turn of
            # the loop more than the plain command.
            self._busy += 1
            try:
                return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
            finally:
                self._busy -= 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._batch:
            # The flush runs on the loop's next turn, after every caller ready in this one.
            task = loop.create_task(self._flush(), name="redis-batch")
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        self._batch.append((args, options, future))
        return await future

    async def execute_in_order(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in the next batch, one after another on its one connection, so
        Redis runs them in this order (plain concurrent commands may travel on different
        connections); the replies, an error as its exception instance (not raised)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for args in commands:
            if not self._batch:
                task = loop.create_task(self._flush(), name="redis-batch")
                self._flushes.add(task)
                task.add_done_callback(self._flushes.discard)
            future: asyncio.Future[Any] = loop.create_future()
            self._batch.append((args, {}, future))
            futures.append(future)
        return list(await asyncio.gather(*futures, return_exceptions=True))

    async def _flush(self) -> None:
        batch, self._batch = self._batch, []
        live = [entry for entry in batch if not entry[2].done()]  # cancelled callers: left out
        self._busy += 1
        try:
            for start in range(0, len(live), _BATCH_MAX):
                await self._send(live[start:start + _BATCH_MAX])
        finally:
            self._busy -= 1
            for *_, future in live:  # the flush itself was cancelled (loop or client closing)
                if not future.done():
                    future.cancel()

    async def _send(self, part: list[tuple[tuple[Any, ...], dict[str, Any],
                                           asyncio.Future[Any]]]) -> None:
        pipe = self.pipeline(transaction=False)
        for args, options, _ in part:
            pipe.pipeline_execute_command(*args, **options)  # type: ignore[no-untyped-call]
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed for all of them, after its retries
            for *_, future in part:
                if not future.done():
                    future.set_exception(_own_copy(exc))
            return
        for (*_, future), reply in zip(part, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


def _own_copy(exc: Exception) -> Exception:
    """The batch's error for one of its callers: raising one instance in many tasks would grow
    its traceback with each of them."""
    mine = copy.copy(exc)
    mine.__cause__ = exc
    return mine


async def in_order(client: RedisClient, commands: list[tuple[Any, ...]]) -> list[Any]:
    """``commands`` run by Redis in this order (for a cluster: all on one slot's node), in one
    round trip; each reply, or its error as an exception instance (not raised)."""
    if isinstance(client, BatchingRedis):
        return await client.execute_in_order(commands)
    pipe = client.pipeline(transaction=False)
    for args in commands:
        pipe.execute_command(*args)
    return list(await pipe.execute(raise_on_error=False))


async def open_connections(client: RedisClient, count: int) -> int:
    """Open up to ``count`` of the client's pooled connections now (at most its pool's bound)
    and leave them idle in the pool; returns how many it holds. A role opens what its busy
    moments will use at start, because a connection opened then costs a TCP connect and
    redis-py's handshake (CLIENT SETINFO, twice) in a caller's path: three round trips, which
    with Redis 1 ms away each way put about 6 ms into a conversation's first audio.

    Concurrent commands cannot do this through ``BatchingRedis``: they share one pipeline, so one
    connection. The connections are taken from the pool itself instead. A cluster client's
    commands are not batched: one ping each, spread over the nodes by redis-py."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        await asyncio.gather(*(client.ping() for _ in range(count)))
        return count
    count = min(count, int(getattr(pool, "max_connections", count)))
    taken = await asyncio.gather(*(pool.get_connection() for _ in range(count)),
                                 return_exceptions=True)
    opened = [c for c in taken if not isinstance(c, BaseException)]
    for connection in opened:
        await pool.release(connection)
    failed = [c for c in taken if isinstance(c, BaseException)]
    if failed:
        raise failed[0]
    return len(opened)


def create_client(
    url: str, *, block_ms: int = 0, max_connections: int = 64, cluster: bool = False,
    retries: int = _RETRIES,
) -> RedisClient:
    """A client for ``url``; ``block_ms`` is the longest BLOCK argument this client will send,
    ``retries`` how often a command that failed on a connection error or timeout is sent again.

    The pool is bounded: with a single server, callers wait for a free connection instead of
    opening more, so the number of connections never grows with the number of clients served.
    """
    socket_timeout = socket_timeout_s(block_ms)
    retry = _retry(retries)
    if cluster:
        return BoundedRedisCluster.from_url(
            url, decode_responses=False, socket_timeout=socket_timeout,
            socket_connect_timeout=_CONNECT_TIMEOUT_S, max_connections=max_connections,
            retry=retry, protocol=_PROTOCOL,
        )
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=_POOL_WAIT_S, decode_responses=False,
        socket_timeout=socket_timeout, socket_connect_timeout=_CONNECT_TIMEOUT_S,
        health_check_interval=30, retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError], protocol=_PROTOCOL,
    )
    pool.connection_class = hiredis_packing(pool.connection_class)
    return BatchingRedis.from_pool(pool)  # owns its pool: aclose() closes the connections


def client_for(settings: Settings, *, block_ms: int = 0, max_connections: int | None = None
               ) -> RedisClient:
    """A client for REDIS_URL (single server or cluster) with this process's pool bound."""
    return create_client(settings.require_redis(), block_ms=block_ms,
                         cluster=settings.redis_cluster,
                         max_connections=max_connections or settings.redis_pool_size)


def node_client(host: str, port: int, *, block_ms: int, like: RedisClient) -> redis.Redis:
    """A plain client for one node of a cluster (blocking reads address one node at a time), with
    no retries: its users (the hub's reads, pub/sub) loop and count failures themselves."""
    kwargs = like.get_connection_kwargs() if isinstance(like, RedisCluster) else {}
    return redis.Redis(
        host=host, port=port, username=kwargs.get("username"), password=kwargs.get("password"),
        ssl=bool(kwargs.get("ssl", False)), decode_responses=False,
        socket_timeout=socket_timeout_s(block_ms), socket_connect_timeout=_CONNECT_TIMEOUT_S,
        max_connections=4, retry=_retry(0), protocol=_PROTOCOL,
    )


def pubsub_client(client: RedisClient) -> redis.Redis:
    """A client for classic pub/sub. On a cluster, PUBLISH reaches subscribers on every node, so
    one connection to any node hears every channel (the cluster client has no pub/sub)."""
    if not isinstance(client, RedisCluster):
        return client
    node = client.get_default_node()
    return node_client(node.host, int(node.port), block_ms=0, like=client)


async def wait_until_ready(client: RedisClient, *, timeout_s: float = 30.0) -> None:
    """PING until the server answers, with capped backoff; raise the last error after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.05
    while True:
        try:
            await client.ping()
            return
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if loop.time() + delay > deadline:
                raise
            log.warning("redis_not_ready", error=str(exc), retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
