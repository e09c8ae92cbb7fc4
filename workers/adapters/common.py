"""What every adapter does: submit a turn under the job's id, and optionally wait for its end.

Why submit rather than speak in the other system's worker: a turn's crash recovery, order within
its conversation and exactly-once playback rest on state only the relay's queue keeps (attempt
epochs, the per-conversation FIFO, the session cap); a Celery or RQ worker process that dies
mid-turn would leave none of it. The submit is short and idempotent, which is all the other
system's at-least-once delivery has to carry.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from relay import wire
from relay.keys import Keys, validate_turn_id
from relay.redis_conn import RedisClient, client_for
from relay.settings import Settings
from relay.streams import read_after, stream_info
from workers.queue.records import JobStore
from workers.queue.submit import SUBMIT_ALREADY_DONE, TurnQueue

T = TypeVar("T")

STATUS_FAILED = "failed"  # dead-lettered after clients saw part of it (they got interrupt)
STATUS_NOT_PLAYED = "not_played"  # left the queue unplayed: dropped, deadline, dead before start
_WAIT_POLL_MS = 500


@dataclass(frozen=True)
class TurnOutcome:
    turn_id: str
    submitted: str  # workers.queue SUBMIT_*: queued, already_queued, already_done
    status: str | None  # complete | audio_only | interrupted | failed | not_played | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def turn_id_for(system: str, job_id: str) -> str:
    """The turn id of a job: the same for every delivery of the job, so a redelivery submits the
    same turn again and the queue ignores it."""
    candidate = f"{system}-{job_id}"
    try:
        return validate_turn_id(candidate)
    except ValueError:
        return f"{system}-{hashlib.sha256(job_id.encode()).hexdigest()[:40]}"


def audio_bytes(audio: bytes | bytearray | str) -> bytes:
    """PCM as bytes; a str is taken as base64 (for JSON serializers that cannot carry bytes)."""
    return base64.b64decode(audio, validate=True) if isinstance(audio, str) else bytes(audio)


def run_sync(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from a synchronous task (Celery, RQ): one event loop per call."""
    return asyncio.run(work)


class RelayTurns:
    """Submits and follows turns for one adapter process; an async context manager."""

    def __init__(self, settings: Settings, client: RedisClient) -> None:
        self._settings = settings
        self._client = client
        self._keys = Keys.of(settings)
        self._queue = TurnQueue.from_settings(settings, client)
        self._store = JobStore(client, self._keys, ttl_s=settings.job_ttl_s, lease_s=1.0)

    @classmethod
    def from_env(cls) -> RelayTurns:
        settings = Settings.from_env()
        return cls(settings, client_for(settings))

    async def __aenter__(self) -> RelayTurns:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.aclose()

    async def speak(self, *, system: str, job_id: str, conversation_id: str,
                    audio: bytes | bytearray | str, sample_rate: int,
                    avatar_id: str | None = None, deadline_s: float | None = None,
                    wait_s: float = 0.0) -> TurnOutcome:
        """Submit the job's turn; with ``wait_s`` > 0, wait up to that long for it to end
        (TimeoutError after that: the turn stays queued, and a retry of the job is harmless)."""
        turn_id = turn_id_for(system, job_id)
        after = (await stream_info(self._client, self._keys, conversation_id)).last_id
        submitted = await self._queue.offer_clip(
            conversation_id, audio_bytes(audio), sample_rate=sample_rate, avatar_id=avatar_id,
            turn_id=turn_id, deadline_s=deadline_s)
        status = None
        if wait_s > 0 and submitted.state != SUBMIT_ALREADY_DONE:
            status = await asyncio.wait_for(self.wait(conversation_id, turn_id, after), wait_s)
        return TurnOutcome(turn_id=turn_id, submitted=submitted.state, status=status)

    async def wait(self, conversation_id: str, turn_id: str, after: str) -> str:
        """How the turn ended, following the conversation stream from ``after``."""
        key = self._keys.stream(conversation_id)
        position = after
        while True:
            reply = await self._client.xread({key: position}, count=512, block=_WAIT_POLL_MS)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    position = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    ended = _end_status(position, fields[b"d"], turn_id)
                    if ended:
                        return ended
            if not await self._store.is_queued(conversation_id, turn_id):
                # It left the queue; an end it wrote is already in the stream: look once more.
                return await self._last_look(conversation_id, turn_id, position)

    async def _last_look(self, conversation_id: str, turn_id: str, position: str) -> str:
        for entry_id, stored in await read_after(self._client, self._keys, conversation_id,
                                                 position, count=100_000):
            ended = _end_status(entry_id, stored, turn_id)
            if ended:
                return ended
        return STATUS_NOT_PLAYED


def _end_status(entry_id: str, stored: bytes, turn_id: str) -> str | None:
    kind, turn = wire.stored_kind(stored)
    if turn != turn_id or kind not in (wire.TURN_END, wire.INTERRUPT):
        return None
    message = wire.decode_server(wire.delivery(entry_id, stored))
    if kind == wire.TURN_END:
        return str(message.get("status"))
    return STATUS_FAILED if message.get("reason") == "failed" else wire.STATUS_INTERRUPTED
