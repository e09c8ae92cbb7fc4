"""``relay bench --append-cost``: what a producer's fenced append costs Redis per entry, against
the plain commands it wraps, in one run on one server.

Redis runs one command at a time, and at load the producers' appends are most of what it runs
(docs/benchmarks.md, "Live path by push"), so every instruction of the append script is paid once
per audio chunk and animation message of every conversation. Three ways of writing the same
entries, each from ``FLUSHALL`` on the same server, one after the other:

* ``xadd``: one pipelined ``XADD`` per entry, nothing else (the bare-loop baseline's writes): what
  storing alone costs;
* ``xadd_spublish``: the same ``XADD`` and one ``SPUBLISH`` per call of that call's entries to the
  conversation's live channel: storing and pushing, unfenced;
* ``append``: ``ConversationLog.append_call``, the fenced append script producers send (turn
  check, duplicate marks, ``XADD``, the live push, the turn record's watermarks).

Entries are the standard conversation's (``relay.dev.bench.schedule``): one 1,280 B audio chunk
per call, and with every fifth call the 2.5 KB animation message too, built by ``relay.wire``;
calls are pipelined ``batch`` at a time over one connection packed by ``relay.dev.bench.resp``,
round-robin over ``conversations`` turns opened by ``ConversationLog.open_turn`` (each turn's
first append also refreshes its expiry, as a producer's does, and later ones leave it alone).
One connection subscribed to every conversation's live channel drains the pushes, as an edge
would.

Figures per entry: Redis CPU (``INFO cpu``, networking included), time inside commands
(``INFO commandstats`` usec, scripts with what they ran inside) and, with ``--instructions`` where
valgrind is installed, the instructions Valkey executed, counted by callgrind: a count, not a
time, so it is the same whatever else the machine is doing (two servers per way, ``calls`` / 5 and
``calls`` calls, and the difference divided by the extra entries, so start-up cancels out).
Loopback only; about 10 s, and about 90 s more with ``--instructions``; stops by itself.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relay import wire
from relay.dev.bench import callgrind
from relay.dev.bench.procstat import run_meta, write_result
from relay.dev.bench.redisinfo import time_and_cpu
from relay.dev.bench.resp import RespPipe, pack
from relay.dev.bench.schedule import CHUNK_BYTES, CHUNKS_PER_FRAMES, SAMPLE_RATE
from relay.dev.bench.writer import animation_envelope
from relay.dev.embedded import EmbeddedServer
from relay.keys import Keys
from relay.redis_conn import RedisClient, create_client
from relay.streams import ConversationLog

WAYS = ("xadd", "xadd_spublish", "append")
_TURN = "t"
_MAXLEN = 100_000  # no trimming inside the measurement: every way stores every entry


@dataclass(frozen=True)
class AppendCostOptions:
    calls: int = 50_000
    conversations: int = 200
    batch: int = 20
    instructions: bool = False
    out: Path = Path("bench/results/append-cost.json")

    @classmethod
    def quick_mode(cls, *, instructions: bool = False) -> AppendCostOptions:
        return cls(calls=500, conversations=20, instructions=instructions)


def _calls(keys: Keys, log: ConversationLog, way: str, options: AppendCostOptions,
           ) -> tuple[list[list[bytes]], int]:
    """The packed commands of ``way``, one list per call (a slot of one conversation), and the
    entries they write."""
    audio = random.Random(3).randbytes(CHUNK_BYTES)
    envelope = animation_envelope()
    calls: list[list[bytes]] = []
    entries_total = 0
    for call in range(options.calls):
        conversation = f"c{call % options.conversations}"
        slot = call // options.conversations
        entries = [wire.audio(_TURN, slot, audio, end=False)]
        if slot % CHUNKS_PER_FRAMES == CHUNKS_PER_FRAMES - 1:
            entries.append(wire.frames(_TURN, slot // CHUNKS_PER_FRAMES, envelope, last=False))
        entries_total += len(entries)
        stream = keys.stream(conversation).encode()
        commands: list[bytes] = []
        calls.append(commands)
        if way == "append":
            command = log.append_call(conversation, _TURN, *entries)
            commands.append(pack(*(_arg(part) for part in command)))
            continue
        for entry in entries:
            commands.append(pack(b"XADD", stream, b"MAXLEN", b"~", b"%d" % _MAXLEN, b"*", b"d",
                                 entry))
        if way == "xadd_spublish":
            commands.append(pack(b"SPUBLISH", keys.live_channel(conversation).encode(),
                                 b"".join(entries)))
    return calls, entries_total


def _arg(part: Any) -> bytes:
    return part if isinstance(part, bytes) else str(part).encode()


async def _drain_pushes(port: int, channels: list[str], ready: asyncio.Event) -> None:
    """An edge's subscriber, reduced to reading: SSUBSCRIBE to every channel, then discard."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"".join(pack(b"SSUBSCRIBE", c.encode()) for c in channels))
        confirmed = 0
        buffer = b""
        while confirmed < len(channels):
            buffer += await reader.read(1 << 16)
            confirmed = buffer.count(b"ssubscribe")
        ready.set()
        while await reader.read(1 << 20):
            pass
    finally:
        writer.close()


