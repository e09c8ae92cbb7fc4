"""``relay bench --queue-cost``: what submitting and taking a clip turn costs Redis, by clip length.

Redis runs one command at a time, so the time a submit or a take spends inside Redis is every
other client's wait (edges' pushes, producers' appends). A Lua script pays for every byte that
passes through it (arguments and ``redis.call`` replies become Lua strings), so a clip over 64 KB
waits beside its queue entry (``Keys.queued_audio``, ``workers.queue.records``) and no script
carries it. This bench measures that layout against the clip inside the job, in the same run and
on the same server: the same clips queued as version 1 jobs, which the submit script writes and
the take script reads back (what ``TurnQueue`` still sends for clips up to 64 KB).

Per clip length (16 kHz and 48 kHz, mono PCM16) and layout: ``rounds`` submits as ``TurnQueue``
sends them (stored: the clip uploaded by SET and renamed into place by the submit script; inline:
the job with its clip through the script), then as many takes with their claim (``JobStore.take``,
plus the GET of the clip for the stored layout, as the worker sends it beside the take).
``TurnQueue`` itself stores clips over ``INLINE_CLIP_MAX`` (64 KB) and sends smaller ones inline,
where both cost the same; the bench measures both layouts at every length. Figures: Redis time
per submit and per take (``INFO commandstats`` usec of every command, scripts with what they ran
inside), and Redis CPU per turn (``INFO cpu``: what the process spent, networking included).
With ``--instructions`` where valgrind is installed, also the instructions Valkey executed per
submit and per take, counted by callgrind (``relay.dev.bench.callgrind``): a count, the same
whatever else the machine is doing, where the times above move by a fifth between runs on a
2-core VM. A count weighs hashing and copying loops far above their time (docs/benchmarks.md,
"Queue cost"): it says which layout does more, the times say how much that costs.
One Valkey, clients in this process, loopback only; about 10 s, and about two minutes more with
``--instructions``; stops by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relay.dev.bench import callgrind
from relay.dev.bench.procstat import run_meta, write_result
from relay.dev.bench.redisinfo import time_and_cpu
from relay.dev.embedded import EmbeddedServer
from relay.keys import Keys
from relay.redis_conn import RedisClient, create_client
from workers.queue.jobs import KIND_CLIP, TurnJob
from workers.queue.records import JobStore
from workers.queue.submit import TurnQueue

STORED = "stored"  # the clip beside the entry (what TurnQueue writes)
INLINE = "inline"  # the clip inside the job (version 1): the baseline


@dataclass(frozen=True)
class QueueCostOptions:
    clips: tuple[tuple[int, float], ...] = ((16_000, 1.0), (16_000, 10.0), (48_000, 1.0),
                                            (48_000, 10.0), (48_000, 60.0))
    rounds: int = 200
    instructions: bool = False
    # Submits (and takes) on each of the two servers under callgrind (``callgrind.per_unit``).
    instruction_rounds: tuple[int, int] = (5, 25)
    out: Path = Path("bench/results/queue-cost.json")

    @classmethod
    def quick_mode(cls, *, instructions: bool = False) -> QueueCostOptions:
        return cls(clips=((16_000, 1.0), (48_000, 10.0)), rounds=5, instructions=instructions,
                   instruction_rounds=(2, 6))


async def _submit(layout: str, queue: TurnQueue, store: JobStore, conversation: str,
                  pcm: bytes, rate: int) -> None:
    """The one-step submit with its doorbell, as ``TurnQueue`` sends it on a single server, in
    the given layout whatever the clip's size (``TurnQueue`` picks by ``INLINE_CLIP_MAX``)."""
    job = TurnJob(kind=KIND_CLIP, conversation_id=conversation, turn_id="t", sample_rate=rate,
                  avatar_id=None, submitted_ms=0, pcm=pcm)
    stored = layout == STORED
    doorbell = queue._doorbells.write_for(conversation, "t", max_waiting=1_000_000,  # noqa: SLF001
                                          stored_audio=stored)
    await store.enqueue(conversation, "t", job.encode(inline=not stored), doorbell=doorbell,
                        audio=pcm if stored else None)


