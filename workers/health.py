"""``/healthz``, ``/readyz`` and ``/metrics`` of a producer process (probes and Prometheus).

The server starts before anything else, Redis included: liveness answers from process start, so a
Redis outage at start-up shows as not ready instead of a liveness probe restarting the process in
a loop. Readiness says whether the producer can do its job: not stopping, its job loop running,
Redis answering.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as redis
from aiohttp import web
from prometheus_client import generate_latest
from redis.exceptions import RedisClusterException

from relay.redis_conn import RedisClient
from relay.settings import Settings
from workers.metrics import ProducerMetrics

_PING_TIMEOUT_S = 2.0
_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_health_app(client: RedisClient, accepting: Callable[[], bool],
                      blocked: Callable[[], str | None] | None = None, *,
                      job_loop_alive: Callable[[], bool] | None = None,
                      metrics: ProducerMetrics | None = None) -> web.Application:
    """``accepting`` says whether the worker is taking jobs (false while stopping); ``blocked``
    says why the worker cannot take work right now (its job loop fails, e.g. the jobs group is
    being recreated after Redis came back empty), or None; ``job_loop_alive`` whether its job
    loop runs (false before it starts and once it ended)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if not accepting():
            return web.json_response({"status": "stopping"}, status=503)
        if job_loop_alive is not None and not job_loop_alive():
            return web.json_response({"status": "job_loop_not_running"}, status=503)
        reason = blocked() if blocked is not None else None
        if reason is not None:
            return web.json_response({"status": "jobs_unavailable", "error": reason}, status=503)
        try:
            await asyncio.wait_for(client.ping(), _PING_TIMEOUT_S)
        except (TimeoutError, OSError, redis.RedisError, RedisClusterException) as exc:
            # RedisClusterException: a cluster client with no node reachable (not a RedisError).
            return web.json_response({"status": "redis_unavailable", "error": str(exc)},
                                     status=503)
        return web.json_response({"status": "ready"})

    async def metrics_page(request: web.Request) -> web.Response:
        if metrics is None:
            raise web.HTTPNotFound()
        await metrics.sample()
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": _CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


async def start_health_server(settings: Settings, client: RedisClient,
                              accepting: Callable[[], bool],
                              blocked: Callable[[], str | None] | None = None, *,
                              job_loop_alive: Callable[[], bool] | None = None,
                              metrics: ProducerMetrics | None = None) -> web.AppRunner | None:
    if not settings.producer_health_port:
        return None
    app = create_health_app(client, accepting, blocked, job_loop_alive=job_loop_alive,
                            metrics=metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.producer_health_host, settings.producer_health_port).start()
    return runner
