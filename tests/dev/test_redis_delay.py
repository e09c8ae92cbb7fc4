"""The latency bench's delaying proxy in front of a real Redis: replies come back whole, in
order, and no sooner than twice the one-way delay."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit

import redis.asyncio as redis

from relay.dev.bench.child import BenchChild

DELAY_MS = 20


async def test_the_proxy_delays_each_way_and_keeps_order(redis_url: str, key_prefix: str,
                                                         tmp_path: Path) -> None:
    proxy = BenchChild("redis-delay", "relay.dev.bench.redis_delay", tmp_path)
    await proxy.start({"target_port": urlsplit(redis_url).port, "delay_ms": DELAY_MS})
    try:
        port = (await proxy.expect("ready", 30))["port"]
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            await client.ping()  # the connection's own handshake, delayed too
            started = time.monotonic()
            assert await client.ping() is True
            assert time.monotonic() - started >= 2 * DELAY_MS / 1000
            key = f"{key_prefix}:delayed"
            payload = bytes(range(256)) * 1024  # larger than one read of the proxy
            pipe = client.pipeline(transaction=False)
            for i in range(50):
                pipe.rpush(key, i)
            pipe.set(f"{key}:big", payload)
            pipe.get(f"{key}:big")
            pipe.lrange(key, 0, -1)
            replies = await pipe.execute()
            assert replies[:50] == list(range(1, 51))
            assert replies[51] == payload
            assert replies[52] == [str(i).encode() for i in range(50)]
            await client.delete(key, f"{key}:big")
        finally:
            await client.aclose()
    finally:
        await proxy.stop()
