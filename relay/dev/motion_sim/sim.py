"""Simulator-wide state: configuration, counters, session tokens, concurrency caps, fault rules."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog
from aiohttp import WSCloseCode, web

from relay.dev.motion_sim.faults import ArmedFault, FaultKind, FaultRule

log = structlog.get_logger(__name__)

FIRST_BATCHES_KEPT = 10_000  # requests whose first-batch time ``/_sim/first-batches`` serves


@dataclass(frozen=True)
class SimConfig:
    api_key: str = field(default="", repr=False)  # empty: any non-empty key is accepted
    known_avatars: frozenset[str] = frozenset()  # empty: every avatar id exists
    max_concurrent_sessions: int = 8  # per app id; 0 = unlimited
    max_session_s: float = 0.0  # 0 = unlimited
    idle_timeout_s: float = 60.0  # without audio input; 0 = never
    batch_keyframes: int = 5  # keyframes per animation message (200 ms of audio)
    first_batch_delay_ms: int = 0  # extra latency before each request's first message
    realtime: bool = False  # pace messages at 25 keyframes/s from the request's first audio
    # A slow Motion Server: the ClientConfigureSession is answered only after this long.
    handshake_delay_ms: int = 0

    def __post_init__(self) -> None:
        if self.batch_keyframes < 1:
            raise ValueError("batch_keyframes must be at least 1")
        for name in ("max_concurrent_sessions", "max_session_s", "idle_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("first_batch_delay_ms", "handshake_delay_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass
class SimStats:
    tokens_issued: int = 0
    # Upgrades with a token an earlier upgrade already used: accepted (like the SDK's own token
    # cache assumes), but the Spatius docs call tokens single-use, so the relay must keep this 0.
    token_reuses: int = 0
    sessions_opened: int = 0
    sessions_open: int = 0
    sessions_peak: int = 0
    audio_bytes: int = 0
    keyframes_sent: int = 0
    messages_sent: int = 0
    requests_ended: int = 0
    interrupts: int = 0
    faults_fired: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class MotionSim:
    """State shared by all connections: tokens, per-app session counts, fault rules, counters."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = SimStats()
        self._faults: list[ArmedFault] = []
        self._tokens: dict[str, float] = {}  # token -> expiry (unix seconds)
        self._used: set[str] = set()  # tokens an upgrade was accepted with (bounded like _tokens)
        self._open_per_app: Counter[str] = Counter()
        self._sockets: set[web.WebSocketResponse] = set()
        # req_id -> seconds from the request's first audio to its first animation message sent,
        # the simulator's own first-batch time as it really ran (the latency bench subtracts it).
        # Bounded: the oldest are forgotten.
        self._first_batches: OrderedDict[str, float] = OrderedDict()

    # What the simulator took to answer.

    def first_batch_sent(self, req_id: str, seconds: float) -> None:
        self._first_batches[req_id] = seconds
        while len(self._first_batches) > FIRST_BATCHES_KEPT:
            self._first_batches.popitem(last=False)

    def first_batches(self) -> dict[str, float]:
        """req_id -> ms from its first audio to its first animation message, the latest
        ``FIRST_BATCHES_KEPT`` requests."""
        return {req_id: round(seconds * 1000, 3) for req_id, seconds in self._first_batches.items()}

    # Fault rules.

    def add_fault(self, rule: FaultRule) -> None:
        self._faults.append(ArmedFault(rule, rule.times))

    def clear_faults(self) -> None:
        self._faults.clear()

    def faults(self) -> list[dict[str, Any]]:
        """Armed rules, with ``times`` showing how many firings are left."""
        return [{**armed.rule.to_json(), "times": armed.remaining} for armed in self._faults]

    def take_fault(
        self, kinds: frozenset[FaultKind], avatar_id: str | None, keyframes: int = 0
    ) -> FaultRule | None:
        """Consume one firing of the first matching rule, if any."""
        for armed in self._faults:
            if armed.matches(kinds, avatar_id, keyframes):
                if armed.remaining > 0:
                    armed.remaining -= 1
                    if armed.remaining == 0:
                        self._faults.remove(armed)
                self.stats.faults_fired += 1
                log.info("fault fired", kind=str(armed.rule.kind), avatar_id=avatar_id)
                return armed.rule
        return None

    # Console credentials.

    def api_key_ok(self, api_key: str) -> bool:
        if not self.config.api_key:
            return bool(api_key)
        return hmac.compare_digest(api_key.encode(), self.config.api_key.encode())

    def issue_token(self, expire_at: float) -> str:
        now = time.time()
        # Dropping expired tokens on issue bounds the store by the issue rate times 24 h.
        self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
        self._used &= self._tokens.keys()
        token = secrets.token_urlsafe(32)
        self._tokens[token] = expire_at
        self.stats.tokens_issued += 1
        return token

    def token_ok(self, token: str) -> bool:
        expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.time()

    def token_used(self, token: str) -> None:
        """An upgrade was accepted with ``token``; counts reuses."""
        self.stats.token_reuses += token in self._used
        self._used.add(token)

    # Sessions.

    def try_open_session(self, app_id: str) -> bool:
        cap = self.config.max_concurrent_sessions
        if cap and self._open_per_app[app_id] >= cap:
            return False
        self._open_per_app[app_id] += 1
        stats = self.stats
        stats.sessions_opened += 1
        stats.sessions_open += 1
        stats.sessions_peak = max(stats.sessions_peak, stats.sessions_open)
        return True

    def release_session(self, app_id: str) -> None:
        self._open_per_app[app_id] -= 1
        if self._open_per_app[app_id] <= 0:
            del self._open_per_app[app_id]
        self.stats.sessions_open -= 1

    def track(self, ws: web.WebSocketResponse) -> None:
        self._sockets.add(ws)

    def untrack(self, ws: web.WebSocketResponse) -> None:
        self._sockets.discard(ws)

    async def close_all(self) -> None:
        """Close every socket with 1001 so clients see a clean close on shutdown."""
        sockets = list(self._sockets)
        await asyncio.gather(
            *(
                ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
                for ws in sockets
            ),
            return_exceptions=True,
        )


SIM_KEY: web.AppKey[MotionSim] = web.AppKey("motion_sim", MotionSim)
