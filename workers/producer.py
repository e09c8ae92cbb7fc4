"""The producer: speaks turns into conversation streams, with motion from the Spatius SDK.

A turn, in stream order: ``turn_start``; for each chunk an ``audio`` entry, appended before
the chunk goes to the Motion Server so a client always holds the audio before the frames made
from it; ``frames`` entries byte-for-byte as the SDK handed them over, written in arrival order
by the turn's one writer task; the audio end marker; ``turn_end``. If the Motion Server fails the
turn, one ``audio_only`` entry says so, the audio still flows, and the turn ends ``audio_only``.
Every write is fenced (``relay.streams``): once a turn is interrupted or superseded it writes
nothing more.

Embed it in any asyncio backend::

    async with Producer(settings, client) as producer:
        result = await producer.speak("conv-1", pcm)
        async with await producer.open_turn("conv-1") as turn:
            await turn.send(chunk)
        await producer.interrupt("conv-1")
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError
from structlog.contextvars import bound_contextvars

from relay import wire
from relay.errors import RelayError, TurnFenced
from relay.keys import Keys, validate_conversation_id, validate_turn_id
from relay.settings import Settings
from relay.streams import ACTIVE, ConversationLog
from workers.control import ControlListener
from workers.errors import ProducerClosed, ProducerError
from workers.frames import REASON_STALL, FramesPipe, PipeOutcome
from workers.leases import ConversationLeases, SessionLeases
from workers.sdk import (
    MotionEndpoints,
    MotionSession,
    MotionUnavailable,
    SessionPool,
    chunk_size,
    disable_sdk_telemetry,
    pcm_seconds,
    validate_pcm,
    validate_sample_rate,
)

__all__ = [  # FramesPipe and PipeOutcome moved to workers.frames; kept importable from here
    "FramesPipe", "PipeOutcome", "Producer", "ProducerClosed", "ProducerError", "Turn",
    "TurnResult",
]

log = structlog.get_logger(__name__)

CLOSE_WAIT_S = 10.0  # Producer.close waits this long for running turns before closing sessions


@dataclass(frozen=True)
class TurnResult:
    turn_id: str
    status: str  # wire.STATUS_COMPLETE | STATUS_AUDIO_ONLY | STATUS_INTERRUPTED
    audio_bytes: int
    frames_messages: int
    start_id: str
    error: str | None = None  # the audio-only reason (and detail) when motion failed


@dataclass(frozen=True)
class _TurnSpec:
    conversation_id: str
    turn_id: str
    sample_rate: int
    avatar_id: str


@dataclass(frozen=True)
class _TurnServices:
    """What a turn needs from its producer."""

    log: ConversationLog
    pool: SessionPool
    frames_timeout_s: float
    spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]
    closed: Callable[[Turn], Awaitable[None]]  # releases the conversation; called exactly once
    interrupt: Callable[[Turn, str], Awaitable[None]]  # interrupts this turn in the stream


class Turn:
    """One turn being spoken; returned by ``Producer.open_turn`` for audio still being generated.

    ``send`` chunks as they come, then ``end``. ``send`` returns False once the turn was
    interrupted (stop generating; ``end`` then returns the interrupted result). Used as an async
    context manager, the turn ends on a normal exit and is aborted (interrupted, reason
    "aborted") when the block raises. Until ``end`` or ``abort`` the conversation stays locked.
    """

    def __init__(self, services: _TurnServices, spec: _TurnSpec, start_id: str) -> None:
        self._services = services
        self._spec = spec
        self.start_id = start_id
        self._log = services.log
        self._stopped = asyncio.Event()
        self._pipe = FramesPipe(services.log, spec.conversation_id, spec.turn_id,
                                stall_s=services.frames_timeout_s)
        self._session: MotionSession | None = None
        self._audio_seq = 0
        self._audio_bytes = 0
        self._motion_bytes = 0
        self._result: TurnResult | None = None
        self._cleanup: asyncio.Task[None] | None = None
        self._started_at = asyncio.get_running_loop().time()

    @property
    def turn_id(self) -> str:
        return self._spec.turn_id

    @property
    def conversation_id(self) -> str:
        return self._spec.conversation_id

    @property
    def interrupted(self) -> bool:
        return self._stopped.is_set()

    async def __aenter__(self) -> Turn:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.end()
        else:
            await self.abort()

    def _bound(self) -> Any:
        return bound_contextvars(conversation_id=self.conversation_id, turn_id=self.turn_id)

    async def send(self, chunk: bytes | bytearray | memoryview) -> bool:
        """Append one PCM16 chunk; False when the turn no longer takes audio (interrupted)."""
        pcm = validate_pcm(chunk)
        if self._result is not None:
            raise ProducerError("send() after the turn ended")
        with self._bound():
            result: bool = await self._guarded(self._push(pcm, end=False))
            return result

    async def end(self) -> TurnResult:
        """Mark the end of the audio, wait for the last frames, and end the turn."""
        if self._result is not None:
            return self._result
        with self._bound():
            result: TurnResult = await self._guarded(self._end())
            return result

    async def abort(self, reason: str = "aborted") -> TurnResult:
        """Stop now: the turn ends with an ``interrupt`` entry and no more audio."""
        if self._result is not None:
            return self._result
        with self._bound():
            try:
                if not self.interrupted:
                    await self._services.interrupt(self, reason)
            finally:
                self.notify_interrupted()
                result = await self._close(wire.STATUS_INTERRUPTED)
        return result

    async def _guarded(self, step: Coroutine[Any, Any, Any]) -> Any:
        """Run a step of the turn; on any failure the turn is aborted before the error goes on."""
        try:
            return await step
        except BaseException:
            with suppress(RedisError, OSError, RelayError):
                await self.abort()
            raise

    async def _end(self) -> TurnResult:
        await self._push(b"", end=True)
        return await self._finish()

    # Internals shared with Producer.speak.

    def notify_interrupted(self) -> None:
        """Stop the turn at once: no more writes; called on TurnFenced and interrupt messages."""
        if not self.interrupted:
            log.info("turn_interrupted", conversation_id=self.conversation_id,
                     turn_id=self.turn_id, audio_entries=self._audio_seq,
                     frames_messages=self._pipe.frames_written)
        self._stopped.set()
        self._pipe.stop()

    async def _begin(self) -> None:
        """Start the frames writer and get a motion session; a failure makes the turn audio-only."""
        self._pipe.start()
        pool, spec = self._services.pool, self._spec
        try:
            session = await self._until_stopped(
                pool.checkout(spec.conversation_id, spec.avatar_id, spec.sample_rate)
            )
        except MotionUnavailable as exc:
            self._pipe.fail(exc.reason, exc.detail)
            await self._pipe.wait()  # the audio_only entry goes in before any audio
            return
        if session is not None:
            self._session = session  # first, so that the release path always checks it back in
            session.attach(self._pipe)

    async def _until_stopped(
        self, work: Coroutine[Any, Any, MotionSession]
    ) -> MotionSession | None:
        """Await ``work`` unless the turn is interrupted first (then cancel it and return None)."""
        task = asyncio.create_task(work)
        stop = asyncio.create_task(self._stopped.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, stop):
                pending.cancel()
            await asyncio.wait({task, stop})
        return None if task.cancelled() else task.result()

    async def _push(self, chunk: bytes, *, end: bool) -> bool:
        if self.interrupted:
            return False
        entry = wire.audio(self.turn_id, self._audio_seq, chunk, end=end)
        try:
            await self._log.append(self.conversation_id, self.turn_id, entry)
        except TurnFenced:
            self.notify_interrupted()
            return False
        self._audio_seq += 1
        self._audio_bytes += len(chunk)
        await self._feed_motion(chunk, end=end)
        return not self.interrupted

    async def _feed_motion(self, chunk: bytes, *, end: bool) -> None:
        session = self._session
        if session is None or self._pipe.done or self._pipe.failed:
            return
        if end and self._motion_bytes == 0 and not chunk:
            self._pipe.no_motion_needed()  # nothing was animated; no request to finish
            return
        timeout = self._services.frames_timeout_s
        try:
            await asyncio.wait_for(session.send(chunk, end=end), timeout)
        except MotionUnavailable as exc:
            self._pipe.fail(exc.reason, exc.detail)
            return
        except TimeoutError:
            session.broken = session.broken or REASON_STALL
            self._pipe.fail(REASON_STALL, f"audio send blocked for {timeout:g}s")
            return
        self._motion_bytes += len(chunk)
        self._pipe.audio_sent(pcm_seconds(len(chunk), self._spec.sample_rate), end=end)

    async def _finish(self) -> TurnResult:
        outcome = await self._pipe.wait()
        if outcome is PipeOutcome.ERROR:
            self.notify_interrupted()
            await self._close(wire.STATUS_INTERRUPTED)
            raise ProducerError("Redis failed while writing frames") from self._pipe.error
        if outcome in (PipeOutcome.STOPPED, PipeOutcome.FENCED) or self.interrupted:
            self.notify_interrupted()
            return await self._close(wire.STATUS_INTERRUPTED)
        status = wire.STATUS_COMPLETE if outcome is PipeOutcome.COMPLETE else wire.STATUS_AUDIO_ONLY
        try:
            await self._log.end_turn(self.conversation_id, self.turn_id, status=status)
        except TurnFenced:
            self.notify_interrupted()
            status = wire.STATUS_INTERRUPTED
        return await self._close(status)

    async def _close(self, status: str) -> TurnResult:
        """Release everything. The release runs as a producer-owned task, so cancelling the
        caller cannot leave the conversation locked or the session attached."""
        if self._cleanup is None:
            self._cleanup = self._services.spawn(self._release(), f"turn-release-{self.turn_id}")
        await asyncio.shield(self._cleanup)
        if self._result is None:
            self._result = self._make_result(status)
            self._log_finished(self._result)
        return self._result

    async def _release(self) -> None:
        session, self._session = self._session, None
        try:
            if session is not None:
                await self._release_session(session)
            await self._pipe.close()
        finally:
            await self._services.closed(self)

    async def _release_session(self, session: MotionSession) -> None:
        if self.interrupted and session.broken is None:
            await session.interrupt()  # best effort: stop the server animating this request
        if self._pipe.failed:
            # The session failed this turn (or fell behind): the next turn gets a fresh one.
            session.broken = session.broken or self._pipe.reason
        session.detach()
        await self._services.pool.checkin(session)

    def _make_result(self, status: str) -> TurnResult:
        error = None
        if status == wire.STATUS_AUDIO_ONLY and self._pipe.reason:
            detail = self._pipe.detail
            error = f"{self._pipe.reason}: {detail}" if detail else self._pipe.reason
        return TurnResult(
            turn_id=self.turn_id, status=status, audio_bytes=self._audio_bytes,
            frames_messages=self._pipe.frames_written, start_id=self.start_id, error=error,
        )

    def _log_finished(self, result: TurnResult) -> None:
        elapsed = asyncio.get_running_loop().time() - self._started_at
        log.info("turn_finished", status=result.status, audio_entries=self._audio_seq,
                 audio_bytes=result.audio_bytes, frames_messages=result.frames_messages,
                 frames_dropped=self._pipe.dropped, reason=self._pipe.reason,
                 duration_ms=round(elapsed * 1000))


class _KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it (bounded by use)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def acquire(self, key: str) -> None:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._forget(key)
            raise

    def release(self, key: str) -> None:
        self._locks[key][0].release()
        self._forget(key)

    def _forget(self, key: str) -> None:
        lock, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)




class Producer:
    """Produces turns for any number of conversations; an async context manager owning its tasks.

    :param console_url: simulator (or explicit Spatius) console endpoint; overrides the settings.
    :param ingress_url: simulator (or explicit Spatius) ingress endpoint; overrides the settings.
    """

    def __init__(
        self, settings: Settings, client: redis.Redis, *,
        console_url: str | None = None, ingress_url: str | None = None,
    ) -> None:
        if settings.frames_timeout_s <= 0 or settings.session_idle_s <= 0:
            raise ValueError("frames_timeout_s and session_idle_s must be positive")
        self._settings = settings
        self._keys = Keys(settings.key_prefix)
        self._endpoints = MotionEndpoints.from_settings(
            settings, console_url=console_url, ingress_url=ingress_url
        )
        # Unique per instance: two producers in one process must not share leases.
        self._owner = f"{settings.node_id}:{uuid.uuid4().hex[:12]}"
        self._log = ConversationLog(client, self._keys, maxlen=settings.stream_maxlen,
                                    ttl_s=settings.stream_ttl_s)
        self._session_leases = SessionLeases(
            client, self._keys, cap=settings.max_sdk_sessions, lease_s=settings.sdk_lease_s,
            wait_s=settings.sdk_wait_s, owner=self._owner, on_lost=self._on_lease_lost,
        )
        self._conversation_leases = ConversationLeases(
            client, self._keys, owner=self._owner, lease_s=settings.conversation_lease_s
        )
        self._pool = SessionPool(
            self._endpoints, self._session_leases, idle_s=settings.session_idle_s,
            per_turn=settings.per_turn_sessions, open_timeout_s=settings.frames_timeout_s,
        )
        self._services = _TurnServices(
            log=self._log, pool=self._pool, frames_timeout_s=settings.frames_timeout_s,
            spawn=self._spawn, closed=self._turn_closed, interrupt=self._interrupt_own_turn,
        )
        self._control = ControlListener(client, self._keys, self._on_interrupt_message)
        self._locks = _KeyedLocks()
        self._active: dict[str, Turn] = {}
        self._no_turns = asyncio.Event()
        self._no_turns.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False

    @property
    def owner(self) -> str:
        """This producer's identity in leases and turn records."""
        return self._owner

    @property
    def active_turns(self) -> int:
        return len(self._active)

    @property
    def motion_sessions(self) -> int:
        return len(self._pool)

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._endpoints.simulated:
            disable_sdk_telemetry()
        await self._control.start()
        self._session_leases.start()
        self._conversation_leases.start()
        self._pool.start()
        self._running = True
        log.info("producer_started", owner=self._owner, simulated=self._endpoints.simulated)

    async def close(self) -> None:
        """Take no new turns, give running ones CLOSE_WAIT_S, then close sessions and leases."""
        self._running = False
        with suppress(TimeoutError):
            await asyncio.wait_for(self._no_turns.wait(), CLOSE_WAIT_S)
        for turn in list(self._active.values()):
            with suppress(RedisError, OSError, RelayError):
                await turn.abort("shutdown")
        await self._control.close()
        await self._pool.close()
        await self._session_leases.close()
        await self._conversation_leases.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        log.info("producer_closed", owner=self._owner)

    # Public API.

    async def speak(
        self, conversation_id: str, pcm: bytes | bytearray | memoryview, *,
        sample_rate: int | None = None, avatar_id: str | None = None, turn_id: str | None = None,
    ) -> TurnResult:
        """Speak a whole clip as one turn (split into ``chunk_ms`` chunks); wait for its end."""
        clip = validate_pcm(pcm, allow_empty=False)
        spec = self._spec(conversation_id, sample_rate, avatar_id, turn_id)
        with bound_contextvars(conversation_id=spec.conversation_id, turn_id=spec.turn_id):
            turn = await self._open(spec)
            result: TurnResult = await turn._guarded(self._speak_clip(turn, clip))
            return result

    async def _speak_clip(self, turn: Turn, clip: bytes) -> TurnResult:
        size = chunk_size(turn._spec.sample_rate, self._settings.chunk_ms)
        for start in range(0, len(clip), size):
            last = start + size >= len(clip)
            if not await turn._push(clip[start : start + size], end=last):
                break  # interrupted
        return await turn._finish()

    async def open_turn(
        self, conversation_id: str, *, sample_rate: int | None = None,
        avatar_id: str | None = None, turn_id: str | None = None,
    ) -> Turn:
        """Start a streamed turn (TTS still generating); returns once audio can be sent.

        Waits for the conversation's previous turn to end (up to ``conversation_wait_s``, then
        ConversationBusy) and for a Motion Server session (up to ``sdk_wait_s`` when the session
        cap is reached; after that the turn runs audio-only).
        """
        spec = self._spec(conversation_id, sample_rate, avatar_id, turn_id)
        with bound_contextvars(conversation_id=spec.conversation_id, turn_id=spec.turn_id):
            return await self._open(spec)

    async def interrupt(self, conversation_id: str, reason: str = "interrupted") -> str | None:
        """Interrupt the conversation's active turn, wherever it runs; its id, or None."""
        turn_id = await self._log.interrupt(conversation_id, reason=reason)
        if turn_id is not None:
            self._on_interrupt_message(conversation_id, turn_id)  # local fast path
        return turn_id

    # Turn plumbing.

    def _spec(
        self, conversation_id: str, sample_rate: int | None, avatar_id: str | None,
        turn_id: str | None,
    ) -> _TurnSpec:
        avatar = avatar_id or self._endpoints.default_avatar_id
        if not avatar:
            raise ValueError("no avatar id: pass avatar_id or set SPATIUS_AVATAR_ID")
        return _TurnSpec(
            conversation_id=validate_conversation_id(conversation_id),
            turn_id=validate_turn_id(turn_id) if turn_id else uuid.uuid4().hex,
            sample_rate=validate_sample_rate(sample_rate or self._settings.sample_rate),
            avatar_id=avatar,
        )

    async def _open(self, spec: _TurnSpec) -> Turn:
        """Lock the conversation (in this process, then across producers) and start the turn."""
        if not self._running:
            raise ProducerClosed("producer is not running")
        conversation_id = spec.conversation_id
        await self._locks.acquire(conversation_id)
        try:
            await self._conversation_leases.acquire(
                conversation_id, wait_s=self._settings.conversation_wait_s
            )
        except BaseException:
            self._locks.release(conversation_id)
            raise
        try:
            start_id = await self._log.open_turn(
                conversation_id, spec.turn_id, sample_rate=spec.sample_rate, owner=self._owner
            )
        except TurnFenced as exc:  # the turn record kept changing under us
            await self._release_conversation(conversation_id)
            raise ProducerError(f"could not open turn {spec.turn_id}") from exc
        except BaseException:
            await self._release_conversation(conversation_id)
            raise
        return await self._begin(spec, start_id)

    async def _begin(self, spec: _TurnSpec, start_id: str) -> Turn:
        turn = Turn(self._services, spec, start_id)
        self._active[spec.conversation_id] = turn
        self._no_turns.clear()
        log.info("turn_started", sample_rate=spec.sample_rate, avatar_id=spec.avatar_id)
        try:
            await turn._begin()
        except BaseException:
            with suppress(RedisError, OSError, RelayError):
                await turn.abort("aborted")
            raise
        return turn

    async def _turn_closed(self, turn: Turn) -> None:
        if self._active.get(turn.conversation_id) is turn:
            del self._active[turn.conversation_id]
        if not self._active:
            self._no_turns.set()
        await self._release_conversation(turn.conversation_id)

    async def _release_conversation(self, conversation_id: str) -> None:
        try:
            await self._conversation_leases.release(conversation_id)
        except (RedisError, OSError) as exc:
            # The lease expires after conversation_lease_s; until then other producers wait.
            log.warning("conversation_lease_release_failed", error=str(exc))
        finally:
            self._locks.release(conversation_id)

    async def _interrupt_own_turn(self, turn: Turn, reason: str) -> None:
        """Interrupt ``turn`` in the stream, unless another turn became active meanwhile."""
        current = await self._log.current_turn(turn.conversation_id)
        if current is not None and current.turn_id == turn.turn_id and current.status == ACTIVE:
            await self._log.interrupt(turn.conversation_id, reason=reason)

    def _on_interrupt_message(self, conversation_id: str, turn_id: str) -> None:
        turn = self._active.get(conversation_id)
        if turn is not None and turn.turn_id == turn_id:
            turn.notify_interrupted()

    def _on_lease_lost(self, lease_id: str) -> None:
        self._pool.lease_lost(lease_id)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task the producer owns: kept until done, awaited on close, failures logged."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("producer_task_failed", task=task.get_name(), exc_info=task.exception())