async def _take(layout: str, store: JobStore, conversation: str) -> None:
    take = store.take(conversation, owner="bench", doorbell="1-1", claim=True)
    if layout == STORED:
        await asyncio.gather(take, store.audio_of(conversation, "t"))
    else:
        await take


async def _measure(client: RedisClient, keys: Keys, layout: str, rate: int, seconds: float,
                   rounds: int) -> dict[str, Any]:
    queue = TurnQueue(client, keys, input_ttl_s=600)
    store = JobStore(client, keys, ttl_s=600, lease_s=60)
    pcm = bytes(int(rate * seconds) * 2)
    prefix = f"{layout}-{rate}-{seconds:g}"
    await _submit(layout, queue, store, f"{prefix}-warm", pcm, rate)  # scripts loaded
    await _take(layout, store, f"{prefix}-warm")
    figures: dict[str, Any] = {"layout": layout, "sample_rate": rate, "clip_s": seconds,
                               "clip_bytes": len(pcm)}
    for step in ("submit", "take"):
        await client.config_resetstat()
        inside0, cpu0 = await time_and_cpu(client)
        for n in range(rounds):
            conversation = f"{prefix}-{n}"
            if step == "submit":
                await _submit(layout, queue, store, conversation, pcm, rate)
            else:
                await _take(layout, store, conversation)
        inside1, cpu1 = await time_and_cpu(client)
        figures[f"{step}_redis_us"] = round((inside1 - inside0) / rounds, 1)
        figures[f"{step}_redis_cpu_us"] = round((cpu1 - cpu0) * 1e6 / rounds, 1)
    await client.flushall()
    return figures


def _turns(layout: str, rate: int, seconds: float, *, takes: bool
           ) -> Callable[[EmbeddedServer, int], Awaitable[int]]:
    """``n`` submits on a server (and then their ``n`` takes), for ``callgrind.per_unit``."""

    async def work(server: EmbeddedServer, n: int) -> int:
        client = create_client(server.url)
        try:
            keys = Keys("qcost")
            queue = TurnQueue(client, keys, input_ttl_s=600)
            store = JobStore(client, keys, ttl_s=600, lease_s=60)
            pcm = bytes(int(rate * seconds) * 2)
            for i in range(n):
                await _submit(layout, queue, store, f"c{i}", pcm, rate)
            for i in range(n if takes else 0):
                await _take(layout, store, f"c{i}")
        finally:
            await client.aclose()
        return n

    return work


async def _instructions(layout: str, rate: int, seconds: float, rounds: tuple[int, int]
                        ) -> dict[str, float]:
    """Valkey's instructions per submit, and per take (submits and takes, less the submits)."""
    submit = await callgrind.per_unit(_turns(layout, rate, seconds, takes=False), *rounds)
    both = await callgrind.per_unit(_turns(layout, rate, seconds, takes=True), *rounds)
    return {"submit": round(submit), "take": round(both - submit)}


async def run_queue_cost(options: QueueCostOptions) -> dict[str, Any]:
    rows = []
    with EmbeddedServer() as server:
        client = create_client(server.url)
        try:
            keys = Keys("qcost")
            for rate, seconds in options.clips:
                stored = await _measure(client, keys, STORED, rate, seconds, options.rounds)
                inline = await _measure(client, keys, INLINE, rate, seconds, options.rounds)
                rows.append({"stored": stored, "inline": inline, "ratios": _ratios(stored, inline)})
        finally:
            await client.aclose()
    instructions: dict[str, Any]
    if not options.instructions:
        instructions = {"skipped": "not asked for (--instructions)"}
    elif not callgrind.available():
        instructions = {"skipped": "valgrind is not installed (apt-get install valgrind)"}
    else:
        instructions = {"counted": "per submit and per take, each layout"}
        for row, (rate, seconds) in zip(rows, options.clips, strict=True):
            for layout in (STORED, INLINE):
                row[layout]["instructions"] = await _instructions(
                    layout, rate, seconds, options.instruction_rounds)
            row["ratios"].update(_instruction_ratios(row[STORED]["instructions"],
                                                     row[INLINE]["instructions"]))
    return {"options": {k: v for k, v in asdict(options).items() if k != "out"}, "rows": rows,
            "instructions": instructions}


