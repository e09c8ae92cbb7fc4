"""Running one conversation's queue: its turns one after another, each exactly once for clients.

A worker that holds a conversation's runner lease (``workers.queue.records``) takes the queue's head
turn, claims an attempt of it (the claim bumps the epoch, fencing any earlier attempt), and then:

* the turn already ended (an earlier attempt finished it just before it died): drop it from the
  queue;
* its deadline passed before it started, or its attempts are exhausted: dead-letter it; clients
  that saw part of it get ``interrupt{reason: "failed"}``;
* nothing of it was delivered: open and speak it;
* an earlier attempt opened it: read what clients have (``workers.speech.resume``) and continue
after it.

Only after the turn is over does the next one start, so a conversation's turns never interleave,
whichever worker runs them and however often one is retried. A failed attempt leaves the turn as
it is and is retried after a short pause; every attempt is counted, so a poison turn reaches the
dead letters after ``job_max_attempts`` and the conversation goes on with its next turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from enum import StrEnum

import structlog
from redis.exceptions import RedisError
from structlog.contextvars import bound_contextvars

from relay.errors import RelayError, TurnFenced
from relay.keys import Keys
from relay.redis_conn import RedisClient
from relay.settings import Settings
from relay.streams import ConversationLog
from workers.errors import AttemptFenced, MalformedJob
from workers.queue.deadletters import (
    REASON_ATTEMPTS,
    REASON_DEADLINE,
    REASON_MALFORMED,
    DeadLetters,
)
from workers.queue.input import InputBatch, read_input
from workers.queue.jobs import KIND_CLIP, TurnJob, decode_job
from workers.queue.records import (
    SUBMIT_OWNER,
    Claim,
    ClaimKind,
    Finished,
    JobStore,
    QueuedTurn,
    Released,
)
from workers.speech.leases import ConversationBusy
from workers.speech.producer import Attempt, Producer
from workers.speech.resume import Delivered, read_delivered
from workers.speech.turn import (
    STATUS_ABANDONED,
    FirstAudio,
    GateTicket,
    Turn,
    TurnResult,
    one_call,
)

log = structlog.get_logger(__name__)

REASON_FAILED = "failed"  # interrupt reason clients see for a turn that went to the dead letters
REASON_HISTORY_LOST = "failover_history_lost"  # a retried turn's start was trimmed away
_RETRY_PAUSE_S = 0.5  # after a failed attempt, before the next one (bounded by max attempts)


class RunnerExit(StrEnum):
    DONE = "done"  # the queue is empty and the lease released: acknowledge the doorbell
    HANDED_BACK = "handed_back"  # the worker is stopping: hand the doorbell back
    LOST = "lost"  # another worker runs the conversation now: leave the doorbell alone


@dataclass(frozen=True)
class RunnerServices:
    settings: Settings
    client: RedisClient
    keys: Keys
    producer: Producer
    store: JobStore
    dead: DeadLetters
    log: ConversationLog
    stopping: asyncio.Event


def _job_of(head: QueuedTurn) -> TurnJob | None:
    """The head's job as far as its entry tells (a version 2 clip's PCM only when it was read
    with the head), or None when it does not decode (its attempt dead-letters it)."""
    try:
        return decode_job({b"job": head.job}, audio=head.audio)
    except MalformedJob:
        return None


def _lead_of(batch: InputBatch) -> tuple[FirstAudio, InputBatch]:
    """The batch's first chunks as a new turn's ``FirstAudio`` (one append call's worth), and
    what is left of the batch for the turn's pump. The batch holds at least one chunk."""
    count = one_call(batch.chunks)
    rest = InputBatch(last_id=batch.last_id, chunks=batch.chunks[count:], ended=batch.ended)
    return FirstAudio(tuple(batch.chunks[:count])), rest


class _Stop(Exception):
    """The attempt ended without finishing its turn (worker stopping, or lease lost)."""


class ConversationRunner:
    """Runs one conversation's queue for as long as this worker holds its runner lease."""

    def __init__(self, services: RunnerServices, conversation_id: str, doorbell: str,
                 take_over_from: str = "", ticket: GateTicket | None = None,
                 head: QueuedTurn | None = None, claim: Claim | None = None,
                 slot: str | None = None) -> None:
        self._s = services
        # The queue's head as read with the runner lease (``JobStore.take``): the first turn
        # needs no read of its own. Possibly gone by the time it is claimed; the claim says so.
        self._first_head: QueuedTurn | None = head
        # ... and claimed with it (``claim``); with a session slot reserved at the same time
        # (``slot``) unless the conversation's session is kept here. The runner owns the slot.
        self._first_claim = claim
        self._first_slot = slot
        # The producer counts this runner's first turn as waiting for its first audio until
        # that turn has begun (it then counts itself) or the runner ends without one.
        self._ticket = ticket
        self.conversation_id = conversation_id
        self.doorbell = doorbell
        self._take_over_from = take_over_from
        self._lost = asyncio.Event()
        self._stop_now = False  # running turns must be handed back now, not finished
        self._turn: Turn | None = None
        self._opened_here = False  # the running attempt opened its turn for clients
        self.releasing = False  # letting go of the runner lease: the queue looked empty

    @property
    def owner(self) -> str:
        return self._s.producer.owner

    async def lose(self) -> None:
        """Another worker took the conversation over: stop at once, writing nothing more."""
        self._lost.set()
        await self.abandon_turn()

    async def stop_now(self) -> None:
        """The worker's stop grace ran out: hand the running turn back unfinished."""
        self._stop_now = True
        await self.abandon_turn()

    async def abandon_turn(self) -> None:
        turn = self._turn
        if turn is not None:
            await turn.abandon()

    def _must_stop(self) -> bool:
        return self._lost.is_set() or self._stop_now

    async def run(self) -> RunnerExit:
        try:
            return await self._run_queue()
        finally:
            self._release_ticket()
            slot, self._first_slot = self._first_slot, None
            if slot is not None:  # the runner ended before its first turn ran
                with suppress(RedisError, OSError):  # unreleased, the slot expires
                    await self._s.producer.release_reservation(slot)

    def _release_ticket(self) -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            ticket.release()

    async def _run_queue(self) -> RunnerExit:
        with bound_contextvars(conversation_id=self.conversation_id):
            while True:
                if self._lost.is_set():
                    return RunnerExit.LOST
                if self._s.stopping.is_set():
                    return RunnerExit.HANDED_BACK
                head = await self._next_head()
                if head is None:
                    # From here the lease may be gone at any moment by this runner's own doing:
                    # the heartbeat must not mistake that for the conversation being lost.
                    self.releasing = True
                    released = await self._s.store.release_if_empty(
                        self.conversation_id, owner=self.owner, doorbell=self.doorbell)
                    if released is Released.RELEASED:
                        return RunnerExit.DONE
                    if released is Released.LOST:
                        return RunnerExit.LOST
                    self.releasing = False
                    continue  # a turn was queued between the two reads
                with bound_contextvars(turn_id=head.turn_id):
                    if not await self._run_head(head):
                        return RunnerExit.LOST if self._lost.is_set() else RunnerExit.HANDED_BACK

    async def _next_head(self) -> QueuedTurn | None:
        head, self._first_head = self._first_head, None
        return head if head is not None else await self._s.store.head(self.conversation_id)

    async def _run_head(self, head: QueuedTurn) -> bool:
        """Deal with the head turn; False when this runner must stop."""
        claim, self._first_claim = self._first_claim, None
        slot, self._first_slot = self._first_slot, None
        if claim is not None:
            stopping = self._s.stopping.is_set() or self._lost.is_set()
            if not stopping and (claim.kind not in (ClaimKind.FRESH, ClaimKind.RESUME)
                                 or slot is not None or self._kept_for(head)):
                try:
                    return await self._claimed(head, slot, claim)
                finally:
                    await self._s.producer.release_reservation(slot)
            # Claimed with the lease, but stopping, or no slot was free and no kept session can
            # serve this turn (none, or another avatar or rate): the attempt goes back
            # uncounted, and the turn is taken the usual way, a slot first (or left to the next
            # runner).
            if not self._lost.is_set():
                await self._s.store.hand_back(self.conversation_id, head.turn_id, claim.epoch)
            if stopping:
                await self._s.producer.release_reservation(slot)
                return False
        # A slot reserved with the take serves a head it did not claim (taken over) too.
        lease = slot if slot is not None else await self._reserve_session(head)
        if self._s.stopping.is_set() or self._lost.is_set():
            await self._s.producer.release_reservation(lease)
            return False  # nothing claimed yet: the turn waits for the next runner untouched
        try:
            return await self._claimed(head, lease)
        finally:
            await self._s.producer.release_reservation(lease)

    def _kept_for(self, head: QueuedTurn) -> bool:
        job = _job_of(head)
        if job is None:
            return True  # dead-lettered by the attempt; needs no session
        return self._s.producer.keeps_session_for(self.conversation_id, avatar_id=job.avatar_id,
                                                  sample_rate=job.sample_rate)

    async def _reserve_session(self, head: QueuedTurn) -> str | None:
        """A Motion Server session slot for the turn, taken before the turn is claimed: at the
        session cap a turn waits here, queued and not counted as an attempt, instead of starting
        and falling back to audio-only."""
        job = _job_of(head)
        if job is None:
            return None  # dead-lettered right after the claim; needs no session
        return await self._s.producer.reserve_session(
            self.conversation_id, avatar_id=job.avatar_id, sample_rate=job.sample_rate,
            keep_waiting=lambda: not (self._s.stopping.is_set() or self._lost.is_set()),
            on_wait=self._release_ticket)  # at the session cap: others must not wait for it

    async def _claimed(self, head: QueuedTurn, lease: str | None,
                       claim: Claim | None = None) -> bool:
        if claim is None:
            claim, head = await self._claim_with_audio(head)
        log.info("turn_claimed", kind=claim.kind, epoch=claim.epoch, attempt=claim.attempts)
        if claim.kind is ClaimKind.GONE:
            return True
        if claim.kind is ClaimKind.FINISHED:
            return await self._finish(head, claim)
        if claim.kind in (ClaimKind.DEAD, ClaimKind.EXPIRED):
            return await self._bury(head, claim)
        return await self._attempt(head, claim, lease)

    async def _attempt(self, head: QueuedTurn, claim: Claim, lease: str | None) -> bool:
        try:
            job = await self._playable(head)
        except MalformedJob as exc:
            return await self._bury(head, claim, reason=REASON_MALFORMED, error=str(exc))
        self._opened_here = False
        try:
            result = await self._speak(job, claim, lease)
        except _Stop:
            return await self._hand_back(head, claim)
        except AttemptFenced:
            return not self._lost.is_set()  # dropped by an interrupt, or taken over
        except (ValueError, TypeError) as exc:  # the producer refuses the job's arguments
            # (or its input, which may be refused after this attempt opened the turn)
            return await self._bury(head, claim, reason=REASON_MALFORMED, error=str(exc),
                                    opened=self._opened_here)
        except (RelayError, RedisError, OSError, ConversationBusy) as exc:
            if self._must_stop() or self._s.stopping.is_set():
                # The turn was abandoned under a step in flight (graceful stop, lost lease):
                # that step's error is the hand-back's doing, not a failure of the turn.
                return await self._hand_back(head, claim)
            return await self._failed(head, claim, exc)
        except asyncio.CancelledError:
            # The worker's stop bound ran out with this attempt still busy: a hand-back too.
            if not self._lost.is_set():
                with suppress(RedisError, OSError):
                    await asyncio.shield(self._s.store.hand_back(
                        self.conversation_id, head.turn_id, claim.epoch))
            raise
        kept = await self._finish(head, claim)
        if result is not None:
            # Not kept: another worker took the turn over while this attempt was paused; what
            # looked like an interrupt here was its epoch fencing this attempt out.
            log.info("job_done" if kept else "attempt_taken_over", status=result.status,
                     error=result.error, epoch=claim.epoch, attempt=claim.attempts)
        return kept

    async def _claim_with_audio(self, head: QueuedTurn) -> tuple[Claim, QueuedTurn]:
        """Claim the head, reading its clip (version 2) in the same round trip."""
        claiming = self._s.store.claim(self.conversation_id, head, owner=self.owner)
        job = _job_of(head)
        if job is None or job.kind != KIND_CLIP or job.pcm is not None:
            return await claiming, head
        claim, audio = await asyncio.gather(
            claiming, self._s.store.audio_of(self.conversation_id, head.turn_id))
        return claim, replace(head, audio=audio)

    async def _playable(self, head: QueuedTurn) -> TurnJob:
        """The head's job with its clip: read beside the head's take when that was the
        doorbell's turn, else read now (MalformedJob when it is gone)."""
        job = decode_job({b"job": head.job}, audio=head.audio)
        if job.kind == KIND_CLIP and job.pcm is None:
            audio = await self._s.store.audio_of(self.conversation_id, head.turn_id)
            job = decode_job({b"job": head.job}, audio=audio)
            if job.pcm is None:
                raise MalformedJob("the clip's audio is gone (it expired while the turn waited "
                                   "longer than RELAY_JOB_TTL_S)")
        return job

    async def _dead_letter_job(self, head: QueuedTurn) -> bytes:
        """The job as its dead letter keeps it: self-contained, with its clip (requeueable)."""
        try:
            job = await self._playable(head)
        except (MalformedJob, RedisError, OSError):
            return head.job  # as it is: malformed, or its audio gone
        return job.encode(inline=True)

    async def _hand_back(self, head: QueuedTurn, claim: Claim) -> bool:
        """The attempt ends unfinished and uncounted; the next worker continues the turn."""
        if not self._lost.is_set():
            await self._s.store.hand_back(self.conversation_id, head.turn_id, claim.epoch)
        return False

    async def _speak(self, job: TurnJob, claim: Claim, lease: str | None) -> TurnResult | None:
        attempt = await self._attempt_for(job, claim, lease)
        if attempt is None:
            return None
        if job.kind == KIND_CLIP:
            result: TurnResult | None = await self._speak_clip(job, attempt)
        else:
            result = await self._speak_streamed(job, attempt)
        if result is not None and result.status == STATUS_ABANDONED:
            raise _Stop()
        return result

    async def _attempt_for(self, job: TurnJob, claim: Claim,
                           lease: str | None) -> Attempt | None:
        """The attempt to run; None when the turn cannot be continued (ended for clients)."""
        if claim.kind is not ClaimKind.RESUME:
            return Attempt(epoch=claim.epoch, take_over_from=self._take_over_from,
                           session_lease=lease)
        delivered = await self._delivered(job, claim)
        if delivered is None:
            log.warning("turn_history_lost")
            await self._end_for_clients(job.turn_id, claim.epoch, REASON_HISTORY_LOST)
            return None
        # Opened by its submit (the conversation was idle): its first audio is out, and no
        # earlier attempt of a producer ran it.
        at_submit = claim.previous_owner == SUBMIT_OWNER
        log.info("turn_continued", audio_bytes=delivered.audio_bytes,
                 audio_ended=delivered.audio_ended, frames=delivered.frames,
                 audio_only=delivered.audio_only, opened_at_submit=at_submit)
        guard = self._s.store.run_guard(job.conversation_id, job.turn_id, claim.epoch)
        previous = "" if at_submit else claim.previous_owner
        return Attempt(epoch=claim.epoch, delivered=delivered,
                       take_over_from=previous or self._take_over_from,
                       session_lease=lease, guard=guard)

    async def _delivered(self, job: TurnJob, claim: Claim) -> Delivered | None:
        """What clients have of the turn: as its submit's opening wrote it (which the claim
        reports: one round trip less on the way to the turn's frames), else read back."""
        if claim.submitted is not None:
            audio = claim.submitted
            return Delivered(start_id=claim.start_id, next_seq=audio.entries,
                             audio_bytes=audio.audio_bytes, audio_ended=audio.ended)
        return await read_delivered(self._s.client, self._s.keys, job.conversation_id,
                                    job.turn_id, claim.start_id)

    async def _open(self, job: TurnJob, attempt: Attempt,
                    first_audio: FirstAudio | None = None) -> Turn:
        if self._must_stop():
            raise _Stop()
        turn = await self._s.producer.open_turn(
            job.conversation_id, sample_rate=job.sample_rate, avatar_id=job.avatar_id,
            turn_id=job.turn_id, attempt=attempt, first_audio=first_audio)
        self._turn = turn
        self._opened_here = True
        self._release_ticket()  # the turn has begun: it counts itself until its first audio
        if self._must_stop():  # told to stop while the turn was opening
            await turn.abandon()
        return turn

    async def _speak_clip(self, job: TurnJob, attempt: Attempt) -> TurnResult:
        clip = job.pcm or b""
        if attempt.delivered is not None:  # continued: its start and some audio are out already
            skip = attempt.delivered.audio_bytes
            turn = await self._open(job, attempt)
            async with self._holding(turn):
                await turn.prefeed(clip[:skip])
                return await turn.speak_rest(clip[skip:])
        # A new turn's first audio goes with its start: one fenced write before the first sound.
        first, rest = FirstAudio.of_clip(clip, sample_rate=job.sample_rate,
                                         chunk_ms=self._s.settings.chunk_ms)
        turn = await self._open(job, attempt, first)
        async with self._holding(turn):
            return await turn.speak_rest(rest)

    async def _speak_streamed(self, job: TurnJob, attempt: Attempt) -> TurnResult | None:
        self._release_ticket()  # its input may be slow to come: others must not wait for it
        await self._keep_input(job)
        first = await self._first_input(job, attempt)
        if first is None:
            return None
        lead: FirstAudio | None = None
        if attempt.delivered is None:
            # A new turn's first input chunks go with its start (bounded like one append call).
            lead, first = _lead_of(first)
        turn = await self._open(job, attempt, lead)
        async with self._holding(turn):
            await self._pump(job, turn, first, attempt)
            return await turn.end()

    @asynccontextmanager
    async def _holding(self, turn: Turn) -> AsyncIterator[None]:
        """Whatever ends the attempt, the turn lets go of everything it holds (the producer's
        conversation lock and lease, its Motion Server session, its frames writer). The turn's
        own steps do that on their failures; the input reads of a streamed turn run between
        them, so a Redis error or a cancellation while blocked on input must do it here."""
        try:
            yield
        except BaseException:
            with suppress(RedisError, OSError, RelayError):
                await asyncio.shield(turn.stop_after_failure())
            raise
        finally:
            self._turn = None

    async def _keep_input(self, job: TurnJob) -> None:
        # A retry reads the input from its start: it must outlive the turn, not just the writes.
        key = self._s.keys.turn_input(job.conversation_id, job.turn_id)
        await self._s.client.pexpire(key, self._s.settings.turn_input_ttl_s * 1000)

    async def _first_input(self, job: TurnJob, attempt: Attempt) -> InputBatch | None:
        """The first input holding audio or the end; None when none came within
        ``turn_input_timeout_s`` (nothing to play). Raises _Stop when the worker stops or the
        attempt was dropped meanwhile."""
        if attempt.delivered is not None:
            return await self._read_input(job, "0-0")  # the turn is open: no waiting for it
        batch = InputBatch(last_id="0-0", chunks=[], ended=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._s.settings.turn_input_timeout_s
        while not batch.chunks and not batch.ended:
            await self._check_running(job, attempt)
            if loop.time() >= deadline:
                log.info("turn_input_empty")
                return None
            batch = await self._read_input(job, batch.last_id)
        if not batch.chunks:
            log.info("turn_input_empty", ended=True)
            return None
        return batch

    async def _check_running(self, job: TurnJob, attempt: Attempt) -> None:
        if self._s.stopping.is_set() or self._lost.is_set():
            raise _Stop()  # nothing was spoken yet: the next worker starts it
        if not await self._s.store.still_running(job.conversation_id, job.turn_id, attempt.epoch):
            raise AttemptFenced("dropped while waiting for its input")

    async def _pump(self, job: TurnJob, turn: Turn, batch: InputBatch, attempt: Attempt) -> None:
        """Feed input to the turn until its end marker, an interrupt or the input timeout; audio
        clients already have (a continued turn) only goes to the new Motion Server request."""
        skip = attempt.delivered.audio_bytes if attempt.delivered else 0
        offset = 0
        loop = asyncio.get_running_loop()
        timeout_s = self._s.settings.turn_input_timeout_s
        deadline = loop.time() + timeout_s
        while True:
            # Everything that arrived is sent in one go: one fenced append per batch of chunks.
            # Delivered audio is a prefix of the input, so every head comes before every tail.
            tails: list[bytes] = []
            for chunk in batch.chunks:
                head, tail = chunk[: max(0, skip - offset)], chunk[max(0, skip - offset) :]
                offset += len(chunk)
                await turn.prefeed(head)
                if tail:
                    tails.append(tail)
            if tails and not await turn.send_many(tails):
                return  # interrupted
            if batch.ended or turn.interrupted:
                return
            if batch.chunks:
                deadline = loop.time() + timeout_s
            elif loop.time() >= deadline:
                log.warning("turn_input_timeout", timeout_s=timeout_s)
                return  # end the turn with what arrived
            batch = await self._read_input(job, batch.last_id)

    async def _read_input(self, job: TurnJob, after: str) -> InputBatch:
        return await read_input(self._s.client, self._s.keys, job.conversation_id, job.turn_id,
                                after=after, block_ms=self._s.settings.jobs_block_ms)

    # Ends of a turn's stay in the queue.

    async def _finish(self, head: QueuedTurn, claim: Claim) -> bool:
        finished = await self._s.store.finish(self.conversation_id, head, claim.epoch)
        return finished is not Finished.TAKEN_OVER

    async def _bury(self, head: QueuedTurn, claim: Claim, *, reason: str = "",
                    error: str = "", opened: bool = False) -> bool:
        """Dead-letter the head turn; clients that saw part of it (opened by an earlier attempt,
        or by this one: ``opened``) get ``interrupt{failed}``."""
        reason = reason or (REASON_DEADLINE if claim.kind is ClaimKind.EXPIRED else REASON_ATTEMPTS)
        if not error and reason == REASON_ATTEMPTS:
            last = await self._s.store.last_error(self.conversation_id, head.turn_id)
            error = last or "its workers stopped or crashed during every attempt"
        await self._s.dead.bury(conversation_id=self.conversation_id, turn_id=head.turn_id,
                                reason=reason, error=error, attempts=claim.attempts - 1,
                                job=await self._dead_letter_job(head))
        opened = opened or claim.opened
        log.warning("turn_dead_lettered", reason=reason, error=error,
                    attempts=claim.attempts - 1, opened=opened)
        self._s.producer.metrics.turn_dead_lettered(reason)
        if opened:
            await self._end_for_clients(head.turn_id, claim.epoch, REASON_FAILED)
        return await self._finish(head, claim)

    async def _end_for_clients(self, turn_id: str, epoch: int, reason: str) -> None:
        """Clients that saw part of a turn that will not go on get ``interrupt``: their player
        resets, and nothing more of the turn follows."""
        try:
            await self._s.log.interrupt_turn(self.conversation_id, turn_id, epoch=epoch,
                                             reason=reason)
        except TurnFenced:
            pass  # interrupted meanwhile, or another attempt runs it

    async def _failed(self, head: QueuedTurn, claim: Claim, exc: BaseException) -> bool:
        error = f"{type(exc).__name__}: {exc}"
        log.error("job_attempt_failed", error=error, attempt=claim.attempts)
        self._s.producer.metrics.attempt_failed()
        recorded = await self._s.store.record_failure(self.conversation_id, head.turn_id,
                                                      claim.epoch, error)
        try:
            await asyncio.wait_for(self._s.stopping.wait(), _RETRY_PAUSE_S * claim.attempts)
        except TimeoutError:
            pass
        return recorded or not self._lost.is_set()
