"""How one edge's costs grow with connected clients (the scale-out measurement).

``python -m relay.dev.bench.scale [--clients 100,1000,5000]`` starts Valkey (or uses REDIS_URL), one
edge process and client processes, and for each client count prints and stores: the Redis
connections the edge holds, the edge's Redis commands per delivered message while a subset of
conversations speaks at real-time rates, and the edge's RSS per idle client. Clients are spread
over at most 2,000 conversations (5,000 clients = 2 or 3 per conversation), so fan-out shows.
Loopback only; bounded in time; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

from relay import wire
from relay.dev.bench.child import BenchChild
from relay.dev.bench.clients import raise_nofile
from relay.dev.bench.procstat import rss_kb, tcp_local_ports
from relay.dev.bench.redisinfo import commands_by_process
from relay.dev.embedded import EmbeddedServer
from relay.dev.stack import LocalStack, child_env
from relay.keys import Keys
from relay.redis_conn import create_client
from relay.settings import Settings
from relay.streams import ConversationLog

MAX_CONVERSATIONS = 2000
CLIENT_PROCESSES = 4
CHUNK = bytes(1280)
FRAMES = bytes(2490)


async def measure(redis_url: str, clients: int, active: int, seconds: float,
                  log_dir: Path) -> dict[str, Any]:
    secret = secrets.token_urlsafe(24)
    prefix = f"scale{clients}"
    settings = Settings(redis_url=redis_url, token_secret=secret, key_prefix=prefix)
    env = child_env(settings, redis_url, secret)
    # Every client process connects from 127.0.0.1: the per-address cap (256 by default, a
    # guard against one host opening thousands of sockets) would refuse all but 256 of them.
    env["RELAY_EDGE_MAX_PER_ADDRESS"] = "0"
    stack = LocalStack(env, log_dir)
    client = create_client(redis_url)
    children: list[BenchChild] = []
    try:
        edge, url = await stack.start_edge("edge-scale")
        assert edge.proc is not None
        pid = edge.proc.pid
        await asyncio.sleep(1.0)
        rss_empty = rss_kb(pid)
        conversations = [f"c{n % min(clients, MAX_CONVERSATIONS)}" for n in range(clients)]
        children = await _start_clients(url, secret, conversations, log_dir)
        await asyncio.sleep(2.0)
        rss_idle = rss_kb(pid)
        connections = await _edge_connections(client, pid)
        before = (await commands_by_process(client, {"edge": pid}))["edge"]
        speaking = sorted(set(conversations))[:active]
        appended = await _speak(client, Keys(prefix, settings.key_buckets), speaking, seconds)
        await asyncio.sleep(2.0)  # let the last entries reach the clients
        after = (await commands_by_process(client, {"edge": pid}))["edge"]
        delivered = await _delivered(children)
        return {
            "clients": clients,
            "conversations": len(set(conversations)),
            "speaking_conversations": active,
            "edge_redis_connections": connections,
            "edge_redis_commands": after - before,
            "appended": appended,
            "delivered": delivered,
            "edge_redis_cmds_per_delivered_msg": round((after - before) / max(delivered, 1), 4),
            "edge_rss_kb_empty": rss_empty,
            "edge_rss_kb_idle": rss_idle,
            "edge_rss_kb_per_client": round((rss_idle - rss_empty) / clients, 1),
        }
    finally:
        for child in children:
            await child.stop()
        await stack.stop()
        await client.aclose()


async def _start_clients(url: str, secret: str, conversations: list[str],
                         log_dir: Path) -> list[BenchChild]:
    children = []
    for index in range(CLIENT_PROCESSES):
        child = BenchChild(f"scale-clients-{index}", "relay.dev.bench.clients", log_dir)
        await child.start({"edge": url, "secret": secret, "connect_concurrency": 64,
                           "conversations": conversations[index::CLIENT_PROCESSES]})
        children.append(child)
    for child in children:
        ready = await child.expect("ready", 120)
        if ready["connected"] != ready["wanted"]:
            raise RuntimeError(f"{child.name}: {ready['connected']} of {ready['wanted']} connected")
    return children


async def _edge_connections(client: Any, pid: int) -> int:
    ports = tcp_local_ports({"edge": pid})
    listing = (await client.execute_command("CLIENT", "LIST")).decode()
    return sum(1 for line in listing.splitlines()
               if int(line.split(" addr=", 1)[1].split(" ", 1)[0].rsplit(":", 1)[1]) in ports)


async def _speak(client: Any, keys: Keys, conversations: list[str], seconds: float) -> int:
    """25 audio and 5 frames entries per second per conversation, in 200 ms batches."""
    log = ConversationLog(client, keys, maxlen=10_000, ttl_s=600)
    for conv in conversations:
        await log.open_turn(conv, "t1", sample_rate=16000, owner="scale")
    appended, seq, started = 0, 0, time.monotonic()
    while time.monotonic() - started < seconds:
        batch = [wire.audio("t1", seq + i, CHUNK, end=False) for i in range(5)]
        batch.append(wire.frames("t1", seq // 5, FRAMES, last=False))
        await asyncio.gather(*(log.append(conv, "t1", *batch) for conv in conversations))
        appended += len(batch) * len(conversations)
        seq += 5
        await asyncio.sleep(max(0.0, started + seq * 0.04 - time.monotonic()))
    return appended


async def _delivered(children: list[BenchChild]) -> int:
    total = 0
    for child in children:
        await child.send({"targets": {}, "deadline_s": 1})
        report = await child.expect("report", 120)
        total += sum(int(t["n"]) for t in report["tallies"])
    return total


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", default="100,1000,5000")
    parser.add_argument("--active", type=int, default=100, help="conversations that speak")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    args = parser.parse_args(argv)
    raise_nofile()
    log_dir = Path("bench/results/logs")
    results = []
    with EmbeddedServer() as server:
        for clients in (int(n) for n in args.clients.split(",")):
            row = await measure(server.url, clients, min(args.active, clients), args.seconds,
                                log_dir)
            print(json.dumps(row), flush=True)
            results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
