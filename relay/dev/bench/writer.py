"""Edge-path load writer: appends standard conversations to conversation streams in real time.

Run as ``python -m relay.dev.bench.writer`` by the bench. Config (first stdin line): ``redis_url``,
``prefix``, ``conversations`` (ids), ``duration_s``, ``turn_s``, ``gap_s``, ``maxlen``, ``mode``:

* ``relay``: every turn is opened and ended through ``ConversationLog`` (the fenced Lua scripts,
  so turn records exist and joiners start at the turn), and each slot's audio and frames
  entries, built by ``relay.wire`` exactly as a producer builds them, go through the fenced
  append script in one pipelined ``EVALSHA`` per slot (as the producer batches them): the write
  path the relay really has, live push included. What it appended is read back from the streams
  by the bench (the script returns only the last id);
* ``bare``: the same entries, turn_start and turn_end included, all by pipelined XADD (the
  bare-loop baseline and the naive per-client-XREAD edge read them);
* ``socketio``: the same entries emitted through python-socketio's ``AsyncRedisManager``
  (write-only), each as ``{"id": <ms>-<seq>, "d": <entry>}`` to the conversation's room, with
  ids made here from the send time (there is no stream);
* ``floor``: the same entries as ``bare``, each slot's as one push of ``relay.dev.bench.floor``
  over one TCP connection to its forwarder (``floor_port``), a batch's pushes in one write; no
  Redis at all (the machine's floor for an edge, measured at every edge step).

Reports per conversation the count and id hash of what it appended (the truth receivers are
checked against), its own Redis command count, and how late it ran against the schedule.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import redis.asyncio as redis

from relay import wire
from relay.dev.bench.child import ParentLink
from relay.dev.bench.floor import push
from relay.dev.bench.resp import RespPipe, pack, value, xadd_prefix
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


def _arg(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class Writer:
    def __init__(self, config: dict[str, Any]) -> None:
        self._cfg = config
        self._ids: list[str] = config["conversations"]
        self._mode = config["mode"]
        self._relay = self._mode == "relay"
        self._floor: asyncio.StreamWriter | None = None
        self._sio: Any = None
        self._sio_seq = [0] * len(self._ids)
        self._sio_last_ms = [0] * len(self._ids)
        self.script_entries = 0
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
        if self._mode == "floor":
            _, self._floor = await asyncio.open_connection("127.0.0.1", self._cfg["floor_port"])
        else:
            await self._pipe.connect()
        if self._relay:
            await self._log.load_scripts()
        if self._mode == "socketio":
            import socketio

            self._sio = socketio.AsyncRedisManager(self._cfg["redis_url"],
                                                   channel=self._cfg["channel"], write_only=True)
        t1 = await drive(self._shape, len(self._ids), self._cfg["duration_s"], link, self._write)
        if self._floor is not None:
            self._floor.close()
            await self._floor.wait_closed()
        link.emit("report", t1=t1, **self._report())
        await self._pipe.close()
        await self._client.aclose()

    async def _write(self, slots: list[Slot], timeline: Timeline, now: float) -> None:
        self._lags.extend(now - slot.due_ms for slot in slots)
        opening = [s for s in slots if s.index == 0]
        if self._relay and opening:
            await asyncio.gather(*(self._open(s) for s in opening))
        if self._mode == "socketio":
            await self._emit(slots, timeline)
            return
        if self._floor is not None:
            await self._push_floor(self._floor, slots, timeline)
            return
        commands: list[bytes] = []
        owners: list[int] = []
        ending: list[Slot] = []
        for slot in slots:
            entries = self._entries(slot, timeline.is_last(slot))
            if self._relay:
                call = self._log.append_call(self._ids[slot.conversation], slot.turn_id(),
                                             *entries)
                commands.append(pack(*(_arg(a) for a in call)))
                owners.append(slot.conversation)
                self.script_entries += len(entries)
            else:
                for entry in entries:
                    commands.append(self._prefixes[slot.conversation] + value(entry))
                    owners.append(slot.conversation)
            if timeline.is_last(slot):
                ending.append(slot)
        for conv, reply in zip(owners, await self._pipe.send(commands), strict=True):
            if self._relay:
                self._truth.errors += not isinstance(reply, bytes)
            else:
                self._truth.add(conv, reply)
        if self._relay and ending:
            await asyncio.gather(*(self._end(s) for s in ending))

    async def _push_floor(self, out: asyncio.StreamWriter, slots: list[Slot],
                          timeline: Timeline) -> None:
        pushes = []
        for slot in slots:
            entries = self._entries(slot, timeline.is_last(slot))
            pushes.append(push(slot.conversation, entries))
            self._truth.count[slot.conversation] += len(entries)
        out.write(b"".join(pushes))
        await out.drain()

    async def _emit(self, slots: list[Slot], timeline: Timeline) -> None:
        """socketio mode: each conversation's entries emitted in order, the conversations
        concurrently (emits in flight together may take different connections and overtake)."""
        per_conversation: dict[int, list[bytes]] = {}
        for slot in slots:
            entries = self._entries(slot, timeline.is_last(slot))
            per_conversation.setdefault(slot.conversation, []).extend(entries)
        await asyncio.gather(*(self._emit_in_order(conv, entries)
                               for conv, entries in per_conversation.items()))

    async def _emit_in_order(self, conv: int, entries: list[bytes]) -> None:
        for entry in entries:
            entry_id = self._next_id(conv)
            self._truth.add(conv, entry_id)
            self.redis_py_calls += 1
            await self._sio.emit("m", {"id": entry_id.decode(), "d": entry},
                                 room=self._ids[conv])

    def _next_id(self, conv: int) -> bytes:
        """An id like a stream's: send time in ms, then a sequence within that ms."""
        now = int(time.time() * 1000)
        if now <= self._sio_last_ms[conv]:
            now, self._sio_seq[conv] = self._sio_last_ms[conv], self._sio_seq[conv] + 1
        else:
            self._sio_seq[conv] = 0
        self._sio_last_ms[conv] = now
        return f"{now}-{self._sio_seq[conv]}".encode()

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
        self.script_entries += 1
        self._truth.add(conv, start_id.encode())

    async def _end(self, slot: Slot) -> None:
        conv = slot.conversation
        end_id = await self._log.end_turn(self._ids[conv], slot.turn_id(),
                                          status=wire.STATUS_COMPLETE)
        self.redis_py_calls += 1
        self.script_entries += 1
        self._truth.add(conv, end_id.encode())

    def _report(self) -> dict[str, Any]:
        lags = sorted(self._lags) or [0.0]
        truth = self._truth
        appended = self.script_entries if self._relay else sum(truth.count)
        return {
            "appended": appended, "errors": truth.errors,
            "offered": appended + truth.errors, "script_entries": self.script_entries,
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
