"""The Spatius Server SDK seen from the relay: endpoints, one session per conversation, a pool.

``MotionSession`` wraps one ``spatius.AvatarSession`` kept for a conversation across turns. The SDK
hands every animation envelope of every request to one ``transport_frames`` callback, so the
wrapper reads each envelope's ``req_id`` (with the SDK's own ``message_pb2``) and gives it only to
the turn that owns that request. Envelopes of an interrupted or earlier request are dropped: a
turn must never show motion made for another turn's audio.

``SessionPool`` keeps those sessions, caps them through ``SessionLeases`` and closes them when idle.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import spatius
import structlog
from redis.exceptions import RedisError
from spatius.proto.generated import message_pb2

from relay.errors import ConfigError, RelayError
from relay.settings import SAMPLE_RATES, Settings
from workers.leases import Periodic, SessionLeases

log = structlog.get_logger(__name__)

# Credentials the simulator accepts (it takes any non-empty app id, key and avatar id).
SIM_API_KEY = "relay-sim"
SIM_APP_ID = "relay-sim"
SIM_AVATAR_ID = "relay-sim-avatar"

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


# --- PCM16 audio rules shared by the producer and the queue --------------------------------------


def validate_sample_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int):
        raise TypeError("sample_rate must be an int")
    if sample_rate not in SAMPLE_RATES:
        raise ValueError(f"sample_rate must be one of {sorted(SAMPLE_RATES)}, not {sample_rate}")
    return sample_rate


def validate_pcm(data: bytes | bytearray | memoryview, *, allow_empty: bool = True) -> bytes:
    """PCM16 mono little-endian as immutable bytes; whole samples only."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"audio must be bytes of PCM16, not {type(data).__name__}")
    pcm = bytes(data)
    if len(pcm) % 2:
        raise ValueError(f"PCM16 audio needs an even number of bytes, got {len(pcm)}")
    if not pcm and not allow_empty:
        raise ValueError("audio clip is empty")
    return pcm


def chunk_size(sample_rate: int, chunk_ms: int) -> int:
    """Bytes of PCM16 mono in ``chunk_ms`` (at least one sample)."""
    return max(2, sample_rate * chunk_ms // 1000 * 2)


def split_pcm(pcm: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(pcm), size):
        yield pcm[start : start + size]


def pcm_seconds(num_bytes: int, sample_rate: int) -> float:
    return num_bytes / (2 * sample_rate)


# --- endpoints -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MotionEndpoints:
    """Where and as whom SDK sessions connect: the real Motion Server or the simulator."""

    app_id: str
    region: str
    console_url: str
    ingress_url: str
    default_avatar_id: str
    simulated: bool
    api_key: str = field(default="", repr=False)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, console_url: str | None = None, ingress_url: str | None = None
    ) -> MotionEndpoints:
        """Real server when Spatius credentials are set, else the simulator at the given URLs."""
        console = console_url or settings.spatius_console_url
        ingress = ingress_url or settings.spatius_ingress_url
        if settings.uses_real_motion_server:
            return cls(
                app_id=settings.spatius_app_id,
                region=settings.spatius_region,
                console_url=console,
                ingress_url=ingress,
                default_avatar_id=settings.spatius_avatar_id,
                simulated=False,
                api_key=settings.spatius_api_key,
            )
        if not (console and ingress):
            raise ConfigError(
                "no Spatius credentials (SPATIUS_API_KEY, SPATIUS_APP_ID) and no simulator "
                "endpoints (SPATIUS_CONSOLE_URL, SPATIUS_INGRESS_URL)"
            )
        return cls(
            app_id=settings.spatius_app_id or SIM_APP_ID,
            region=settings.spatius_region,
            console_url=console,
            ingress_url=ingress,
            default_avatar_id=settings.spatius_avatar_id or SIM_AVATAR_ID,
            simulated=True,
            api_key=settings.spatius_api_key or SIM_API_KEY,
        )


