"""A protocol-faithful local stand-in for the Spatius Motion Server, for the unmodified SDK.

Point the SDK at it with explicit endpoints (which skips region bootstrap):
``console_endpoint_url=http://HOST:PORT/v1/console`` and
``ingress_endpoint_url=ws://HOST:PORT/v2/driveningress``.

Endpoints
  ``POST /v1/console/session-tokens``   header ``X-Api-Key``, body ``{"expireAt": <unix s>}``;
      200 ``{"sessionToken": ...}``, or 400/401 with the ``{"errors": [...]}`` envelope.
  ``GET /v2/driveningress/websocket?id=<avatar_id>``   auth by headers ``X-App-ID`` and
      ``X-Session-Key`` or by query ``appId`` and ``sessionKey``; binary protobuf after the upgrade.
  ``POST /_sim/faults`` (one rule object or a list), ``GET /_sim/faults``, ``DELETE /_sim/faults``,
      ``GET /_sim/stats``: the unauthenticated test control API, so bind to localhost.

Fault rules (``FaultRule``; JSON keys as the field names) fire in the order they were added.
Common keys: ``times`` (fires this many times, default 1, -1 = forever), ``avatar_id``
(only sessions for that avatar), ``after_keyframes`` (runtime kinds only: fire at the first
animation boundary once the session has sent this many keyframes, default 0 = before the first).
  ``token_error``       the token POST answers ``status`` (default 500) with an errors envelope
                        whose detail is ``message``. Cannot be filtered by avatar.
  ``reject_upgrade``    the WebSocket upgrade is refused with HTTP ``status`` (default 400) and
                        body ``{"message": message}`` (default "Invalid session token").
  ``handshake_silence`` the ClientConfigureSession is never answered (the SDK times out).
  ``server_error``      a ServerError{``code`` (default 13), ``message`` (default "driven server
                        request failed")} for the request being streamed, which then stops.
  ``drop``              the TCP connection is aborted without a close frame.
  ``close``             the session closes with ``code`` (default 4503) and reason ``message``.
  ``stall``             the session sends no more animation but stays open.

Deliberate simplifications: PCM only (Ogg Opus is refused), session tokens are reusable until they
expire (the SDK's prewarm cache relies on that), and a request id that ended, failed or was
interrupted is never reopened (its late audio is ignored).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import string
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from http import HTTPStatus
from operator import itemgetter
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf.message import DecodeError

from relay.motion_sim import proto
from relay.motion_sim.animation import FPS, Keyframe, KeyframeGenerator, encode_animation

log = structlog.get_logger(__name__)

SAMPLE_RATES = frozenset({8000, 16000, 22050, 24000, 32000, 44100, 48000})
MAX_TOKEN_TTL_S = 24 * 3600
HANDSHAKE_TIMEOUT_S = 10.0  # the SDK gives up after the same time
OUTBOUND_QUEUE_SIZE = 32  # messages per connection waiting for the socket
MAX_ACTIVE_REQUESTS = 16  # concurrently streaming req_ids per connection
MAX_PENDING_KEYFRAMES = 60 * FPS  # audio a request may run ahead of its (paced) animation
RETIRED_REQUEST_IDS = 256  # finished req_ids remembered per connection to ignore late audio
MAX_CLOSE_REASON_BYTES = 123  # RFC 6455 limit for a close frame's reason

# gRPC-style status codes the production server relays in ServerError.code.
_INVALID_ARGUMENT = 3
_RESOURCE_EXHAUSTED = 8
_INTERNAL = 13
# No code at all: the SDK then classifies by message text. Code 3 would win over the text and
# turn "unsupported sample rate" into invalidRequest instead of unsupportedSampleRate.
_TEXT_ONLY = 0

_ID_ALPHABET = string.ascii_letters + string.digits + "_-"


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

    def __post_init__(self) -> None:
        if self.batch_keyframes < 1:
            raise ValueError("batch_keyframes must be at least 1")
        for name in ("max_concurrent_sessions", "max_session_s", "idle_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.first_batch_delay_ms < 0:
            raise ValueError("first_batch_delay_ms must not be negative")


class FaultKind(StrEnum):
    TOKEN_ERROR = "token_error"
    REJECT_UPGRADE = "reject_upgrade"
    HANDSHAKE_SILENCE = "handshake_silence"
    SERVER_ERROR = "server_error"
    DROP = "drop"
    CLOSE = "close"
    STALL = "stall"


_RUNTIME_FAULTS = frozenset(
    {FaultKind.SERVER_ERROR, FaultKind.DROP, FaultKind.CLOSE, FaultKind.STALL}
)


@dataclass(frozen=True)
class FaultRule:
    kind: FaultKind
    avatar_id: str | None = None
    after_keyframes: int = 0
    times: int = 1
    code: int | None = None
    message: str | None = None
    status: int | None = None

    def __post_init__(self) -> None:
        if self.times == 0 or self.times < -1:
            raise ValueError("times must be positive or -1 (forever)")
        if self.after_keyframes < 0:
            raise ValueError("after_keyframes must not be negative")
        if self.after_keyframes and self.kind not in _RUNTIME_FAULTS:
            raise ValueError("after_keyframes only applies to runtime faults")
        if self.kind is FaultKind.TOKEN_ERROR and self.avatar_id is not None:
            raise ValueError("token_error cannot be filtered by avatar_id")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError("status must be an HTTP error status")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaultRule:
        """Build a rule from decoded JSON; raises ValueError on unknown keys or bad values."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        kind = data.get("kind")
        if not isinstance(kind, str):
            raise ValueError("kind must be a string")
        kwargs = {**data, "kind": FaultKind(kind)}
        for key in ("after_keyframes", "times", "code", "status"):
            if key in kwargs and kwargs[key] is not None and not _is_int(kwargs[key]):
                raise ValueError(f"{key} must be an integer")
        for key in ("avatar_id", "message"):
            if key in kwargs and kwargs[key] is not None and not isinstance(kwargs[key], str):
                raise ValueError(f"{key} must be a string")
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class _ArmedFault:
    rule: FaultRule
    remaining: int  # -1 = forever

    def matches(self, kinds: frozenset[FaultKind], avatar_id: str | None, keyframes: int) -> bool:
        rule = self.rule
        return (
            rule.kind in kinds
            and rule.avatar_id in (None, avatar_id)
            and keyframes >= rule.after_keyframes
        )


