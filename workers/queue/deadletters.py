"""Dead letters: turns the queue will not play, with why, for operators to inspect, drop or requeue.

One stream (``Keys.dead_letters``), trimmed to about ``dead_letter_maxlen`` entries. An entry
keeps the job as submitted (a clip job keeps its audio, which is what makes a requeue possible),
so the cap is also the memory bound: see docs/operations.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from relay.keys import Keys
from relay.lua import ScriptArg, register, text
from relay.redis_conn import RedisClient

REASON_ATTEMPTS = "max_attempts"  # every attempt failed or its worker crashed
REASON_DEADLINE = "deadline"  # the deadline had passed when a worker picked the turn up
REASON_MALFORMED = "malformed"  # not a valid job or doorbell; running it again cannot help


@dataclass(frozen=True)
class DeadLetter:
    entry_id: str
    conversation_id: str
    turn_id: str
    reason: str
    error: str
    attempts: int
    at_ms: int
    job: bytes  # the job as queued (workers.queue encoding); b"" when there was none



def _letter(entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
        entry_id=text(entry_id), conversation_id=text(fields.get(b"conv", b"")),
        turn_id=text(fields.get(b"turn", b"")), reason=text(fields.get(b"reason", b"")),
        error=text(fields.get(b"error", b"")), attempts=int(fields.get(b"attempts", b"0") or 0),
        at_ms=int(fields.get(b"at", b"0") or 0), job=fields.get(b"job", b""),
    )


# KEYS: dead letters, index. ARGV: identity ('' for none), maxlen, then the entry's field/value
# pairs. Appends the dead letter and returns its id, or '' when the identity was buried before.
# Run twice (a redis-py retry, or a worker that died between burying a turn and removing it
# from its queue, so that the next worker buries it again): the second run finds the identity
# in the index and writes nothing. The index keeps the newest 2 x maxlen identities, more than
# the letters kept.
_BURY = """
if ARGV[1] ~= '' and redis.call('ZSCORE', KEYS[2], ARGV[1]) then return '' end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[2], tonumber(string.match(id, '^%d+')), ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -2 * tonumber(ARGV[2]) - 1)
end
return id
"""


class DeadLetters:
    def __init__(self, client: RedisClient, keys: Keys, *, maxlen: int) -> None:
        if maxlen <= 0:
            raise ValueError("maxlen must be positive")
        self._client = client
        self._key = keys.dead_letters()
        self._index = keys.dead_letters_index()
        self._maxlen = maxlen
        self._bury = register(client, _BURY)

    async def bury(self, *, conversation_id: str, turn_id: str, reason: str, error: str = "",
                   attempts: int = 0, job: bytes = b"") -> str:
        """Dead-letter a turn, once: a turn (conversation and turn id) buried before is not
        buried again (a requeued turn gets a new turn id). Returns the entry id, or "" for a
        turn already buried. Without both ids (a malformed doorbell) every call writes one."""
        identity = f"{conversation_id}/{turn_id}" if conversation_id and turn_id else ""
        fields: list[ScriptArg] = [
            b"conv", conversation_id, b"turn", turn_id, b"reason", reason,
            b"error", error[:1000], b"attempts", attempts, b"at", int(time.time() * 1000),
            b"job", job,
        ]
        entry_id = await self._bury(keys=[self._key, self._index],
                                    args=[identity, self._maxlen, *fields])
        return text(entry_id)

    async def list(self, count: int = 100) -> list[DeadLetter]:
        """The newest ``count`` dead letters, oldest first."""
        rows = await self._client.xrevrange(self._key, count=count)
        return [_letter(i, f) for i, f in reversed(rows)]

    async def get(self, entry_id: str) -> DeadLetter | None:
        rows = await self._client.xrange(self._key, min=entry_id, max=entry_id)
        return _letter(*rows[0]) if rows else None

    async def drop(self, entry_id: str) -> bool:
        return bool(await self._client.xdel(self._key, entry_id))

    async def count(self) -> int:
        return int(await self._client.xlen(self._key))
