"""One turn being spoken: audio appended before it goes to the Motion Server, frames after it.

A turn, in stream order: ``turn_start``; for each chunk an ``audio`` entry, appended before the
chunk goes to the Motion Server so a client always holds the audio before the frames made from
it; ``frames`` entries written by the turn's ``FramesPipe``; the audio end marker; ``turn_end``.

The audio never waits for the Motion Server: ``begin`` starts getting the turn's SDK session
(checked out of the pool, or opened: token and handshake) in a task of its own and returns at
once. Until the session is ready the chunks whose audio is already in the stream wait in the
turn's motion backlog, in order, and then all go to that one session (one request); if no session
can be had, the turn goes audio-only from wherever its audio is at that moment.

A queued turn may be an attempt that continues a turn an earlier attempt started (``Delivered``):
it goes on with the next audio seq and never rewrites delivered audio. If no frames went out yet
it runs a fresh Motion Server request fed with the whole turn's audio (``prefeed`` the delivered
part), so the animation is whole and comes from one request. If frames already went out, the rest
is audio-only (``audio_only{producer_failover}``): frames of two requests are never mixed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog
from redis.exceptions import RedisError
from structlog.contextvars import bound_contextvars

from relay import wire
from relay.errors import RelayError, TurnFenced
from relay.streams import ConversationLog
from workers.errors import ProducerError
from workers.metrics import ProducerMetrics
from workers.speech.frames import REASON_STALL, FramesPipe, PipeOutcome
from workers.speech.pcm import (
    AUDIO_BATCH_MAX,
    AUDIO_BATCH_MAX_BYTES,
    chunk_size,
    clip_head,
    first_audio_chunks,
    pcm_seconds,
    validate_pcm,
)
from workers.speech.pool import SessionPool
from workers.speech.resume import Delivered
from workers.speech.session import REASON_MOTION_ERROR, MotionSession, MotionUnavailable

log = structlog.get_logger(__name__)

# A turn stopped by its own worker without a word to the stream (graceful stop, lost lease): it
# stays active there and the next attempt continues it. Never written to the stream.
STATUS_ABANDONED = "abandoned"
REASON_FAILOVER = "producer_failover"

# ``send_many`` appends the audio entries of up to ``AUDIO_BATCH_MAX`` chunks (and at most
# ``AUDIO_BATCH_MAX_BYTES``, but always one chunk) in one fenced call, all before any of them goes
# to the Motion Server; more chunks are split into further calls. The chunks are the caller's,
# nothing more is buffered.
# Overflow policy "motion_backlog": while the turn's session is still opening, at most this many
# bytes of audio (already in the stream) wait to be sent to it; past that the audio path waits
# for the session to be ready (or to fail) before it appends more. Bounds what a turn holds for
# a slow handshake or a long wait at the session cap (about 2 min of 16 kHz audio).
MOTION_BACKLOG_MAX_BYTES = 4 * 1024 * 1024
# Getting the session starts once the turn's first audio is appended, or after this long without
# audio: opening one (token fetch, handshake) takes the event loop for a few ms, and turns of
# other conversations starting at the same moment must not wait behind it for their first audio.
MOTION_OPEN_GRACE_S = 0.05


@dataclass(frozen=True)
class TurnResult:
    turn_id: str
    status: str  # wire.STATUS_COMPLETE | STATUS_AUDIO_ONLY | STATUS_INTERRUPTED | abandoned
    audio_bytes: int
    frames_messages: int
    start_id: str
    error: str | None = None  # the audio-only reason (and detail) when motion failed


def chunks_per_call(size: int) -> int:
    """How many chunks of ``size`` bytes one fenced append call takes (see ``one_call``)."""
    return max(1, min(AUDIO_BATCH_MAX, AUDIO_BATCH_MAX_BYTES // size))


def one_call(chunks: Sequence[bytes], start: int = 0) -> int:
    """Where the run of ``chunks`` from ``start`` that one fenced append call takes ends: at
    most ``AUDIO_BATCH_MAX`` chunks and ``AUDIO_BATCH_MAX_BYTES`` bytes, always one chunk."""
    stop, size = start + 1, len(chunks[start])
    while (stop < len(chunks) and stop - start < AUDIO_BATCH_MAX
           and size + len(chunks[stop]) <= AUDIO_BATCH_MAX_BYTES):
        size += len(chunks[stop])
        stop += 1
    return stop


@dataclass(frozen=True)
class FirstAudio:
    """A turn's first audio chunks, appended by the same atomic write as its ``turn_start``
    (``ConversationLog.open_turn``): the client's first sound then waits for no append call of
    its own. Each chunk becomes one ``audio`` entry, as ``Turn.send`` would make it; ``end``: the
    last one ends the turn's audio (a clip that fits in it). PCM16 is checked here, before
    anything is written."""

    chunks: tuple[bytes, ...]
    end: bool = False

    def __post_init__(self) -> None:
        if not self.chunks:
            raise ValueError("first audio needs at least one chunk")
        object.__setattr__(self, "chunks", tuple(validate_pcm(c) for c in self.chunks))
        if one_call(self.chunks) < len(self.chunks):
            raise ValueError(f"first audio holds at most {AUDIO_BATCH_MAX} chunks and, past "
                             f"one chunk, {AUDIO_BATCH_MAX_BYTES} bytes (as one append call)")

    @classmethod
    def of_clip(cls, pcm: bytes, *, sample_rate: int,
                chunk_ms: int) -> tuple[FirstAudio | None, bytes]:
        """The clip's head (``pcm.clip_head``: its first 200 ms) in chunks (None for no audio), and
        the rest of the clip, for ``Turn.speak_rest``."""
        head, rest = clip_head(pcm, sample_rate=sample_rate, chunk_ms=chunk_ms)
        if not head:
            return None, pcm
        return cls(tuple(head), end=not rest), rest

    @property
    def audio_bytes(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def entries(self, turn_id: str) -> list[bytes]:
        return wire.audio_run(turn_id, self.chunks, end=self.end)


@dataclass(frozen=True)
class TurnSpec:
    conversation_id: str
    turn_id: str
    sample_rate: int
    avatar_id: str
    epoch: int = 0  # the queued attempt's epoch; 0 for turns spoken directly


class FirstAudioGate:
    """The producer's turns that have started but not yet appended their first audio.

    Opening an SDK session takes a few ms of the event loop (token, WebSocket, handshake); with
    many turns starting together, each session waits until no turn of the producer still waits
    for its first audio (or ``MOTION_OPEN_GRACE_S`` passed), so first audio always goes first.
    """

    def __init__(self) -> None:
        self._waiting = 0
        self._clear = asyncio.Event()
        self._clear.set()

    def _enter(self) -> None:
        self._waiting += 1
        self._clear.clear()

    def _leave(self) -> None:
        self._waiting -= 1
        if self._waiting <= 0:
            self._waiting = 0
            self._clear.set()

    @property
    def waiting(self) -> int:
        """Turns (begun, or expected through a ticket) still waiting for their first audio."""
        return self._waiting

    async def wait_clear(self) -> None:
        await self._clear.wait()

    def ticket(self) -> GateTicket:
        """Count one turn as waiting for its first audio until the ticket is released: a turn
        holds one from ``begin`` to its first audio, a worker one from reading the turn's job
        until the turn has begun (``Producer.expect_turn``)."""
        self._enter()
        return GateTicket(self)


class GateTicket:
    """One turn counted in a FirstAudioGate; ``release`` is idempotent."""

    def __init__(self, gate: FirstAudioGate) -> None:
        self._gate: FirstAudioGate | None = gate

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._leave()  # noqa: SLF001 - the gate's own ticket


@dataclass(frozen=True)
class TurnServices:
    """What a turn needs from its producer."""

    log: ConversationLog
    pool: SessionPool
    frames_timeout_s: float
    chunk_ms: int
    spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]
    closed: Callable[[Turn], Awaitable[None]]  # releases the conversation; called exactly once
    interrupt: Callable[[Turn, str], Awaitable[None]]  # interrupts this turn in the stream
    metrics: ProducerMetrics | None = None
    first_audio: FirstAudioGate | None = None  # shared by the producer's turns


class Turn:
    """One turn being spoken; returned by ``Producer.open_turn`` for audio still being generated.

    ``send`` chunks as they come, then ``end``. ``send`` returns False once the turn was
    interrupted (stop generating; ``end`` then returns the interrupted result). Used as an async
    context manager, the turn ends on a normal exit and is aborted (interrupted, reason
    "aborted") when the block raises. Until ``end`` or ``abort`` the conversation stays locked.
    """

    def __init__(self, services: TurnServices, spec: TurnSpec, start_id: str,
                 delivered: Delivered | None = None, *, session_lease: str | None = None,
                 first_audio: FirstAudio | None = None) -> None:
        self._services = services
        # Appended with turn_start already: ``begin`` counts it and backlogs it for the session.
        self._first_audio = first_audio
        self._session_lease = session_lease  # reserved before the claim (queued turns)
        self._spec = spec
        self.start_id = start_id
        self._log = services.log
        self._delivered = delivered
        self._stopped = asyncio.Event()
        self._pipe = FramesPipe(services.log, spec.conversation_id, spec.turn_id,
                                stall_s=services.frames_timeout_s, epoch=spec.epoch)
        self._session: MotionSession | None = None
        # Getting the session runs beside the audio; until it is ready the chunks for the Motion
        # Server wait in the backlog (``MOTION_BACKLOG_MAX_BYTES``), and go out in order.
        self._opening: asyncio.Task[None] | None = None
        self._motion_ready = False
        self._audio_out = asyncio.Event()  # the first audio is appended (or the turn stopped)
        # Held (counted in the producer's FirstAudioGate) from begin until the first audio.
        self._gate_ticket: GateTicket | None = None
        self._begun_at: float | None = None  # loop time of begin, until the first motion send
        self._backlog: deque[tuple[bytes, bool]] = deque()
        self._backlog_bytes = 0
        self._audio_seq = delivered.next_seq if delivered else 0
        self._audio_bytes = delivered.audio_bytes if delivered else 0
        self._audio_end_sent = delivered.audio_ended if delivered else False
        self._motion_bytes = 0
        self._motion_end_fed = False  # the request's end went to the session (or its backlog)
        # Audio clients already have goes to a fresh request first; the first new audio ends that.
        self._may_prefeed = delivered is not None and delivered.audio_bytes > 0
        self._abandoned = False
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
    def epoch(self) -> int:
        return self._spec.epoch

    @property
    def interrupted(self) -> bool:
        return self._stopped.is_set()

    @property
    def needs_prefeed(self) -> bool:
        """A continued turn whose new Motion Server request must first hear the audio clients
        already have (``prefeed``) before any new audio is sent."""
        return self._may_prefeed and self._wants_motion

    @property
    def _wants_motion(self) -> bool:
        """A session is attached or still being got, and the animation has not failed."""
        has = self._session is not None or self._opening is not None
        return has and not (self._pipe.done or self._pipe.failed)

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

    async def send_many(self, chunks: list[bytes]) -> bool:
        """``send`` for several PCM16 chunks in order, with one fenced append per batch of
        ``AUDIO_BATCH_MAX`` chunks; False when the turn no longer takes audio (interrupted)."""
        pcms = [validate_pcm(chunk) for chunk in chunks]
        if self._result is not None:
            raise ProducerError("send() after the turn ended")
        with self._bound():
            start = 0
            while start < len(pcms):
                stop = one_call(pcms, start)
                if not await self._guarded(self._push_many(pcms[start:stop], end=False)):
                    return False
                start = stop
            return True

    async def speak_rest(self, pcm: bytes) -> TurnResult:
        """Send the rest of a clip in ``chunk_ms`` chunks (the last carries the end) and end."""
        with self._bound():
            result: TurnResult = await self._guarded(self._speak(validate_pcm(pcm)))
            return result

    async def prefeed(self, pcm: bytes) -> None:
        """Feed audio clients already have to the new Motion Server request, writing nothing;
        a no-op unless ``needs_prefeed``."""
        if not self.needs_prefeed:
            return
        size = chunk_size(self._spec.sample_rate, self._services.chunk_ms)
        # In pieces of as many chunks as one append call carries, as ``_appended`` sends them:
        # the Motion Server takes audio in pieces of any size, and each send is a WebSocket
        # message of the producer's busy loop (a turn opened at submit: one, not five).
        piece = size * chunks_per_call(size)
        with self._bound():
            for start in range(0, len(pcm), piece):
                if self.interrupted:
                    return
                await self._guarded(self._feed_motion(pcm[start : start + piece], end=False))

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

    async def abandon(self) -> TurnResult:
        """Stop now and write nothing: the turn stays active in the stream, for the next attempt
        of its queued job to continue (graceful stop, lost runner lease)."""
        if self._result is not None:
            return self._result
        self._abandoned = True
        with self._bound():
            self.notify_interrupted()
            return await self._close(STATUS_ABANDONED)

    async def _guarded(self, step: Coroutine[Any, Any, Any]) -> Any:
        """Run a step of the turn; on any failure the turn is stopped before the error goes on."""
        try:
            return await step
        except BaseException:
            with suppress(RedisError, OSError, RelayError):
                await self.stop_after_failure()
            raise

    async def stop_after_failure(self) -> TurnResult:
        """A turn spoken directly is aborted (clients get ``interrupt``). A queued attempt is
        abandoned instead: its next attempt continues the turn, or ends it for clients once the
        attempts run out."""
        return await (self.abandon() if self.epoch else self.abort())

    async def _speak(self, pcm: bytes) -> TurnResult:
        """The clip's first 200 ms (``pcm.first_audio_chunks``) go in one call of their own
        (unless clients hold audio of the turn already: ``FirstAudio`` went with its start, or
        an earlier attempt's), so the client's first audio waits for no other write;
        the rest, once no turn of the producer still waits for its first audio (at most
        ``MOTION_OPEN_GRACE_S``, well inside what the client already holds), in calls of up to
        ``AUDIO_BATCH_MAX`` chunks (one per chunk would delay every later turn's first audio when
        many start together). The last chunk carries the end."""
        size = chunk_size(self._spec.sample_rate, self._services.chunk_ms)
        starts = list(range(0, len(pcm), size))
        # No call of its own when clients already hold audio of the turn: its start's write
        # carried some, or an earlier attempt (or the submit) appended some.
        held = self._first_audio is not None or self._audio_bytes > 0
        first = 0 if held else first_audio_chunks(self._services.chunk_ms)
        per_call = chunks_per_call(size)
        groups = [starts[:first]] + [starts[i : i + per_call]
                                     for i in range(first, len(starts), per_call)]
        for index, group in enumerate(g for g in groups if g):
            if index == (1 if first else 0):
                await self._after_first_audio_everywhere()
            chunks = [pcm[start : start + size] for start in group]
            if not await self._push_many(chunks, end=group[-1] + size >= len(pcm)):
                break  # interrupted
        return await self._end()

    async def _after_first_audio_everywhere(self) -> None:
        gate = self._services.first_audio
        if gate is not None:
            with suppress(TimeoutError):
                async with asyncio.timeout(MOTION_OPEN_GRACE_S):
                    await gate.wait_clear()

    async def _end(self) -> TurnResult:
        self._first_audio_out()  # whatever comes now is the end marker
        if not self._audio_end_sent:
            await self._push(b"", end=True)
        elif not self._motion_end_fed:
            # A continued turn whose audio end went out earlier: only its new request must end.
            await self._feed_motion(b"", end=True)
        return await self._finish()

    # Internals shared with Producer.

    def notify_interrupted(self) -> None:
        """Stop the turn at once: no more writes; called on TurnFenced and interrupt messages."""
        if not self.interrupted:
            log.info("turn_abandoned" if self._abandoned else "turn_interrupted",
                     conversation_id=self.conversation_id, turn_id=self.turn_id,
                     audio_entries=self._audio_seq, frames_messages=self._pipe.frames_written)
        self._stopped.set()
        self._first_audio_out()
        self._pipe.stop()

    async def begin(self) -> None:
        """Start the frames writer and start getting a motion session, without waiting for it:
        the turn's audio may go out at once (a failure makes the turn audio-only)."""
        self._pipe.start()
        self._begun_at = asyncio.get_running_loop().time()
        delivered = self._delivered
        if delivered is not None and (delivered.motion_started or delivered.frames_last):
            await self._continue_without_motion(delivered)
            return
        first = self._first_audio
        gate = self._services.first_audio
        if first is None and self._audio_bytes > 0:
            # Continued after audio clients already hold: no first audio to wait for, neither
            # for its own session (``_get_motion``) nor for other turns (the producer's gate).
            self._audio_out.set()
        elif first is None and gate is not None and not self._audio_out.is_set():
            self._gate_ticket = gate.ticket()
        if not self._attach_kept_now():
            self._opening = asyncio.create_task(self._open_motion(),
                                                name=f"motion-open-{self.turn_id}")
        if first is not None:
            await self._appended(list(first.chunks), end=first.end)

    async def _appended(self, chunks: list[bytes], *, end: bool) -> None:
        """The chunks' audio entries are in the stream: count them, then send the chunks to the
        Motion Server (or its backlog) as one piece."""
        self._may_prefeed = False
        self._first_audio_out()
        self._audio_seq += len(chunks)
        self._audio_bytes += sum(len(chunk) for chunk in chunks)
        self._audio_end_sent = self._audio_end_sent or end
        # One send for the whole call: all of its audio is in the stream already, and the Motion
        # Server takes audio in pieces of any size (the reference demos send whole clips). Under
        # load, one WebSocket message per chunk_ms of audio was most of a turn's producer time.
        await self._feed_motion(chunks[0] if len(chunks) == 1 else b"".join(chunks), end=end)

    def _first_audio_out(self) -> None:
        """The turn's first audio is in the stream, or none will come (it ends or stopped)."""
        self._audio_out.set()
        self._leave_gate()

    def _leave_gate(self) -> None:
        if self._gate_ticket is not None:
            self._gate_ticket.release()

    async def _open_motion(self) -> None:
        """Check a session out (or open one), attach the turn, then send it the backlog. Any
        failure ends in the pipe (audio-only): nobody awaits this task for a result."""
        try:
            await self._get_motion()
        except Exception as exc:
            log.error("motion_open_crashed", exc_info=exc)
            self._drop_backlog()
            self._pipe.fail(REASON_MOTION_ERROR, type(exc).__name__)

    async def _get_motion(self) -> None:
        pool, spec = self._services.pool, self._spec
        gate = self._services.first_audio
        with suppress(TimeoutError):
            async with asyncio.timeout(MOTION_OPEN_GRACE_S):
                await self._audio_out.wait()
                if gate is not None:
                    await gate.wait_clear()  # other turns' first audio goes first too
        # A turn whose audio is slow to come (streaming TTS) holds the others back no longer.
        self._leave_gate()
        started = asyncio.get_running_loop().time()
        try:
            session = self._reuse_kept() or await self._until_stopped(pool.checkout(
                spec.conversation_id, spec.avatar_id, spec.sample_rate,
                lease_id=self._session_lease))
        except MotionUnavailable as exc:
            self._drop_backlog()
            self._pipe.fail(exc.reason, exc.detail)
            return
        except (RedisError, OSError) as exc:  # the session cap could not be checked
            self._drop_backlog()
            self._pipe.fail(REASON_MOTION_ERROR, type(exc).__name__)
            return
        if session is None:
            return  # interrupted meanwhile
        self._attach(session)
        log.debug("motion_session_ready", backlog_bytes=self._backlog_bytes,
                  wait_ms=round((asyncio.get_running_loop().time() - started) * 1000, 1))
        while self._backlog:
            chunk, end = self._backlog.popleft()
            self._backlog_bytes -= len(chunk)
            await self._send_motion(chunk, end=end)
        self._motion_ready = True  # no await since the backlog was seen empty

    def _motion_started(self) -> None:
        """The first audio of this attempt reached the Motion Server: how long after begin."""
        begun, self._begun_at = self._begun_at, None
        metrics = self._services.metrics
        if begun is not None and metrics is not None:
            metrics.motion_started(asyncio.get_running_loop().time() - begun)

    def _drop_backlog(self) -> None:
        self._backlog.clear()
        self._backlog_bytes = 0

    async def _continue_without_motion(self, delivered: Delivered) -> None:
        """Clients hold frames of an earlier attempt's request: no new request for this turn."""
        if delivered.frames_last:
            self._pipe.no_motion_needed()  # the animation is already whole
        elif delivered.audio_only:
            self._pipe.assume_audio_only(REASON_FAILOVER)
        else:
            self._pipe.fail(REASON_FAILOVER, "frames of an earlier attempt were delivered")
            await self._pipe.wait()  # the audio_only entry goes in before the rest of the audio

    def _attach_kept_now(self) -> bool:
        """What ``_open_motion`` would do at once, done here without a task of its own: a turn
        whose first audio is out already (continued after what clients hold), with no other turn
        of the producer waiting for its first audio, reusing its conversation's kept session.
        Its audio then reaches the Motion Server one pass of the producer's event loop sooner:
        with 20 turns starting together a pass took 10 to 17 ms (latency bench, probed)."""
        gate = self._services.first_audio
        if not self._audio_out.is_set() or (gate is not None and gate.waiting):
            return False
        session = self._reuse_kept()
        if session is None:
            return False
        self._attach(session)
        self._motion_ready = True  # nothing was fed yet: the backlog is empty
        return True

    def _attach(self, session: MotionSession) -> None:
        self._session = session  # first, so that the release path always checks it back in
        session.attach(self._pipe)

    def _reuse_kept(self) -> MotionSession | None:
        """The conversation's kept session, when the turn reserved no slot of its own (a slot
        to release is an await: ``checkout`` does it) and was not interrupted meanwhile."""
        if self._session_lease is not None or self._stopped.is_set():
            return None
        spec = self._spec
        return self._services.pool.reuse(spec.conversation_id, spec.avatar_id, spec.sample_rate)

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
        return await self._push_many([chunk], end=end)

    async def _push_many(self, chunks: list[bytes], *, end: bool) -> bool:
        """Append the chunks' audio entries (``end`` marks the last one) in one fenced call,
        together with the frames waiting in the pipe, then send the chunks to the Motion Server:
        every chunk's audio is in the stream before the chunk reaches the server."""
        if self.interrupted:
            return False
        last = len(chunks) - 1
        entries = [wire.audio(self.turn_id, self._audio_seq + i, chunk, end=end and i == last)
                   for i, chunk in enumerate(chunks)]
        try:
            await self._pipe.append_with(entries)
        except TurnFenced:
            self.notify_interrupted()
            return False
        await self._appended(chunks, end=end)
        return not self.interrupted

    async def _feed_motion(self, chunk: bytes, *, end: bool) -> None:
        """Send a chunk (whose audio is in the stream) to the Motion Server, or to the backlog
        while the session is still being got."""
        if not self._wants_motion:
            return
        self._motion_end_fed = self._motion_end_fed or end
        if not self._motion_ready:
            self._backlog.append((chunk, end))
            self._backlog_bytes += len(chunk)
            if self._backlog_bytes > MOTION_BACKLOG_MAX_BYTES and self._opening is not None:
                self._first_audio_out()
                await asyncio.wait({self._opening})  # policy "motion_backlog": wait for it
            return
        await self._send_motion(chunk, end=end)

    async def _send_motion(self, chunk: bytes, *, end: bool) -> None:
        session = self._session
        if session is None or self._pipe.done or self._pipe.failed:
            return
        if end and self._motion_bytes == 0 and not chunk:
            self._pipe.no_motion_needed()  # nothing was animated; no request to finish
            return
        timeout = self._services.frames_timeout_s
        try:
            async with asyncio.timeout(timeout):  # no task per send, as wait_for made on 3.11
                await session.send(chunk, end=end)
        except MotionUnavailable as exc:
            self._pipe.fail(exc.reason, exc.detail)
            return
        except TimeoutError:
            session.broken = session.broken or REASON_STALL
            self._pipe.fail(REASON_STALL, f"audio send blocked for {timeout:g}s")
            return
        self._motion_started()
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
            await self._log.end_turn(self.conversation_id, self.turn_id, status=status,
                                     epoch=self.epoch)
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
            self._result = self._make_result(STATUS_ABANDONED if self._abandoned else status)
            self._log_finished(self._result)
        return self._result

    async def _release(self) -> None:
        self._first_audio_out()  # never leave the producer's gate counting this turn
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()  # a session it opens meanwhile is disposed of by the pool
        if opening is not None:
            await asyncio.wait({opening})
        self._drop_backlog()
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
        earlier_frames = self._delivered.frames if self._delivered else 0
        return TurnResult(
            turn_id=self.turn_id, status=status, audio_bytes=self._audio_bytes,
            frames_messages=earlier_frames + self._pipe.frames_written, start_id=self.start_id,
            error=error,
        )

    def _log_finished(self, result: TurnResult) -> None:
        elapsed = asyncio.get_running_loop().time() - self._started_at
        if self._services.metrics is not None:
            self._services.metrics.turn_finished(result.status, self._pipe.reason, elapsed)
        log.info("turn_finished", status=result.status, audio_entries=self._audio_seq,
                 audio_bytes=result.audio_bytes, frames_messages=result.frames_messages,
                 frames_dropped=self._pipe.dropped, reason=self._pipe.reason,
                 epoch=self.epoch, continued=self._delivered is not None,
                 duration_ms=round(elapsed * 1000))
