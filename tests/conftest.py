"""Shared fixtures: a real Redis-compatible server (REDIS_URL, or valkey-server from PyPI) and
per-test key prefixes so tests never see each other's keys."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as redis

from relay.dev.embedded import EmbeddedCluster, EmbeddedServer
from relay.keys import Keys
from relay.redis_conn import create_client
from relay.settings import Settings
from workers.queue.submit import TurnQueue

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
def queue(redis_client: redis.Redis, keys: Keys) -> TurnQueue:
    """The built-in turn queue on the test's Redis (a module's own redis_client wins)."""
    return TurnQueue(redis_client, keys, input_ttl_s=300)