@asynccontextmanager
async def _subscribed(server: EmbeddedServer, channels: list[str]) -> AsyncIterator[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(_drain_pushes(server.port, channels, ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _prepare(client: RedisClient, keys: Keys, options: AppendCostOptions,
                   ) -> ConversationLog:
    """Open every conversation's turn (the append script's fence needs one) and load scripts."""
    log = ConversationLog(client, keys, maxlen=_MAXLEN, ttl_s=3600)
    await log.load_scripts()
    for n in range(options.conversations):
        await log.open_turn(f"c{n}", _TURN, sample_rate=SAMPLE_RATE, owner="bench")
    return log


async def _stored_entries(client: RedisClient, keys: Keys, conversations: int) -> int:
    """Entries in the streams, minus each turn's ``turn_start``."""
    total = 0
    for n in range(conversations):
        total += int(await client.xlen(keys.stream(f"c{n}")))
    return total - conversations


async def _run_way(server: EmbeddedServer, way: str, options: AppendCostOptions,
                   ) -> dict[str, Any]:
    """Write ``options.calls`` calls the given way on ``server`` (fresh), return its figures."""
    client = create_client(server.url)
    pipe = RespPipe(server.url)
    try:
        await client.flushall()
        keys = Keys("acost")
        log = await _prepare(client, keys, options)
        calls, entries = _calls(keys, log, way, options)
        await pipe.connect()
        channels = [keys.live_channel(f"c{n}") for n in range(options.conversations)]
        async with _subscribed(server, channels):
            await client.config_resetstat()
            inside0, cpu0 = await time_and_cpu(client)
            errors = 0
            for start in range(0, len(calls), options.batch):  # every way: `batch` calls a send
                batch = [command for call in calls[start:start + options.batch]
                         for command in call]
                replies = await pipe.send(batch)
                errors += sum(1 for r in replies if isinstance(r, Exception) or r is None)
            inside1, cpu1 = await time_and_cpu(client)
        stored = await _stored_entries(client, keys, options.conversations)
        return {"way": way, "calls": options.calls, "entries": entries, "stored": stored,
                "errors": errors,
                "redis_cpu_us_per_entry": round((cpu1 - cpu0) * 1e6 / entries, 2),
                "redis_us_per_entry": round((inside1 - inside0) / entries, 2)}
    finally:
        await pipe.close()
        await client.aclose()


async def _instructions(way: str, options: AppendCostOptions) -> float:
    """Instructions Valkey executed per entry written ``way`` (``callgrind.per_unit``: a fifth
    of the calls, then all of them)."""

    async def work(server: EmbeddedServer, calls: int) -> int:
        counted = AppendCostOptions(calls=calls, conversations=options.conversations,
                                    batch=options.batch)
        figures = await _run_way(server, way, counted)
        return int(figures["entries"])

    return round(await callgrind.per_unit(work, max(1, options.calls // 5), options.calls))


async def run_append_cost(options: AppendCostOptions) -> dict[str, Any]:
    ways: dict[str, dict[str, Any]] = {}
    with EmbeddedServer() as server:
        for way in WAYS:
            ways[way] = await _run_way(server, way, options)
    instructions: dict[str, Any]
    if not options.instructions:
        instructions = {"skipped": "not asked for (--instructions)"}
    elif not callgrind.available():
        instructions = {"skipped": "valgrind is not installed (apt-get install valgrind)"}
    else:
        instructions = {way: await _instructions(way, options) for way in WAYS}
    return {"options": {k: v for k, v in asdict(options).items() if k != "out"}, "ways": ways,
            "instructions_per_entry": instructions, "ratios": _ratios(ways, instructions)}


def _ratios(ways: dict[str, dict[str, Any]], instructions: dict[str, Any],
            ) -> dict[str, float | None]:
    """The append's cost over each plain way's (1: as cheap as the plain commands)."""
    out: dict[str, float | None] = {}
    for base in ("xadd", "xadd_spublish"):
        cpu = ways[base]["redis_cpu_us_per_entry"]
        out[f"cpu_append_over_{base}"] = (
            round(ways["append"]["redis_cpu_us_per_entry"] / cpu, 2) if cpu > 0 else None)
        if base in instructions:
            out[f"instructions_append_over_{base}"] = round(
                instructions["append"] / instructions[base], 2)
    return out


def render(result: dict[str, Any]) -> str:
    instructions = result["instructions_per_entry"]
    lines = ["Redis per entry written, the same entries three ways, same run and server:", "",
             "| way | Redis CPU us | inside commands us | instructions |",
             "|---|---|---|---|"]
    for way, figures in result["ways"].items():
        count = instructions.get(way)
        lines.append(f"| {way} | {figures['redis_cpu_us_per_entry']:g} "
                     f"| {figures['redis_us_per_entry']:g} "
                     f"| {f'{count:,.0f}' if count is not None else '-'} |")
    lines.append("")
    lines.append("ratios: " + ", ".join(f"{k} {v}" for k, v in result["ratios"].items()))
    if "skipped" in instructions:
        lines.append(f"instructions: skipped ({instructions['skipped']})")
    return "\n".join(lines)


def correct(result: dict[str, Any]) -> bool:
    """Every way stored every entry, and no call failed."""
    return all(w["errors"] == 0 and w["stored"] == w["entries"] for w in result["ways"].values())


def run_command(options: AppendCostOptions, command: str) -> int:
    """``relay bench --append-cost``: run, write the JSON, print the table; 1 when an entry was
    not stored."""
    meta = run_meta(command)
    result = write_result(meta, "append_cost", asyncio.run(run_append_cost(options)), options.out)
    print(render(result["append_cost"]), flush=True)
    print(f"\nresults: {options.out}")
    return 0 if correct(result["append_cost"]) else 1