def disable_sdk_telemetry() -> None:
    """Keep the SDK from exporting metrics and traces to Spatius about simulator sessions."""
    try:
        spatius.configure_telemetry("")
    except RuntimeError:
        # Another component configured telemetry first; that choice stands.
        log.warning("sdk_telemetry_already_configured")


# --- one session ---------------------------------------------------------------------------------


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
    ) -> None:
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

    async def start(self) -> None:
        """Token, WebSocket and handshake; SDK errors propagate (AvatarSDKError, ValueError)."""
        # The SDK's read task (and so every callback) inherits the context it is created in; a
        # fresh one keeps the opening turn's ids off the log lines of later turns.
        await asyncio.create_task(self._start(), context=contextvars.Context())

    async def _start(self) -> None:
        structlog.contextvars.bind_contextvars(conversation_id=self.conversation_id)
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
            raise MotionUnavailable(self.broken, _describe(exc)) from exc
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
            log.info("motion_interrupt_failed", error=_describe(exc))
        self._retire(req_id)

    async def close(self) -> None:
        self._closing = True
        self._sink = None
        try:
            await asyncio.wait_for(self._sdk.close(), CLOSE_TIMEOUT_S)
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
            log.info("motion_late_error_ignored", error=_describe(error))
            return
        reason = _reason_of(error)
        self.broken = self.broken or reason
        log.warning("motion_session_error", conversation_id=self.conversation_id,
                    error=_describe(error), in_turn=self._sink is not None)
        if self._sink is not None:
            self._sink.fail(reason, _describe(error))

    def _on_close(self) -> None:
        if self._closing:
            return
        self.broken = self.broken or REASON_MOTION_CLOSED
        if self._sink is not None:
            self._sink.fail(REASON_MOTION_CLOSED, "Motion Server closed the session")


def _reason_of(error: BaseException) -> str:
    code = getattr(error, "code", None)
    if code == spatius.AvatarSDKErrorCode.connectionClosed:
        return REASON_MOTION_CLOSED
    return REASON_MOTION_ERROR


def _describe(error: BaseException) -> str:
    """Code and phase only: SDK messages can carry server bodies, which we keep out of logs."""
    code = getattr(error, "code", None)
    phase = getattr(error, "phase", None)
    if code is None:
        return type(error).__name__
    text = getattr(code, "value", str(code))
    return f"{text} ({phase})" if phase else str(text)


# --- the pool ------------------------------------------------------------------------------------


_MIN_SPARE_IDLE_S = 1.0


