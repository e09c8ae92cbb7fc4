"""Run fault scenarios and report: ``python -m tests.faults [--short] [--conversations N]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from redis.exceptions import RedisError

from relay.streams import parse_id
from tests.faults.checker import Verdict, check, turn_outcomes
from tests.faults.clients import Fleet
from tests.faults.harness import PRODUCER_ENV, SECRET, FaultStack, StackShape
from tests.faults.scenarios import BY_NAME, FAULTS, SHORT, Fault, FaultContext
from tests.faults.workload import Workload, submit_all
from workers.queue.deadletters import DeadLetters
from workers.run import STOP_MARGIN_S


@dataclass(frozen=True)
class RunOptions:
    conversations: int = 30
    turns: int = 3
    fault_after_s: float = 2.5  # into the run, while every conversation is speaking
    drop_every_s: float = 2.0
    slow_clients: int = 1
    settle_timeout_s: float = 120.0
    seed: int = 0


@dataclass
class ScenarioResult:
    fault: Fault
    verdict: Verdict
    outcomes: Counter[str]
    drops: int
    resume_s: list[float] = field(default_factory=list)
    takeover_s: list[float] = field(default_factory=list)
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    settled: bool = True
    duration_s: float = 0.0
    stalled: list[str] = field(default_factory=list)  # conversations busy at the end
    stop_s: dict[str, float] = field(default_factory=dict)  # producer -> seconds to exit
    stop_bound_s: float = 0.0
    cap_overshoot: int = 0  # simulator's peak sessions above RELAY_MAX_SDK_SESSIONS

    @property
    def missed_stop_bound(self) -> list[str]:
        return [name for name, took in self.stop_s.items() if took > self.stop_bound_s]

    @property
    def stuck(self) -> int:
        """Submitted turns that never ended (those Redis lost before they ran excepted)."""
        return self.outcomes.get("missing", 0)

    @property
    def ok(self) -> bool:
        missing = self.stuck and not (self.fault.loss_allowed and not self.fault.resubmit)
        return (self.settled and not missing and not self.stalled and not self.cap_overshoot
                and not self.missed_stop_bound
                and self.verdict.ok(loss_allowed=self.fault.loss_allowed))


def _ended(truth: dict[str, list[tuple[str, bytes]]], turn_id: str) -> bool:
    """The turn has a turn_end or interrupt in the streams."""
    from relay import wire

    for rows in truth.values():
        for _, stored in rows:
            kind, turn = wire.stored_kind(stored)
            if turn == turn_id and kind in (wire.TURN_END, wire.INTERRUPT):
                return True
    return False


def _pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.2f}"


def _takeovers(hurt: list[tuple[int, str, str]], truth: dict[str, list[tuple[str, bytes]]],
               after_ms: dict[str, int]) -> list[float]:
    """Per hurt turn: seconds from the fault to the turn's next entry after it (or its end)."""
    from relay import wire

    out = []
    for at, conv, turn in hurt:
        start = max(at, after_ms.get(conv, at))
        later = [parse_id(i)[0] for i, d in truth.get(conv, [])
                 if parse_id(i)[0] > start and wire.stored_kind(d)[1] == turn]
        if later:
            out.append((min(later) - at) / 1000)
    return out


