"""Full-path feeder: speaks streamed turns through the job queue, in real time.

Run as ``python -m relay.dev.bench.feeder``. Each turn is queued with ``TurnQueue.open_streamed``
(the
public API a backend uses) and its audio goes into the turn's input stream as the queue module
defines it (``Keys.turn_input``, one ``{a: pcm}`` entry per 40 ms chunk, then ``{end: 1}``),
written with pipelined XADD across conversations: ``StreamedInput.send`` is one MULTI/EXEC round
trip per chunk, whose client cost would take a large share of a 2-core box away from the
producer under test. The turn id carries the scheduled start so clients can time each audio
chunk from its scheduled send to its receipt.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as redis

from relay.dev.bench.child import ParentLink
from relay.dev.bench.resp import RespPipe, pack, value, xadd_prefix
from relay.dev.bench.schedule import (
    CHUNK_BYTES,
    SAMPLE_RATE,
    ConversationShape,
    Slot,
    Timeline,
    drive,
)
from relay.dev.demo import speech_like_pcm
from relay.keys import Keys
from workers.queue.jobs import INPUT_AUDIO, INPUT_END
from workers.queue.submit import TurnQueue

INPUT_TTL_S = 600


class Feeder:
    def __init__(self, config: dict[str, Any]) -> None:
        self._cfg = config
        self._ids: list[str] = config["conversations"]
        self._shape = ConversationShape(config["turn_s"], config["gap_s"])
        self._keys = Keys(config["prefix"])
        self._client = redis.Redis.from_url(config["redis_url"])
        self._queue = TurnQueue(self._client, self._keys, input_ttl_s=INPUT_TTL_S)
        self._pipe = RespPipe(config["redis_url"])
        clip = speech_like_pcm(1.0, SAMPLE_RATE, seed=3)
        self._chunks = [clip[i : i + CHUNK_BYTES] for i in range(0, len(clip), CHUNK_BYTES)]
        self._open: dict[int, bytes] = {}  # conversation -> input key of its unfinished turn
        self._lags: list[float] = []
        self.turns = 0
        self.chunks_sent = 0
        self.redis_py_calls = 0

    async def run(self, link: type[ParentLink]) -> None:
        await self._pipe.connect()
        t1 = await drive(self._shape, len(self._ids), self._cfg["duration_s"], link, self._feed)
        await self._end_open_turns()
        # What this schedule asks the relay to deliver: per chunk one audio entry, per five one
        # frames entry, per turn its turn_start and turn_end.
        offered = self.chunks_sent + self.chunks_sent // 5 + 2 * self.turns
        link.emit("report", t1=t1, turns=self.turns, chunks=self.chunks_sent, offered=offered,
                  commands=self._pipe.commands + self.redis_py_calls,
                  lag_p99_ms=_pct(self._lags, 0.99), lag_max_ms=_pct(self._lags, 1.0))
        await self._pipe.close()
        await self._client.aclose()

    async def _feed(self, slots: list[Slot], timeline: Timeline, now: float) -> None:
        self._lags.extend(now - slot.due_ms for slot in slots)
        opening = [s for s in slots if s.index == 0]
        if opening:
            await asyncio.gather(*(self._submit(s) for s in opening))
        commands: list[bytes] = []
        ttl = str(INPUT_TTL_S * 1000).encode()
        for slot in slots:
            key = self._open.get(slot.conversation)
            if key is None:
                continue
            if slot.index == 0:
                commands.append(pack(b"PEXPIRE", key, ttl))
            chunk = self._chunks[slot.index % len(self._chunks)]
            commands.append(xadd_prefix(key, None, INPUT_AUDIO) + value(chunk))
            self.chunks_sent += 1
            if timeline.is_last(slot):
                commands.append(xadd_prefix(key, None, INPUT_END) + value(b"1"))
                del self._open[slot.conversation]
        await self._pipe.send(commands)

    async def _submit(self, slot: Slot) -> None:
        conv = self._ids[slot.conversation]
        turn = slot.turn_id()
        await self._queue.open_streamed(conv, sample_rate=SAMPLE_RATE, turn_id=turn)
        self.redis_py_calls += 2  # XLEN + XADD of the job
        self._open[slot.conversation] = self._keys.turn_input(conv, turn).encode()
        self.turns += 1

    async def _end_open_turns(self) -> None:
        """The run ended mid-turn: end those turns' input so their producers finish them."""
        commands = [xadd_prefix(key, None, INPUT_END) + value(b"1")
                    for key in self._open.values()]
        self._open.clear()
        await self._pipe.send(commands)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[int(q * (len(ordered) - 1))], 1)


async def _main() -> None:
    link = await ParentLink.open()
    config = await link.receive()
    if config is None:
        return
    await Feeder(config).run(ParentLink)


if __name__ == "__main__":
    asyncio.run(_main())
