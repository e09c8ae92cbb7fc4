"""The edge's Prometheus metrics (docs/operations.md "Metrics"): defined here, called elsewhere.

Each edge app owns an ``EdgeMetrics`` with its own ``CollectorRegistry``, so tests that run
several edges in one process never mix their figures. Label values come from closed sets (stream
kinds, close codes, start modes): no label ever carries a conversation id.

The hub delivers tens of thousands of messages a second, so the hot path never touches a
prometheus_client object per message: it counts into a ``DeliveryTally`` (plain integers) and the
tally is added to the counters once per read.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from relay import wire
from relay.build import build_facts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Every stored entry starts with its kind: fixmap header, fixstr "kind", fixstr value
# (relay.wire._entry writes "kind" first). Slicing it out costs far less than decoding the entry.
_KIND_KEY = b"\xa4kind"
_KINDS = tuple(sorted(wire.STREAM_KINDS)) + ("other",)
_KIND_BY_BYTES = {kind.encode(): kind for kind in wire.STREAM_KINDS}

# Close codes as labels: the documented ones, the usual client-side ones, everything else "other".
_CLOSE_CODES = frozenset({
    1000, 1001, 1002, 1005, 1006, 1009, 1011, 1012, 4400, 4401, 4402, 4403, 4429, 4430, 4503,
})

# Label values created at start, so every series exists (at 0) before its first event: a query
# or alert on a series that is absent returns nothing instead of 0.
_READ_ERROR_KINDS = ("connection", "timeout", "cluster", "redirect", "other")
_STARTS = ("resume", "turn", "live")
_RESUME_OUTCOMES = ("recovered", "lost")
_REFUSAL_CODES = ("400", "403", "1012", "4400", "4401", "4402", "4403", "4430")
# Refusals answered over HTTP before any WebSocket exists: 403 (Origin not allowed), 400 (not a
# WebSocket upgrade). Three digits, so they never read as a close code.
_HTTP_REFUSALS = frozenset({400, 403})
_DISCONNECT_CODES = ("1000", "1001", "1005", "1006", "1011", "1012", "4402", "4429", "4503")

_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def entry_kind(stored: bytes) -> str:
    """The kind of a stored entry, read from its first bytes; "other" if it is not laid out as
    the producer writes it."""
    if stored[1:6] != _KIND_KEY:
        return "other"
    size = stored[6] & 0x1F if len(stored) > 6 else 0
    return _KIND_BY_BYTES.get(stored[7:7 + size], "other")


def close_code_label(code: int | None) -> str:
    if code is None:
        return "none"
    return str(code) if code in _CLOSE_CODES else "other"


def _read_error_kind(exc: BaseException) -> str:
    # By name, not by class: this module stays free of redis imports, and the hub's own
    # TopologyChanged means a redirect (MOVED, failover) or a node gone too long.
    name = type(exc).__name__
    if name in ("ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "OSError"):
        return "connection"
    if name == "TimeoutError":
        return "timeout"
    if name.startswith("RedisCluster") or name in ("ClusterDownError", "SlotNotCoveredError"):
        return "cluster"
    if name in ("TopologyChanged", "MovedError", "AskError", "TryAgainError"):
        return "redirect"
    return "other"


class DeliveryTally:
    """Messages and bytes handed to clients during one read, by kind: plain integers."""

    __slots__ = ("messages", "bytes", "oldest_ms")

    def __init__(self) -> None:
        self.messages: dict[str, int] = dict.fromkeys(_KINDS, 0)
        self.bytes: dict[str, int] = dict.fromkeys(_KINDS, 0)
        self.oldest_ms = 0  # time of the oldest entry delivered live in this read (its id's ms)

    def add(self, stored: bytes, copies: int, frame_bytes: int) -> None:
        kind = entry_kind(stored)
        self.messages[kind] += copies
        self.bytes[kind] += copies * frame_bytes


class _LoopHistogram(Collector):
    """A histogram observed from the event loop only, exposed through the collector API.

    Why not prometheus_client's Histogram: its ``observe`` takes a lock per bucket and per sum,
    about 1.7 µs, and the hub observes two of them per live push, close to once per message per
    edge; a bisect and two integer additions cost a fifth of that. Scrapes run on the same
    loop (the /metrics handler), so nothing needs a lock.
    """

    def __init__(self, name: str, documentation: str, *, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[Metric]:
        cumulative, buckets = 0, []
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets,
                                    sum_value=self._sum)


class EdgeMetrics:
    """Every edge metric. ``bind`` attaches the gauges read at scrape time."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        Info("relay_build", "The relay's version and runtime in this process (value 1).",
             registry=r).info(build_facts("edge"))
        self.clients = Gauge("relay_edge_clients", "Client WebSockets connected to this edge.",
                             registry=r)
        self.conversations = Gauge(
            "relay_edge_conversations", "Conversations with at least one client on this edge.",
            registry=r)
        self.messages = Counter(
            "relay_edge_messages_delivered_total",
            "Stream messages handed to clients (one per client), by kind and source "
            "(live: from the read loops; history: catch-up on join or resume).",
            ["kind", "source"], registry=r)
        self.bytes = Counter(
            "relay_edge_bytes_delivered_total",
            "WebSocket frame bytes of the stream messages handed to clients, by kind and source.",
            ["kind", "source"], registry=r)
        self.lag = _LoopHistogram(
            "relay_edge_delivery_lag_seconds",
            "Time from a live entry's append to Redis (its stream id) to the edge handing it to "
            "its clients' send queues; observed once per live push for its oldest entry.",
            buckets=_LAG_BUCKETS, registry=r)
        self.read_batch = _LoopHistogram(
            "relay_edge_read_batch_entries",
            "Conversation entries delivered by one live push, or by one page the hub read from "
            "the stream to fill a gap.", buckets=_BATCH_BUCKETS, registry=r)
        self.read_errors = Counter(
            "relay_edge_read_errors_total",
            "Blocking stream reads and node discoveries that failed, by kind (connection, "
            "timeout, cluster: no node answered discovery, redirect: the slot moved, other).",
            ["error"], registry=r)
        self.topology_refreshes = Counter(
            "relay_edge_topology_refreshes_total",
            "Times the read loops re-discovered the Redis nodes (start, failover, outage).",
            registry=r)
        self.read_loops = Gauge(
            "relay_edge_read_loops_ready", "Read loops (one per Redis node or bucket) reading now.",
            registry=r)
        self.hub_restarts = Counter(
            "relay_edge_hub_restarts_total",
            "Times the supervisor restarted the hub after it ended unexpectedly.", registry=r)
        self.joins = Counter(
            "relay_edge_joins_total", "Clients admitted, by where delivery started "
            "(resume: after the client's last_id; turn: the active turn's start; live: new "
            "entries only).", ["start"], registry=r)
        self.resumes = Counter(
            "relay_edge_resumes_total",
            "Joins that carried a last_id, by outcome (recovered: nothing missed; lost: entries "
            "after last_id are gone, delivery restarted at the active turn or live).",
            ["outcome"], registry=r)
        self.refused = Counter(
            "relay_edge_connections_refused_total",
            "WebSocket connections refused before delivery, by close code (by HTTP status, 400 "
            "or 403, when refused before the upgrade).", ["code"], registry=r)
        self.disconnects = Counter(
            "relay_edge_disconnects_total",
            "Admitted clients that left, by close code (1012 drain, 4429 slow client, 4503 "
            "Redis unavailable; 1000/1001/1005/1006 from the client side).", ["code"], registry=r)
        for values, counter in ((_READ_ERROR_KINDS, self.read_errors), (_STARTS, self.joins),
                                (_RESUME_OUTCOMES, self.resumes), (_REFUSAL_CODES, self.refused),
                                (_DISCONNECT_CODES, self.disconnects)):
            for label in values:
                counter.labels(label)
        # Children bound once: labels() costs a dict lookup and a lock.
        self._live_messages = {k: self.messages.labels(k, "live") for k in _KINDS}
        self._live_bytes = {k: self.bytes.labels(k, "live") for k in _KINDS}
        self._history_messages = {k: self.messages.labels(k, "history") for k in _KINDS}
        self._history_bytes = {k: self.bytes.labels(k, "history") for k in _KINDS}

    def bind(self, *, clients: Callable[[], int], conversations: Callable[[], int],
             read_loops: Callable[[], int]) -> None:
        self.clients.set_function(clients)
        self.conversations.set_function(conversations)
        self.read_loops.set_function(read_loops)

    def pushed(self, entries: int, oldest_ms: int) -> None:
        """Once per live push (or history page of the hub) delivered: its size and the lag of
        its oldest entry (two observations; the counters come in batches, see ``add_live``)."""
        self.read_batch.observe(entries)
        self.lag.observe(max(0.0, time.time() - oldest_ms / 1000))

    def add_live(self, tally: DeliveryTally) -> None:
        """The live messages and bytes counted since the last call (the hub calls it on every
        keepalive tick and before each scrape)."""
        for kind, count in tally.messages.items():
            if count:
                self._live_messages[kind].inc(count)
                self._live_bytes[kind].inc(tally.bytes[kind])

    def delivered_history(self, tally: DeliveryTally) -> None:
        for kind, count in tally.messages.items():
            if count:
                self._history_messages[kind].inc(count)
                self._history_bytes[kind].inc(tally.bytes[kind])

    def read_failed(self, exc: BaseException) -> None:
        self.read_errors.labels(_read_error_kind(exc)).inc()

    def joined(self, start: str, recovered: bool | None) -> None:
        self.joins.labels(start).inc()
        if recovered is not None:
            self.resumes.labels("recovered" if recovered else "lost").inc()

    def refused_with(self, code: int) -> None:
        """A refusal by close code, or by HTTP status when refused before the upgrade."""
        label = str(code) if code in _HTTP_REFUSALS else close_code_label(code)
        self.refused.labels(label).inc()

    def disconnected(self, code: int | None) -> None:
        self.disconnects.labels(close_code_label(code)).inc()
