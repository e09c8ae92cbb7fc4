"""A producer's /healthz and /readyz, against a live and a dead Redis."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from relay.dev.embedded import free_port
from relay.redis_conn import create_client
from workers.health import create_health_app


async def probe(app: web.Application) -> tuple[int, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as health:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as ready:
                    return health.status, ready.status
    finally:
        await runner.cleanup()


async def test_ready_only_with_redis_and_while_accepting(redis_client):
    assert await probe(create_health_app(redis_client, lambda: True)) == (200, 200)
    assert await probe(create_health_app(redis_client, lambda: False)) == (200, 503)
    dead = create_client(f"redis://127.0.0.1:{free_port()}/0")
    assert await probe(create_health_app(dead, lambda: True)) == (200, 503)
    await dead.aclose()


async def test_not_ready_while_the_worker_cannot_take_work(redis_client):
    blocked = create_health_app(redis_client, lambda: True, lambda: "ResponseError: NOGROUP")
    assert await probe(blocked) == (200, 503)
    assert await probe(create_health_app(redis_client, lambda: True, lambda: None)) == (200, 200)
