"""A streamed turn's input stream: the feeding end (``StreamedInput``) and the reading end.

One entry ``{"a": pcm}`` per chunk and a final ``{"end": "1"}``; the stream expires
``input_ttl_s`` after its last write.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

from relay.keys import Keys
from relay.redis_conn import RedisClient
from workers.errors import QueueError
from workers.queue.doorbells import stream_entries
from workers.queue.jobs import INPUT_AUDIO, INPUT_END, MAX_CHUNK_BYTES
from workers.speech.pcm import validate_pcm


class StreamedInput:
    """The feeding end of a queued streamed turn: ``send`` PCM16 chunks, then ``end``.

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
        self._ended = False

    async def __aenter__(self) -> StreamedInput:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.end()

    async def send(self, chunk: bytes | bytearray | memoryview) -> None:
        pcm = validate_pcm(chunk)
        if len(pcm) > MAX_CHUNK_BYTES:
            raise ValueError(f"chunk of {len(pcm)} bytes exceeds {MAX_CHUNK_BYTES}")
        if self._ended:
            raise QueueError("send() after end()")
        if pcm:
            await self._write({INPUT_AUDIO: pcm})

    async def end(self) -> None:
        if not self._ended:
            self._ended = True
            await self._write({INPUT_END: b"1"})

    async def _write(self, fields: dict[bytes, bytes]) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xadd(self._key, fields)  # type: ignore[arg-type]
            pipe.pexpire(self._key, self._ttl_ms)
            await pipe.execute()



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
