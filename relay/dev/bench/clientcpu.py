"""Client CPU per Redis command: redis-py's plain client against the relay's batching one.

Part of ``relay bench --latency``: a turn's way to its first audio is a chain of small commands,
and with many turns starting at once their callers run concurrently on one event loop. Here
``callers`` tasks each run a chain of ``chain`` script calls (the shape of a turn's start), once
through ``redis.asyncio.Redis`` and once through ``relay.redis_conn.BatchingRedis``, on the same
pooled connections of the same server, alternating, twice each; the figure is this process's CPU
time per command (``time.process_time``), the lower of the two runs, and the ratio plain/batching.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as redis

from relay.lua import register
from relay.redis_conn import BatchingRedis, create_client

# One key read and one written, like the relay's smallest fenced scripts.
_SCRIPT = "local v = redis.call('GET', KEYS[1]); redis.call('SET', KEYS[1], ARGV[1]); return v"
CALLERS = (1, 20, 100)
CHAIN = 70  # commands per caller and run (ten turn starts' worth)
_PREFIX = "bench-client-cpu"


async def _run(client: redis.Redis, callers: int, chain: int) -> float:
    script = register(client, _SCRIPT)
    await script(keys=[f"{_PREFIX}:warm"], args=[0])

    async def one(i: int) -> None:
        for k in range(chain):
            await script(keys=[f"{_PREFIX}:{i}"], args=[k])

    started = time.process_time()
    await asyncio.gather(*(one(i) for i in range(callers)))
    return (time.process_time() - started) * 1e6 / (callers * chain)


async def measure(redis_url: str, chain: int = CHAIN) -> list[dict[str, Any]]:
    batching = create_client(redis_url, max_connections=8)
    if not isinstance(batching, BatchingRedis):
        raise TypeError("create_client no longer makes a BatchingRedis")
    plain = redis.Redis(connection_pool=batching.connection_pool)
    rows: list[dict[str, Any]] = []
    try:
        for callers in CALLERS:
            runs: dict[str, list[float]] = {"plain": [], "batching": []}
            for _ in range(2):
                runs["plain"].append(await _run(plain, callers, chain))
                runs["batching"].append(await _run(batching, callers, chain))
            best = {name: min(values) for name, values in runs.items()}
            rows.append({"callers": callers, "plain_us": round(best["plain"], 1),
                         "batching_us": round(best["batching"], 1),
                         "ratio": round(best["plain"] / max(best["batching"], 1e-9), 2)})
        await batching.delete(*(f"{_PREFIX}:{i}" for i in range(max(CALLERS))),
                              f"{_PREFIX}:warm")
    finally:
        await batching.aclose()
    return rows


def render(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["", "Client CPU per command (this process; a chain of script calls per caller), "
             "redis-py plain / relay batching:", "",
             "| concurrent callers | plain us | batching us | plain / batching |",
             "|---|---|---|---|"]
    lines += [f"| {r['callers']} | {r['plain_us']:g} | {r['batching_us']:g} | {r['ratio']:g} |"
              for r in rows]
    return lines
