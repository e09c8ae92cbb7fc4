"""Redis-side figures of a run: commands processed (total and per command), memory, CPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from relay.dev.bench.procstat import tcp_local_ports
from relay.redis_conn import RedisClient


@dataclass(frozen=True)
class RedisSnapshot:
    total_commands: int
    calls: dict[str, int]  # per command, from INFO commandstats (script-internal calls included)
    used_memory: int
    cpu_s: float
    usec: dict[str, int] = field(default_factory=dict)  # per command: Redis time spent in it

    def delta(self, later: RedisSnapshot) -> dict[str, Any]:
        calls = {name: later.calls.get(name, 0) - self.calls.get(name, 0)
                 for name in set(later.calls) | set(self.calls)}
        usec = {name: later.usec.get(name, 0) - self.usec.get(name, 0)
                for name in set(later.usec) | set(self.usec)}
        return {
            "commands": later.total_commands - self.total_commands,
            "calls": {k: v for k, v in sorted(calls.items()) if v},
            "usec": {k: v for k, v in sorted(usec.items()) if v},
            "memory_bytes": later.used_memory - self.used_memory,
            "cpu_s": round(later.cpu_s - self.cpu_s, 3),
        }


async def snapshot(client: RedisClient) -> RedisSnapshot:
    stats = await client.info("stats")
    commandstats = await client.info("commandstats")
    memory = await client.info("memory")
    cpu = await client.info("cpu")
    calls = {name.removeprefix("cmdstat_"): int(value["calls"])
             for name, value in commandstats.items() if isinstance(value, dict)}
    usec = {name.removeprefix("cmdstat_"): int(value["usec"])
            for name, value in commandstats.items() if isinstance(value, dict)}
    return RedisSnapshot(
        total_commands=int(stats["total_commands_processed"]),
        calls=calls, usec=usec,
        used_memory=int(memory["used_memory"]),
        cpu_s=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    )


async def commands_by_process(client: RedisClient, pids: dict[str, int]) -> dict[str, int]:
    """Top-level commands each named process has sent so far over its open connections
    (``CLIENT LIST`` tot-cmds, matched to processes by the connections' source ports)."""
    listing = await cast(Any, client).execute_command("CLIENT", "LIST")
    text = listing.decode() if isinstance(listing, bytes) else str(listing)
    owners = tcp_local_ports(pids)
    totals = dict.fromkeys(pids, 0)
    for line in text.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        port = int(fields.get("addr", ":0").rsplit(":", 1)[1])
        owner = owners.get(port)
        if owner is not None:
            totals[owner] += int(fields.get("tot-cmds", 0))
    return totals


# Entry ids only, so the truth of a stream can be read without moving its payloads.
STREAM_IDS = """
local out = {}
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
for i, row in ipairs(rows) do out[i] = row[1] end
return out
"""


async def time_and_cpu(client: RedisClient) -> tuple[float, float]:
    """(microseconds spent inside commands other than INFO, the server's CPU seconds) so far: the
    two readings a one-shot bench subtracts around what it measures (``--queue-cost``,
    ``--append-cost``); scripts count with what they ran inside."""
    stats = await client.info("commandstats")
    cpu = await client.info("cpu")
    inside = sum(float(v["usec"]) for k, v in stats.items() if not k.startswith("cmdstat_info"))
    return inside, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
