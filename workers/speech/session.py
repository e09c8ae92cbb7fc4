"""One Spatius SDK session per conversation, kept across turns.

``MotionSession`` wraps one ``spatius.AvatarSession``. The SDK hands every animation envelope of
every request to one ``transport_frames`` callback, so the wrapper reads each envelope's ``req_id``
(with the SDK's own ``message_pb2``) and gives it only to the turn that owns that request.
Envelopes of an interrupted or earlier request are dropped: a turn must never show motion made for
another turn's audio.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Protocol

import spatius
import structlog
from spatius.proto.generated import message_pb2

from relay.errors import RelayError
from workers.metrics import ProducerMetrics
from workers.speech.endpoints import MotionEndpoints
from workers.speech.tokens import TokenStock, init_with

log = structlog.get_logger(__name__)

# The session token only authenticates the WebSocket upgrade, but the server ends a session when
# its token expires (close code 4010), so long-lived sessions are recycled well before that.
SESSION_TOKEN_TTL = timedelta(hours=1)
SESSION_MAX_AGE_S = SESSION_TOKEN_TTL.total_seconds() - 300.0
CLOSE_TIMEOUT_S = 5.0
INTERRUPT_TIMEOUT_S = 2.0
_RETIRED_REQUESTS = 64  # req_ids remembered per session so their late envelopes are dropped

# Fallback reasons (the ``reason`` of the audio_only entry) that come from the Motion Server side.
REASON_CAPACITY = "capacity"
REASON_MOTION_ERROR = "motion_error"
REASON_MOTION_CLOSED = "motion_closed"


class MotionUnavailable(RelayError):
    """The Motion Server cannot animate this turn; ``reason`` is the audio_only reason code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

class FrameSink(Protocol):
    """The turn side of a session: where its envelopes and its failure go (called on the loop)."""

    def offer(self, envelope: bytes, is_last: bool) -> None: ...

    def fail(self, reason: str, detail: str = "") -> None: ...


def request_id_of(envelope: bytes) -> str | None:
    """The req_id of an animation envelope, or None when it is not one."""
    message = message_pb2.Message()  # type: ignore[attr-defined]  # generated, no stubs
    try:
        message.ParseFromString(envelope)
    except Exception:  # protobuf's DecodeError; the SDK parsed it already, so this is defensive
        return None
    if message.type != message_pb2.MESSAGE_SERVER_RESPONSE_ANIMATION:  # type: ignore[attr-defined]
        return None
    req_id: str = message.server_response_animation.req_id
    return req_id


