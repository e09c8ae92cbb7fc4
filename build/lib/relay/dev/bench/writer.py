"""Edge-path load writer: appends standard conversations to conversation streams in real time.

Run as ``python -m relay.dev.bench.writer`` by the bench. Config (first stdin line): ``redis_url``,
``prefix``, ``conversations`` (ids), ``duration_s``, ``turn_s``, ``gap_s``, ``maxlen``, ``mode``:

* ``relay``: every turn is opened and ended through ``ConversationLog`` (the fenced Lua scripts,
  so turn records exist and joiners start at the turn), and its audio and frames entries, built
  by ``relay.wire`` exactly as a producer builds them, are appended with pipelined
  ``XADD MAXLEN ~`` (the edge only reads entries; the fencing check is a write-side cost that
  the full path measures);
* ``bare``: the same entries, turn_start and turn_end included, all by pipelined XADD.

Reports per conversation the count and id hash of what it appended (the truth receivers are
checked against), its own Redis command count, and how late it ran against the schedule.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import redis.asyncio as redis

from relay import wire
from relay.dev.bench.child import ParentLink
from relay.dev.bench.resp import RespPipe, value, xadd_prefix
from relay.dev.bench.schedule import (
    CHUNK_BYTES,
    CHUNKS_PER_FRAMES,
    SAMPLE_RATE,
    ConversationShape,
    Slot,
    Timeline,
    drive,
)
from relay.dev.bench.tally import HASH_MOD, id_hash
from relay.dev.motion_sim import KeyframeGenerator, encode_animation
from relay.keys import Keys
from relay.streams import ConversationLog

_OWNER = "bench-writer"


def animation_envelope() -> bytes:
    """A real 5-keyframe animation message, as the simulator sends it (about 2.5 KB)."""
    generator = KeyframeGenerator(SAMPLE_RATE)
    pcm = random.Random(7).randbytes(CHUNK_BYTES * CHUNKS_PER_FRAMES)
    keyframes = generator.feed(pcm)[:CHUNKS_PER_FRAMES]
    return encode_animation("bench-connection", "bench-request", end=False, keyframes=keyframes)


class Truth:
    """What was appended per conversation: count, id hash, last id."""

    def __init__(self, conversations: int) -> None:
        self.count = [0] * conversations
        self.hash = [0] * conversations
        self.last: list[str | None] = [None] * conversations
        self.errors = 0

    def add(self, conv: int, reply: Any) -> None:
        if not isinstance(reply, bytes):
            self.errors += 1
            return
        self.count[conv] += 1
        self.hash[conv] = (self.hash[conv] + id_hash(reply)) % HASH_MOD
        self.last[conv] = reply.decode()


class Writer:
    def __init__(self, config: dict[str, Any]) -> None:
        self._cfg = config
        self._ids: list[str] = config["conversations"]
        self._relay = config["mode"] == "relay"
        self._shape = ConversationShape(config["turn_s"], config["gap_s"])
        keys = Keys(config["prefix"])
        maxlen = int(config["maxlen"])
        self._prefixes = [xadd_prefix(keys.stream(c).encode(), maxlen, b"d") for c in self._ids]
        self._pipe = RespPipe(config["redis_url"])
        self._client = redis.Redis.from_url(config["redis_url"])
        self._log = ConversationLog(self._client, keys, maxlen=maxlen, ttl_s=3600)
        self._truth = Truth(len(self._ids))
        self._pcm = os.urandom(CHUNK_BYTES)
        self._envelope = animation_envelope()
        self._lags: list[float] = []
        self.redis_py_calls = 0

    async def run(self, link: type[ParentLink]) -> None:
        await self._pipe.connect()
        t1 = await drive(self._shape, len(self._ids), self._cfg["duration_s"], link, self._write)
        link.emit("report", t1=t1, **self._report())
        await self._pipe.close()
        await self._client.aclose()

    async def _write(self, slots: list[Slot], timeline: Timeline, now: float) -> None:
        self._lags.extend(now - slot.due_ms for slot in slots)
        opening = [s for s in slots if s.index == 0]
        if self._relay and opening:
            await asyncio.gather(*(self._open(s) for s in opening))
        commands: list[bytes] = []
        owners: list[int] = []
        ending: list[Slot] = []
        for slot in slots:
            for entry in self._entries(slot, timeline.is_last(slot)):
                commands.append(self._prefixes[slot.conversation] + value(entry))
                owners.append(slot.conversation)
            if timeline.is_last(slot):
                ending.append(slot)
        for conv, reply in zip(owners, await self._pipe.send(commands), strict=True):
            self._truth.add(conv, reply)
        if self._relay and ending:
            await asyncio.gather(*(self._end(s) for s in ending))

    def _entries(self, slot: Slot, last: bool) -> list[bytes]:
        turn = slot.turn_id()
        entries = []
        if slot.index == 0 and not self._relay:
            entries.append(wire.turn_start(turn, sample_rate=SAMPLE_RATE))
        entries.append(wire.audio(turn, slot.index, self._pcm, end=last))
        if slot.index % CHUNKS_PER_FRAMES == CHUNKS_PER_FRAMES - 1:
            entries.append(wire.frames(turn, slot.index // CHUNKS_PER_FRAMES, self._envelope,
                                       last=last))
        if last and not self._relay:
            entries.append(wire.turn_end(turn, status=wire.STATUS_COMPLETE))
        return entries

    async def _open(self, slot: Slot) -> None:
        conv = slot.conversation
        start_id = await self._log.open_turn(self._ids[conv], slot.turn_id(),
                                             sample_rate=SAMPLE_RATE, owner=_OWNER)
        self.redis_py_calls += 2  # HGETALL of the turn record + EVALSHA
        self._truth.add(conv, start_id.encode())

    async def _end(self, slot: Slot) -> None:
        conv = slot.conversation
        end_id = await self._log.end_turn(self._ids[conv], slot.turn_id(),
                                          status=wire.STATUS_COMPLETE)
        self.redis_py_calls += 1
        self._truth.add(conv, end_id.encode())

    def _report(self) -> dict[str, Any]:
        lags = sorted(self._lags) or [0.0]
        truth = self._truth
        return {
            "appended": sum(truth.count), "errors": truth.errors,
            "offered": sum(truth.count) + truth.errors,
            "commands": self._pipe.commands + self.redis_py_calls,
            "lag_p99_ms": round(lags[int(0.99 * (len(lags) - 1))], 1),
            "lag_max_ms": round(lags[-1], 1),
            "truth": [[c, h, last] for c, h, last in zip(truth.count, truth.hash, truth.last,
                                                         strict=True)],
        }


async def _main() -> None:
    link = await ParentLink.open()
    config = await link.receive()
    if config is None:
        return
    await Writer(config).run(ParentLink)


if __name__ == "__main__":
    asyncio.run(_main())
