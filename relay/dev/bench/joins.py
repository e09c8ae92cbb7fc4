"""``relay bench --joins``: what a client's join costs an edge, and what refusing one costs.

The figure behind ``RELAY_EDGE_ADMIT_RATE`` (docs/operations.md): a reconnect storm is N joins at
once, so an edge's CPU per join says how long a storm of N takes a core away from the clients it
already serves. One Valkey, one ``relay edge`` (no producer: a join reads the conversation's
turn record and stream and subscribes to its live channel, whether anyone speaks or not), and the
clients in this process. Rounds of ``per_round`` joins to distinct conversations, at most
``in_flight`` of them opening at once; every client stays connected until the end of the run, so
a later round joins an edge that already serves the earlier rounds' clients. Per round: the
edge's CPU time per join (``/proc``: it hardly depends on what else the machine runs), its Redis
commands per join (``CLIENT LIST`` tot-cmds of its connections), and connect -> ``welcome``
p50 / p99 / max at the client. A last round connects ``per_round`` clients to a second edge whose
``RELAY_EDGE_ADMIT_RATE`` is 1 per second: nearly all are refused (``error{too_many_connections}``
then close 4430), and its CPU per refusal is what the limit costs. Loopback only; bounded; stops
by itself.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

from relay import wire
from relay.dev.bench.clients import raise_nofile
from relay.dev.bench.latency import percentiles
from relay.dev.bench.procstat import cpu_seconds, run_meta
from relay.dev.bench.redisinfo import commands_by_process
from relay.dev.embedded import EmbeddedServer
from relay.dev.stack import LocalStack, child_env
from relay.errors import RelayError
from relay.redis_conn import create_client
from relay.settings import Settings
from relay.tokens import mint_token

_JOIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class JoinsOptions:
    rounds: int = 2
    per_round: int = 1000
    in_flight: int = 100  # joins opening at once (a storm's clients do not all connect at once)
    out: Path = Path("bench/results/joins.json")

    @classmethod
    def quick_mode(cls) -> JoinsOptions:
        return cls(rounds=2, per_round=50, in_flight=20)


@dataclass
class Outcome:
    welcomed: bool = False
    refused: bool = False
    failed: str = ""
    join_ms: float = 0.0


async def _join(http: aiohttp.ClientSession, url: str, gate: asyncio.Semaphore,
                held: list[aiohttp.ClientWebSocketResponse]) -> Outcome:
    """One client: connect, read the first message; a welcomed client stays connected."""
    outcome = Outcome()
    async with gate:
        started = time.monotonic()
        try:
            async with asyncio.timeout(_JOIN_TIMEOUT_S):
                ws = await http.ws_connect(url, max_msg_size=0)
                msg = await ws.receive()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            outcome.failed = type(exc).__name__
            return outcome
        outcome.join_ms = (time.monotonic() - started) * 1000
    kind = ""
    if msg.type == aiohttp.WSMsgType.BINARY:
        kind = str(msgpack.unpackb(msg.data).get("kind", ""))
    if kind == wire.WELCOME:
        outcome.welcomed = True
        held.append(ws)
        return outcome
    outcome.refused = kind == wire.ERROR
    outcome.failed = "" if outcome.refused else f"first message {msg.type.name} {kind}"
    await ws.close()
    return outcome


async def _round(http: aiohttp.ClientSession, edge: str, secret: str, prefix: str,
                 pid: int, redis: Any, options: JoinsOptions,
                 held: list[aiohttp.ClientWebSocketResponse], *,
                 refusing: bool = False) -> dict[str, Any]:
    conversations = [f"{prefix}-{secrets.token_hex(6)}" for _ in range(options.per_round)]
    gate = asyncio.Semaphore(options.in_flight)
    cpu_before = cpu_seconds(pid)
    commands_before = (await commands_by_process(redis, {"edge": pid}))["edge"]
    started = time.monotonic()
    outcomes = await asyncio.gather(*(
        _join(http, f"{edge}/v1/conversations/{c}/ws?token={mint_token(secret, c)}", gate, held)
        for c in conversations))
    wall_s = time.monotonic() - started
    await asyncio.sleep(0.5)  # the edge's last joins finish their work after the welcome
    cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000
    commands = (await commands_by_process(redis, {"edge": pid}))["edge"] - commands_before
    welcomed = sum(o.welcomed for o in outcomes)
    refused = sum(o.refused for o in outcomes)
    failures = sorted({o.failed for o in outcomes if o.failed})
    per = max(1, refused if refusing else welcomed)
    return {
        "connections": len(outcomes), "welcomed": welcomed, "refused": refused,
        "failed": sum(bool(o.failed) for o in outcomes), "failures": failures[:5],
        "already_connected": len(held) - welcomed,
        "edge_cpu_ms": round(cpu_ms, 1),
        # Per welcomed join, or per refusal in the refusing round (its few admitted joins, one
        # per second, are in its CPU too: the figure is an upper bound).
        "edge_cpu_ms_per_connection": round(cpu_ms / per, 3),
        "edge_redis_commands_per_connection": round(commands / per, 2),
        "connect_to_first_message_ms": percentiles([o.join_ms for o in outcomes
                                                    if not o.failed]),
        "wall_s": round(wall_s, 2), "connections_per_s": round(len(outcomes) / wall_s, 1),
    }


async def run_joins(options: JoinsOptions, log_dir: Path) -> dict[str, Any]:
    raise_nofile()
    secret = secrets.token_urlsafe(32)
    prefix = "joins"
    result: dict[str, Any] = {"options": {k: v for k, v in asdict(options).items()
                                          if k != "out"}}
    with EmbeddedServer() as server:
        env = child_env(Settings(key_prefix=prefix), server.url, secret)
        # Every client connects from 127.0.0.1: the per-address cap would refuse all but 256.
        env.update({"RELAY_LOG_LEVEL": "warning", "RELAY_EDGE_MAX_PER_ADDRESS": "0"})
        stack = LocalStack(env, log_dir)
        redis = create_client(server.url)
        held: list[aiohttp.ClientWebSocketResponse] = []
        try:
            child, edge = await stack.start_edge("edge-joins")
            limited_child, limited = await stack.start_edge("edge-limited",
                                                            RELAY_EDGE_ADMIT_RATE="1")
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                rounds = [await _round(http, edge, secret, prefix, _pid(child), redis, options,
                                       held) for _ in range(options.rounds)]
                refusing = await _round(http, limited, secret, prefix, _pid(limited_child),
                                        redis, options, held, refusing=True)
                await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)
        finally:
            await stack.stop()
            await redis.aclose()
    result["rounds"] = rounds
    result["refusing"] = refusing
    return result


def _pid(child: Any) -> int:
    if child.proc is None:
        raise RelayError(f"{child.name} is not running")
    return int(child.proc.pid)


def correct(result: dict[str, Any]) -> bool:
    """Every join of the open rounds was welcomed; the limited edge refused or welcomed each."""
    refusing = result["refusing"]
    return (all(r["welcomed"] == r["connections"] for r in result["rounds"])
            and refusing["failed"] == 0 and refusing["refused"] > 0)


def render(result: dict[str, Any]) -> str:
    lines = ["| round | connections | already connected | welcomed | refused | edge CPU ms "
             "per connection | edge Redis commands per connection | connect -> first message "
             "p50 / p99 / max ms | per s |", "|---|---|---|---|---|---|---|---|---|"]
    named = [(f"join {i + 1}", r) for i, r in enumerate(result["rounds"])]
    for name, r in [*named, ("refused (admit rate 1/s)", result["refusing"])]:
        p = r["connect_to_first_message_ms"]
        lines.append(f"| {name} | {r['connections']} | {r['already_connected']} | "
                     f"{r['welcomed']} | {r['refused']} | {r['edge_cpu_ms_per_connection']:g} | "
                     f"{r['edge_redis_commands_per_connection']:g} | "
                     f"{p['p50']} / {p['p99']} / {p['max']} | {r['connections_per_s']:g} |")
    return "\n".join(lines)


def run_command(options: JoinsOptions, command: str) -> int:
    """``relay bench --joins``: run, write the JSON, print the table; 0 when every join of the
    open rounds was welcomed and the limited edge refused cleanly."""
    import json

    meta = run_meta(command)
    log_dir = options.out.parent / "logs" / f"joins-{meta['run_id']}"
    result: dict[str, Any] = {**meta, "joins": asyncio.run(run_joins(options, log_dir))}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2, default=str))
    print(render(result["joins"]), flush=True)
    print(f"\nresults: {options.out}")
    return 0 if correct(result["joins"]) else 1
