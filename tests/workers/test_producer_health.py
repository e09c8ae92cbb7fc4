"""A producer's /healthz and /readyz, against a live and a dead Redis, and from process start."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import aiohttp
import pytest
from aiohttp import web

from relay.dev.embedded import EmbeddedServer, free_port
from relay.errors import ConfigError
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


async def _status(http: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with http.get(url) as response:
            return response.status
    except aiohttp.ClientError:
        return None


async def _until(http: aiohttp.ClientSession, url: str, wanted: int, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await _status(http, url) != wanted:
        assert loop.time() < deadline, f"{url} never answered {wanted}"
        await asyncio.sleep(0.1)


async def test_a_producer_is_alive_before_redis_and_ready_once_it_answers(tmp_path):
    """`relay producer` started while Redis is down: /healthz answers at once (a liveness probe
    must not restart it in a loop), /readyz says why it is not ready, /metrics answers; when
    Redis comes up it becomes ready by itself; every line it logged is JSON."""
    redis_port, health_port, sim_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "SPATIUS_")) and k != "REDIS_URL"}
    env.update({"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "RELAY_PRODUCER_HEALTH_PORT": str(health_port),
                "SPATIUS_CONSOLE_URL": f"http://127.0.0.1:{sim_port}/v1/console",
                "SPATIUS_INGRESS_URL": f"ws://127.0.0.1:{sim_port}/v2/driveningress"})
    base = f"http://127.0.0.1:{health_port}"
    log_path = tmp_path / "producer.log"
    with log_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "relay", "producer",
                                                    env=env, stdout=out, stderr=out)
    server = EmbeddedServer(redis_port)
    try:
        async with aiohttp.ClientSession() as http:
            await _until(http, f"{base}/healthz", 200, 20)
            async with http.get(f"{base}/readyz") as ready:
                assert ready.status == 503
                assert (await ready.json())["status"] == "job_loop_not_running"
            assert await _status(http, f"{base}/metrics") == 200
            await asyncio.sleep(1.0)
            assert proc.returncode is None and await _status(http, f"{base}/healthz") == 200
            server.start()
            await _until(http, f"{base}/readyz", 200, 20)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.stop()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert "redis_not_ready" in {line["event"] for line in lines}
    assert lines[-1]["event"] == "producer_stopped"


def test_sdk_telemetry_setting_reaches_the_sdk():
    import spatius
    from spatius.telemetry import telemetry_enabled

    from relay.settings import Settings
    from workers.speech.endpoints import configure_sdk_telemetry

    try:
        assert configure_sdk_telemetry("on", simulated=True) == "off"
        assert not telemetry_enabled()
        assert configure_sdk_telemetry("http://127.0.0.1:4318", simulated=False) == "collector"
        assert telemetry_enabled()
        assert configure_sdk_telemetry("off", simulated=False) == "off"
        assert not telemetry_enabled()
    finally:
        spatius.configure_telemetry("")  # the suite never exports anything
    assert Settings.from_env({"RELAY_SPATIUS_SDK_TELEMETRY": "off"}).spatius_sdk_telemetry == "off"
    with pytest.raises(ConfigError, match="RELAY_SPATIUS_SDK_TELEMETRY"):
        Settings.from_env({"RELAY_SPATIUS_SDK_TELEMETRY": "ftp://collector"})
