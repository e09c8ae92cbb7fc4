"""Redis clients with the timeouts the relay's blocking reads need, and a bounded wait for start-up.

One function makes every client, for a single server or a Redis Cluster, so timeouts, retries
and pool bounds are the same everywhere.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import Any, TypeAlias, TypeVar, cast

import redis.asyncio as redis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
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
            retry=retry,
        )
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=_POOL_WAIT_S, decode_responses=False,
        socket_timeout=socket_timeout, socket_connect_timeout=_CONNECT_TIMEOUT_S,
        health_check_interval=30, retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return redis.Redis(connection_pool=pool)


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
        max_connections=4, retry=_retry(0),
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
