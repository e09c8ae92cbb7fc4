"""Redis clients with the timeouts the relay's blocking reads need, and a bounded wait for start-up."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = structlog.get_logger(__name__)

# Blocking reads (XREAD BLOCK) must finish well inside the socket timeout, or redis-py reports a
# timeout for a read that is merely waiting; the margin covers a busy event loop.
_SOCKET_TIMEOUT_MARGIN_S = 10.0


def create_client(url: str, *, block_ms: int = 0, max_connections: int = 64) -> redis.Redis:
    """A client for ``url``; ``block_ms`` is the longest BLOCK argument this client will send."""
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=block_ms / 1000 + _SOCKET_TIMEOUT_MARGIN_S,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        max_connections=max_connections,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


async def wait_until_ready(client: redis.Redis, *, timeout_s: float = 30.0) -> None:
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