async def run_scenario(fault: Fault, options: RunOptions, workdir: Path) -> ScenarioResult:
    rng = random.Random(options.seed or time.time_ns())
    conversations = [f"{fault.name.replace('_', '-')}-{n}" for n in range(options.conversations)]
    stack = FaultStack(workdir / fault.name, StackShape(aof=fault.aof, sdk_cap=fault.sdk_cap))
    started = time.monotonic()
    await stack.start()
    fleet = Fleet(stack.edge_urls, conversations, SECRET, slow_clients=options.slow_clients,
                  rng=rng)
    tasks: list[asyncio.Task[None]] = []
    try:
        await fleet.start()
        workload = Workload.plan(conversations, options.turns, rng)
        assert stack.client is not None
        rss_before = stack.rss_mb()
        tasks += await submit_all(stack.client, stack.keys, workload)
        tasks.append(asyncio.create_task(fleet.drop_sockets(options.drop_every_s)))
        await asyncio.sleep(options.fault_after_s)
        ctx = FaultContext(stack, conversations, rng)
        await fault.inject(ctx)
        lost_with_redis: set[str] = set()
        if fault.resubmit:
            # Redis lost the queued turns: a second round shows the producers take work again.
            lost_with_redis = {turn.turn_id for turn in workload.turns}
            again = Workload.plan(conversations, 1, rng, round_=1)
            drops = tasks.pop()
            tasks += await submit_all(stack.client, stack.keys, again)
            tasks.append(drops)
            workload = Workload(workload.turns + again.turns)
        settled = await stack.settled(conversations, options.settle_timeout_s)
        stalled = await stack.stalled(conversations)
        await asyncio.gather(*tasks[:-1], return_exceptions=True)
        tasks[-1].cancel()
        await _caught_up(stack, fleet, conversations)
        rss_after = stack.rss_mb()
        await fleet.stop()
        cap_overshoot = max(0, await stack.sim_peak_sessions() - fault.sdk_cap)
        stop_s = await stack.stop_producers()
        truth = await stack.truth(conversations)
        dead = {letter.turn_id for letter in await DeadLetters(
            stack.client, stack.keys, maxlen=1000).list(1000)}
        verdict = check(fleet.records(), truth, stack.snapshots, workload.clips(),
                        workload.order())
        outcomes = turn_outcomes(truth, workload.order(), dead)
        gone = sum(1 for turns in workload.order().values() for t in turns
                   if t in lost_with_redis and not _ended(truth, t))
        if gone:  # lost with Redis before they ran: not stuck, reported apart
            outcomes["missing"] -= gone
            outcomes["lost_with_redis"] = gone
            outcomes += Counter()  # drops a zero count
        return ScenarioResult(
            fault=fault, verdict=verdict, outcomes=outcomes, stalled=stalled, stop_s=stop_s,
            stop_bound_s=float(PRODUCER_ENV["RELAY_PRODUCER_STOP_S"]) + STOP_MARGIN_S,
            cap_overshoot=cap_overshoot,
            drops=fleet.drops,
            resume_s=[x for r in fleet.records() for x in r.resume_latencies()],
            takeover_s=_takeovers(ctx.hurt, truth, {}), rss_before_mb=rss_before,
            rss_after_mb=rss_after, settled=settled, duration_s=time.monotonic() - started)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await fleet.stop()
        await stack.stop()


async def _caught_up(stack: FaultStack, fleet: Fleet, conversations: list[str],
                     timeout_s: float = 30.0) -> None:
    """Until every client holds its stream's last entry (or the timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        with contextlib.suppress(RedisError, OSError):
            tips = await stack.tips(conversations)
            if all(tips[c.conversation_id] is None or c.last_id == tips[c.conversation_id]
                   for c in fleet.clients):
                return
        await asyncio.sleep(0.3)


HEADER = ("fault", "ok", "turns", "outcomes", "stuck", "stalled", "stop>bound", "cap over",
          "msgs", "lost", "dup", "reord", "bad", "gaps", "drops", "resume p50/p99 s",
          "takeover p50/p99 s", "rss MB before/after", "secs")


def row(result: ScenarioResult) -> tuple[str, ...]:
    v = result.verdict
    outcomes = " ".join(f"{k}={n}" for k, n in sorted(result.outcomes.items()))
    return (result.fault.name, "yes" if result.ok else "NO", str(sum(result.outcomes.values())),
            outcomes, str(result.stuck), str(len(result.stalled)),
            str(len(result.missed_stop_bound)), str(result.cap_overshoot), str(v.messages),
            str(v.lost), str(v.duplicated), str(v.reordered),
            str(v.bad_turns + v.corrupt), str(v.announced_gaps), str(result.drops),
            f"{_pct(result.resume_s, 0.5)}/{_pct(result.resume_s, 0.99)}",
            f"{_pct(result.takeover_s, 0.5)}/{_pct(result.takeover_s, 0.99)}",
            f"{result.rss_before_mb:.0f}/{result.rss_after_mb:.0f}", f"{result.duration_s:.0f}")


def table(results: list[ScenarioResult]) -> str:
    rows = [HEADER, *(row(r) for r in results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    for result in results:
        lines += [f"  {result.fault.name}: {p}" for p in result.verdict.problems[:10]]
    return "\n".join(lines)


async def run_all(names: list[str], options: RunOptions) -> list[ScenarioResult]:
    results = []
    with tempfile.TemporaryDirectory(prefix="relay-faults-") as workdir:
        for name in names:
            result = await run_scenario(BY_NAME[name], options, Path(workdir))
            print(table([result]).splitlines()[1], flush=True)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    import logging

    import structlog

    # The suite's own process logs only warnings; the roles log to their files.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(prog="python -m tests.faults")
    parser.add_argument("--short", action="store_true", help="only the faults make test runs")
    parser.add_argument("--conversations", type=int, default=30)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--fault", action="append", choices=sorted(BY_NAME))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = args.fault or (SHORT if args.short else [f.name for f in FAULTS])
    options = RunOptions(conversations=args.conversations, turns=args.turns, seed=args.seed)
    results = asyncio.run(run_all(names, options))
    print()
    print(table(results))
    print(f"\n{statistics.fmean([r.ok for r in results]) * 100:.0f}% of scenarios passed",
          flush=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
