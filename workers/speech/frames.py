"""A turn's animation path: SDK envelopes to ``frames`` entries, in arrival order, or audio-only.

``FramesPipe`` is the one writer of a turn's ``frames`` and ``audio_only`` entries; the SDK
callbacks only hand it envelopes (``offer``) or failures (``fail``), synchronously.
"""

from __future__ import annotations

import asyncio
from collections import deque
from enum import StrEnum

import structlog
from redis.exceptions import RedisError

from relay import wire
from relay.errors import TurnFenced
from relay.streams import ConversationLog
from workers.errors import ProducerError

log = structlog.get_logger(__name__)

# Overflow policy "frames_backlog": a turn holds at most this many envelopes the writer has not
# appended yet. More means Redis writes fell that far behind the Motion Server; the turn then
# gives up on motion and finishes audio-only, because buffering without bound risks the process
# and dropping envelopes from the middle would corrupt the animation.
FRAMES_QUEUE_MAX = 256
# The writer appends every envelope waiting (up to this many, in arrival order) in one fenced
# script call; the rest wait for the next call. Bounds one call's size, buffers nothing more.
FRAMES_BATCH_MAX = 32
REASON_STALL = "stall"
# Unanswered audio beyond this means frames are owed: the server answers every 200 ms of audio
# (a batch of keyframes); a second leaves room for its processing time.
OWED_AUDIO_S = 1.0
REASON_FRAMES_BACKLOG = "frames_backlog"


class PipeOutcome(StrEnum):
    COMPLETE = "complete"  # the frames with is_last are in the stream
    AUDIO_ONLY = "audio_only"  # the audio_only entry is in the stream
    STOPPED = "stopped"  # the turn was interrupted; nothing more is written
    FENCED = "fenced"  # a write found the turn no longer active
    ERROR = "error"  # Redis failed; ``error`` holds the exception


