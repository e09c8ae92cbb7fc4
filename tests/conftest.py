"""Shared fixtures: a real Redis-compatible server (REDIS_URL, or valkey-server from PyPI) and
per-test key prefixes so tests never see each other's keys."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis.asyncio as redis
from aiohttp import web

from relay.dev.embedded import EmbeddedCluster, EmbeddedServer
from relay.dev.motion_sim import SimConfig, bound_port, serve
from relay.keys import Keys
from relay.redis_conn import create_client
from relay.settings import Settings
from tests.helpers.producer import FAST, SimHandle
from workers.queue.submit import TurnQueue
from workers.queue.worker import ProducerWorker
from workers.speech.producer import Producer

TEST_SECRET = "test-secret-0123456789abcdef-0123456789"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A real 3-master Redis Cluster (REDIS_CLUSTER_URL, or valkey-server from PyPI)."""
    url = os.environ.get("REDIS_CLUSTER_URL")
    if url:
        yield url
        return
    with EmbeddedCluster(masters=3) as cluster:
        yield cluster.url


@pytest.fixture
def key_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
def settings(redis_url: str, key_prefix: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        token_secret=TEST_SECRET,
        log_json=False,
        read_block_ms=500,
        jobs_block_ms=200,
    )


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.Redis]:
    client = create_client(redis_url, block_ms=2000)
    yield client
    await client.aclose()


@pytest.fixture
def queue(settings: Settings, redis_client: redis.Redis) -> TurnQueue:
    """The built-in turn queue on the test's Redis, configured like the producers."""
    return TurnQueue.from_settings(settings, redis_client)


# --- the Motion Server simulator, producers and workers ------------------------------------------


@pytest.fixture
async def start_sim() -> AsyncIterator[Callable[..., Awaitable[SimHandle]]]:
    runners: list[web.AppRunner] = []

    async def start(config: SimConfig | None = None) -> SimHandle:
        runner = await serve(config or SimConfig(max_concurrent_sessions=0))
        runners.append(runner)
        return SimHandle(runner, bound_port(runner))

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def sim(start_sim: Callable[..., Awaitable[SimHandle]]) -> SimHandle:
    return await start_sim()


@pytest.fixture
async def make_producer(
    settings: Settings, redis_client: redis.Redis, sim: SimHandle
) -> AsyncIterator[Callable[..., Awaitable[Producer]]]:
    producers: list[Producer] = []

    async def make(*, at: SimHandle | None = None, **overrides: object) -> Producer:
        target = at or sim
        producer = Producer(settings.with_overrides(**{**FAST, **overrides}), redis_client,
                            console_url=target.console_url, ingress_url=target.ingress_url)
        await producer.start()
        producers.append(producer)
        return producer

    yield make
    for producer in producers:
        await producer.close()


@pytest.fixture
async def run_worker(
    settings: Settings,
    redis_client: redis.Redis,
    make_producer: Callable[..., Awaitable[Producer]],
) -> AsyncIterator[Callable[..., Awaitable[ProducerWorker]]]:
    running: list[tuple[ProducerWorker, asyncio.Task[None]]] = []

    async def start(*, at: SimHandle | None = None, **overrides: object) -> ProducerWorker:
        producer = await make_producer(at=at, **overrides)
        worker = ProducerWorker(settings.with_overrides(**overrides), redis_client, producer)
        running.append((worker, asyncio.create_task(worker.run())))
        return worker

    yield start
    for worker, task in running:
        await worker.stop(timeout_s=2)
        await task



WEB_TESTS_ENABLE = ("apt-get update && apt-get install -y chromium nodejs npm, then make web-deps "
                    "(Playwright comes with make install)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line for the web client and browser tests skipped for want of Chromium or Node."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        text = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""
        if "[web] " in text:
            reason = text.split("[web] ", 1)[1]
            reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        why = "; ".join(f"{count} for {reason}" for reason, count in reasons.items())
        terminalreporter.write_line(f"web client and browser tests skipped ({why}); to run them: "
                                    f"{WEB_TESTS_ENABLE}")
