"""``/healthz`` and ``/readyz`` for a producer process (load balancers, Kubernetes probes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as redis
from aiohttp import web

from relay.redis_conn import RedisClient
from relay.settings import Settings

_PING_TIMEOUT_S = 2.0


def create_health_app(client: RedisClient, accepting: Callable[[], bool],
                      blocked: Callable[[], str | None] | None = None) -> web.Application:
    """``accepting`` says whether the worker is taking jobs (false while stopping); ``blocked``
    says why the worker cannot take work right now (its job loop fails, e.g. the jobs group is
    being recreated after Redis came back empty), or None."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if not accepting():
            return web.json_response({"status": "stopping"}, status=503)
        reason = blocked() if blocked is not None else None
        if reason is not None:
            return web.json_response({"status": "jobs_unavailable", "error": reason}, status=503)
        try:
            await asyncio.wait_for(client.ping(), _PING_TIMEOUT_S)
        except (TimeoutError, OSError, redis.RedisError) as exc:
            return web.json_response({"status": "redis_unavailable", "error": str(exc)},
                                     status=503)
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_health_server(settings: Settings, client: RedisClient,
                              accepting: Callable[[], bool],
                              blocked: Callable[[], str | None] | None = None,
                              ) -> web.AppRunner | None:
    if not settings.producer_health_port:
        return None
    runner = web.AppRunner(create_health_app(client, accepting, blocked), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.producer_health_host, settings.producer_health_port).start()
    return runner