@dataclass
class SimStats:
    tokens_issued: int = 0
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
        self._faults: list[_ArmedFault] = []
        self._tokens: dict[str, float] = {}  # token -> expiry (unix seconds)
        self._open_per_app: Counter[str] = Counter()
        self._sockets: set[web.WebSocketResponse] = set()

    # Fault rules.

    def add_fault(self, rule: FaultRule) -> None:
        self._faults.append(_ArmedFault(rule, rule.times))

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
        token = secrets.token_urlsafe(32)
        self._tokens[token] = expire_at
        self.stats.tokens_issued += 1
        return token

    def token_ok(self, token: str) -> bool:
        expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.time()

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


# Helpers shared by the handlers.


def new_id() -> str:
    """An id shaped like the production ones: ``YYYYMMDDHHMMSS_<12 random chars>`` (UTC)."""
    suffix = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    return f"{datetime.now(UTC):%Y%m%d%H%M%S}_{suffix}"


def _errors_response(
    status: int, detail: str, *, code: str | None = None, title: str | None = None
) -> web.Response:
    phrase = HTTPStatus(status)
    error = {
        "id": secrets.token_hex(8),
        "status": str(status),
        "code": code or phrase.name.lower(),
        "title": title or phrase.phrase,
        "detail": detail,
    }
    return web.json_response({"errors": [error]}, status=status)


def _message_response(status: int, message: str) -> web.Response:
    # Same shape as the production upgrade rejections, trailing newline included.
    body = json.dumps({"message": message}, separators=(",", ":")) + "\n"
    return web.Response(status=status, text=body, content_type="application/json")