class FramesPipe:
    """A turn's animation envelopes, from the SDK callback to the stream, in arrival order.

    ``offer`` and ``fail`` are synchronous so SDK callbacks never block the read loop. The writer
    task is the only one that appends ``frames`` and ``audio_only`` entries, which is what keeps
    every frames entry of the turn ahead of its audio_only marker.

    Stall rule (RELAY_FRAMES_TIMEOUT_S is ``stall_s``): the Motion Server owes frames once the
    audio end was sent, or once ``OWED_AUDIO_S`` of audio (at most ``stall_s``) went unanswered.
    Owing, and no frames for ``stall_s`` since the first unanswered audio was sent (or since the
    last frames, if later), is a stall: so motion that stops mid-turn turns audio-only
    ``stall_s`` after its last frames, not later. (A TTS pause mid-turn is not a stall: the server
    holds back less than a batch until it has the audio, and that owes nothing.)
    """

    def __init__(
        self, log_: ConversationLog, conversation_id: str, turn_id: str,
        *, stall_s: float, capacity: int = FRAMES_QUEUE_MAX, epoch: int = 0,
    ) -> None:
        self._log = log_
        self._conversation_id = conversation_id
        self._turn_id = turn_id
        self._epoch = epoch
        self._stall_s = stall_s
        self._capacity = capacity
        self._items: deque[tuple[bytes, bool]] = deque()
        # Held for every append of this pipe's entries, by the writer task or by the turn's audio
        # path (``append_with``), so envelopes taken by either reach the stream in arrival order.
        self._write_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._done = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._end_sent = False
        self._unanswered_s = 0.0
        self._unanswered_since: float | None = None  # first audio sent after the last frames
        self._owed_since: float | None = None
        self._progress_at = 0.0
        self.outcome: PipeOutcome | None = None
        self.reason: str | None = None
        self.detail = ""
        self.error: BaseException | None = None
        self.frames_written = 0
        self.dropped = 0

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def failed(self) -> bool:
        return self.reason is not None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"frames-{self._turn_id}")

    async def wait(self) -> PipeOutcome:
        await self._done.wait()
        return self.outcome or PipeOutcome.ERROR  # set together with _done

    async def close(self) -> None:
        """Stop the writer (if still running) and surface a crash of it."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            raise ProducerError("frames writer crashed") from task.exception()

    # Called from the SDK read task or the turn; all synchronous.

    def offer(self, envelope: bytes, is_last: bool) -> None:
        if self.done or self.failed or not envelope:  # never write an empty frames message
            self.dropped += 1
            return
        if len(self._items) >= self._capacity:
            self.fail(REASON_FRAMES_BACKLOG, f"{self._capacity} envelopes waiting for Redis")
            return
        self._items.append((envelope, is_last))
        self._progress_at = self._loop.time()
        self._unanswered_s = 0.0
        self._unanswered_since = None
        if not self._end_sent:
            self._owed_since = None
        self._wake.set()

    def fail(self, reason: str, detail: str = "") -> None:
        if self.done or self.failed:
            return
        self.reason, self.detail = reason, detail
        self._wake.set()

    def stop(self) -> None:
        self._items.clear()
        self._finish(PipeOutcome.STOPPED)

    def audio_sent(self, seconds: float, *, end: bool) -> None:
        now = self._loop.time()
        if self._unanswered_since is None and (seconds > 0 or end):
            self._unanswered_since = now
        self._unanswered_s += seconds
        self._end_sent = self._end_sent or end
        owes = self._end_sent or self._unanswered_s >= min(OWED_AUDIO_S, self._stall_s)
        if owes and self._owed_since is None:
            self._owed_since = self._unanswered_since if self._unanswered_since is not None \
                else now
        self._wake.set()

    def no_motion_needed(self) -> None:
        """The turn had no audio for the Motion Server, so there is no animation to wait for."""
        self._finish(PipeOutcome.COMPLETE)

    def assume_audio_only(self, reason: str) -> None:
        """An earlier attempt of the turn already wrote its audio_only entry: write nothing more."""
        self.reason = self.reason or reason
        self._items.clear()
        self._finish(PipeOutcome.AUDIO_ONLY)

    # The writer task.

    async def _run(self) -> None:
        try:
            while not self.done:
                if self.failed:
                    await self._write_fallback()
                elif self._items:
                    await self._write_next()
                else:
                    await self._idle()
        except TurnFenced:
            self._finish(PipeOutcome.FENCED)
        except (RedisError, OSError) as exc:
            self.error = exc
            self._finish(PipeOutcome.ERROR)
        finally:
            self._finish(PipeOutcome.ERROR)  # no-op unless the writer crashed; waiters go on

    async def append_with(self, entries: list[bytes]) -> None:
        """Append ``entries`` of the turn (its audio) in one fenced call, preceded by the frames
        envelopes waiting now: they were made from audio already in the stream, so they may go
        ahead of this audio. Raises TurnFenced (nothing of the call was appended)."""
        async with self._write_lock:
            frames, last = self._take_frames()
            await self._log.append(self._conversation_id, self._turn_id, *frames, *entries,
                                   epoch=self._epoch)
            self._written(len(frames), last)

    async def _write_next(self) -> None:
        async with self._write_lock:
            if self.done or self.failed:
                return  # the loop writes the fallback, or ends
            frames, last = self._take_frames()
            if not frames:
                return  # the turn's audio path took them
            await self._log.append(self._conversation_id, self._turn_id, *frames,
                                   epoch=self._epoch)
            self._written(len(frames), last)

    def _take_frames(self) -> tuple[list[bytes], bool]:
        """The waiting envelopes as frames entries (up to ``FRAMES_BATCH_MAX``, never past the
        one marked last), taken off the queue; none once the pipe failed or is done."""
        entries: list[bytes] = []
        last = False
        if self.done or self.failed:
            return entries, last
        while self._items and not last and len(entries) < FRAMES_BATCH_MAX:
            envelope, last = self._items.popleft()
            seq = self.frames_written + len(entries)
            entries.append(wire.frames(self._turn_id, seq, envelope, last=last))
        return entries, last

    def _written(self, count: int, last: bool) -> None:
        self.frames_written += count
        if last:
            self._finish(PipeOutcome.COMPLETE)

    async def _write_fallback(self) -> None:
        # Under the lock: frames the audio path took before the failure go in ahead of the marker.
        async with self._write_lock:
            if self.done:
                return
            self._items.clear()
            reason = self.reason or "motion_error"
            log.warning("motion_failed", reason=reason, detail=self.detail,
                        frames_messages=self.frames_written)
            await self._log.append(
                self._conversation_id, self._turn_id,
                wire.audio_only(self._turn_id, reason=reason), epoch=self._epoch,
            )
            self._finish(PipeOutcome.AUDIO_ONLY)

    async def _idle(self) -> None:
        self._wake.clear()
        try:
            async with asyncio.timeout(self._stall_timeout()):  # 3.11's wait_for: a task each
                await self._wake.wait()
        except TimeoutError:
            left = self._stall_timeout()
            if left is not None and left <= 0:
                self.fail(REASON_STALL, f"no frames for {self._stall_s:g}s")

    def _stall_timeout(self) -> float | None:
        if self._owed_since is None:
            return None
        since = max(self._owed_since, self._progress_at)
        return since + self._stall_s - self._loop.time()

    def _finish(self, outcome: PipeOutcome) -> None:
        if not self.done:
            self.outcome = outcome
            self._done.set()

