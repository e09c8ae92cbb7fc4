"""``relay producer``: take turn jobs from the queue and speak them through a Producer.

The loop reads jobs with XREADGROUP only while it has a free slot (``producer_concurrency``
turns at once), so a busy worker leaves jobs in Redis for other workers instead of buffering
them. A job is acknowledged (XACK, then XDEL to keep the jobs stream small) once its turn
finished, whatever its status, and also when it can never succeed:

* a malformed job (bad msgpack, unknown version, invalid field) is logged, acknowledged and
  not retried: running it again cannot fix it;
* a job whose arguments the producer refuses (ValueError, TypeError), or whose conversation
  stayed busy past ``conversation_wait_s``, is logged and acknowledged the same way.

A job whose turn failed because Redis failed, or that was cancelled by ``stop``, stays pending
in the group. Reclaiming such jobs (XAUTOCLAIM after an idle time, with a dead-letter stream after
N deliveries) is left to the crash-recovery work: ``handle_entry`` is the single entry point a
reclaimer would feed claimed entries to.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError, ResponseError
from structlog.contextvars import bound_contextvars

from relay.keys import Keys
from relay.settings import Settings
from workers.leases import ConversationBusy
from workers.producer import Producer, ProducerClosed, ProducerError, Turn, TurnResult
from workers.queue import (
    KIND_CLIP,
    InputBatch,
    MalformedJob,
    TurnJob,
    decode_job,
    read_input,
    stream_entries,
)

log = structlog.get_logger(__name__)

STOP_TIMEOUT_S = 30.0
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 5.0


class ProducerWorker:
    """Consumes ``Keys.jobs`` in group ``Keys.jobs_group`` as consumer ``settings.node_id``."""

    def __init__(self, settings: Settings, client: redis.Redis, producer: Producer) -> None:
        self._settings = settings
        self._client = client
        self._producer = producer
        self._keys = Keys(settings.key_prefix)
        self._consumer = settings.node_id
        self._concurrency = settings.producer_concurrency
        self._running: set[asyncio.Task[None]] = set()
        self._acks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loop_done = asyncio.Event()

    @property
    def running_turns(self) -> int:
        return len(self._running)

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless it exists; only BUSYGROUP is benign."""
        try:
            await self._client.xgroup_create(
                self._keys.jobs(), self._keys.jobs_group(), id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Take jobs until ``stop``; returns once no more jobs will be started."""
        self._loop_done.clear()
        try:
            await self.ensure_group()
            log.info("worker_started", consumer=self._consumer, concurrency=self._concurrency)
            delay = _BACKOFF_FIRST_S
            while not self._stopping.is_set():
                free = await self._free_slots()
                if not free:
                    break
                try:
                    entries = await self._read(free)
                    delay = _BACKOFF_FIRST_S
                except (RedisError, OSError) as exc:
                    log.warning("jobs_read_failed", error=str(exc), retry_in_s=delay)
                    await self._sleep_unless_stopping(delay)
                    delay = min(delay * 2, _BACKOFF_MAX_S)
                    continue
                for entry_id, fields in entries:
                    self._start(entry_id, fields)
        finally:
            self._loop_done.set()

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop taking jobs; wait up to ``timeout_s`` for running turns, then cancel the rest.

        Cancelled turns end interrupted (reason "aborted") and their jobs stay pending.
        """
        self._stopping.set()
        self._slot_freed.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with suppress(TimeoutError):
            # The read loop notices within one jobs_block_ms; bounded in case it never ran.
            await asyncio.wait_for(self._loop_done.wait(), self._settings.jobs_block_ms / 1000 + 1)
        if self._running:
            await asyncio.wait(set(self._running), timeout=max(0.0, deadline - loop.time()))
        await _cancel_all(self._running)
        if self._acks:
            await asyncio.wait(set(self._acks))
        log.info("worker_stopped", consumer=self._consumer)

    async def _free_slots(self) -> int:
        """Wait for at least one free turn slot; 0 once stopping."""
        while not self._stopping.is_set():
            free = self._concurrency - len(self._running)
            if free > 0:
                return free
            self._slot_freed.clear()
            await self._slot_freed.wait()
        return 0

    async def _read(self, count: int) -> list[tuple[Any, dict[bytes, bytes]]]:
        try:
            reply = await self._client.xreadgroup(
                self._keys.jobs_group(), self._consumer, {self._keys.jobs(): ">"},
                count=count, block=self._settings.jobs_block_ms,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("jobs_group_missing_recreating")
            await self.ensure_group()
            return []
        return stream_entries(reply)

    async def _sleep_unless_stopping(self, delay_s: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay_s)

    def _start(self, entry_id: Any, fields: Mapping[bytes, bytes]) -> None:
        job_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        task = asyncio.create_task(self.handle_entry(job_id, fields), name=f"job-{job_id}")
        self._running.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("job_task_failed", task=task.get_name(), exc_info=task.exception())

    # One job.

    async def handle_entry(self, job_id: str, fields: Mapping[bytes, bytes]) -> None:
        """Run one jobs-stream entry to its end and acknowledge it when it must not run again."""
        try:
            job = decode_job(fields)
        except MalformedJob as exc:
            log.warning("job_malformed", job_id=job_id, error=str(exc))
            await self._ack(job_id)
            return
        with bound_contextvars(job_id=job_id, conversation_id=job.conversation_id,
                               turn_id=job.turn_id):
            if await self._run_job(job):
                await self._ack(job_id, job)

    async def _run_job(self, job: TurnJob) -> bool:
        """True when the job is finished for good (to acknowledge), False to leave it pending."""
        try:
            result = await (self._speak_clip(job) if job.kind == KIND_CLIP else self._stream(job))
        except (ValueError, TypeError, ConversationBusy) as exc:
            log.warning("job_failed", kind=job.kind, error=str(exc), retried=False)
            return True
        except (ProducerClosed, ProducerError, RedisError, OSError) as exc:
            log.error("job_failed", kind=job.kind, error=str(exc), retried="pending")
            return False
        if result is None:
            return True
        log.info("job_done", kind=job.kind, status=result.status, error=result.error,
                 queued_ms=_queued_ms(job))
        return True

    async def _speak_clip(self, job: TurnJob) -> TurnResult:
        return await self._producer.speak(
            job.conversation_id, job.pcm or b"", sample_rate=job.sample_rate,
            avatar_id=job.avatar_id, turn_id=job.turn_id,
        )

    async def _stream(self, job: TurnJob) -> TurnResult | None:
        """Open the turn once its first audio (or its end) is in; None when no audio ever came."""
        first = await self._first_input(job)
        if first is None or not first.chunks:
            log.info("turn_input_empty", ended=first is not None and first.ended)
            return None
        turn = await self._producer.open_turn(
            job.conversation_id, sample_rate=job.sample_rate, avatar_id=job.avatar_id,
            turn_id=job.turn_id,
        )
        async with turn:  # ends the turn on exit, aborts it if pumping raised
            await self._pump(job, turn, first)
        return await turn.end()

    async def _first_input(self, job: TurnJob) -> InputBatch | None:
        """The first input that holds audio or the end; None after ``turn_input_timeout_s``."""
        batch = InputBatch(last_id="0-0", chunks=[], ended=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.turn_input_timeout_s
        while not batch.chunks and not batch.ended:
            if self._stopping.is_set():
                # Nothing was spoken yet: leave the job pending for another worker.
                raise ProducerClosed("worker stopping before the turn's audio arrived")
            left_ms = int((deadline - loop.time()) * 1000)
            if left_ms <= 0:
                return None
            batch = await self._read_input(job, batch.last_id, min(left_ms, self._block_ms))
        return batch

    async def _pump(self, job: TurnJob, turn: Turn, batch: InputBatch) -> None:
        """Feed input to the turn until its end marker, an interrupt or the input timeout."""
        loop = asyncio.get_running_loop()
        timeout_s = self._settings.turn_input_timeout_s
        deadline = loop.time() + timeout_s
        while True:
            for chunk in batch.chunks:
                if not await turn.send(chunk):
                    return  # interrupted
            if batch.ended or turn.interrupted:
                return
            if batch.chunks:
                deadline = loop.time() + timeout_s
            elif loop.time() >= deadline:
                log.warning("turn_input_timeout", timeout_s=timeout_s)
                return  # end the turn with what arrived
            batch = await self._read_input(job, batch.last_id, self._block_ms)

    @property
    def _block_ms(self) -> int:
        return self._settings.jobs_block_ms

    async def _read_input(self, job: TurnJob, after: str, block_ms: int) -> InputBatch:
        return await read_input(self._client, self._keys, job.conversation_id, job.turn_id,
                                after=after, block_ms=block_ms)

    async def _ack(self, job_id: str, job: TurnJob | None = None) -> None:
        """XACK + XDEL (and drop the turn's input), in a task ``stop`` cannot cancel halfway:
        a finished turn whose ack was lost would be spoken twice after recovery."""
        task = asyncio.create_task(self._write_ack(job_id, job), name=f"ack-{job_id}")
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)
        try:
            await asyncio.shield(task)
        except (RedisError, OSError) as exc:
            log.error("job_ack_failed", job_id=job_id, error=str(exc))

    async def _write_ack(self, job_id: str, job: TurnJob | None) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xack(self._keys.jobs(), self._keys.jobs_group(), job_id)
            pipe.xdel(self._keys.jobs(), job_id)
            if job is not None and job.kind != KIND_CLIP:
                pipe.delete(self._keys.turn_input(job.conversation_id, job.turn_id))
            await pipe.execute()


def _queued_ms(job: TurnJob) -> int | None:
    return int(time.time() * 1000) - job.submitted_ms if job.submitted_ms else None


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)

