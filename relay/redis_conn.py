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

# Blocking reads (XREAD BLOCK) must finish well inside the socket timeout, or redis-py reports a
# timeout for a read that is merely waiting; the margin covers a busy event loop.
_SOCKET_TIMEOUT_MARGIN_S = 10.0
# A caller waits this long for a free pooled connection before the command fails.
_POOL_WAIT_S = 10.0


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
    url: str, *, block_ms: int = 0, max_connections: int = 64, cluster: bool = False
) -> RedisClient:
    """A client for ``url``; ``block_ms`` is the longest BLOCK argument this client will send.

    The pool is bounded: with a single server, callers wait for a free connection instead of
    opening more, so the number of connections never grows with the number of clients served.
    """
    socket_timeout = block_ms / 1000 + _SOCKET_TIMEOUT_MARGIN_S
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3)
    if cluster:
        return BoundedRedisCluster.from_url(
            url, decode_responses=False, socket_timeout=socket_timeout,
            socket_connect_timeout=5.0, max_connections=max_connections, retry=retry,
        )
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=_POOL_WAIT_S, decode_responses=False,
        socket_timeout=socket_timeout, socket_connect_timeout=5.0, health_check_interval=30,
        retry=retry, retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return redis.Redis(connection_pool=pool)


def client_for(settings: Settings, *, block_ms: int = 0, max_connections: int | None = None
               ) -> RedisClient:
    """A client for REDIS_URL (single server or cluster) with this process's pool bound."""
    return create_client(settings.require_redis(), block_ms=block_ms,
                         cluster=settings.redis_cluster,
                         max_connections=max_connections or settings.redis_pool_size)


def node_client(host: str, port: int, *, block_ms: int, like: RedisClient) -> redis.Redis:
    """A plain client for one node of a cluster (blocking reads address one node at a time)."""
    kwargs = like.get_connection_kwargs() if isinstance(like, RedisCluster) else {}
    return redis.Redis(
        host=host, port=port, username=kwargs.get("username"), password=kwargs.get("password"),
        ssl=bool(kwargs.get("ssl", False)), decode_responses=False,
        socket_timeout=block_ms / 1000 + _SOCKET_TIMEOUT_MARGIN_S, socket_connect_timeout=5.0,
        max_connections=4,
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
