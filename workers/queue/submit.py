"""The built-in turn queue: any backend process with a Redis client hands turns to producer workers.

A submitted turn goes into its conversation's own FIFO (``Keys.queue``, see
``workers.queue.records``),
then a doorbell for the conversation goes into ``Keys.jobs``, read by the ``producers`` consumer
group (``workers.queue.doorbells``). A job is a small versioned msgpack map::

    {"v": 1 | 2, "kind": "clip" | "stream", "conv": str, "turn": str, "rate": int,
     "avatar": str | None, "pcm": bytes (v1 clip only), "at": submit time in unix ms}

A clip job carries its audio up to ``INLINE_CLIP_MAX`` (64 KB); a larger clip waits beside its
queue entry (``Keys.queued_audio``, uploaded in the submit's own round trip; no script carries it,
see ``workers.queue.records``), and its doorbell says so. A streamed job is submitted
when the turn is opened, and its audio follows through the turn's input stream
(``Keys.turn_input``): one entry ``{"a": pcm}`` per chunk and a final ``{"end": "1"}``. The
input stream expires ``input_ttl_s`` after its last write, so abandoned input does not pile up; it
must outlive the turn's wait in the queue, because a retried turn reads its input again from the
start.

Turn ids are fixed here, at submit: every attempt of the turn writes under the same id. A submit is
idempotent per turn id: while the turn is queued or running, and after it left the queue (played,
dead-lettered or dropped) for the conversation's last ``DONE_KEEP`` turns within ``queue_ttl_s``.
So a caller that got an error may submit again with the same ``turn_id`` (that also rings the
doorbell again, which repairs a submit whose doorbell write failed), and a job another queue
system delivers twice plays once.

Backpressure: ``QueueFull`` once ``max_jobs`` doorbells wait in ``Keys.jobs`` (conversations no
worker took yet), or once the conversation itself holds ``queue_max`` queued turns.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from redis.asyncio.cluster import RedisCluster

from relay import wire
from relay.keys import Keys, validate_conversation_id, validate_turn_id
from relay.redis_conn import RedisClient, open_connections
from relay.settings import Settings
from relay.streams import ConversationLog
from workers.errors import QueueError, QueueFull
from workers.queue.doorbells import Doorbells
from workers.queue.input import StreamedInput
from workers.queue.jobs import (
    DEFAULT_MAX_JOBS,
    INLINE_CLIP_MAX,
    KIND_CLIP,
    KIND_STREAM,
    MAX_CLIP_BYTES,
    TurnJob,
)
from workers.queue.records import (
    SUBMIT_OWNER,
    Enqueued,
    JobStore,
    OpenAtSubmit,
    SubmittedAudio,
)
from workers.speech.pcm import clip_head, validate_pcm, validate_sample_rate


def _new_turn_id(turn_id: str | None) -> str:
    return validate_turn_id(turn_id) if turn_id else uuid.uuid4().hex


def _now_ms() -> int:
    return int(time.time() * 1000)



SUBMIT_QUEUED = "queued"  # newly queued
SUBMIT_ALREADY_QUEUED = "already_queued"  # the same turn id is queued or running: nothing changed
SUBMIT_ALREADY_DONE = "already_done"  # the same turn id already left the queue: not played again


@dataclass(frozen=True)
class Submitted:
    turn_id: str
    state: str  # SUBMIT_QUEUED | SUBMIT_ALREADY_QUEUED | SUBMIT_ALREADY_DONE



@dataclass(frozen=True)
class InterruptDetail:
    turn_id: str | None  # the turn that was interrupted, None when none was playing
    dropped: int  # queued turns removed with it


class TurnQueue:
    """Submit turns for producer workers; needs only a Redis client.

    :param input_ttl_s: expiry of a streamed turn's input stream after its last write.
    :param max_jobs: submissions are refused (QueueFull) while this many doorbells wait.
    :param queue_max: submissions are refused while the conversation has this many turns queued.
    :param queue_ttl_s: a conversation's queue expires this long after its last change.
    :param drop_queued_on_interrupt: default of ``interrupt(drop_queued=...)``.
    :param open_at_submit_cap: set when a clip turn of an idle conversation is to be opened in
        its own submit, with its first ``FIRST_AUDIO_S`` of audio in ``chunk_ms`` chunks
        (``RELAY_QUEUE_OPEN_AT_SUBMIT``; a single server only, and never a turn with a deadline):
        the session cap to check when no producer published theirs (every running producer
        does, ``Keys.sdk_session_cap``); None: every turn waits for a worker to open it.
    """

    def __init__(
        self, client: RedisClient, keys: Keys, *, input_ttl_s: int,
        max_jobs: int = DEFAULT_MAX_JOBS, stream_maxlen: int = 10_000, stream_ttl_s: int = 3600,
        queue_max: int = 64, queue_ttl_s: int = 86_400, drop_queued_on_interrupt: bool = True,
        open_at_submit_cap: int | None = None, chunk_ms: int = 40,
    ) -> None:
        if input_ttl_s <= 0 or max_jobs <= 0:
            raise ValueError("input_ttl_s and max_jobs must be positive")
        self._client = client
        self._keys = keys
        self._input_ttl_ms = input_ttl_s * 1000
        self._max_jobs = max_jobs
        self._drop_queued = drop_queued_on_interrupt
        self._log = ConversationLog(client, keys, maxlen=stream_maxlen, ttl_s=stream_ttl_s)
        # Submitting never leases anything: the lease time only matters to workers.
        self._store = JobStore(client, keys, ttl_s=queue_ttl_s, lease_s=1.0, queue_max=queue_max)
        self._doorbells = Doorbells(client, keys, consumer="submitter")
        # On a single server the jobs stream can be written in the enqueue script itself; on a
        # cluster it lives in another slot than the conversation's keys, so the doorbell is a
        # second call, made after the turn is queued (whoever reads it must find the turn).
        self._one_step = not isinstance(client, RedisCluster)
        # Opening a clip turn in its submit names the session leases, which only a single
        # server can put in the same script as the conversation's keys.
        if open_at_submit_cap is not None and open_at_submit_cap <= 0:
            raise ValueError("open_at_submit_cap must be positive")
        self._open_cap = open_at_submit_cap if self._one_step else None
        self._chunk_ms = chunk_ms
        self._stream_maxlen = stream_maxlen
        self._stream_ttl_ms = stream_ttl_s * 1000

    @classmethod
    def from_settings(cls, settings: Settings, client: RedisClient) -> TurnQueue:
        return cls(
            client, Keys.of(settings),
            input_ttl_s=settings.turn_input_ttl_s,
            stream_maxlen=settings.stream_maxlen, stream_ttl_s=settings.stream_ttl_s,
            queue_max=settings.conversation_queue_max, queue_ttl_s=settings.job_ttl_s,
            drop_queued_on_interrupt=settings.interrupt_drops_queued,
            open_at_submit_cap=(settings.max_sdk_sessions if settings.queue_open_at_submit
                                else None),
            chunk_ms=settings.chunk_ms,
        )

    async def open_connections(self, count: int = 8) -> int:
        """Open up to ``count`` of the client's pooled connections now (at most its pool's
        bound); returns how many it holds. Call it once at start: otherwise the first submits of
        a burst each open one in their own path (a TCP connect and redis-py's handshake, three
        round trips, which the client's first audio waits for when Redis is across a network)."""
        if count <= 0:
            raise ValueError("count must be positive")
        return await open_connections(self._client, count)

    async def submit_clip(
        self, conversation_id: str, pcm: bytes | bytearray | memoryview, *, sample_rate: int,
        avatar_id: str | None = None, turn_id: str | None = None,
        deadline_s: float | None = None,
    ) -> str:
        """Queue a whole clip as one turn; returns its turn id.

        :param deadline_s: the turn must start within this many seconds (Redis server clock),
            or it is not played and goes to the dead letters with reason "deadline".
        """
        submitted = await self.offer_clip(conversation_id, pcm, sample_rate=sample_rate,
                                          avatar_id=avatar_id, turn_id=turn_id,
                                          deadline_s=deadline_s)
        return submitted.turn_id

    async def offer_clip(
        self, conversation_id: str, pcm: bytes | bytearray | memoryview, *, sample_rate: int,
        avatar_id: str | None = None, turn_id: str | None = None,
        deadline_s: float | None = None,
    ) -> Submitted:
        """``submit_clip`` that also tells whether the turn id was new (idempotent retries)."""
        clip = validate_pcm(pcm, allow_empty=False)
        if len(clip) > MAX_CLIP_BYTES:
            raise ValueError(f"clip of {len(clip)} bytes exceeds {MAX_CLIP_BYTES}; stream it")
        job = TurnJob(
            kind=KIND_CLIP, conversation_id=validate_conversation_id(conversation_id),
            turn_id=_new_turn_id(turn_id), sample_rate=validate_sample_rate(sample_rate),
            avatar_id=_check_avatar(avatar_id), submitted_ms=_now_ms(), pcm=clip,
        )
        return Submitted(job.turn_id, await self._submit(job, deadline_s))

    async def open_streamed(
        self, conversation_id: str, *, sample_rate: int, avatar_id: str | None = None,
        turn_id: str | None = None, deadline_s: float | None = None,
    ) -> StreamedInput:
        """Queue a turn whose audio is still being generated; feed it through the result."""
        job = TurnJob(
            kind=KIND_STREAM, conversation_id=validate_conversation_id(conversation_id),
            turn_id=_new_turn_id(turn_id), sample_rate=validate_sample_rate(sample_rate),
            avatar_id=_check_avatar(avatar_id), submitted_ms=_now_ms(),
        )
        await self._submit(job, deadline_s)
        key = self._keys.turn_input(job.conversation_id, job.turn_id)
        return StreamedInput(self._client, key, conversation_id=job.conversation_id,
                             turn_id=job.turn_id, ttl_ms=self._input_ttl_ms)

    async def interrupt(self, conversation_id: str, *, reason: str = "interrupted",
                        drop_queued: bool | None = None) -> str | None:
        """Interrupt the conversation's active turn (wherever it runs); its id, or None.

        With ``drop_queued`` (default: ``drop_queued_on_interrupt``) every turn queued for the
        conversation before this call is dropped too, so the next turn submitted after it starts
        clean; without it, queued turns play after the interrupt.
        """
        outcome = await self.interrupt_detail(conversation_id, reason=reason,
                                              drop_queued=drop_queued)
        return outcome.turn_id

    async def interrupt_detail(self, conversation_id: str, *, reason: str = "interrupted",
                               drop_queued: bool | None = None) -> InterruptDetail:
        """``interrupt``, also telling how many queued turns were dropped."""
        drop = self._drop_queued if drop_queued is None else drop_queued
        extension = self._store.drop_queued(conversation_id) if drop else None
        outcome = await self._log.interrupt_with(conversation_id, reason=reason,
                                                 extension=extension)
        dropped = int(outcome.extra[0]) if outcome.extra else 0
        return InterruptDetail(turn_id=outcome.turn_id, dropped=dropped)

    async def resubmit(self, job: TurnJob, *, turn_id: str | None = None) -> str:
        """Queue a copy of ``job`` as a new turn (operators requeueing a dead letter)."""
        if job.kind != KIND_CLIP:
            raise QueueError("only clip turns can be requeued: a streamed turn's input is gone")
        if job.pcm is None:
            raise QueueError("this clip turn's audio is gone (it expired in the queue before it "
                             "was buried): it cannot be requeued")
        return await self.submit_clip(job.conversation_id, job.pcm, sample_rate=job.sample_rate,
                                      avatar_id=job.avatar_id, turn_id=turn_id)

    async def _submit(self, job: TurnJob, deadline_s: float | None) -> str:
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        deadline_ms = int(deadline_s * 1000) if deadline_s else 0
        if self._one_step:
            return await self._submit_in_one_step(job, deadline_ms)
        if await self._client.xlen(self._keys.jobs()) >= self._max_jobs:
            raise QueueFull(f"{self._max_jobs} conversations are already waiting for a worker")
        encoded, audio = _stored_form(job)
        queued = await self._store.enqueue(job.conversation_id, job.turn_id, encoded,
                                           deadline_in_ms=deadline_ms, audio=audio)
        if queued is Enqueued.FULL:
            raise QueueFull(f"conversation {job.conversation_id} already has its maximum of "
                            "turns queued")
        if queued is Enqueued.ALREADY_DONE:
            return SUBMIT_ALREADY_DONE
        # Rung after the turn is queued, so whoever reads the doorbell finds the turn. Rung
        # again for a duplicate submit: it costs one entry and repairs a lost doorbell.
        await self._doorbells.ring(job.conversation_id, job.turn_id,
                                   stored_audio=audio is not None)
        return SUBMIT_QUEUED if queued is Enqueued.QUEUED else SUBMIT_ALREADY_QUEUED

    async def _submit_in_one_step(self, job: TurnJob, deadline_ms: int) -> str:
        """The same checks and writes in one script call: the back-pressure check, the turn and
        its doorbell (one round trip instead of three; a single server only)."""
        encoded, audio = _stored_form(job)
        doorbell = self._doorbells.write_for(job.conversation_id, job.turn_id,
                                             max_waiting=self._max_jobs,
                                             stored_audio=audio is not None)
        # A turn with a deadline waits for a worker to open it: one that no worker takes in
        # time then plays none of its audio, as ``deadline_s`` promises.
        opening = None if deadline_ms else self._opening(job)
        queued = await self._store.enqueue(job.conversation_id, job.turn_id, encoded,
                                           deadline_in_ms=deadline_ms, doorbell=doorbell,
                                           audio=audio, opening=opening)
        if queued is Enqueued.JOBS_FULL:
            raise QueueFull(f"{self._max_jobs} conversations are already waiting for a worker")
        if queued is Enqueued.FULL:
            raise QueueFull(f"conversation {job.conversation_id} already has its maximum of "
                            "turns queued")
        if queued is Enqueued.ALREADY_DONE:
            return SUBMIT_ALREADY_DONE
        if queued is Enqueued.ALREADY_QUEUED:
            return SUBMIT_ALREADY_QUEUED
        return SUBMIT_QUEUED

    def _opening(self, job: TurnJob) -> OpenAtSubmit | None:
        """How the submit opens a clip turn at once, when its conversation turns out idle: the
        same ``turn_start`` and first audio entries a worker would write (``FirstAudio``, which
        this module cannot import: ``workers.speech.turn`` brings the SDK with it)."""
        if self._open_cap is None or job.pcm is None:
            return None
        head, rest = clip_head(job.pcm, sample_rate=job.sample_rate, chunk_ms=self._chunk_ms)
        start = wire.turn_start(job.turn_id, sample_rate=job.sample_rate)
        audio = SubmittedAudio(entries=len(head), audio_bytes=sum(len(c) for c in head),
                               ended=bool(head) and not rest)
        return OpenAtSubmit(owner=SUBMIT_OWNER, maxlen=self._stream_maxlen,
                            ttl_ms=self._stream_ttl_ms, session_cap=self._open_cap,
                            entries=(start, *wire.audio_run(job.turn_id, head, end=not rest)),
                            audio=audio)


def _stored_form(job: TurnJob) -> tuple[bytes, bytes | None]:
    """The job as queued, and the clip to store beside it (None: it travels inside the job)."""
    if job.pcm is not None and len(job.pcm) > INLINE_CLIP_MAX:
        return job.encode(), job.pcm
    return job.encode(inline=True), None


def _check_avatar(avatar_id: str | None) -> str | None:
    if avatar_id is not None and (not isinstance(avatar_id, str) or not avatar_id):
        raise ValueError("avatar_id must be a non-empty string")
    return avatar_id
