"""One measured step of each kind: edge path, full path, bare-loop baseline.

Each step starts from an empty Redis (FLUSHALL of the bench's own embedded server) and fresh
role processes, so steps do not inherit each other's memory or connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from relay.dev.bench import measure, profiling
from relay.dev.bench.child import BenchChild, ChildFailed
from relay.dev.bench.options import BenchOptions
from relay.dev.bench.procstat import rss_kb
from relay.dev.bench.redisinfo import STREAM_IDS, commands_by_process, snapshot
from relay.dev.stack import Child, LocalStack, child_env
from relay.keys import Keys
from relay.settings import Settings

_READY_TIMEOUT_S = 120.0
_IDS_PAGE = 5000


class Bench:
    def __init__(self, options: BenchOptions, redis_url: str, secret: str, log_dir: Path) -> None:
        self.options = options
        self._url = redis_url
        self._secret = secret
        self._log_dir = log_dir
        self._client = redis.Redis.from_url(redis_url)
        self._ids_script = self._client.register_script(STREAM_IDS)

    async def close(self) -> None:
        await self._client.aclose()

    async def server_version(self) -> str:
        info = await self._client.info("server")
        return f"valkey {info.get('valkey_version', info.get('redis_version'))}"

    # --- steps -------------------------------------------------------------------------------

    async def edge_step(self, n: int, *, profile_s: float = 0.0, kill_pubsub: bool = False
                        ) -> dict[str, Any]:
        """Writer -> Redis -> one ``relay edge`` -> WebSocket clients in several processes.
        With ``kill_pubsub`` the edge's live subscriber connection is killed (``CLIENT KILL TYPE
        pubsub``) a third and again two thirds into the load: it must refill from the streams."""
        name = f"edge-{n}" + ("-profile" if profile_s else "") + ("-kill" if kill_pubsub else "")
        conversations, stack = await self._fresh(name, f"e{n}", n)
        children: list[BenchChild] = []
        try:
            edge, url = await stack.start_edge("edge-1")
            figures = await self._edge_run(name, conversations, stack, edge, url, children,
                                           profile_s, kill_pubsub)
        finally:
            await _stop_all(children)
            await stack.stop()
        return figures

    async def _edge_run(self, name: str, conversations: list[str], stack: LocalStack,
                        edge: Child, url: str, children: list[BenchChild], profile_s: float,
                        kill_pubsub: bool = False) -> dict[str, Any]:
        edge_pid = _pid(edge)
        await asyncio.sleep(1.0)
        rss_base = rss_kb(edge_pid)
        before_clients = await snapshot(self._client)
        clients = await self._start_clients(name, url, conversations, children)
        await asyncio.sleep(1.0)
        rss_idle = rss_kb(edge_pid)
        writer = BenchChild(f"{name}-writer", "relay.dev.bench.writer", self._log_dir)
        children.append(writer)
        prefix = f"e{len(conversations)}"
        await writer.start(self._writer_config(prefix, conversations, "relay"))
        pids = {"edge": edge_pid, "writer": writer.pid, **_pids("clients", clients)}
        run = await self._load(writer, pids, profile=(edge_pid, profile_s, name),
                               kill_pubsub=kill_pubsub)
        rss_load = rss_kb(edge_pid)
        truth = await self._stream_truth(prefix, conversations)
        reports = await self._finish(clients, {c: t[2] for c, t in truth.items()})
        figures = measure.receivers(reports, _counts(truth), run["window"])
        figures.update(self._common(conversations, run, before_clients))
        figures["edge_cpu_us_per_msg"] = _per_msg(run["cpu"]["cpu_s"]["edge"], figures)
        figures["edge_redis_cmds_per_delivered_msg"] = _cmds_per_msg(run, "edge", figures)
        figures["edge_rss_kb"] = {"base": rss_base, "idle": rss_idle, "load": rss_load}
        figures["edge_rss_kb_per_client"] = round((rss_idle - rss_base) / len(conversations), 1)
        figures["edge_rss_kb_per_client_under_load"] = round(
            (rss_load - rss_base) / len(conversations), 1)
        figures["generator_cpu_us_per_msg"] = _per_msg(
            sum(v for k, v in run["cpu"]["cpu_s"].items() if k != "edge"), figures)
        figures.update(_write_path(run))
        if kill_pubsub:
            figures["pubsub_connections_killed"] = run["killed"]
        return figures

    async def peer_step(self, n: int, kind: str) -> dict[str, Any]:
        """The same writer schedule and clients through a peer instead of the relay's edge:
        ``naive`` (one XREAD per client, ``relay.dev.bench.naive``) or ``socketio``
        (python-socketio's AsyncRedisManager, ``relay.dev.bench.sio``)."""
        name, prefix = f"{kind}-{n}", f"{kind[0]}{n}"
        await self._client.flushall()
        conversations = [f"c{i}" for i in range(n)]
        children: list[BenchChild] = []
        try:
            module = "relay.dev.bench.naive" if kind == "naive" else "relay.dev.bench.sio"
            server = BenchChild(f"{name}-server", module, self._log_dir)
            children.append(server)
            await server.start({"redis_url": self._url, "prefix": prefix,
                                "channel": f"sio-{prefix}"})
            port = (await server.expect("ready", _READY_TIMEOUT_S))["port"]
            before = await snapshot(self._client)
            clients = await self._start_clients(name, f"ws://127.0.0.1:{port}", conversations,
                                                children, protocol=kind)
            writer = BenchChild(f"{name}-writer", "relay.dev.bench.writer", self._log_dir)
            children.append(writer)
            config = self._writer_config(prefix, conversations,
                                         "bare" if kind == "naive" else "socketio")
            await writer.start({**config, "channel": f"sio-{prefix}"})
            pids = {"edge": server.pid, "writer": writer.pid, **_pids("clients", clients)}
            run = await self._load(writer, pids)
            truth = _truth(conversations, run["report"]["truth"])
            reports = await self._finish(clients, {c: t[2] for c, t in truth.items()})
        finally:
            await _stop_all(children)
        figures = measure.receivers(reports, _counts(truth), run["window"])
        figures.update(self._common(conversations, run, before))
        figures["edge_cpu_us_per_msg"] = _per_msg(run["cpu"]["cpu_s"]["edge"], figures)
        figures["edge_redis_cmds_per_delivered_msg"] = _cmds_per_msg(run, "edge", figures)
        return figures

    async def full_step(self, n: int, *, profile_s: float = 0.0) -> dict[str, Any]:
        """Feeder -> job queue -> ``relay producer`` (SDK, simulator) -> edge -> clients."""
        name = f"full-{n}" + ("-profile" if profile_s else "")
        conversations, stack = await self._fresh(name, f"f{n}", n, full=True)
        children: list[BenchChild] = []
        try:
            await stack.start_sim()
            producer = await stack.start_producer("producer-1")
            edge, url = await stack.start_edge("edge-1")
            await self._wait_for_producer(f"f{n}", producer)
            figures = await self._full_run(name, conversations, producer, edge, url, children,
                                           profile_s, stack)
        finally:
            await _stop_all(children)
            await stack.stop()
        return figures

    async def _full_run(self, name: str, conversations: list[str], producer: Child, edge: Child,
                        url: str, children: list[BenchChild], profile_s: float,
                        stack: LocalStack) -> dict[str, Any]:
        before_clients = await snapshot(self._client)
        clients = await self._start_clients(name, url, conversations, children)
        feeder = BenchChild(f"{name}-feeder", "relay.dev.bench.feeder", self._log_dir)
        children.append(feeder)
        prefix = f"f{len(conversations)}"
        await feeder.start(self._writer_config(prefix, conversations, "full"))
        sim = next(c for c in stack.children if c.name == "motion-sim")
        pids = {"producer": _pid(producer), "edge": _pid(edge), "sim": _pid(sim),
                "feeder": feeder.pid, **_pids("clients", clients)}
        run = await self._load(feeder, pids, profile=(_pid(producer), profile_s, name))
        drain_s = await self._wait_turns_ended(prefix, conversations)
        truth = await self._stream_truth(prefix, conversations)
        reports = await self._finish(clients, {c: t[2] for c, t in truth.items()})
        figures = measure.receivers(reports, _counts(truth), run["window"])
        run["report"]["appended"] = sum(t[0] for t in truth.values())
        figures.update(self._common(conversations, run, before_clients))
        cpu = run["cpu"]["cpu_s"]
        figures["edge_cpu_us_per_msg"] = _per_msg(cpu["edge"], figures)
        figures["producer_cpu_us_per_msg"] = _per_msg(cpu["producer"], figures)
        figures["edge_redis_cmds_per_delivered_msg"] = _cmds_per_msg(run, "edge", figures)
        figures["producer_redis_cmds_per_delivered_msg"] = _cmds_per_msg(run, "producer", figures)
        figures["sim_cpu_us_per_msg"] = _per_msg(cpu["sim"], figures)
        figures["turns_submitted"] = run["report"]["turns"]
        figures["turns_completed"] = figures["kinds"].get("turn_end", 0)
        figures["turns_drain_s"] = drain_s
        figures["audio_only_turns"] = figures["kinds"].get("audio_only", 0)
        figures["interrupted_turns"] = figures["kinds"].get("interrupt", 0)
        return figures

    async def baseline_step(self, n: int) -> dict[str, Any]:
        """The same writer and load, read by one bare XREAD-and-decode loop."""
        name = f"bare-{n}"
        prefix = f"b{n}"
        await self._client.flushall()
        conversations = [f"c{i}" for i in range(n)]
        keys = Keys(prefix)
        children: list[BenchChild] = []
        try:
            reader = BenchChild(f"{name}-reader", "relay.dev.bench.bare", self._log_dir)
            children.append(reader)
            await reader.start({"redis_url": self._url, "count": 512, "block_ms": 1000,
                                "streams": {keys.stream(c): c for c in conversations}})
            await reader.expect("ready", _READY_TIMEOUT_S)
            before = await snapshot(self._client)
            writer = BenchChild(f"{name}-writer", "relay.dev.bench.writer", self._log_dir)
            children.append(writer)
            await writer.start(self._writer_config(prefix, conversations, "bare"))
            run = await self._load(writer, {"reader": reader.pid, "writer": writer.pid})
            truth = _truth(conversations, run["report"]["truth"])
            reports = await self._finish([reader], {c: t[2] for c, t in truth.items()})
        finally:
            await _stop_all(children)
        figures = measure.receivers(reports, _counts(truth), run["window"])
        figures.update(self._common(conversations, run, before))
        figures["reader_cpu_us_per_msg"] = _per_msg(run["cpu"]["cpu_s"]["reader"], figures)
        figures["reader_redis_cmds_per_msg"] = _cmds_per_msg(run, "reader", figures)
        figures["xread_calls"] = reports[0].get("reads")
        return figures

    async def floor_step(self, n: int) -> dict[str, Any]:
        """The same writer schedule, as bare pushes forwarded by a minimal asyncio process to
        as many client processes (``relay.dev.bench.floor``): what moving a message costs on
        this machine before any relay code runs."""
        name = f"floor-{n}"
        children: list[BenchChild] = []
        try:
            forwarder = BenchChild(f"{name}-forwarder", "relay.dev.bench.floor", self._log_dir)
            children.append(forwarder)
            await forwarder.start({"role": "forwarder", "conversations": n})
            ports = await forwarder.expect("ready", _READY_TIMEOUT_S)
            count = max(1, min(self.options.client_processes, n))
            clients = []
            for index in range(count):
                child = BenchChild(f"{name}-clients-{index}", "relay.dev.bench.floor",
                                   self._log_dir)
                children.append(child)
                clients.append(child)
                await child.start({"role": "clients", "port": ports["client_port"],
                                   "indices": list(range(index, n, count))})
            for child in clients:
                await child.expect("ready", _READY_TIMEOUT_S)
            await forwarder.expect("routed", _READY_TIMEOUT_S)  # every client's index is read
            writer = BenchChild(f"{name}-writer", "relay.dev.bench.writer", self._log_dir)
            children.append(writer)
            conversations = [f"c{i}" for i in range(n)]
            await writer.start({**self._writer_config(f"fl{n}", conversations, "floor"),
                                "floor_port": ports["upstream_port"]})
            started = await writer.expect("started", _READY_TIMEOUT_S)
            await asyncio.sleep(max(0.0, float(started["t0"]) - time.time()))
            before = measure.cpu_snap({"forwarder": forwarder.pid})
            report = await writer.expect("report", self.options.duration_s + 120)
            forwarded = await forwarder.expect("report", _READY_TIMEOUT_S)
            after = measure.cpu_snap({"forwarder": forwarder.pid})
        finally:
            await _stop_all(children)
        cpu = measure.cpu_delta(before, after)
        messages = int(forwarded["messages"])
        return {
            "conversations": n, "sent": report["appended"], "forwarded": messages,
            "unrouted": forwarded["unrouted"], "writes": forwarded["writes"],
            "forwarder_cpu_us_per_msg": round(cpu["cpu_s"]["forwarder"] * 1e6 / messages, 1)
            if messages else None,
            "forwarded_msgs_per_s": round(messages / cpu["wall_s"], 1) if cpu["wall_s"] else None,
            "forwarder_core_pct": cpu["core_pct"].get("forwarder"),
        }

    # --- pieces ------------------------------------------------------------------------------

    async def _fresh(self, name: str, prefix: str, n: int, full: bool = False
                     ) -> tuple[list[str], LocalStack]:
        await self._client.flushall()
        conversations = [f"c{i}" for i in range(n)]
        env = child_env(Settings(key_prefix=prefix), self._url, self._secret)
        # Every bench client connects from 127.0.0.1: the per-address admission cap is off.
        env.update({"RELAY_LOG_LEVEL": "warning", "RELAY_STREAM_MAXLEN": str(self.options.maxlen),
                    "RELAY_EDGE_MAX_PER_ADDRESS": "0"})
        if full:
            env.update({
                "RELAY_SIM_REALTIME": "true", "RELAY_SIM_BATCH_KEYFRAMES": "5",
                "RELAY_SIM_MAX_SESSIONS": "0", "RELAY_MAX_SDK_SESSIONS": str(n + 16),
                "RELAY_PRODUCER_CONCURRENCY": str(n + 16),
            })
        return conversations, LocalStack(env, self._log_dir / name)

    def _writer_config(self, prefix: str, conversations: list[str], mode: str) -> dict[str, Any]:
        shape = self.options.shape
        return {"redis_url": self._url, "prefix": prefix, "conversations": conversations,
                "duration_s": self.options.duration_s, "turn_s": shape.turn_s,
                "gap_s": shape.gap_s, "maxlen": self.options.maxlen, "mode": mode}

    async def _start_clients(self, name: str, url: str, conversations: list[str],
                             children: list[BenchChild], protocol: str = "relay"
                             ) -> list[BenchChild]:
        count = max(1, min(self.options.client_processes, len(conversations)))
        clients = []
        for index in range(count):
            child = BenchChild(f"{name}-clients-{index}", "relay.dev.bench.clients", self._log_dir)
            children.append(child)
            clients.append(child)
            await child.start({"edge": url, "conversations": conversations[index::count],
                               "secret": self._secret, "connect_concurrency": 32,
                               "protocol": protocol})
        for child in clients:
            ready = await child.expect("ready", _READY_TIMEOUT_S)
            if ready["connected"] != ready["wanted"]:
                raise ChildFailed(f"{child.name}: only {ready['connected']} of "
                                  f"{ready['wanted']} clients connected")
        return clients

    async def _load(self, source: BenchChild, pids: dict[str, int],
                    profile: tuple[int, float, str] | None = None, kill_pubsub: bool = False
                    ) -> dict[str, Any]:
        """Run the writer or feeder to its end; CPU and Redis counters over exactly that time."""
        started = await source.expect("started", _READY_TIMEOUT_S)
        t0 = float(started["t0"])
        await asyncio.sleep(max(0.0, t0 - time.time()))
        cpu0, redis0 = measure.cpu_snap(pids), await snapshot(self._client)
        cmds0 = await commands_by_process(self._client, pids)
        profiler = self._profiler(profile)
        killer = asyncio.create_task(self._kill_pubsub()) if kill_pubsub else None
        report = await source.expect("report", self.options.duration_s + 120)
        killed = await killer if killer is not None else 0
        cpu1, redis1 = measure.cpu_snap(pids), await snapshot(self._client)
        cmds1 = await commands_by_process(self._client, pids)
        t1 = float(report["t1"])
        by_process = {name: max(0, cmds1[name] - cmds0.get(name, 0)) for name in cmds1
                      if not name.startswith("clients")}
        result = {"report": report, "window": (t0, t1), "cpu": measure.cpu_delta(cpu0, cpu1),
                  "redis": {**redis0.delta(redis1), "commands_by_process": by_process},
                  "redis_after": redis1, "killed": killed}
        if profiler is not None:
            result["profile"] = await profiler
        return result

    async def _kill_pubsub(self) -> int:
        """Kill every pub/sub connection (the edge's live subscriber) twice during the load."""
        killed = 0
        for _ in range(2):
            await asyncio.sleep(self.options.duration_s / 3)
            killed += int(await self._client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
        return killed

    def _profiler(self, profile: tuple[int, float, str] | None) -> asyncio.Task[Any] | None:
        if profile is None or not profile[1]:
            return None
        pid, seconds, name = profile
        seconds = min(seconds, max(1.0, self.options.duration_s - 3.0))
        out = self._log_dir / f"{name}.pyspy.txt"

        async def run() -> dict[str, Any] | None:
            await asyncio.sleep(2.0)  # past the ramp-up
            raw = await profiling.record(pid, seconds, out)
            return profiling.summarise(raw, seconds) if raw else None

        return asyncio.create_task(run())

    def _common(self, conversations: list[str], run: dict[str, Any], before: Any
                ) -> dict[str, Any]:
        report, redis_delta = run["report"], run["redis"]
        t0, t1 = run["window"]
        appended = report.get("appended") or 0
        return {
            "conversations": len(conversations),
            "window_s": round(t1 - t0, 2),
            "redis_cpu_s": redis_delta["cpu_s"],
            # What the schedule asked for in this window (ramp-up included); the writer's or the
            # producer's actual appends may lag behind it.
            "offered_msgs_per_s": round(report.get("offered", 0) / (t1 - t0), 1),
            "appended_msgs_per_s": round(appended / (t1 - t0), 1),
            "cpu": run["cpu"],
            "redis": redis_delta,
            "redis_commands_by_generator": report.get("commands"),
            "redis_memory_bytes_per_conversation": round(
                (run["redis_after"].used_memory - before.used_memory) / len(conversations)),
            "generator_lag_p99_ms": report.get("lag_p99_ms"),
            "generator_lag_max_ms": report.get("lag_max_ms"),
            **({"profile": run["profile"]} if run.get("profile") else {}),
        }

    async def _finish(self, receivers: list[BenchChild], targets: dict[str, str | None]
                      ) -> list[dict[str, Any]]:
        deadline = self.options.drain_s
        for child in receivers:
            await child.send({"targets": targets, "deadline_s": deadline})
        return list(await asyncio.gather(*(c.expect("report", deadline + 60)
                                           for c in receivers)))

    async def _wait_for_producer(self, prefix: str, producer: Child) -> None:
        keys = Keys(prefix)
        for _ in range(300):
            if not producer.alive:
                raise ChildFailed(f"producer exited at start; see {producer.log_path}")
            with contextlib.suppress(redis.ResponseError):
                if await self._client.xinfo_groups(keys.jobs()):
                    return
            await asyncio.sleep(0.1)
        raise ChildFailed("producer did not create its jobs consumer group within 30 s")

    async def _wait_turns_ended(self, prefix: str, conversations: list[str]) -> float:
        """Seconds until no conversation has an active turn (producers finished their turns)."""
        keys = Keys(prefix)
        start = time.monotonic()
        while time.monotonic() - start < self.options.drain_s:
            async with self._client.pipeline(transaction=False) as pipe:
                for conv in conversations:
                    pipe.hget(keys.turn(conv), "status")
                statuses = await pipe.execute()
            pending = await self._client.xlen(keys.jobs())
            if b"active" not in statuses and not pending:
                break
            await asyncio.sleep(0.2)
        return round(time.monotonic() - start, 2)

    async def _stream_truth(self, prefix: str, conversations: list[str]
                            ) -> dict[str, tuple[int, int, str | None]]:
        """What the producers appended, read back from the streams (ids only)."""
        from relay.dev.bench.tally import HASH_MOD, id_hash

        keys = Keys(prefix)
        truth: dict[str, tuple[int, int, str | None]] = {}
        for conv in conversations:
            count, digest, last, start = 0, 0, None, "-"
            while True:
                ids = await self._ids_script(keys=[keys.stream(conv)], args=[start, _IDS_PAGE])
                for raw in ids:
                    count += 1
                    digest = (digest + id_hash(raw)) % HASH_MOD
                last = ids[-1].decode() if ids else last
                if len(ids) < _IDS_PAGE:
                    break
                start = f"({last}"
            truth[conv] = (count, digest, last)
        return truth


def _pid(child: Child) -> int:
    if child.proc is None:
        raise ChildFailed(f"{child.name} is not running")
    return child.proc.pid


def _pids(prefix: str, children: list[BenchChild]) -> dict[str, int]:
    return {f"{prefix}-{i}": c.pid for i, c in enumerate(children)}


def _truth(conversations: list[str], rows: list[list[Any]]
           ) -> dict[str, tuple[int, int, str | None]]:
    return {conv: (int(row[0]), int(row[1]), row[2]) for conv, row in zip(conversations, rows,
                                                                          strict=True)}


def _counts(truth: dict[str, tuple[int, int, str | None]]) -> measure.Truth:
    return dict(truth)


def _per_msg(cpu_s: float, figures: dict[str, Any]) -> float | None:
    delivered = figures.get("delivered_in_window") or 0
    return round(cpu_s / delivered * 1e6, 1) if delivered else None


def _cmds_per_msg(run: dict[str, Any], name: str, figures: dict[str, Any]) -> float | None:
    delivered = figures.get("delivered_in_window") or 0
    commands = run["redis"]["commands_by_process"].get(name)
    return round(commands / delivered, 4) if delivered and commands is not None else None


async def _stop_all(children: list[BenchChild]) -> None:
    await asyncio.gather(*(c.stop() for c in children), return_exceptions=True)



def _write_path(run: dict[str, Any]) -> dict[str, Any]:
    """The append script's Redis cost in the load window (INFO commandstats: usec includes the
    commands the script ran), per script call and per entry it appended."""
    usec = run["redis"]["usec"].get("evalsha", 0)
    calls = run["redis"]["calls"].get("evalsha", 0)
    entries = run["report"].get("script_entries") or 0
    inner = {name: count for name, count in run["redis"]["calls"].items()
             if name in ("xadd", "xrevrange", "spublish", "hmget", "hset", "hexists", "pexpire")}
    return {
        "append_script_us_per_call": round(usec / calls, 2) if calls else None,
        "append_script_us_per_entry": round(usec / entries, 2) if entries else None,
        "append_script_calls_per_entry": round(calls / entries, 3) if entries else None,
        "append_script_inner_calls_per_entry": {
            name: round(count / entries, 3) for name, count in sorted(inner.items())
        } if entries else {},
    }


def redis_cpu_per_msg(figures: dict[str, Any]) -> float | None:
    """Redis CPU (user + sys, writes included) per delivered message, in microseconds."""
    delivered = figures.get("delivered_in_window") or 0
    cpu = figures.get("redis_cpu_s")
    return round(cpu / delivered * 1e6, 2) if delivered and cpu is not None else None
