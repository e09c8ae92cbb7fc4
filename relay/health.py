"""``relay check``: exit 0 when the dependencies of a role answer; for container probes."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisClusterException

from relay.redis_conn import client_for
from relay.settings import Settings

log = structlog.get_logger(__name__)


async def check(settings: Settings, *, role: str) -> int:
    failures = await _check_redis(settings)
    if role == "producer":
        failures.extend(await _check_motion_server(settings))
    for failure in failures:
        log.error("dependency_unreachable", detail=failure)
    if not failures:
        log.info("dependencies_ok", role=role)
    return 1 if failures else 0


async def _check_redis(settings: Settings) -> list[str]:
    # No REDIS_URL is a dependency this role cannot reach: exit 1 like any other, as documented.
    if not settings.redis_url:
        return ["redis: REDIS_URL is not set"]
    client = client_for(settings)
    try:
        await asyncio.wait_for(client.ping(), 3.0)
    except (TimeoutError, OSError, redis.RedisError, RedisClusterException) as exc:
        # RedisClusterException: a cluster client with no node reachable (not a RedisError).
        return [f"redis: {exc}"]
    finally:
        await client.aclose()
    return []


async def _check_motion_server(settings: Settings) -> list[str]:
    url = settings.spatius_console_url
    if not url:
        return []  # region endpoints are resolved by the SDK; nothing local to probe
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parsed.hostname, port), 3.0)
    except (TimeoutError, OSError) as exc:
        return [f"motion server console {parsed.hostname}:{port}: {exc}"]
    writer.close()
    await writer.wait_closed()
    return []