class SessionPool:
    """Motion sessions by conversation, capped by ``SessionLeases`` and closed when idle.

    :param idle_s: an unused session is closed after this long (the server bills open time).
    :param per_turn: close every session right after its turn instead of keeping it.
    :param open_timeout_s: longest a session may take to fetch its token and shake hands.
    """

    def __init__(
        self,
        endpoints: MotionEndpoints,
        leases: SessionLeases,
        *,
        idle_s: float,
        per_turn: bool,
        open_timeout_s: float,
    ) -> None:
        self._endpoints = endpoints
        self._leases = leases
        self._idle_s = idle_s
        self._per_turn = per_turn
        self._open_timeout_s = open_timeout_s
        self._sessions: dict[str, MotionSession] = {}
        # Also the cadence at which waiting turns elsewhere get idle sessions closed for them.
        self._reaper = Periodic("motion-session-reaper", max(0.05, min(idle_s / 4, 1.0)), self.reap)

    def __len__(self) -> int:
        return len(self._sessions)

    def start(self) -> None:
        self._reaper.start()

    async def close(self) -> None:
        await self._reaper.close()
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(self._dispose(s) for s in sessions))

    def has_session(self, conversation_id: str, avatar_id: str, sample_rate: int) -> bool:
        """The conversation keeps a session its next turn can reuse (no new slot needed)."""
        existing = self._sessions.get(conversation_id)
        return existing is not None and existing.reusable_for(avatar_id, sample_rate)

    def uses_lease(self, lease_id: str) -> bool:
        return any(session.lease_id == lease_id for session in self._sessions.values())

    async def checkout(
        self, conversation_id: str, avatar_id: str, sample_rate: int, *,
        lease_id: str | None = None,
    ) -> MotionSession:
        """The conversation's session, opened if needed; MotionUnavailable when none can be had.

        ``lease_id`` is a slot the caller reserved beforehand (``SessionLeases.acquire``); it is
        used for a new session, or released when the kept one is reused. Callers serialize turns
        per conversation, so one conversation never checks out twice.
        """
        existing = self._sessions.pop(conversation_id, None)
        if existing is not None:
            if existing.reusable_for(avatar_id, sample_rate):
                existing.touch()  # not idle any more: the reaper must leave it to this turn
                self._sessions[conversation_id] = existing
                if lease_id is not None:
                    await self._leases.release(lease_id)
                return existing
            await self._dispose(existing)
        if lease_id is None:
            lease_id = await self._leases.acquire()
        if lease_id is None:
            raise MotionUnavailable(REASON_CAPACITY, "no Motion Server session slot free")
        session = MotionSession(self._endpoints, conversation_id=conversation_id,
                                avatar_id=avatar_id, sample_rate=sample_rate, lease_id=lease_id)
        await self._open(session)
        self._sessions[conversation_id] = session
        log.info("motion_session_opened", conversation_id=conversation_id, open=len(self))
        return session

    async def _open(self, session: MotionSession) -> None:
        try:
            await asyncio.wait_for(session.start(), self._open_timeout_s)
        except (spatius.AvatarSDKError, ValueError, OSError, TimeoutError) as exc:
            await self._dispose(session)
            log.warning("motion_session_open_failed", error=_describe(exc))
            raise MotionUnavailable(REASON_MOTION_ERROR, _describe(exc)) from exc
        except BaseException:
            await self._dispose(session)  # cancelled while opening: free the slot at once
            raise

    async def checkin(self, session: MotionSession) -> None:
        """After a turn: keep the session for the next one unless it must go."""
        if self._per_turn or session.broken is not None or session.retire:
            if self._sessions.get(session.conversation_id) is session:
                del self._sessions[session.conversation_id]
            await self._dispose(session)

    async def reap(self) -> None:
        """Close sessions idle for ``idle_s``, idle ones that broke or lost their lease, and, while
        turns anywhere wait for a slot, as many idle sessions as they need (longest idle first):
        a kept session only saves a handshake, a waiting turn would otherwise go audio-only."""
        wanted = await self._leases.demand() if self._sessions else 0
        # From here to the deletions nothing awaits, so no turn can check a doomed session out.
        idle = sorted((s for s in self._sessions.values() if not s.in_use),
                      key=lambda s: s.idle_for(), reverse=True)
        doomed = [s for s in idle if s.idle_for() >= self._idle_s or s.broken or s.retire]
        # A session checked out moments ago is idle until its turn attaches; spare it.
        spare = [s for s in idle if s not in doomed and s.idle_for() >= _MIN_SPARE_IDLE_S]
        doomed += spare[:wanted]
        for session in doomed:
            del self._sessions[session.conversation_id]
        if doomed:
            log.info("motion_sessions_reaped", closed=len(doomed), open=len(self))
            await asyncio.gather(*(self._dispose(s) for s in doomed))

    def lease_lost(self, lease_id: str) -> None:
        """The cap may be exceeded: close that session as soon as its turn is over."""
        for session in self._sessions.values():
            if session.lease_id == lease_id:
                session.retire = True

    async def _dispose(self, session: MotionSession) -> None:
        try:
            await session.close()
        finally:
            try:
                await self._leases.release(session.lease_id)
            except (RedisError, OSError) as exc:
                # Harmless beyond a delay: the slot expires after lease_s without renewals.
                log.warning("sdk_lease_release_failed", error=str(exc))
