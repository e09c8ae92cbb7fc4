"""Conversation streams: the fenced writes producers make and the reads edges make.

Every write for a turn goes through a Lua script that first checks the conversation's turn record
(``Keys.turn``): only the active turn may append. An interrupt or a newer turn flips that record in
the same atomic step that appends its own marker, so once a client has seen ``interrupt`` no audio
or frames of the old turn can follow it, however late the old producer's writes arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from relay import wire
from relay.errors import TurnFenced
from relay.keys import Keys

ACTIVE = "active"
ENDED = "ended"
INTERRUPTED = "interrupted"

# KEYS: stream, turn. ARGV: turn_id, owner, maxlen, ttl_ms, start_entry, expected_previous,
# interrupt_entry_for_previous. Returns {0} when the active turn changed under the caller (retry),
# {1, id} on success, {2, start_id} when this turn is already the active one (idempotent re-open).
_OPEN = """
local cur = redis.call('HMGET', KEYS[2], 'id', 'status', 'start')
if cur[2] == 'active' then
  if cur[1] == ARGV[1] then return {2, cur[3]} end
  if cur[1] ~= ARGV[6] then return {0} end
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[7])
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[5])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'start', id, 'status', 'active', 'owner', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {1, id}
"""

# KEYS: stream, turn. ARGV: turn_id, maxlen, ttl_ms, new_status ('' keeps it), entries...
# Returns the last entry id, or false when the turn is not the active one.
_APPEND = """
local cur = redis.call('HMGET', KEYS[2], 'id', 'status')
if cur[1] ~= ARGV[1] or cur[2] ~= 'active' then return false end
local last
for i = 5, #ARGV do
  last = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'd', ARGV[i])
end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'status', ARGV[4], 'end', last) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return last
"""


@dataclass(frozen=True)
class TurnState:
    turn_id: str
    start_id: str
    status: str
    owner: str


@dataclass(frozen=True)
class StreamInfo:
    """What an edge needs to place a new client: the stream's tip and its trimmed history."""

    exists: bool
    last_id: str  # "0-0" when the stream does not exist
    first_id: str | None

    def can_resume_after(self, position: str) -> bool:
        """True when every entry after ``position`` is still in the stream.

        Trimming only removes the oldest entries, so nothing after ``position`` is missing while
        ``position`` is at or past the first retained entry. A position older than that, a stream
        that is gone, or a position the stream never reached (a stream recreated after loss) means
        entries may be missing, and the client must be told.
        """
        if not self.exists:
            return False
        wanted = parse_id(position)
        if wanted > parse_id(self.last_id):
            return False
        return self.first_id is None or wanted >= parse_id(self.first_id)


def parse_id(entry_id: str | bytes) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence) pairs, not as strings."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def valid_id(entry_id: str) -> bool:
    try:
        ms, seq = parse_id(entry_id)
    except ValueError:
        return False
    return ms >= 0 and seq >= 0 and entry_id.count("-") == 1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ConversationLog:
    """Fenced writes to conversation streams, shared by producers and the interrupt API."""

    def __init__(self, client: redis.Redis, keys: Keys, *, maxlen: int, ttl_s: int) -> None:
        self._client = client
        self._keys = keys
        self._maxlen = maxlen
        self._ttl_ms = ttl_s * 1000
        self._open = client.register_script(_OPEN)
        self._append = client.register_script(_APPEND)

    async def open_turn(
        self, conversation_id: str, turn_id: str, *, sample_rate: int, owner: str
    ) -> str:
        """Start a turn; an active turn of the conversation is ended with ``interrupt`` first."""
        keys = [self._keys.stream(conversation_id), self._keys.turn(conversation_id)]
        start = wire.turn_start(turn_id, sample_rate=sample_rate)
        for _ in range(16):
            current = await self.current_turn(conversation_id)
            previous = current.turn_id if current and current.status == ACTIVE else ""
            superseded = wire.interrupt(previous or "-", reason="superseded")
            args = [turn_id, owner, self._maxlen, self._ttl_ms, start, previous, superseded]
            result = await self._open(keys=keys, args=args)
            if int(result[0]) != 0:
                return _text(result[1])
        raise TurnFenced(f"turn record of {conversation_id} kept changing; could not open turn")

    async def append(self, conversation_id: str, turn_id: str, *entries: bytes) -> str:
        """Append entries of ``turn_id``; raise TurnFenced if that turn is no longer active."""
        return await self._write(conversation_id, turn_id, "", entries)

    async def end_turn(self, conversation_id: str, turn_id: str, *, status: str) -> str:
        entry = wire.turn_end(turn_id, status=status)
        return await self._write(conversation_id, turn_id, ENDED, (entry,))

    async def interrupt(self, conversation_id: str, *, reason: str = "interrupted") -> str | None:
        """Interrupt the active turn; return its id, or None when no turn was active."""
        for _ in range(16):
            current = await self.current_turn(conversation_id)
            if current is None or current.status != ACTIVE:
                return None
            entry = wire.interrupt(current.turn_id, reason=reason)
            try:
                await self._write(conversation_id, current.turn_id, INTERRUPTED, (entry,))
            except TurnFenced:
                continue  # the turn ended or changed between the read and the write; look again
            await self._client.publish(
                self._keys.control_channel(conversation_id), current.turn_id.encode()
            )
            return current.turn_id
        return None

    async def _write(
        self, conversation_id: str, turn_id: str, status: str, entries: tuple[bytes, ...]
    ) -> str:
        keys = [self._keys.stream(conversation_id), self._keys.turn(conversation_id)]
        args: list[Any] = [turn_id, self._maxlen, self._ttl_ms, status, *entries]
        result = await self._append(keys=keys, args=args)
        if result is None:
            raise TurnFenced(f"turn {turn_id} of {conversation_id} is no longer active")
        return _text(result)

    async def current_turn(self, conversation_id: str) -> TurnState | None:
        return await read_turn(self._client, self._keys, conversation_id)


async def read_turn(client: redis.Redis, keys: Keys, conversation_id: str) -> TurnState | None:
    raw = await client.hgetall(keys.turn(conversation_id))
    if not raw:
        return None
    record = {_text(k): _text(v) for k, v in raw.items()}
    return TurnState(
        turn_id=record.get("id", ""),
        start_id=record.get("start", "0-0"),
        status=record.get("status", ""),
        owner=record.get("owner", ""),
    )


async def stream_info(client: redis.Redis, keys: Keys, conversation_id: str) -> StreamInfo:
    try:
        info = await client.xinfo_stream(keys.stream(conversation_id))
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return StreamInfo(exists=False, last_id="0-0", first_id=None)
        raise
    first = info.get("first-entry")
    return StreamInfo(
        exists=True,
        last_id=_text(info["last-generated-id"]),
        first_id=_text(first[0]) if first else None,
    )


async def read_after(
    client: redis.Redis, keys: Keys, conversation_id: str, after_id: str, *, count: int
) -> list[tuple[str, bytes]]:
    """Entries strictly after ``after_id`` (oldest first), at most ``count``."""
    rows = await client.xrange(
        keys.stream(conversation_id), min=f"({after_id}", max="+", count=count
    )
    return [(_text(entry_id), fields[b"d"]) for entry_id, fields in rows]


async def read_from(
    client: redis.Redis, keys: Keys, conversation_id: str, start_id: str, *, count: int
) -> list[tuple[str, bytes]]:
    """Entries from ``start_id`` inclusive (oldest first), at most ``count``."""
    rows = await client.xrange(keys.stream(conversation_id), min=start_id, max="+", count=count)
    return [(_text(entry_id), fields[b"d"]) for entry_id, fields in rows]