def _instruction_ratios(stored: dict[str, float], inline: dict[str, float]
                        ) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for step in ("submit", "take"):
        out[f"{step}_instructions"] = (round(inline[step] / stored[step], 2)
                                       if stored[step] > 0 else None)
    both = stored["submit"] + stored["take"]
    out["turn_instructions"] = (round((inline["submit"] + inline["take"]) / both, 2)
                                if both > 0 else None)
    return out


def _ratios(stored: dict[str, Any], inline: dict[str, Any]) -> dict[str, float | None]:
    """Inline over stored (above 1: the stored layout costs Redis less)."""
    out: dict[str, float | None] = {}
    for name in ("submit_redis_us", "take_redis_us", "submit_redis_cpu_us", "take_redis_cpu_us"):
        out[name] = round(inline[name] / stored[name], 2) if stored[name] > 0 else None
    return out


def render(result: dict[str, Any]) -> str:
    lines = ["Redis time per submit and per take (claim included), clip beside the entry "
             "(stored) against inside the job (inline, the earlier layout), same run:", "",
             "| clip | submit us stored / inline | x | take us stored / inline | x | "
             "Redis CPU us per submit+take stored / inline |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        s, i, r = row["stored"], row["inline"], row["ratios"]
        cpu_s = s["submit_redis_cpu_us"] + s["take_redis_cpu_us"]
        cpu_i = i["submit_redis_cpu_us"] + i["take_redis_cpu_us"]
        lines.append(
            f"| {s['clip_s']:g} s at {s['sample_rate'] // 1000} kHz ({s['clip_bytes'] // 1024} KB) "
            f"| {s['submit_redis_us']:g} / {i['submit_redis_us']:g} | {r['submit_redis_us']} "
            f"| {s['take_redis_us']:g} / {i['take_redis_us']:g} | {r['take_redis_us']} "
            f"| {cpu_s:.0f} / {cpu_i:.0f} |")
    skipped = result.get("instructions", {}).get("skipped")
    if skipped:
        lines += ["", f"instructions: skipped ({skipped})"]
        return "\n".join(lines)
    lines += ["", "Valkey instructions per submit and per take (callgrind), same layouts:", "",
              "| clip | submit stored / inline | x | take stored / inline | x | "
              "turn (submit + take) x |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        s, i, r = row["stored"], row["inline"], row["ratios"]
        si, ii = s["instructions"], i["instructions"]
        lines.append(
            f"| {s['clip_s']:g} s at {s['sample_rate'] // 1000} kHz ({s['clip_bytes'] // 1024} KB) "
            f"| {si['submit']:,.0f} / {ii['submit']:,.0f} | {r['submit_instructions']} "
            f"| {si['take']:,.0f} / {ii['take']:,.0f} | {r['take_instructions']} "
            f"| {r['turn_instructions']} |")
    return "\n".join(lines)


def run_command(options: QueueCostOptions, command: str) -> int:
    """``relay bench --queue-cost``: run, write the JSON, print the table."""
    meta = run_meta(command)
    result = write_result(meta, "queue_cost", asyncio.run(run_queue_cost(options)), options.out)
    print(render(result["queue_cost"]), flush=True)
    print(f"\nresults: {options.out}")
    return 0
