"""The faults the suite injects. Each is a ``Fault``: a name, an ``inject`` coroutine that breaks
something in a running ``FaultStack`` (and repairs it, if the fault is one that ends), and what
the checker may accept afterwards.

Adding a fault: write ``async def my_fault(ctx: FaultContext) -> None`` that injects it (use
``ctx.stack`` for processes and Redis, ``ctx.mark_takeover(...)`` before hurting a producer so
takeover latency is measured, then ``ctx.hit()`` right after the fault strikes,
``ctx.stack.snapshot(...)`` before anything that may lose Redis
data), then add ``Fault("my_fault", my_fault)`` to ``FAULTS``; set ``loss_allowed=True`` only
when Redis itself loses data (then every gap must be announced with ``recovered: false``). Put
the fault in ``SHORT`` only if it keeps ``make test`` quick. ``make faults`` runs all of them.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tests.faults.harness import FaultStack


@dataclass
class FaultContext:
    stack: FaultStack
    conversations: list[str]
    rng: random.Random
    # (when the fault hit, unix ms; conversation; turn id): turns a fault interrupted.
    hurt: list[tuple[int, str, str]] = field(default_factory=list)
    _marked: list[tuple[str, str]] = field(default_factory=list)

    async def mark_takeover(self, producer_name: str | None = None) -> None:
        """Remember the turns being played now (by ``producer_name`` only, if given); call
        ``hit()`` right after the fault strikes. The table's takeover column is, per such turn,
        the time from the hit to its next stream entry: how long its clients heard nothing."""
        for conv, turn in (await self.stack.active_turns(self.conversations)).items():
            runner = await self.stack.runner_of(conv)
            if producer_name is None or (runner is not None and runner.name == producer_name):
                self._marked.append((conv, turn))

    def hit(self) -> None:
        at = int(time.time() * 1000)
        self.hurt += [(at, conv, turn) for conv, turn in self._marked]
        self._marked.clear()


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Callable[[FaultContext], Awaitable[None]]
    loss_allowed: bool = False
    aof: bool = True  # the scenario's Redis keeps an append-only file
    sdk_cap: int = 96  # RELAY_MAX_SDK_SESSIONS of the scenario's producers
    # Redis lost the queues: turns submitted before the fault are gone with them and are not
    # counted as stuck; the run submits a second round after the fault, which must all play.
    resubmit: bool = False


def redis_frozen(seconds: float) -> Callable[[FaultContext], Awaitable[None]]:
    async def inject(ctx: FaultContext) -> None:
        await ctx.mark_takeover()
        ctx.stack.redis.pause()
        ctx.hit()
        try:
            await asyncio.sleep(seconds)
        finally:
            ctx.stack.redis.resume()
    return inject


async def redis_restarted_aof(ctx: FaultContext) -> None:
    """A clean restart: the append-only file holds every write, so nothing may be lost."""
    await ctx.mark_takeover()
    ctx.stack.redis.stop()
    ctx.hit()
    await asyncio.sleep(1.0)
    ctx.stack.redis.start()


def redis_restarted_aof_down(seconds: float) -> Callable[[FaultContext], Awaitable[None]]:
    async def inject(ctx: FaultContext) -> None:
        """Down longer than the Redis clients' own retries: every producer blocked on a streamed
        turn's input read gets the error (the reproduction of the stalled conversations)."""
        await ctx.mark_takeover()
        ctx.stack.redis.stop()
        ctx.hit()
        await asyncio.sleep(seconds)
        ctx.stack.redis.start()
    return inject


async def redis_restarted_empty(ctx: FaultContext) -> None:
    """Redis comes back with nothing: queues, groups and streams gone. Producers must take work
    again (their group recreated), and every client that lost history must be told."""
    await ctx.stack.snapshot(ctx.conversations)
    await ctx.mark_takeover()
    ctx.stack.redis.stop()
    ctx.hit()
    ctx.stack.redis.wipe()
    await asyncio.sleep(1.0)
    ctx.stack.redis.start()


async def redis_killed(ctx: FaultContext) -> None:
    """SIGKILL, then a restart from the append-only file: up to a second of writes is gone."""
    await ctx.stack.snapshot(ctx.conversations)
    await ctx.mark_takeover()
    ctx.stack.redis.kill()
    ctx.hit()
    await asyncio.sleep(1.0)
    ctx.stack.redis.start()


async def _busiest_producer(ctx: FaultContext) -> str:
    for _ in range(100):
        active = await ctx.stack.active_turns(ctx.conversations)
        for conv in ctx.rng.sample(sorted(active), len(active)):
            runner = await ctx.stack.runner_of(conv)
            if runner is not None:
                return runner.name
        await asyncio.sleep(0.1)
    return ctx.rng.choice(sorted(ctx.stack.producers))


async def producer_killed(ctx: FaultContext) -> None:
    name = await _busiest_producer(ctx)
    await ctx.mark_takeover(name)
    ctx.stack.producers[name].kill()
    ctx.hit()
    await ctx.stack.start_producer()


def producer_paused(seconds: float) -> Callable[[FaultContext], Awaitable[None]]:
    async def inject(ctx: FaultContext) -> None:
        name = await _busiest_producer(ctx)
        child = ctx.stack.producers[name]
        assert child.proc is not None
        await ctx.mark_takeover(name)
        os.kill(child.proc.pid, signal.SIGSTOP)
        ctx.hit()
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(child.proc.pid, signal.SIGCONT)
    return inject


async def edge_killed(ctx: FaultContext) -> None:
    name = ctx.rng.choice(sorted(ctx.stack.edges))
    port = ctx.stack.edge_port(name)
    ctx.stack.edges[name].kill()
    await asyncio.sleep(1.0)
    await ctx.stack.start_edge(name, port)


def edge_paused(seconds: float) -> Callable[[FaultContext], Awaitable[None]]:
    async def inject(ctx: FaultContext) -> None:
        child = ctx.stack.edges[ctx.rng.choice(sorted(ctx.stack.edges))]
        assert child.proc is not None
        os.kill(child.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(child.proc.pid, signal.SIGCONT)
    return inject


async def nothing(ctx: FaultContext) -> None:
    """Only the background faults: client sockets dropped every ~2 s and a slow client."""


FAULTS = [
    Fault("baseline_drops_slow_client", nothing),
    Fault("redis_frozen_5s", redis_frozen(5.0)),
    Fault("redis_frozen_15s", redis_frozen(15.0)),
    Fault("redis_restarted_aof", redis_restarted_aof),
    Fault("redis_killed", redis_killed, loss_allowed=True),
    Fault("producer_sigkill", producer_killed),
    Fault("producer_sigstop_6s", producer_paused(6.0)),
    # Past its session leases (5 s here) and its claim idle, with a cap the fleet fills: the
    # paused producer's open sessions must keep their slots (cap overshoot 0 at the simulator).
    Fault("producer_sigstop_past_lease_12s", producer_paused(12.0), sdk_cap=8),
    Fault("redis_restarted_aof_2s", redis_restarted_aof_down(2.0)),
    Fault("redis_restarted_empty", redis_restarted_empty, loss_allowed=True, resubmit=True),
    Fault("edge_sigkill", edge_killed),
    Fault("edge_sigstop_8s", edge_paused(8.0)),
]
BY_NAME = {fault.name: fault for fault in FAULTS}
# What ``make test`` runs (keep it to a minute or two): the reported duplicate needs a stall
# longer than the Redis client's socket timeout.
SHORT = ["redis_frozen_15s", "producer_sigkill"]
