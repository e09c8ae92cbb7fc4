"""The producer: speaks turns into conversation streams, with motion from the Spatius SDK.

A turn (``workers.speech.turn``), in stream order: ``turn_start``; ``audio`` entries, each appended
before
its chunk goes to the Motion Server; ``frames`` entries byte-for-byte as the SDK handed them over;
the audio end marker; ``turn_end``. If the Motion Server fails the turn, one ``audio_only`` entry
says so, the audio still flows, and the turn ends ``audio_only``. Every write is fenced
(``relay.streams``): once a turn is interrupted or superseded it writes nothing more.

Embed it in any asyncio backend::

    async with Producer(settings, client) as producer:
        result = await producer.speak("conv-1", pcm)
        async with await producer.open_turn("conv-1") as turn:
            await turn.send(chunk)
        # Audio already at hand goes into the turn's first write, with its turn_start:
        async with await producer.open_turn("conv-1", first_audio=FirstAudio((chunk,))) as turn:
            await turn.send(next_chunk)
        await producer.interrupt("conv-1")

Queue workers pass an ``Attempt``: the turn id is fixed at submit, and the attempt's epoch fences
every earlier attempt of the same turn (``workers.queue.runner``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import RedisError
from structlog.contextvars import bound_contextvars

from relay.build import relay_version, sdk_version
from relay.errors import LockHeld, RelayError, TurnFenced
from relay.keys import Keys, validate_conversation_id, validate_turn_id
from relay.redis_conn import RedisClient, open_connections
from relay.settings import Settings
from relay.streams import ConversationLog, Guard, Lock
from workers.errors import AttemptFenced, ProducerClosed, ProducerError
from workers.metrics import ProducerMetrics
from workers.speech.control import ControlListener
from workers.speech.endpoints import MotionEndpoints, configure_sdk_telemetry, prewarm_sdk
from workers.speech.frames import FramesPipe, PipeOutcome
from workers.speech.leases import ConversationBusy, ConversationLeases, SessionLeases
from workers.speech.pcm import validate_pcm, validate_sample_rate
from workers.speech.pool import SessionPool
from workers.speech.resume import Delivered
from workers.speech.session import SESSION_TOKEN_TTL
from workers.speech.tokens import TokenStock
from workers.speech.turn import (
    FirstAudio,
    FirstAudioGate,
    GateTicket,
    Turn,
    TurnResult,
    TurnServices,
    TurnSpec,
)

__all__ = [  # FramesPipe, PipeOutcome moved to workers.speech.frames, Turn to workers.speech.turn
    "Attempt", "FirstAudio", "FramesPipe", "PipeOutcome", "Producer", "ProducerClosed",
    "ProducerError", "Turn", "TurnResult",
]

log = structlog.get_logger(__name__)

CLOSE_WAIT_S = 10.0  # Producer.close waits this long for running turns before closing sessions
_RESERVE_POLL_S = 1.0  # a waiting reservation re-checks whether it should still wait this often
_LEASE_RELEASE_S = 2.0  # a turn's release of its conversation lease gives up after this


@dataclass(frozen=True)
class Attempt:
    """One attempt of a queued turn (see ``workers.queue.runner``).

    :param epoch: the attempt's epoch from its claim; every write checks it.
    :param delivered: what earlier attempts delivered, when the turn is already open: the
        attempt continues it instead of opening it.
    :param take_over_from: a producer whose conversation lock may be taken at once (its attempt
        was fenced by the claim).
    :param session_lease: a Motion Server session slot reserved before the claim
        (``reserve_session``); the turn's new session uses it.
    :param guard: checked atomically when the attempt opens its turn (``ConversationLog``): the
        job queue's "this attempt is the one allowed to run".
    """

    epoch: int
    delivered: Delivered | None = None
    take_over_from: str = ""
    session_lease: str | None = None
    guard: Guard | None = None  # the caller's condition for opening the turn (the queue's fence)


class _KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it (bounded by use)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def acquire(self, key: str, timeout_s: float) -> None:
        """Take the key's lock, waiting at most ``timeout_s`` (then ConversationBusy): a turn
        that never lets go must not hold up the conversation's later turns for ever."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with asyncio.timeout(timeout_s):
                await lock.acquire()
        except TimeoutError:
            self._forget(key)
            raise ConversationBusy(f"conversation {key} is busy with a turn of this producer") \
                from None
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
    :param metrics: where the producer counts (``producer.metrics``); a fresh registry if None.
    """

    def __init__(
        self, settings: Settings, client: RedisClient, *,
        console_url: str | None = None, ingress_url: str | None = None,
        metrics: ProducerMetrics | None = None,
    ) -> None:
        if settings.frames_timeout_s <= 0 or settings.session_idle_s <= 0:
            raise ValueError("frames_timeout_s and session_idle_s must be positive")
        self._settings = settings
        self._client = client
        self.metrics = metrics if metrics is not None else ProducerMetrics()
        self._keys = Keys.of(settings)
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
            hold_s=settings.sdk_paused_hold_s, liveness_known=not settings.redis_cluster,
        )
        self._conversation_leases = ConversationLeases(
            client, self._keys, owner=self._owner, lease_s=settings.conversation_lease_s
        )
        self._tokens = TokenStock(self._endpoints, size=settings.sdk_token_stock,
                                  ttl=SESSION_TOKEN_TTL)
        self._pool = SessionPool(
            self._endpoints, self._session_leases, idle_s=settings.session_idle_s,
            per_turn=settings.per_turn_sessions, open_timeout_s=settings.frames_timeout_s,
            tokens=self._tokens,
            metrics=self.metrics,
        )
        self._services = TurnServices(
            log=self._log, pool=self._pool, frames_timeout_s=settings.frames_timeout_s,
            chunk_ms=settings.chunk_ms,
            spawn=self._spawn, closed=self._turn_closed, interrupt=self._interrupt_own_turn,
            metrics=self.metrics, first_audio=FirstAudioGate(),
        )
        self._control = ControlListener(client, self._keys, self._on_interrupt_message,
                                        alive_channel=self._keys.producer_alive(self._owner))
        self._locks = _KeyedLocks()
        self._active: dict[str, Turn] = {}
        self._no_turns = asyncio.Event()
        self._no_turns.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False
        self.metrics.bind_producer(active_turns=lambda: len(self._active),
                                   sessions_open=lambda: len(self._pool),
                                   cap=settings.max_sdk_sessions)

    @property
    def owner(self) -> str:
        """This producer's identity in leases and turn records."""
        return self._owner

    def expect_turn(self) -> GateTicket | None:
        """A turn of this producer is about to start (a worker read its job): until the ticket
        is released, other turns' session opens and the rest of their audio wait for it as for
        a started turn's first audio (each at most MOTION_OPEN_GRACE_S), so a turn claimed a
        few ms after others does not queue behind their bulk work."""
        gate = self._services.first_audio
        return gate.ticket() if gate is not None else None

    @property
    def awaiting_first_audio(self) -> int:
        """Turns of this producer counted as waiting for their first audio (see expect_turn)."""
        gate = self._services.first_audio
        return gate.waiting if gate is not None else 0

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
        telemetry = configure_sdk_telemetry(self._settings.spatius_sdk_telemetry,
                                            simulated=self._endpoints.simulated)
        await prewarm_sdk(self._endpoints)  # never raises; best effort, bounded by the SDK
        await self._open_connections()
        await self._session_leases.publish_cap()  # then with every renewal
        self._tokens.start()
        await self._control.start()
        self._session_leases.start()
        self._conversation_leases.start()
        self._pool.start()
        self._running = True
        log.info("producer_started", owner=self._owner, simulated=self._endpoints.simulated,
                 version=relay_version(), spatius=sdk_version(),
                 sdk_telemetry=telemetry)

    async def _open_connections(self) -> None:
        """Open the Redis connections turns will use now, not when a conversation's first turn
        or many turns at once need one more: each new connection costs a TCP connect and a
        handshake on the way to a first audio (``open_connections``)."""
        count = min(self._settings.redis_pool_size, self._settings.producer_concurrency)
        await open_connections(self._client, count)

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
        await self._tokens.close()
        # Together, each bounded: a stop must not wait on a Redis that does not answer.
        await asyncio.gather(self._session_leases.close(), self._conversation_leases.close())
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
        first, rest = FirstAudio.of_clip(clip, sample_rate=spec.sample_rate,
                                         chunk_ms=self._settings.chunk_ms)
        with bound_contextvars(conversation_id=spec.conversation_id, turn_id=spec.turn_id):
            turn = await self._open(spec, None, first)
            return await turn.speak_rest(rest)

    async def open_turn(
        self, conversation_id: str, *, sample_rate: int | None = None,
        avatar_id: str | None = None, turn_id: str | None = None, attempt: Attempt | None = None,
        first_audio: FirstAudio | None = None,
    ) -> Turn:
        """Start a streamed turn (TTS still generating); returns once audio can be sent.

        Waits for the conversation's previous turn to end (up to ``conversation_wait_s``, then
        ConversationBusy) and for a Motion Server session (up to ``sdk_wait_s`` when the session
        cap is reached; after that the turn runs audio-only). With an ``attempt`` (queued turns)
        it raises AttemptFenced when that attempt may no longer run. ``first_audio``, audio the
        caller already has, goes into the stream with the turn's start (one write less before
        the client's first sound); the turn's ``send`` calls go on after it. A continued
        attempt (``attempt.delivered``) has its start already and takes none (ValueError).
        """
        if first_audio is not None and attempt is not None and attempt.delivered is not None:
            raise ValueError("a continued attempt's turn is open already: no first_audio")
        spec = self._spec(conversation_id, sample_rate, avatar_id, turn_id,
                          attempt.epoch if attempt else 0)
        with bound_contextvars(conversation_id=spec.conversation_id, turn_id=spec.turn_id):
            return await self._open(spec, attempt, first_audio)

    async def interrupt(self, conversation_id: str, reason: str = "interrupted") -> str | None:
        """Interrupt the conversation's active turn, wherever it runs; its id, or None."""
        turn_id = await self._log.interrupt(conversation_id, reason=reason)
        if turn_id is not None:
            self._on_interrupt_message(conversation_id, turn_id)  # local fast path
        return turn_id

    # Turn plumbing.

    def _spec(
        self, conversation_id: str, sample_rate: int | None, avatar_id: str | None,
        turn_id: str | None, epoch: int = 0,
    ) -> TurnSpec:
        avatar = avatar_id or self._endpoints.default_avatar_id
        if not avatar:
            raise ValueError("no avatar id: pass avatar_id or set SPATIUS_AVATAR_ID")
        return TurnSpec(
            conversation_id=validate_conversation_id(conversation_id),
            turn_id=validate_turn_id(turn_id) if turn_id else uuid.uuid4().hex,
            sample_rate=validate_sample_rate(sample_rate or self._settings.sample_rate),
            avatar_id=avatar, epoch=epoch,
        )

    async def _open(self, spec: TurnSpec, attempt: Attempt | None,
                    first_audio: FirstAudio | None) -> Turn:
        """Lock the conversation (in this process, then across producers) and start the turn."""
        if not self._running:
            raise ProducerClosed("producer is not running")
        conversation_id = spec.conversation_id
        wait_s = self._settings.conversation_wait_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        await self._locks.acquire(conversation_id, wait_s)
        try:
            start_id = await self._start_id(spec, attempt, deadline, first_audio)
        except BaseException:
            await self._release_conversation(conversation_id)  # whether or not it was taken
            raise
        return await self._begin(spec, start_id, attempt, first_audio)

    async def _start_id(self, spec: TurnSpec, attempt: Attempt | None, deadline: float,
                        first_audio: FirstAudio | None) -> str:
        """The turn_start entry: the one an earlier attempt wrote, or a new one (with
        ``first_audio`` after it), whose writing takes the conversation lock in the same step
        (one round trip less on the way to the first audio); while another producer holds the
        lock, it waits for it first."""
        conversation_id = spec.conversation_id
        leases = self._conversation_leases
        take_from = attempt.take_over_from if attempt else ""

        async def lock_alone() -> None:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            await leases.acquire(conversation_id, wait_s=remaining, take_from=take_from)

        if attempt is not None and attempt.delivered is not None:
            await lock_alone()  # its turn_start exists: the lock is taken on its own
            return attempt.delivered.start_id
        entries = first_audio.entries(spec.turn_id) if first_audio is not None else []
        try:
            try:
                start_id = await self._open_turn(spec, attempt, entries,
                                                 leases.lock_for(conversation_id, take_from))
            except LockHeld:
                await lock_alone()
                return await self._open_turn(spec, attempt, entries, None)
        except TurnFenced as exc:
            if attempt is not None:
                raise AttemptFenced(f"attempt {spec.epoch} of turn {spec.turn_id}") from exc
            raise ProducerError(f"could not open turn {spec.turn_id}") from exc
        leases.opened_with(conversation_id)
        return start_id

    async def _open_turn(self, spec: TurnSpec, attempt: Attempt | None, first_audio: list[bytes],
                         lock: Lock | None) -> str:
        return await self._log.open_turn(
            spec.conversation_id, spec.turn_id, sample_rate=spec.sample_rate, owner=self._owner,
            epoch=spec.epoch, guard=attempt.guard if attempt is not None else None, lock=lock,
            first_audio=first_audio)

    async def _begin(self, spec: TurnSpec, start_id: str, attempt: Attempt | None,
                     first_audio: FirstAudio | None) -> Turn:
        delivered = attempt.delivered if attempt else None
        turn = Turn(self._services, spec, start_id, delivered,
                    session_lease=attempt.session_lease if attempt else None,
                    first_audio=first_audio)
        self._active[spec.conversation_id] = turn
        self._no_turns.clear()
        log.info("turn_started", sample_rate=spec.sample_rate, avatar_id=spec.avatar_id,
                 epoch=spec.epoch, continued=delivered is not None)
        try:
            await turn.begin()
        except BaseException:
            with suppress(RedisError, OSError, RelayError):
                await turn.stop_after_failure()
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
            # Bounded: a Redis that does not answer must not hold the turn's end (nor a stop).
            async with asyncio.timeout(_LEASE_RELEASE_S):
                await self._conversation_leases.release(conversation_id)
        except (RedisError, OSError, TimeoutError) as exc:
            # The lease expires after conversation_lease_s; until then other producers wait.
            log.warning("conversation_lease_release_failed", error=str(exc) or type(exc).__name__)
        finally:
            self._locks.release(conversation_id)

    async def _interrupt_own_turn(self, turn: Turn, reason: str) -> None:
        """Interrupt this attempt of ``turn`` in the stream, unless it is no longer active."""
        with suppress(TurnFenced):
            await self._log.interrupt_turn(turn.conversation_id, turn.turn_id,
                                           epoch=turn.epoch, reason=reason)

    async def session_usage(self) -> tuple[int, int]:
        """(slots held, turns waiting for one) across all producers, for the metrics."""
        return await self._session_leases.used(), await self._session_leases.demand()

    async def session_room(self) -> int:
        """How many more turns this producer can give a Motion Server session now (none is
        taken): the slots free across all producers, plus its own idle kept sessions (each
        serves its conversation's next turn without a new slot, or closes for another's)."""
        return await self._session_leases.room() + self._pool.idle()

    def keeps_session(self, conversation_id: str) -> bool:
        """A session is kept for the conversation here: its next turn likely needs no new
        Motion Server session slot (``keeps_session_for`` says whether it can reuse it)."""
        return self._pool.keeps(conversation_id)

    def keeps_session_for(self, conversation_id: str, *, avatar_id: str | None,
                          sample_rate: int) -> bool:
        """The conversation keeps a session here that a turn with ``avatar_id`` (None: the
        default) and ``sample_rate`` can reuse: that turn needs no new slot."""
        avatar = avatar_id or self._endpoints.default_avatar_id
        return self._pool.has_session(conversation_id, avatar, sample_rate)

    async def reserve_session(
        self, conversation_id: str, *, avatar_id: str | None, sample_rate: int,
        keep_waiting: Callable[[], bool], on_wait: Callable[[], None] | None = None,
    ) -> str | None:
        """Reserve a Motion Server session slot for the conversation's next turn before it
        starts, waiting for as long as ``keep_waiting()`` holds (meanwhile idle sessions
        anywhere close for it). None when the conversation's kept session will do, or when the
        wait was given up. Give it back with ``release_reservation`` once the turn is over.
        ``on_wait`` is called when no slot was free at the first try, before waiting."""
        if self.keeps_session_for(conversation_id, avatar_id=avatar_id, sample_rate=sample_rate):
            return None
        lease_id = await self.try_reserve_session()  # one try: the common case
        if lease_id is not None:
            return lease_id
        if on_wait is not None:
            on_wait()
        while keep_waiting():
            lease_id = await self._session_leases.acquire(wait_s=_RESERVE_POLL_S)
            if lease_id is not None:
                return lease_id
        return None

    async def try_reserve_session(self) -> str | None:
        """A Motion Server session slot if one is free now (one try, no wait), else None.
        Give it back with ``release_reservation``."""
        return await self._session_leases.acquire(wait_s=0)

    async def release_reservation(self, lease_id: str | None) -> None:
        """Free a reserved slot unless a session (running or kept) now holds it."""
        if lease_id is not None and not self._pool.uses_lease(lease_id):
            await self._session_leases.release(lease_id)

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
