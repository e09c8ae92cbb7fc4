"""The producer's Prometheus metrics (docs/operations.md "Metrics"): defined here, called elsewhere.

A ``Producer`` owns one ``ProducerMetrics`` with its own ``CollectorRegistry`` (tests run several
producers in one process); ``relay producer`` serves it on its health port. Labels come from
closed sets (outcomes, reasons, error kinds): never a conversation or turn id.

Queue-wide figures (doorbells waiting and pending, dead letters, session slots used across all
producers, turns waiting for a slot) live in Redis: ``sample`` reads them when Prometheus scrapes,
in one round of cheap commands, so no background task polls Redis for figures nobody reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from redis.exceptions import RedisError

from relay.build import build_facts, sdk_version

TURN_OUTCOMES = ("complete", "audio_only", "interrupted", "abandoned", "failed", "dead_lettered")
AUDIO_ONLY_REASONS = ("capacity", "motion_error", "motion_closed", "stall", "frames_backlog",
                      "producer_failover", "other")
MOTION_ERROR_KINDS = ("session_error", "connection_closed", "open_failed")
DEAD_LETTER_REASONS = ("max_attempts", "deadline", "malformed", "other")
_DURATION_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
_SILENCE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
# A kept session: under a millisecond to tens of ms on a busy producer; a new one: its token and
# handshake (tens to hundreds of ms); the session cap: up to RELAY_SDK_WAIT_S.
_MOTION_START_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                         10.0, 30.0)
_SAMPLE_TIMEOUT_S = 2.0

# Reads the Redis figures; returns {gauge name: value}. Set by the worker (it knows the keys).
Sampler = Callable[[], Awaitable[dict[str, float]]]


def _bounded(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else "other"


class ProducerMetrics:
    """Every producer metric. Gauges of local state are bound with ``bind_*`` and read at
    scrape time; Redis-wide gauges are refreshed by ``sample`` before each scrape."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        Info("relay_build", "The relay's version and runtime in this process (value 1).",
             registry=r).info(build_facts("producer", spatius=sdk_version()))
        self.turns = Counter(
            "relay_producer_turns_total",
            "Turn attempts that ended, by outcome (complete, audio_only, interrupted; abandoned: "
            "handed back or taken over unfinished; failed: the attempt raised and will be "
            "retried; dead_lettered: the turn was given up).", ["outcome"], registry=r)
        self.audio_only = Counter(
            "relay_producer_audio_only_turns_total",
            "Turns that ended audio_only (audio delivered, no animation), by reason.",
            ["reason"], registry=r)
        self.turn_duration = Histogram(
            "relay_producer_turn_duration_seconds",
            "Wall time of a turn attempt from its start to its end, by outcome.",
            ["outcome"], buckets=_DURATION_BUCKETS, registry=r)
        self.motion_start = Histogram(
            "relay_producer_motion_start_seconds",
            "From a turn attempt's start to its first audio sent to the Motion Server: the "
            "session's checkout (a kept one), or its open (token, WebSocket, handshake), or the "
            "wait for a slot at the session cap. The turn's audio never waits for it; its first "
            "frames do.", buckets=_MOTION_START_BUCKETS, registry=r)
        self.dead_lettered = Counter(
            "relay_producer_dead_lettered_total",
            "Turns this producer moved to the dead letters, by reason (max_attempts, deadline, "
            "malformed).", ["reason"], registry=r)
        self.motion_errors = Counter(
            "relay_producer_motion_errors_total",
            "Motion Server failures seen through the SDK, by kind (session_error, "
            "connection_closed, open_failed: token, connect or handshake failed or timed out).",
            ["kind"], registry=r)
        self.takeovers = Counter(
            "relay_producer_takeovers_total",
            "Conversations this producer took over from a producer that died or stalled.",
            registry=r)
        self.takeover_silence = Histogram(
            "relay_producer_takeover_silence_seconds",
            "At a takeover: time since the conversation's last stream entry (how long its clients "
            "heard nothing new).", buckets=_SILENCE_BUCKETS, registry=r)
        self.jobs_read_errors = Counter(
            "relay_producer_jobs_read_errors_total",
            "Failed reads of the job queue (Redis unreachable or failing).", registry=r)
        self.active_turns = Gauge("relay_producer_active_turns",
                                  "Turns this producer is speaking now.", registry=r)
        self.conversations = Gauge(
            "relay_producer_conversations_running",
            "Conversations this producer's worker runs now (at most RELAY_PRODUCER_CONCURRENCY).",
            registry=r)
        self.concurrency = Gauge("relay_producer_concurrency",
                                 "RELAY_PRODUCER_CONCURRENCY of this producer.", registry=r)
        self.sessions_open = Gauge("relay_producer_sdk_sessions_open",
                                   "Motion Server sessions this producer holds open now.",
                                   registry=r)
        self.slots_cap = Gauge("relay_producer_sdk_session_slots_cap",
                               "RELAY_MAX_SDK_SESSIONS: the session cap shared by all producers.",
                               registry=r)
        self.slots_used = Gauge(
            "relay_producer_sdk_session_slots_used",
            "Session slots held across all producers (read from Redis at scrape).", registry=r)
        self.slot_waiters = Gauge(
            "relay_producer_turns_waiting_for_session",
            "Turns on any producer waiting for a session slot now (read from Redis at scrape).",
            registry=r)
        self.doorbells_waiting = Gauge(
            "relay_producer_doorbells_waiting",
            "Conversations with queued turns that no worker has read yet (the consumer group's "
            "lag: queue depth in conversations).", registry=r)
        self.doorbells_pending = Gauge(
            "relay_producer_doorbells_pending",
            "Conversations a worker has read and runs or will retry (pending in the group).",
            registry=r)
        self.dead_letters = Gauge("relay_producer_dead_letters",
                                  "Dead letters kept (awaiting `relay jobs`).", registry=r)
        self.sample_errors = Counter(
            "relay_producer_metrics_sample_errors_total",
            "Scrapes whose Redis figures could not be read (those gauges kept their last value).",
            registry=r)
        self._sampler: Sampler | None = None
        self._turn_children = {o: self.turns.labels(o) for o in TURN_OUTCOMES}
        # Every known label value exists from the start (at 0), so queries see 0, not nothing.
        for outcome in TURN_OUTCOMES[:4]:
            self.turn_duration.labels(outcome)
        for reason in AUDIO_ONLY_REASONS:
            self.audio_only.labels(reason)
        for kind in MOTION_ERROR_KINDS:
            self.motion_errors.labels(kind)
        for reason in DEAD_LETTER_REASONS:
            self.dead_lettered.labels(reason)

    # --- set-up ----------------------------------------------------------------------------------

    def bind_producer(self, *, active_turns: Callable[[], int], sessions_open: Callable[[], int],
                      cap: int) -> None:
        self.active_turns.set_function(active_turns)
        self.sessions_open.set_function(sessions_open)
        self.slots_cap.set(cap)

    def bind_worker(self, *, conversations: Callable[[], int], concurrency: int,
                    sampler: Sampler) -> None:
        self.conversations.set_function(conversations)
        self.concurrency.set(concurrency)
        self._sampler = sampler

    async def sample(self) -> None:
        """Refresh the Redis-wide gauges (called by the /metrics handler)."""
        if self._sampler is None:
            return
        try:
            figures = await asyncio.wait_for(self._sampler(), _SAMPLE_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError):
            self.sample_errors.inc()
            return
        for name, figure in figures.items():
            gauge: Any = getattr(self, name)
            gauge.set(figure)

    # --- events ----------------------------------------------------------------------------------

    def turn_finished(self, status: str, reason: str | None, duration_s: float) -> None:
        outcome = status if status in TURN_OUTCOMES else "interrupted"
        self._turn_children[outcome].inc()
        self.turn_duration.labels(outcome).observe(duration_s)
        if outcome == "audio_only":
            self.audio_only.labels(_bounded(reason or "other", AUDIO_ONLY_REASONS)).inc()

    def motion_started(self, waited_s: float) -> None:
        self.motion_start.observe(waited_s)

    def attempt_failed(self) -> None:
        self._turn_children["failed"].inc()

    def turn_dead_lettered(self, reason: str) -> None:
        self._turn_children["dead_lettered"].inc()
        self.dead_lettered.labels(_bounded(reason, DEAD_LETTER_REASONS)).inc()

    def motion_error(self, kind: str) -> None:
        self.motion_errors.labels(kind if kind in MOTION_ERROR_KINDS else "session_error").inc()

    def taken_over(self, silence_s: float | None) -> None:
        self.takeovers.inc()
        if silence_s is not None:
            self.takeover_silence.observe(max(0.0, silence_s))
