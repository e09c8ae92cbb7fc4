"""A streamed turn's input stream: the feeding end (``StreamedInput``) and the reading end.

One entry ``{"a": pcm}`` per chunk and a final ``{"end": "1"}``; the stream expires
``input_ttl_s`` after its last write. Each entry's id is its own sequence (``<n>-0``, the n-th
write of the feed, from 1), so a chunk is in the stream at most once however often its write is
retried: see ``_PUT``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

from relay.keys import Keys
from relay.lua import register
from relay.redis_conn import RedisClient
from workers.errors import QueueError, SendPending
from workers.queue.doorbells import stream_entries
from workers.queue.jobs import INPUT_AUDIO, INPUT_END, MAX_CHUNK_BYTES
from workers.speech.pcm import validate_pcm

# KEYS: input stream. ARGV: seq (>= 1), field, value, ttl_ms. Appends the entry under id
# ``<seq>-0`` and refreshes the expiry; returns 1, or 0 when an entry with that seq (or a later
# one) is already there. Runs twice (a redis-py retry after a timeout whose first attempt reached
# Redis, or StreamedInput writing a chunk whose earlier write raised): the second run is that
# no-op, so the chunk is in the stream once.
_PUT = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if top and tonumber(string.match(top[1], '^%d+')) >= tonumber(ARGV[1]) then return 0 end
redis.call('XADD', KEYS[1], ARGV[1] .. '-0', ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


class StreamedInput:
    """The feeding end of a queued streamed turn: ``send`` PCM16 chunks, then ``end``.

    Exactly once, also across errors: a chunk whose ``send`` raised (Redis unreachable, a
    timeout) may or may not be in Redis; it is kept, and ``flush()`` writes it, at most once
    thanks to its sequence. Until that succeeds, ``send`` refuses new chunks with
    ``SendPending``: retrying ``send(chunk)`` itself (a retry decorator, a loop) would otherwise
    queue the same audio a second time. ``end`` flushes first and may be retried until it
    returns.

    As an async context manager it ends the input on exit, whatever happened: the worker then
    finishes the turn with the audio that arrived.
    """

    def __init__(self, client: RedisClient, key: str, *, conversation_id: str, turn_id: str,
                 ttl_ms: int) -> None:
        self._client = client
        self._key = key
        self._ttl_ms = ttl_ms
        self.conversation_id = conversation_id
        self.turn_id = turn_id
        self._put = register(client, _PUT)
        self._next_seq = 1
        self._pending: tuple[bytes, bytes] | None = None  # written or not: unknown after an error
        self._end_requested = False
        self._ended = False

    async def __aenter__(self) -> StreamedInput:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.end()

    @property
    def ended(self) -> bool:
        """The end marker is in Redis: the worker will finish the turn."""
        return self._ended

    async def send(self, chunk: bytes | bytearray | memoryview) -> None:
        pcm = validate_pcm(chunk)
        if len(pcm) > MAX_CHUNK_BYTES:
            raise ValueError(f"chunk of {len(pcm)} bytes exceeds {MAX_CHUNK_BYTES}")
        if self._end_requested:
            raise QueueError("send() after end()")
        if self._pending is not None:
            raise SendPending("an earlier send() raised and its chunk may or may not be in Redis: "
                              "call flush() to write it (at most once), then send the next chunk")
        if pcm:
            await self._write(INPUT_AUDIO, pcm)

    async def end(self) -> None:
        """Write the end marker (after any chunk still pending); safe to call again after an
        error, and a no-op once it succeeded."""
        self._end_requested = True
        await self.flush()
        if not self._ended:
            await self._write(INPUT_END, b"1")

    async def flush(self) -> None:
        """Write the chunk (or end marker) whose earlier write raised, if any."""
        if self._pending is not None:
            await self._write(*self._pending)

    async def _write(self, field: bytes, value: bytes) -> None:
        self._pending = (field, value)
        await self._put(keys=[self._key], args=[self._next_seq, field, value, self._ttl_ms])
        self._pending = None
        self._next_seq += 1
        self._ended = self._ended or field == INPUT_END


@dataclass(frozen=True)
class InputBatch:
    last_id: str
    chunks: list[bytes]
    ended: bool


async def read_input(
    client: RedisClient, keys: Keys, conversation_id: str, turn_id: str,
    *, after: str, block_ms: int, count: int = 256,
) -> InputBatch:
    """Input entries of a streamed turn after ``after`` (blocking up to ``block_ms``)."""
    key = keys.turn_input(conversation_id, turn_id)
    reply = await client.xread({key: after}, count=count, block=max(1, block_ms))
    chunks: list[bytes] = []
    last_id, ended = after, False
    for entry_id, fields in stream_entries(reply):
        last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        if INPUT_END in fields:
            ended = True
            break
        audio = fields.get(INPUT_AUDIO)
        if audio:
            chunks.append(audio)
    return InputBatch(last_id=last_id, chunks=chunks, ended=ended)
