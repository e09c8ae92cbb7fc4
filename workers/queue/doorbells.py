"""Doorbells: "conversation X has queued turns", in the ``producers`` consumer group of Keys.jobs.

A doorbell carries no audio; the turns wait in the conversation's own queue
(``workers.queue.records``).
Reading one makes a worker responsible for the conversation until the queue is empty, and the
doorbell stays pending (unacknowledged) in the group for exactly that long. That is what makes a
crash recoverable: a worker renews its doorbells' idle time (``touch``) while it runs them; a
doorbell whose worker died goes idle, and after ``job_claim_idle_s`` another worker takes it with
XAUTOCLAIM and, with it, the right to take the conversation over.

Acknowledging and renewing check that the doorbell is still the caller's own (XPENDING with a
consumer filter, in the same script), so a worker that was paused and lost its doorbell to another
can never acknowledge the other's work away.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import ResponseError

from relay.keys import Keys
from relay.lua import ScriptArgs, register, text
from relay.redis_conn import RedisClient
from workers.queue.records import DoorbellWrite

log = structlog.get_logger(__name__)

CONVERSATION_FIELD = b"conv"
TURN_FIELD = b"turn"
# "1" when the turn's clip waits beside its queue entry (``Keys.queued_audio``): the worker that
# takes the turn reads it in the take's round trip, and only then.
AUDIO_FIELD = b"audio"
# "1" when the submit that rang it also opened the turn, its first audio already in the stream
# (``Enqueued.OPENED``): no turn of the worker's producer need wait for this one's first audio.
OPENED_FIELD = b"opened"

# KEYS: jobs. ARGV: group, consumer, ids... Resets the idle time of the ids still pending for the
# consumer (JUSTID: the delivery counter stays); returns the ids that are no longer its own.
# Run twice: resets the same idle times again; the same answer.
_TOUCH = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

# KEYS: jobs. ARGV: group, consumer, id. XACK + XDEL when the id is pending for the consumer.
# Run twice: the id is no longer pending, so the second run does nothing.
_ACK_MINE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #p == 0 then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""

# KEYS: jobs. ARGV: group, consumer, id, idle_ms. Makes the consumer's pending id look idle for
# idle_ms, so the next XAUTOCLAIM of any worker takes it at once.
# Run twice: sets the same idle time again (or finds the id claimed meanwhile and leaves it).
_HAND_BACK = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #p == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[4], 'JUSTID')
return 1
"""


@dataclass(frozen=True)
class Doorbell:
    entry_id: str
    conversation_id: str | None  # None: not a doorbell (malformed, or written by something else)
    turn_id: str | None
    fields: Mapping[bytes, bytes]

    @property
    def stored_audio(self) -> bool:
        """The turn's clip is stored beside its queue entry (read it with the take)."""
        return self.fields.get(AUDIO_FIELD) == b"1"

    @property
    def opened_at_submit(self) -> bool:
        """The submit opened the turn: its first audio was appended with the doorbell."""
        return self.fields.get(OPENED_FIELD) == b"1"



def _fields(conversation_id: str, turn_id: str, stored_audio: bool) -> tuple[Any, ...]:
    """A doorbell's field/value pairs, in the order XADD takes them."""
    fields: tuple[Any, ...] = (CONVERSATION_FIELD, conversation_id, TURN_FIELD, turn_id)
    return fields + (AUDIO_FIELD, b"1") if stored_audio else fields


async def waiting_conversations(client: RedisClient, keys: Keys, *, limit: int) -> list[str]:
    """Conversations with a doorbell in the jobs stream (rung, not yet done), for operators."""
    rows = await client.xrange(keys.jobs(), count=limit)
    return sorted({text(fields[CONVERSATION_FIELD]) for _, fields in rows
                   if fields.get(CONVERSATION_FIELD)})


def _doorbell(entry_id: Any, fields: Mapping[bytes, bytes]) -> Doorbell:
    conversation = fields.get(CONVERSATION_FIELD)
    turn = fields.get(TURN_FIELD)
    return Doorbell(entry_id=text(entry_id),
                    conversation_id=text(conversation) if conversation else None,
                    turn_id=text(turn) if turn else None, fields=fields)


def _missing_group(exc: ResponseError) -> bool:
    """NOGROUP: the group or its stream does not exist (also raised from inside a script)."""
    message = str(exc)
    return "NOGROUP" in message or "no such key" in message.lower()


