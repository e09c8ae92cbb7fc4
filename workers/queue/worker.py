"""``relay producer``: take conversations from the job queue and run their turns through a Producer.

The loop, while not stopping:

1. wait for a free slot (``producer_concurrency`` conversations at once);
2. wait until the Motion Server session cap has room (``Producer.session_room``: slots free
   anywhere, plus this producer's idle kept sessions, which serve their own conversations' next
   turns or close for others'): a worker does not take work it cannot give a session to, so at
   the cap turns wait in Redis, and idle sessions anywhere are closed for them; audio-only for
   capacity stays a last resort, for the rare turn that still finds no slot within
   ``sdk_wait_s``. It reads at most that many doorbells at once;
3. take doorbells: first those idle for ``job_claim_idle_s`` (their worker crashed or handed them
   back; XAUTOCLAIM), else new ones (XREADGROUP);
4. for each, try to become the conversation's runner (``workers.queue.records``); a conversation
that
   another worker runs is left to it and the doorbell acknowledged; otherwise a
   ``ConversationRunner`` runs its queue until it is empty.

One heartbeat task renews, for every conversation this worker runs, the runner lease and the
doorbell's idle time; what it lost, it stops at once (a paused worker that lost its conversations
is fenced by the epoch anyway). ``stop`` stops taking work, lets running turns finish for up to
``producer_stop_s``, then hands the rest back: nothing is written for them, their attempt is not
counted, and their doorbells become claimable by any other worker at once.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from dataclasses import replace

import structlog
from redis.exceptions import RedisError

from relay.keys import Keys
from relay.redis_conn import RedisClient
from relay.settings import Settings
from relay.streams import ConversationLog, stream_info
from workers.queue.deadletters import REASON_MALFORMED, DeadLetters
from workers.queue.doorbells import Doorbell, Doorbells
from workers.queue.records import JobStore, RunnerTake, Take
from workers.queue.runner import ConversationRunner, RunnerExit, RunnerServices
from workers.speech.periodic import Periodic
from workers.speech.producer import Producer
from workers.speech.turn import GateTicket

log = structlog.get_logger(__name__)

# After the stop grace, abandoning the running turns and handing their conversations back gets
# this long; a worker's stop is bounded by ``producer_stop_s`` + HAND_BACK_S whatever its turns
# are waiting for (docs/operations.md "Graceful stop").
HAND_BACK_S = 4.0
_CANCEL_WAIT_S = 0.5
_FORGET_S = 0.5  # removing this consumer from the group is a courtesy: never worth waiting for
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 2.0
# A handed-back doorbell looks this idle, so any worker's next XAUTOCLAIM takes it.
_HANDED_BACK_IDLE_MS = 10 * 365 * 86_400_000


async def _none() -> None:
    return None


class ProducerWorker:
    """Consumes ``Keys.jobs`` in group ``Keys.jobs_group`` under a consumer name unique to the
    process (the producer's owner id)."""

    def __init__(self, settings: Settings, client: RedisClient, producer: Producer) -> None:
        self._settings = settings
        self._client = client
        self._producer = producer
        keys = Keys.of(settings)
        self._doorbells = Doorbells(client, keys, consumer=producer.owner)
        store = JobStore(client, keys, ttl_s=settings.job_ttl_s,
                         lease_s=settings.conversation_lease_s,
                         max_attempts=settings.job_max_attempts,
                         queue_max=settings.conversation_queue_max)
        self._store = store
        self._dead = DeadLetters(client, keys, maxlen=settings.dead_letter_maxlen)
        self._stopping = asyncio.Event()
        self._services = RunnerServices(
            settings=settings, client=client, keys=keys, producer=producer, store=store,
            dead=self._dead, stopping=self._stopping,
            log=ConversationLog(client, keys, maxlen=settings.stream_maxlen,
                                ttl_s=settings.stream_ttl_s),
        )
        self._claim_idle_ms = int(settings.job_claim_idle_s * 1000)
        self._runners: dict[str, ConversationRunner] = {}  # by doorbell id
        self._dispatching = 0  # doorbells read whose take is in flight (each holds a slot)
        self._dispatch_failure: BaseException | None = None  # raised by the read loop
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._loop_done = asyncio.Event()
        self._next_reclaim = 0.0
        self._blocked: str | None = "not started"
        beat = min(settings.job_claim_idle_s, settings.conversation_lease_s) / 3
        self._heartbeat = Periodic("jobs-heartbeat", beat, self.heartbeat)
        self._keys = keys
        producer.metrics.bind_worker(conversations=lambda: len(self._runners),
                                     concurrency=settings.producer_concurrency,
                                     sampler=self.sample_queue)

    @property
    def running_turns(self) -> int:
        """Conversations this worker is running now (each runs one turn at a time)."""
        return len(self._runners)

    async def run(self) -> None:
        """Take work until ``stop``; returns once no more work will be started."""
        self._loop_done.clear()
        try:
            await self._doorbells.ensure_group()
            self._heartbeat.start()
            log.info("worker_started", consumer=self._doorbells.consumer,
                     concurrency=self._settings.producer_concurrency)
            self._blocked = None
            delay = _BACKOFF_FIRST_S
            while not self._stopping.is_set():
                try:
                    await self._take_work()
                    delay = _BACKOFF_FIRST_S
                    self._blocked = None
                except (RedisError, OSError) as exc:
                    self._blocked = f"{type(exc).__name__}: {exc}"
                    log.warning("jobs_read_failed", error=str(exc), retry_in_s=delay)
                    self._producer.metrics.jobs_read_errors.inc()
                    await self._sleep_unless_stopping(delay)
                    delay = min(delay * 2, _BACKOFF_MAX_S)
        except BaseException as exc:
            self._blocked = f"job loop ended: {type(exc).__name__}"
            raise
        finally:
            self._loop_done.set()

    def blocked(self) -> str | None:
        """Why this worker cannot take work now (for ``/readyz``), or None while it can: its
        job loop runs and its last round of reading the jobs group succeeded."""
        return self._blocked

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop taking work; let running turns finish for ``timeout_s`` (``producer_stop_s``),
        then hand every conversation still held back to the other workers."""
        grace = self._settings.producer_stop_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self._stopping.set()
        self._slot_freed.set()
        with suppress(TimeoutError):
            # The read loop notices within one jobs_block_ms; bounded in case it never ran.
            await asyncio.wait_for(self._loop_done.wait(), self._settings.jobs_block_ms / 1000 + 1)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - loop.time()))
        await self._hand_back_all()
        await self._heartbeat.close()
        with suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._doorbells.forget_consumer(), _FORGET_S)
        log.info("worker_stopped", consumer=self._doorbells.consumer)

    async def _hand_back_all(self) -> None:
        """Abandon every turn still running and let the runners hand their conversations back,
        for up to HAND_BACK_S in all; runners still busy then (blocked on a Redis that does not
        answer) are cancelled: their doorbells go idle and another worker takes them over after
        ``job_claim_idle_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HAND_BACK_S
        stops = [asyncio.create_task(self._stop_runner(r)) for r in self._runners.values()]
        if stops:
            await asyncio.wait(stops, timeout=HAND_BACK_S)
        busy: set[asyncio.Task[None]] = set(self._tasks)
        if busy:
            _, busy = await asyncio.wait(busy, timeout=max(0.0, deadline - loop.time()))
        for task in (*stops, *busy):
            task.cancel()
        if busy:
            log.warning("runners_cancelled_at_stop", runners=len(busy))
            await asyncio.wait({*stops, *busy}, timeout=_CANCEL_WAIT_S)

    async def _stop_runner(self, runner: ConversationRunner) -> None:
        try:
            await runner.stop_now()
        except (RedisError, OSError) as exc:
            log.warning("runner_stop_failed", conversation_id=runner.conversation_id,
                        error=str(exc))

    # Taking work.

    async def _take_work(self) -> None:
        free = await self._free_slots()
        room = await self._session_room() if free else 0
        if not free or not room:
            return
        self._raise_dispatch_failure()
        bells = await self._reclaim(min(free, room))
        if not bells:
            bells = await self._doorbells.read(min(free, room), self._settings.jobs_block_ms)
        # Each doorbell is dispatched in a task of its own and the loop reads on at once: when
        # many conversations start together, their doorbells arrive over a few ms, and waiting
        # for one read's dispatch round trips before the next read made each later wave of
        # turns start a round later. A failed dispatch leaves its doorbell pending (it is
        # reclaimed after job_claim_idle_s) and makes the loop back off (_raise_dispatch_failure).
        for bell in bells:
            self._dispatching += 1
            task = asyncio.create_task(self._dispatch_counted(bell),
                                       name=f"dispatch-{bell.entry_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _dispatch_counted(self, bell: Doorbell) -> None:
        # From here the turn counts as waiting for its first audio; a runner started for it
        # takes the ticket over (and releases it once its turn has begun), else it ends here.
        # Not a turn its submit opened: that one's first audio is out already, and holding the
        # other turns' sessions back for it (up to MOTION_OPEN_GRACE_S) only delays their frames.
        ticket = None if bell.opened_at_submit else self._producer.expect_turn()
        runner: ConversationRunner | None = None
        try:
            runner = await self._dispatch(bell, ticket)
        except Exception as exc:  # Redis errors back off; anything else ends the loop, as before
            self._dispatch_failure = exc
        finally:
            if ticket is not None and runner is None:
                ticket.release()
            self._dispatching -= 1
            self._slot_freed.set()

    def _raise_dispatch_failure(self) -> None:
        failure, self._dispatch_failure = self._dispatch_failure, None
        if failure is not None:
            raise failure  # the read loop backs off and retries (the doorbell stays pending)

    async def _free_slots(self) -> int:
        """Wait for at least one free slot; 0 once stopping. A doorbell being dispatched holds
        a slot, so the loop never reads more than ``producer_concurrency`` conversations."""
        while not self._stopping.is_set():
            free = self._settings.producer_concurrency - len(self._runners) - self._dispatching
            if free > 0:
                return free
            self._slot_freed.clear()
            await self._slot_freed.wait()
        return 0

    async def _session_room(self) -> int:
        """Wait until the session cap has room (polling: slots free up on other processes too);
        0 once stopping."""
        delay = _BACKOFF_FIRST_S
        while not self._stopping.is_set():
            room = await self._producer.session_room()
            if room > 0:
                return room
            await self._sleep_unless_stopping(delay)
            delay = min(delay * 2, 1.0)
        return 0

    async def _reclaim(self, count: int) -> list[Doorbell]:
        """Doorbells of crashed or stopping workers, looked for every half claim-idle time."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_reclaim:
            return []
        self._next_reclaim = loop.time() + min(self._settings.job_claim_idle_s / 2, 5.0)
        bells = await self._doorbells.reclaim(count, self._claim_idle_ms)
        for bell in bells:
            log.info("doorbell_reclaimed", doorbell=bell.entry_id,
                     conversation_id=bell.conversation_id)
        return bells

    async def _dispatch(self, bell: Doorbell, ticket: GateTicket | None = None
                        ) -> ConversationRunner | None:
        """Take the doorbell's conversation; the runner started for it (which then owns
        ``ticket``), or None when there is nothing to run here."""
        if bell.entry_id in self._runners:
            return None  # our own doorbell came back through XAUTOCLAIM: it is running here
        conversation_id = bell.conversation_id
        if conversation_id is None:
            await self._bury_malformed(bell)
            return None
        try:
            take, slot = await self._take(conversation_id, bell)
        except ValueError:  # an invalid conversation id: no key can be named for it
            await self._bury_malformed(bell)
            return None
        if not take.runs:
            await self._producer.release_reservation(slot)
            # The runner (here or elsewhere) holds a doorbell of its own and checks the queue
            # atomically before it lets go, so it will run every turn queued before now.
            await self._doorbells.ack(bell.entry_id)
            return None
        over = take.kind is RunnerTake.TAKEN_OVER
        if over:
            silence_s = await self._silence_s(conversation_id)
            log.info("conversation_taken_over", conversation_id=conversation_id,
                     previous_owner=take.holder, silent_for_s=silence_s)
            self._producer.metrics.taken_over(silence_s)
        runner = ConversationRunner(self._services, conversation_id, bell.entry_id,
                                    take_over_from=take.holder if over else "",
                                    ticket=ticket, head=take.head, claim=take.claim, slot=slot)
        self._start(runner)
        return runner

    async def _take(self, conversation_id: str, bell: Doorbell) -> tuple[Take, str | None]:
        """Take the conversation with its head claimed in the same step, and, unless its session
        is kept here, try for a session slot at the same time: a conversation's first turn then
        pays the round trips of a later one on its way to the first audio (taking, then
        reserving, then claiming cost it two more; with Redis 2 ms away its first audio came 4
        to 10 ms sooner). The slot, or None: none is needed, or none was free (the runner then
        hands the claim back uncounted and waits for a slot the usual way before it claims
        again: two round trips more, at the cap only)."""
        take = self._store.take(conversation_id, owner=self._producer.owner,
                                doorbell=bell.entry_id, claim=True)
        # A stored clip of the doorbell's turn, read beside the take: that turn is the head
        # unless turns were queued before it (the runner then reads its head's clip itself).
        stored = bool(bell.turn_id) and bell.stored_audio
        kept = self._producer.keeps_session(conversation_id)
        if kept and not stored:
            return await take, None
        audio = self._store.audio_of(conversation_id, bell.turn_id or "") if stored else _none()
        slot_of = _none() if kept else self._producer.try_reserve_session()
        taken, clip, slot = await asyncio.gather(take, audio, slot_of, return_exceptions=True)
        if isinstance(slot, BaseException):
            slot = None  # the runner reserves again the usual way, and reports any error
        if isinstance(taken, BaseException):
            await self._producer.release_reservation(slot)
            raise taken
        head = taken.head
        if head is not None and isinstance(clip, bytes) and head.turn_id == bell.turn_id:
            taken = replace(taken, head=replace(head, audio=clip))
        return taken, slot

    async def _silence_s(self, conversation_id: str) -> float | None:
        """How long the conversation's stream has had no new entry (its clients' wait so far)."""
        try:
            info = await stream_info(self._client, self._keys, conversation_id)
            now_s, now_us = await self._client.time()
        except (RedisError, OSError):
            return None
        if not info.exists:
            return None
        last_ms = int(info.last_id.split("-")[0])
        return round(max(0.0, float(now_s) + float(now_us) / 1e6 - last_ms / 1000), 3)

    async def sample_queue(self) -> dict[str, float]:
        """Queue-wide figures for the metrics, read when Prometheus scrapes."""
        figures: dict[str, float] = {}
        for group in await self._client.xinfo_groups(self._keys.jobs()):
            name = group.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == self._keys.jobs_group():
                figures["doorbells_pending"] = float(group.get("pending") or 0)
                figures["doorbells_waiting"] = float(group.get("lag") or 0)
        figures["dead_letters"] = float(await self._dead.count())
        used, waiting = await self._producer.session_usage()
        figures["slots_used"], figures["slot_waiters"] = float(used), float(waiting)
        return figures

    async def _bury_malformed(self, bell: Doorbell) -> None:
        log.warning("doorbell_malformed", doorbell=bell.entry_id)
        await self._dead.bury(conversation_id=bell.conversation_id or "",
                              turn_id=bell.turn_id or "", reason=REASON_MALFORMED,
                              error="not a doorbell of this version",
                              job=bell.fields.get(b"job", b""))
        await self._doorbells.ack(bell.entry_id)

    # Running conversations.

    def _start(self, runner: ConversationRunner) -> None:
        self._runners[runner.doorbell] = runner
        task = asyncio.create_task(self._run(runner), name=f"runner-{runner.conversation_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, runner: ConversationRunner) -> None:
        exit_ = RunnerExit.HANDED_BACK
        try:
            exit_ = await runner.run()
        except (RedisError, OSError) as exc:
            log.error("runner_redis_failed", conversation_id=runner.conversation_id,
                      error=str(exc))
        except Exception:
            log.exception("runner_failed", conversation_id=runner.conversation_id)
        finally:
            await asyncio.shield(self._settle(runner, exit_))

    async def _settle(self, runner: ConversationRunner, exit_: RunnerExit) -> None:
        """Acknowledge or hand back the runner's doorbell: never leave it pending and renewed
        with nobody running the conversation."""
        runner.releasing = True
        try:
            if exit_ is RunnerExit.DONE:
                await self._doorbells.ack(runner.doorbell)
            elif exit_ is RunnerExit.HANDED_BACK:
                await self._store.give_up(runner.conversation_id, owner=self._producer.owner,
                                          doorbell=runner.doorbell)
                await self._doorbells.hand_back(runner.doorbell, _HANDED_BACK_IDLE_MS)
                log.info("conversation_handed_back", conversation_id=runner.conversation_id)
        except (RedisError, OSError) as exc:
            # Not renewed any more, the doorbell goes idle and is reclaimed after claim-idle.
            log.warning("doorbell_settle_failed", error=str(exc), exit=exit_)
        finally:
            self._runners.pop(runner.doorbell, None)
            self._slot_freed.set()

    async def heartbeat(self) -> None:
        """Renew every runner lease and doorbell held here; stop the conversations lost."""
        runners = [r for r in self._runners.values() if not r.releasing]
        if not runners:
            return
        lost = await self._doorbells.touch([r.doorbell for r in runners])
        renewed = await asyncio.gather(*(
            self._store.renew(r.conversation_id, owner=self._producer.owner, doorbell=r.doorbell)
            for r in runners))
        for runner, kept in zip(runners, renewed, strict=True):
            # A runner that released its lease (or acknowledged its doorbell) while this round
            # was in flight finished its queue: that is not a loss.
            gone = runner.doorbell in lost or not kept
            if gone and self._runners.get(runner.doorbell) is runner and not runner.releasing:
                log.warning("conversation_lost", conversation_id=runner.conversation_id)
                await runner.lose()

    async def _sleep_unless_stopping(self, delay_s: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay_s)
