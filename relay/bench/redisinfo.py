"""Redis-side figures of a run: commands processed (total and per command), memory, CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis


@dataclass(frozen=True)
class RedisSnapshot:
    total_commands: int
    calls: dict[str, int]  # per command, from INFO commandstats (script-internal calls included)
    used_memory: int
    cpu_s: float

    def delta(self, later: RedisSnapshot) -> dict[str, Any]:
        calls = {name: later.calls.get(name, 0) - self.calls.get(name, 0)
                 for name in set(later.calls) | set(self.calls)}
        return {
            "commands": later.total_commands - self.total_commands,
            "calls": {k: v for k, v in sorted(calls.items()) if v},
            "memory_bytes": later.used_memory - self.used_memory,
            "cpu_s": round(later.cpu_s - self.cpu_s, 3),
        }


async def snapshot(client: redis.Redis) -> RedisSnapshot:
    stats = await client.info("stats")
    commandstats = await client.info("commandstats")
    memory = await client.info("memory")
    cpu = await client.info("cpu")
    calls = {name.removeprefix("cmdstat_"): int(value["calls"])
             for name, value in commandstats.items() if isinstance(value, dict)}
    return RedisSnapshot(
        total_commands=int(stats["total_commands_processed"]),
        calls=calls,
        used_memory=int(memory["used_memory"]),
        cpu_s=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    )


# Entry ids only, so the truth of a stream can be read without moving its payloads.
STREAM_IDS = """
local out = {}
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
for i, row in ipairs(rows) do out[i] = row[1] end
return out
"""