def stream_entries(reply: Any) -> list[tuple[Any, dict[bytes, bytes]]]:
    """Stream entries of a one-stream XREAD/XREADGROUP reply (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else [item[1] for item in reply]
    return [(entry_id, fields) for entries in streams for entry_id, fields in entries]


class Doorbells:
    """One worker's view of the jobs group: it reads, reclaims, renews and acknowledges.

    :param consumer: this worker's consumer name; unique per process (a restarted process must
        not mistake its predecessor's doorbells for its own).
    """

    def __init__(self, client: RedisClient, keys: Keys, *, consumer: str) -> None:
        self._client = client
        self._key = keys.jobs()
        self._group = keys.jobs_group()
        self._consumer = consumer
        self._cursor = "0-0"
        self._touch = register(client, _TOUCH)
        self._ack = register(client, _ACK_MINE)
        self._hand_back = register(client, _HAND_BACK)

    @property
    def consumer(self) -> str:
        return self._consumer

    async def ring(self, conversation_id: str, turn_id: str, *, stored_audio: bool = False
                   ) -> str:
        """Add a doorbell (the submit side)."""
        pairs = _fields(conversation_id, turn_id, stored_audio)
        fields: dict[Any, Any] = dict(zip(pairs[::2], pairs[1::2], strict=True))
        return text(await self._client.xadd(self._key, fields))

    def write_for(self, conversation_id: str, turn_id: str, *, max_waiting: int,
                  stored_audio: bool = False) -> DoorbellWrite:
        """The doorbell ``ring`` would add, for ``JobStore.enqueue`` to write in its own step."""
        return DoorbellWrite(key=self._key, max_waiting=max_waiting,
                             fields=_fields(conversation_id, turn_id, stored_audio),
                             opened=(OPENED_FIELD, b"1"))

    async def ensure_group(self) -> None:
        """Create the group (and the stream) unless it exists; only BUSYGROUP is benign."""
        try:
            await self._client.xgroup_create(self._key, self._group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _recreate(self, operation: str) -> None:
        """The group (or the whole stream) vanished under an operation: Redis restarted empty,
        was flushed, or failed over to a replica that never had it. Every pending doorbell went
        with it, so nothing is left to reclaim; recreate the group and carry on."""
        log.warning("jobs_group_missing_recreating", operation=operation)
        self._cursor = "0-0"
        await self.ensure_group()

    async def read(self, count: int, block_ms: int) -> list[Doorbell]:
        """New doorbells, blocking up to ``block_ms``."""
        try:
            reply = await self._client.xreadgroup(
                self._group, self._consumer, {self._key: ">"}, count=count, block=block_ms)
        except ResponseError as exc:
            if not _missing_group(exc):
                raise
            await self._recreate("read")
            return []
        return [_doorbell(i, f) for i, f in stream_entries(reply)]

    async def reclaim(self, count: int, min_idle_ms: int) -> list[Doorbell]:
        """Doorbells idle for ``min_idle_ms`` in any consumer (a dead or stopping worker's)."""
        try:
            reply = await self._client.xautoclaim(
                self._key, self._group, self._consumer, min_idle_ms, start_id=self._cursor,
                count=count)
        except ResponseError as exc:
            if not _missing_group(exc):
                raise
            await self._recreate("reclaim")
            return []
        self._cursor = text(reply[0])
        claimed = [_doorbell(i, f) for i, f in reply[1] if f is not None]
        for deleted in reply[2] if len(reply) > 2 else []:
            # Deleted from the stream while pending: nothing to run, only the PEL entry is left.
            await self._client.xack(self._key, self._group, deleted)
        return claimed

    async def touch(self, entry_ids: list[str]) -> set[str]:
        """Renew the idle time of doorbells this worker runs; returns the ones it lost (all of
        them when the group vanished)."""
        if not entry_ids:
            return set()
        try:
            lost = await self._touch(keys=[self._key],
                                     args=[self._group, self._consumer, *entry_ids])
        except ResponseError as exc:
            if not _missing_group(exc):
                raise
            await self._recreate("touch")
            return set(entry_ids)
        return {text(i) for i in lost or []}

    async def ack(self, entry_id: str) -> bool:
        """Acknowledge and delete a doorbell, if it is still this worker's."""
        try:
            return bool(int(await self._ack(keys=[self._key],
                                            args=[self._group, self._consumer, entry_id])))
        except ResponseError as exc:
            if not _missing_group(exc):
                raise
            await self._recreate("ack")
            return False

    async def hand_back(self, entry_id: str, idle_ms: int) -> bool:
        """Make a doorbell this worker holds claimable by any other worker right away."""
        args: ScriptArgs = [self._group, self._consumer, entry_id, idle_ms]
        try:
            return bool(int(await self._hand_back(keys=[self._key], args=args)))
        except ResponseError as exc:
            if not _missing_group(exc):
                raise
            await self._recreate("hand_back")
            return False

    async def forget_consumer(self) -> None:
        """Remove this consumer from the group when it holds nothing (clean shutdown)."""
        try:
            consumers = await self._client.xinfo_consumers(self._key, self._group)
        except ResponseError as exc:
            if not _missing_group(exc):
                raise
            return  # nothing to forget: the group is gone
        for info in consumers:
            if text(info.get("name", "")) == self._consumer and int(info.get("pending", 0)) == 0:
                await self._client.xgroup_delconsumer(self._key, self._group, self._consumer)