def _server_error(code: int, message: str, connection_id: str = "", req_id: str = "") -> bytes:
    envelope = proto.Message(type=proto.MessageType.SERVER_ERROR)
    envelope.server_error.connection_id = connection_id
    envelope.server_error.req_id = req_id
    envelope.server_error.code = code
    envelope.server_error.message = message
    payload: bytes = envelope.SerializeToString()
    return payload


def _server_confirm(connection_id: str) -> bytes:
    envelope = proto.Message(type=proto.MessageType.SERVER_CONFIRM_SESSION)
    envelope.server_confirm_session.connection_id = connection_id
    payload: bytes = envelope.SerializeToString()
    return payload


def _close_reason(text: str) -> bytes:
    return text.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore").encode()


async def _cancel(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel and await tasks; asyncio.wait never swallows a cancellation of the caller."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


# Console API.


async def _read_expire_at(request: web.Request) -> int | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    value = body.get("expireAt") if isinstance(body, dict) else None
    return value if _is_int(value) else None


async def handle_session_token(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    fault = sim.take_fault(frozenset({FaultKind.TOKEN_ERROR}), None)
    if fault is not None:
        return _errors_response(fault.status or 500, fault.message or "injected fault")
    if not sim.api_key_ok(request.headers.get("X-Api-Key", "")):
        # Not "Unauthorized": the SDK reads that word as a LiveKit credential problem
        # (invalidEgressConfig) before it looks at the 401 status.
        return _errors_response(
            401, "invalid API key", code="invalid_api_key", title="Authentication failed"
        )
    expire_at = await _read_expire_at(request)
    now = time.time()
    if expire_at is None:
        return _errors_response(400, "expireAt must be an integer unix timestamp")
    if not now < expire_at <= now + MAX_TOKEN_TTL_S:
        return _errors_response(400, "expireAt must be in the future and at most 24h ahead")
    token = sim.issue_token(float(expire_at))
    log.info("session token issued", expires_in_s=int(expire_at - now))
    return web.json_response({"sessionToken": token})


# Ingress WebSocket.


def _credentials(request: web.Request) -> tuple[str, str]:
    headers, query = request.headers, request.query
    if "X-Session-Key" in headers:
        return headers.get("X-App-ID", ""), headers["X-Session-Key"]
    return query.get("appId", ""), query.get("sessionKey", "")


def _check_upgrade(sim: MotionSim, request: web.Request) -> web.Response | None:
    """The HTTP answer that refuses the upgrade, or None to accept it."""
    avatar_id = request.query.get("id", "")
    fault = sim.take_fault(frozenset({FaultKind.REJECT_UPGRADE}), avatar_id)
    if fault is not None:
        return _message_response(fault.status or 400, fault.message or "Invalid session token")
    app_id, token = _credentials(request)
    if not app_id or not sim.token_ok(token):
        return _message_response(400, "Invalid session token")
    known = sim.config.known_avatars
    if not avatar_id or (known and avatar_id not in known):
        return _message_response(404, "Avatar not found")
    return None


async def handle_ingress(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    rejection = _check_upgrade(sim, request)
    if rejection is not None:
        return rejection
    # No permessage-deflate: payloads stay byte-identical and sends never await a compressor.
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    app_id, _ = _credentials(request)
    sim.track(ws)
    try:
        await _Connection(sim, ws, request, app_id, request.query["id"]).run()
    finally:
        sim.untrack(ws)
    return ws


@dataclass(frozen=True)
class _Ending:
    """How a connection ends: an optional last ServerError, then a close frame or a TCP abort."""

    close_code: int = WSCloseCode.OK
    reason: str = ""
    error: bytes | None = None
    abort: bool = False


_CLIENT_GONE = _Ending()


@dataclass(frozen=True)
class _Outbound:
    payload: bytes
    req_id: str | None = None  # set for animation messages only
    keyframes: int = 0
    end: bool = False


class _Request:
    """One req_id: keyframes made from its audio that were not yet handed to the writer."""

    def __init__(self, req_id: str, sample_rate: int, started_at: float) -> None:
        self.req_id = req_id
        self.started_at = started_at
        self.pending: deque[Keyframe] = deque()
        self.ended = False
        self.taken = 0
        self.changed = asyncio.Event()
        self.emitter: asyncio.Task[None] | None = None
        self._generator = KeyframeGenerator(sample_rate)

    def feed(self, audio: bytes, end: bool) -> None:
        self.pending.extend(self._generator.feed(audio))
        if end:
            self.pending.extend(self._generator.finish())
            self.ended = True
        self.changed.set()

    def ready(self, batch: int) -> bool:
        # Until the request ends the newest keyframe is held back, so the end=true message
        # always carries at least one keyframe when the request had audio.
        return self.ended or len(self.pending) > batch

    def take(self, batch: int) -> tuple[list[Keyframe], bool]:
        final = self.ended and len(self.pending) <= batch
        count = len(self.pending) if final else batch
        keyframes = [self.pending.popleft() for _ in range(count)]
        self.taken += count
        return keyframes, final


class _Connection:
    """One ingress WebSocket: handshake, then a reader, a writer and one emitter per request.

    The reader never waits on output, so interrupts are seen while requests are being paced.
    Emitters hand finished messages to the writer through a bounded queue, and the writer is the
    only task that sends. The first component to decide the connection's fate resolves
    ``_ending``; ``run`` then cancels every task and performs that ending.
    """

    def __init__(
        self,
        sim: MotionSim,
        ws: web.WebSocketResponse,
        request: web.Request,
        app_id: str,
        avatar_id: str,
    ) -> None:
        self._sim = sim
        self._config = sim.config
        self._ws = ws
        self._transport = request.transport
        self._app_id = app_id
        self._avatar_id = avatar_id
        self._connection_id = new_id()
        self._log = log.bind(connection_id=self._connection_id, app_id=app_id, avatar_id=avatar_id)
        self._loop = asyncio.get_running_loop()
        self._ending: asyncio.Future[_Ending] = self._loop.create_future()
        self._outbound: asyncio.Queue[_Outbound] = asyncio.Queue(OUTBOUND_QUEUE_SIZE)
        self._requests: dict[str, _Request] = {}
        self._retired: OrderedDict[str, None] = OrderedDict()
        self._sample_rate = 0
        self._started_at = 0.0
        self._last_audio_at = 0.0
        self._keyframes_sent = 0
        self._stalled = False
        self._opened = False

    async def run(self) -> None:
        try:
            ending = await self._handshake()
            if ending is None:
                self._log.info("session opened", sample_rate=self._sample_rate)
                ending = await self._serve()
            await self._finish(ending)
        except ConnectionError:
            self._log.info("client went away")
        finally:
            if self._opened:  # holds a concurrency slot
                self._sim.release_session(self._app_id)
                self._log.info("session closed", keyframes_sent=self._keyframes_sent)

    # Handshake.

    async def _handshake(self) -> _Ending | None:
        """Answer the ClientConfigureSession; None once the session is confirmed."""
        configure = await self._receive_configure()
        if configure is None:
            return self._reject(_TEXT_ONLY, "expected ClientConfigureSession message")
        if self._sim.take_fault(frozenset({FaultKind.HANDSHAKE_SILENCE}), self._avatar_id):
            return await self._ignore_until_closed()
        if configure.audio_format != proto.AudioFormat.PCM_S16LE:
            return self._reject(_INVALID_ARGUMENT, "unsupported audio format: only PCM_S16LE")
        if configure.sample_rate not in SAMPLE_RATES:
            return self._reject(_TEXT_ONLY, f"unsupported sample rate: {configure.sample_rate}")
        if not self._sim.try_open_session(self._app_id):
            code = proto.CloseCode.CONCURRENCY_LIMIT
            return self._reject(code, "concurrency limit exceeded", close_code=code)
        self._opened = True
        self._sample_rate = configure.sample_rate
        self._started_at = self._last_audio_at = self._loop.time()
        await self._send(_server_confirm(self._connection_id))
        return None

    async def _receive_configure(self) -> Any:
        try:
            msg = await self._ws.receive(timeout=HANDSHAKE_TIMEOUT_S)
        except TimeoutError:
            return None
        if msg.type is not WSMsgType.BINARY:
            return None
        envelope = proto.Message()
        try:
            envelope.ParseFromString(msg.data)
        except DecodeError:
            return None
        if envelope.type != proto.MessageType.CLIENT_CONFIGURE_SESSION:
            return None
        return envelope.client_configure_session

    async def _ignore_until_closed(self) -> _Ending:
        # Bounded so a client that never gives up cannot pin the handler forever.
        limit = self._config.idle_timeout_s or HANDSHAKE_TIMEOUT_S
        with suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while not self._ws.closed:
                    msg = await self._ws.receive()
                    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                        break
        return _CLIENT_GONE

    def _reject(
        self, code: int, message: str, *, close_code: int = WSCloseCode.POLICY_VIOLATION
    ) -> _Ending:
        self._log.info("session rejected", reason=message)
        error = _server_error(code, message, self._connection_id)
        return _Ending(close_code=close_code, reason=message, error=error)

    # Running session.

    async def _serve(self) -> _Ending:
        reader = asyncio.create_task(self._read_loop(), name=f"sim-read-{self._connection_id}")
        writer = asyncio.create_task(self._write_loop(), name=f"sim-write-{self._connection_id}")
        waiters: list[asyncio.Future[Any]] = [self._ending, reader, writer]
        try:
            # Both loops decide the ending before they return, unless they crash.
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for task in (reader, writer):
                if task.done() and task.exception() is not None:
                    self._log.error("connection task failed", exc_info=task.exception())
                    self._end(_Ending(WSCloseCode.INTERNAL_ERROR, "internal error"))
            return self._ending.result()
        finally:
            emitters = [r.emitter for r in self._requests.values() if r.emitter is not None]
            await _cancel([reader, writer, *emitters])

    def _end(self, ending: _Ending) -> None:
        if not self._ending.done():
            self._ending.set_result(ending)

    async def _finish(self, ending: _Ending) -> None:
        if ending.abort:
            if self._transport is not None:
                self._transport.abort()
            return
        if ending.error is not None:
            with suppress(ConnectionError):
                await self._send(ending.error)
        await self._ws.close(code=ending.close_code, message=_close_reason(ending.reason))

    async def _send(self, payload: bytes) -> None:
        await self._ws.send_bytes(payload)
        self._sim.stats.messages_sent += 1

    # Reader.

    async def _read_loop(self) -> None:
        while True:
            deadline = self._next_deadline()
            timeout = None
            if deadline is not None:
                due, on_expiry = deadline
                timeout = due - self._loop.time()
                if timeout <= 0:
                    self._end(on_expiry())
                    return
            try:
                msg = await self._ws.receive(timeout=timeout)
            except TimeoutError:
                continue  # the deadline check above decides what expired
            if msg.type is WSMsgType.BINARY:
                await self._on_message(msg.data)
            elif msg.type is WSMsgType.TEXT:
                self._log.warning("text frame ignored")
            else:
                self._end(_CLIENT_GONE)
                return

    def _next_deadline(self) -> tuple[float, Callable[[], _Ending]] | None:
        config = self._config
        deadlines: list[tuple[float, Callable[[], _Ending]]] = []
        if config.idle_timeout_s:
            deadlines.append((self._last_audio_at + config.idle_timeout_s, self._idle_ending))
        if config.max_session_s:
            deadlines.append((self._started_at + config.max_session_s, self._duration_ending))
        return min(deadlines, key=itemgetter(0), default=None)

    def _idle_ending(self) -> _Ending:
        message = f"no audio input for {self._config.idle_timeout_s:g}s"
        error = _server_error(_TEXT_ONLY, message, self._connection_id)
        return _Ending(WSCloseCode.OK, "idle timeout", error)

    def _duration_ending(self) -> _Ending:
        code = proto.CloseCode.SESSION_TIMEOUT
        message = "maximum session duration reached"
        return _Ending(code, message, _server_error(code, message, self._connection_id))

    async def _on_message(self, data: bytes) -> None:
        envelope = proto.Message()
        try:
            envelope.ParseFromString(data)
        except DecodeError:
            self._queue_error(_INVALID_ARGUMENT, "failed to unmarshal message")
            return
        if envelope.type == proto.MessageType.CLIENT_AUDIO_INPUT:
            await self._on_audio(envelope.client_audio_input)
        elif envelope.type == proto.MessageType.CLIENT_INTERRUPT:
            self._sim.stats.interrupts += 1
            await self._drop_request(envelope.client_interrupt.req_id)
        else:
            # Older production servers ignore what they do not know (e.g. pause/resume).
            self._log.debug("message ignored", type=envelope.type)

    async def _on_audio(self, audio_input: Any) -> None:
        self._last_audio_at = self._loop.time()
        self._sim.stats.audio_bytes += len(audio_input.audio)
        req_id: str = audio_input.req_id
        if req_id in self._retired:
            return
        request = self._requests.get(req_id) or self._open_request(req_id)
        if request is None or request.ended:  # ended: its end message is still queued
            return
        request.feed(audio_input.audio, audio_input.end)
        if len(request.pending) > MAX_PENDING_KEYFRAMES:
            self._queue_error(_RESOURCE_EXHAUSTED, "audio input too far ahead", req_id)
            await self._drop_request(req_id)

    def _open_request(self, req_id: str) -> _Request | None:
        if len(self._requests) >= MAX_ACTIVE_REQUESTS:
            self._queue_error(_RESOURCE_EXHAUSTED, "too many concurrent requests", req_id)
            self._retire(req_id)
            return None
        request = _Request(req_id, self._sample_rate, self._loop.time())
        request.emitter = asyncio.create_task(self._emit(request), name=f"sim-emit-{req_id}")
        request.emitter.add_done_callback(self._on_emitter_done)
        self._requests[req_id] = request
        return request

    def _on_emitter_done(self, task: asyncio.Task[None]) -> None:
        # Emitters are cancelled, never awaited for a result, so a crash is surfaced here.
        if not task.cancelled() and task.exception() is not None:
            self._log.error("emitter failed", exc_info=task.exception())
            self._end(_Ending(WSCloseCode.INTERNAL_ERROR, "internal error"))

    def _retire(self, req_id: str) -> None:
        self._retired[req_id] = None
        if len(self._retired) > RETIRED_REQUEST_IDS:
            self._retired.popitem(last=False)

    async def _drop_request(self, req_id: str) -> None:
        """Forget a request: nothing more is sent for it, not even end."""
        self._retire(req_id)
        request = self._requests.pop(req_id, None)
        if request is not None and request.emitter is not None:
            await _cancel([request.emitter])

    def _queue_error(self, code: int, message: str, req_id: str = "") -> None:
        item = _Outbound(_server_error(code, message, self._connection_id, req_id))
        try:
            self._outbound.put_nowait(item)
        except asyncio.QueueFull:
            # The client stopped reading; the reader must not block on it.
            self._end(_Ending(WSCloseCode.TRY_AGAIN_LATER, "client not reading"))

    # Emitters.

    async def _emit(self, request: _Request) -> None:
        batch = self._config.batch_keyframes
        first = True
        while True:
            while not request.ready(batch):
                request.changed.clear()
                await request.changed.wait()
            if first and self._config.first_batch_delay_ms:
                await self._sleep_until(
                    request.started_at + self._config.first_batch_delay_ms / 1000
                )
            first = False
            keyframes, final = request.take(batch)
            if self._config.realtime:
                await self._sleep_until(request.started_at + request.taken / FPS)
            payload = encode_animation(
                self._connection_id, request.req_id, end=final, keyframes=keyframes
            )
            await self._outbound.put(_Outbound(payload, request.req_id, len(keyframes), final))
            if final:
                return

    async def _sleep_until(self, when: float) -> None:
        delay = when - self._loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    # Writer.

    async def _write_loop(self) -> None:
        try:
            while True:
                item = await self._outbound.get()
                if item.req_id is None:
                    await self._send(item.payload)
                    continue
                if not self._sendable(item.req_id):
                    continue
                if await self._inject_fault(item.req_id):
                    return
                if not self._sendable(item.req_id):  # the fault stalled or failed it
                    continue
                await self._send(item.payload)
                self._count_sent(item)
                if await self._inject_fault(item.req_id):
                    return
        except ConnectionError:
            self._end(_CLIENT_GONE)

    def _sendable(self, req_id: str) -> bool:
        # Interrupted and failed requests were removed; their queued messages are dropped.
        return not self._stalled and req_id in self._requests

    def _count_sent(self, item: _Outbound) -> None:
        self._keyframes_sent += item.keyframes
        stats = self._sim.stats
        stats.keyframes_sent += item.keyframes
        if item.end and item.req_id is not None:
            stats.requests_ended += 1
            self._requests.pop(item.req_id, None)
            self._retire(item.req_id)

    async def _inject_fault(self, req_id: str) -> bool:
        """Fire one due runtime fault; True when it ends the connection."""
        rule = self._sim.take_fault(_RUNTIME_FAULTS, self._avatar_id, self._keyframes_sent)
        if rule is None:
            return False
        if rule.kind is FaultKind.STALL:
            self._stalled = True
        elif rule.kind is FaultKind.SERVER_ERROR:
            message = rule.message or "driven server request failed"
            code = _INTERNAL if rule.code is None else rule.code
            await self._send(_server_error(code, message, self._connection_id, req_id))
            await self._drop_request(req_id)
        elif rule.kind is FaultKind.DROP:
            self._end(_Ending(abort=True))
            return True
        elif rule.kind is FaultKind.CLOSE:
            code = proto.CloseCode.UPSTREAM_UNAVAILABLE if rule.code is None else rule.code
            self._end(_Ending(code, rule.message or "upstream unavailable"))
            return True
        return False


# Control API.


def _parse_rules(body: object) -> list[FaultRule]:
    rules = []
    for item in body if isinstance(body, list) else [body]:
        if not isinstance(item, dict):
            raise ValueError("a fault rule must be a JSON object")
        rules.append(FaultRule.from_json(item))
    return rules


async def handle_add_faults(request: web.Request) -> web.Response:
    """Arm one rule (a JSON object) or several (a list); all or nothing."""
    sim = request.app[SIM_KEY]
    try:
        rules = _parse_rules(await request.json())
    except ValueError as error:
        return web.json_response({"error": str(error)}, status=400)
    for rule in rules:
        sim.add_fault(rule)
    return web.json_response({"faults": sim.faults()}, status=201)


async def handle_list_faults(request: web.Request) -> web.Response:
    return web.json_response({"faults": request.app[SIM_KEY].faults()})


async def handle_clear_faults(request: web.Request) -> web.Response:
    request.app[SIM_KEY].clear_faults()
    return web.json_response({"faults": []})


async def handle_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM_KEY].stats.as_dict())


# Application.


def create_app(config: SimConfig) -> web.Application:
    app = web.Application()
    app[SIM_KEY] = MotionSim(config)
    app.router.add_post("/v1/console/session-tokens", handle_session_token)
    app.router.add_get("/v2/driveningress/websocket", handle_ingress)
    app.router.add_post("/_sim/faults", handle_add_faults)
    app.router.add_get("/_sim/faults", handle_list_faults)
    app.router.add_delete("/_sim/faults", handle_clear_faults)
    app.router.add_get("/_sim/stats", handle_stats)
    app.on_shutdown.append(_close_sockets)
    return app


async def _close_sockets(app: web.Application) -> None:
    await app[SIM_KEY].close_all()


async def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> web.AppRunner:
    """Start the simulator; port 0 binds a free port (see ``bound_port``). Call ``cleanup()``."""
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port a runner from ``serve`` listens on."""
    port: int = runner.addresses[0][1]
    return port


async def run_forever(config: SimConfig, host: str, port: int) -> None:
    """Serve until cancelled, then shut down cleanly."""
    runner = await serve(config, host, port)
    log.info("motion server simulator listening", host=host, port=bound_port(runner))
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