class MotionSession:
    """One SDK session for one conversation; at most one turn (sink) is attached at a time."""

    def __init__(
        self,
        endpoints: MotionEndpoints,
        *,
        conversation_id: str,
        avatar_id: str,
        sample_rate: int,
        lease_id: str,
        metrics: ProducerMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self.conversation_id = conversation_id
        self.avatar_id = avatar_id
        self.sample_rate = sample_rate
        self.lease_id = lease_id
        self.broken: str | None = None  # fallback reason once the session is unusable
        self.retire = False  # close at the next check-in (its capacity lease was lost)
        self.dropped_envelopes = 0
        loop = asyncio.get_running_loop()
        self.opened_at = self.last_used = loop.time()
        self._loop = loop
        self._sink: FrameSink | None = None
        self._req_id: str | None = None
        self._retired: OrderedDict[str, None] = OrderedDict()
        self._closing = False
        self._endpoints = endpoints
        self._sdk = spatius.new_avatar_session(
            avatar_id=avatar_id,
            api_key=endpoints.api_key,
            app_id=endpoints.app_id,
            expire_at=datetime.now(UTC) + SESSION_TOKEN_TTL,
            sample_rate=sample_rate,
            transport_frames=self._on_frames,
            on_error=self._on_error,
            on_close=self._on_close,
            region=endpoints.region,
            console_endpoint_url=endpoints.console_url,
            ingress_endpoint_url=endpoints.ingress_url,
        )

    @property
    def in_use(self) -> bool:
        return self._sink is not None

    def reusable_for(self, avatar_id: str, sample_rate: int) -> bool:
        young = self._loop.time() - self.opened_at < SESSION_MAX_AGE_S
        same = self.avatar_id == avatar_id and self.sample_rate == sample_rate
        return young and same and self.broken is None and not self.retire

    def touch(self) -> None:
        self.last_used = self._loop.time()

    def idle_for(self) -> float:
        return 0.0 if self.in_use else self._loop.time() - self.last_used

    async def start(self, tokens: TokenStock | None = None) -> None:
        """Token (from ``tokens`` when it is enabled), WebSocket and handshake; SDK errors
        propagate (AvatarSDKError, ValueError)."""
        # The SDK's read task (and so every callback) inherits the context it is created in; a
        # fresh one keeps the opening turn's ids off the log lines of later turns.
        await asyncio.create_task(self._start(tokens), context=contextvars.Context())

    async def _start(self, tokens: TokenStock | None) -> None:
        structlog.contextvars.bind_contextvars(conversation_id=self.conversation_id)
        if tokens is not None and tokens.enabled:
            await init_with(await tokens.take(), self._endpoints, self._sdk.init)
        else:
            await self._sdk.init()
        await self._sdk.start()

    def attach(self, sink: FrameSink) -> None:
        if self._sink is not None:
            raise RuntimeError("a turn is already attached to this motion session")
        self._sink = sink
        self._req_id = None
        self.last_used = self._loop.time()

    def detach(self) -> None:
        """End of the turn: its request is retired, so its late envelopes are dropped."""
        self._retire(self._req_id)
        self._sink = None
        self._req_id = None
        self.last_used = self._loop.time()

    async def send(self, chunk: bytes, *, end: bool) -> None:
        """Send audio of the attached turn; raise MotionUnavailable when the session is broken."""
        if self.broken is not None:
            raise MotionUnavailable(self.broken)
        self.last_used = self._loop.time()
        try:
            req_id = await self._sdk.send_audio(chunk, end=end)
        except (spatius.AvatarSDKError, ValueError, OSError) as exc:
            self.broken = self.broken or _reason_of(exc)
            raise MotionUnavailable(self.broken, describe_error(exc)) from exc
        if self._req_id != req_id:
            if self._req_id is not None:
                log.warning("motion_request_changed", previous=self._req_id, current=req_id)
            self._req_id = req_id

    async def interrupt(self) -> None:
        """Tell the server to stop the attached turn's request (if it has one still running).

        On any failure the session counts as broken: its request may still be animating.
        """
        req_id = self._req_id
        if req_id is None or req_id in self._retired:
            return
        try:
            await asyncio.wait_for(self._sdk.interrupt(), INTERRUPT_TIMEOUT_S)
        except (spatius.AvatarSDKError, ValueError, OSError, TimeoutError) as exc:
            self.broken = self.broken or REASON_MOTION_ERROR
            log.info("motion_interrupt_failed", error=describe_error(exc))
        self._retire(req_id)

    @property
    def closed(self) -> bool:
        return self._closing

    def fence(self) -> None:
        """Its capacity lease is gone: fail the attached turn over to audio-only at once; the
        pool closes the session."""
        self.broken = self.broken or REASON_CAPACITY
        if self._sink is not None:
            self._sink.fail(REASON_CAPACITY, "the session's capacity lease could not be renewed")

    async def close(self, timeout_s: float | None = None) -> None:
        self._closing = True
        self._sink = None
        try:
            await asyncio.wait_for(self._sdk.close(), timeout_s or CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("motion_close_timeout", conversation_id=self.conversation_id)

    def _retire(self, req_id: str | None) -> None:
        if req_id:
            self._retired[req_id] = None
            while len(self._retired) > _RETIRED_REQUESTS:
                self._retired.popitem(last=False)

    def _owns(self, req_id: str) -> bool:
        if req_id in self._retired:
            return False
        if self._req_id is None:
            # The first envelope can beat send_audio's return (the read task runs while the send
            # awaits the socket); every earlier request of this session is retired, so an unknown
            # req_id can only be the attached turn's.
            self._req_id = req_id
        return req_id == self._req_id

    # SDK callbacks: they run inside the SDK's read task on the event loop and must not block.

    def _on_frames(self, envelope: bytes, is_last: bool) -> None:
        req_id = request_id_of(envelope)
        sink = self._sink
        if sink is None or not req_id or not self._owns(req_id):
            self.dropped_envelopes += 1
            return
        sink.offer(envelope, is_last)
        if is_last:
            self._retire(req_id)

    def _on_error(self, error: Exception) -> None:
        req_id = getattr(error, "req_id", None)
        if req_id and req_id in self._retired:
            log.info("motion_late_error_ignored", error=describe_error(error))
            return
        reason = _reason_of(error)
        self.broken = self.broken or reason
        if self._metrics is not None:
            closed = reason == REASON_MOTION_CLOSED
            self._metrics.motion_error("connection_closed" if closed else "session_error")
        log.warning("motion_session_error", conversation_id=self.conversation_id,
                    error=describe_error(error), in_turn=self._sink is not None)
        if self._sink is not None:
            self._sink.fail(reason, describe_error(error))

    def _on_close(self) -> None:
        if self._closing:
            return
        self.broken = self.broken or REASON_MOTION_CLOSED
        if self._metrics is not None:
            self._metrics.motion_error("connection_closed")
        if self._sink is not None:
            self._sink.fail(REASON_MOTION_CLOSED, "Motion Server closed the session")


def _reason_of(error: BaseException) -> str:
    code = getattr(error, "code", None)
    if code == spatius.AvatarSDKErrorCode.connectionClosed:
        return REASON_MOTION_CLOSED
    return REASON_MOTION_ERROR


def describe_error(error: BaseException) -> str:
    """Code and phase only: SDK messages can carry server bodies, which we keep out of logs."""
    code = getattr(error, "code", None)
    phase = getattr(error, "phase", None)
    if code is None:
        return type(error).__name__
    text = getattr(code, "value", str(code))
    return f"{text} ({phase})" if phase else str(text)


# --- the pool ------------------------------------------------------------------------------------
