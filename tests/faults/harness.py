"""A whole relay on loopback, every role its own process, for fault scenarios to break.

``FaultStack`` owns: its own Redis (``RedisProcess``), the Motion Server simulator (real time),
producer and edge processes started through ``relay.dev.stack.LocalStack``, a fleet of recording
clients, and the truth the checker compares against (every stream entry read back, plus
snapshots taken before faults that may lose data).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as redis
from redis.exceptions import RedisError

from relay.dev.stack import Child, LocalStack, child_env
from relay.keys import Keys
from relay.redis_conn import create_client
from relay.settings import Settings
from relay.streams import ACTIVE, read_after, read_turn
from tests.faults.redis_proc import RedisProcess

SECRET = "faults-secret-0123456789abcdef-0123456789"

# Short enough that a run takes seconds, not minutes; the product defaults are slower.
PRODUCER_ENV = {
    "RELAY_JOB_CLAIM_IDLE_S": "3", "RELAY_JOBS_BLOCK_MS": "200", "RELAY_JOB_MAX_ATTEMPTS": "10",
    "RELAY_PRODUCER_STOP_S": "2", "RELAY_MAX_SDK_SESSIONS": "96", "RELAY_SDK_LEASE_S": "5",
    "RELAY_FRAMES_TIMEOUT_S": "5",
}
EDGE_ENV = {"RELAY_HEARTBEAT_S": "2", "RELAY_CLIENT_QUEUE_MESSAGES": "1024"}


@dataclass
class StackShape:
    producers: int = 2
    edges: int = 2
    aof: bool = True
    sdk_cap: int = 96  # RELAY_MAX_SDK_SESSIONS; the simulator counts the peak against it


@dataclass
class FaultStack:
    workdir: Path
    shape: StackShape = field(default_factory=StackShape)
    prefix: str = "faults"

    def __post_init__(self) -> None:
        self.redis = RedisProcess(aof=self.shape.aof)
        self.keys = Keys(self.prefix)
        self.local: LocalStack | None = None
        self.producers: dict[str, Child] = {}
        self.edges: dict[str, Child] = {}
        self.edge_urls: list[str] = []
        self.snapshots: dict[str, dict[str, bytes]] = {}  # conversation -> entry id -> stored
        self.client: redis.Redis | None = None
        self._names = 0

    async def start(self) -> None:
        self.redis.start()
        settings = Settings(redis_url=self.redis.url, key_prefix=self.prefix,
                            token_secret=SECRET)
        env = child_env(settings, self.redis.url, SECRET)
        env.update({"RELAY_SIM_REALTIME": "true", "RELAY_SIM_MAX_SESSIONS": "0",
                    "RELAY_LOG_LEVEL": "info"})
        self.local = LocalStack(env, self.workdir / "logs")
        await self.local.start_sim()
        for _ in range(self.shape.producers):
            await self.start_producer()
        for _ in range(self.shape.edges):
            await self.start_edge()
        self.client = create_client(self.redis.url)  # type: ignore[assignment]

    async def start_producer(self) -> Child:
        assert self.local is not None
        self._names += 1
        name = f"producer-{self._names}"
        env = {**PRODUCER_ENV, "RELAY_MAX_SDK_SESSIONS": str(self.shape.sdk_cap)}
        self.producers[name] = await self.local.start_producer(name, **env)
        return self.producers[name]

    async def start_edge(self, name: str | None = None, port: int = 0) -> Child:
        """A new edge, or ``name`` started again on its old ``port``."""
        assert self.local is not None
        if name is None:
            self._names += 1
            name = f"edge-{self._names}"
        child, url = await self.local.start_edge(name, port, **EDGE_ENV)
        self.edges[name] = child
        if url not in self.edge_urls:
            self.edge_urls.append(url)
        return child

    def edge_port(self, name: str) -> int:
        index = list(self.edges).index(name)
        return int(self.edge_urls[index].rsplit(":", 1)[1])

    async def stop_producers(self) -> dict[str, float]:
        """SIGTERM every live producer at once; seconds each took to exit (killed after the
        stack's grace, which is above any producer's documented bound)."""
        if self.redis.paused:
            self.redis.resume()
        loop = asyncio.get_running_loop()

        async def timed(child: Child) -> float:
            if child.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.proc.pid, 18)  # SIGCONT: a paused child cannot stop
            started = loop.time()
            await child.stop()
            return loop.time() - started

        live = {name: child for name, child in self.producers.items() if child.alive}
        took = await asyncio.gather(*(timed(child) for child in live.values()))
        return dict(zip(live, took, strict=True))

    async def sim_peak_sessions(self) -> int:
        """The most Motion Server sessions the simulator had open at once."""
        assert self.local is not None and self.local.sim_url
        import aiohttp

        async with aiohttp.ClientSession() as http, \
                http.get(f"{self.local.sim_url}/_sim/stats") as reply:
            return int((await reply.json())["sessions_peak"])

    async def stalled(self, conversations: list[str]) -> list[str]:
        """Conversations that still hold a queued or playing turn."""
        assert self.client is not None
        out = []
        for conv in conversations:
            with contextlib.suppress(RedisError, OSError):
                state = await read_turn(self.client, self.keys, conv)
                if await self.client.xlen(self.keys.queue(conv)) or (
                        state is not None and state.status == ACTIVE):
                    out.append(conv)
        return out

    async def stop(self) -> None:
        if self.redis.paused:
            self.redis.resume()
        for child in [*self.producers.values(), *self.edges.values()]:
            if child.alive and child.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.proc.pid, 18)  # SIGCONT: a paused child cannot stop
        if self.local is not None:
            await self.local.stop()
        if self.client is not None:
            await self.client.aclose()
        self.redis.close()

    # Looking at the system from outside.

    async def runner_of(self, conversation_id: str) -> Child | None:
        """The live producer process that runs the conversation's queue now, if any."""
        assert self.client is not None
        raw = await self.client.get(self.keys.queue_runner(conversation_id))
        if raw is None:
            return None
        child = self.producers.get(raw.decode().rpartition("|")[0].rpartition(":")[0])
        return child if child is not None and child.alive else None

    async def active_turns(self, conversations: list[str]) -> dict[str, str]:
        """conversation -> turn id of every turn being played now."""
        assert self.client is not None
        out = {}
        for conv in conversations:
            state = await read_turn(self.client, self.keys, conv)
            if state is not None and state.status == ACTIVE:
                out[conv] = state.turn_id
        return out

    async def snapshot(self, conversations: list[str]) -> None:
        """Remember every entry now in the streams (before a fault that may lose some)."""
        assert self.client is not None
        for conv in conversations:
            rows = await read_after(self.client, self.keys, conv, "0-0", count=1_000_000)
            self.snapshots.setdefault(conv, {}).update(rows)

    async def truth(self, conversations: list[str]) -> dict[str, list[tuple[str, bytes]]]:
        assert self.client is not None
        return {conv: await read_after(self.client, self.keys, conv, "0-0", count=1_000_000)
                for conv in conversations}

    async def settled(self, conversations: list[str], timeout_s: float) -> bool:
        """Wait until no conversation has a queued or playing turn (True), or the timeout."""
        assert self.client is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            with contextlib.suppress(RedisError, OSError):
                busy = False
                for conv in conversations:
                    state = await read_turn(self.client, self.keys, conv)
                    queued = await self.client.xlen(self.keys.queue(conv))
                    if queued or (state is not None and state.status == ACTIVE):
                        busy = True
                        break
                if not busy:
                    return True
            await asyncio.sleep(0.5)
        return False

    async def tips(self, conversations: list[str]) -> dict[str, str | None]:
        assert self.client is not None
        out: dict[str, str | None] = {}
        for conv in conversations:
            last = await self.client.xrevrange(self.keys.stream(conv), count=1)
            out[conv] = last[0][0].decode() if last else None
        return out

    def rss_mb(self) -> float:
        """Resident memory of the live edges and producers together, in MiB."""
        total = 0
        for child in [*self.producers.values(), *self.edges.values()]:
            if child.alive and child.proc is not None:
                with contextlib.suppress(OSError):
                    for line in Path(f"/proc/{child.proc.pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
        return total / 1024


def now_ms() -> int:
    return int(time.time() * 1000)
