"""The standard conversation and a real-time timeline of when each of its messages is due.

Standard conversation (docs/benchmarks.md): 16 kHz mono PCM16 in 40 ms chunks (1,280 bytes,
25 per second) and, as the simulator streams it, one animation message of 5 keyframes (about
2.5 KB) per 200 ms of audio, appended after the audio it was made from. Speech comes in turns
of ``turn_s`` seconds with ``gap_s`` of silence between them. Conversations are spread evenly
over the first second, so load is smooth rather than a 25 Hz thundering herd.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

CHUNK_MS = 40
CHUNK_BYTES = 1280
SAMPLE_RATE = 16_000
CHUNKS_PER_FRAMES = 5  # one animation message per 200 ms of audio (5 keyframes at 25 fps)
KEYFRAME_BYTES = 500
_SPREAD_MS = 997.0  # conversation start offsets cover about one second, not a multiple of 40


@dataclass(frozen=True)
class ConversationShape:
    turn_s: float = 8.0
    gap_s: float = 0.5

    @property
    def chunks(self) -> int:
        """Audio chunks per turn, a whole number of animation batches."""
        raw = max(CHUNKS_PER_FRAMES, round(self.turn_s * 1000 / CHUNK_MS))
        return raw - raw % CHUNKS_PER_FRAMES

    @property
    def period_ms(self) -> float:
        return self.chunks * CHUNK_MS + self.gap_s * 1000

    @property
    def messages_per_turn(self) -> int:
        """turn_start + audio + frames + turn_end."""
        return 2 + self.chunks + self.chunks // CHUNKS_PER_FRAMES

    @property
    def messages_per_s(self) -> float:
        return self.messages_per_turn / (self.period_ms / 1000)

    def as_dict(self) -> dict[str, object]:
        return {"audio_chunk_bytes": CHUNK_BYTES, "audio_chunk_ms": CHUNK_MS,
                "sample_rate": SAMPLE_RATE, "frames_every_ms": CHUNK_MS * CHUNKS_PER_FRAMES,
                "keyframes_per_frames_message": CHUNKS_PER_FRAMES, "turn_s": self.turn_s,
                "gap_s": self.gap_s, "messages_per_s_per_conversation":
                round(self.messages_per_s, 2)}


@dataclass(frozen=True)
class Slot:
    """One 40 ms slot of a conversation's turn: audio chunk ``index`` is due (and more)."""

    conversation: int
    turn: int
    index: int
    turn_start_ms: int  # scheduled wall time of the turn's first slot
    due_ms: float

    def turn_id(self) -> str:
        # The scheduled start rides in the turn id, so a client can tell how long after its
        # scheduled send time each audio chunk arrived, whatever path it took.
        return f"t{self.turn}-{self.turn_start_ms}"


class Timeline:
    """Yields due slots of ``conversations`` conversations in time order, until ``end_ms``."""

    def __init__(self, shape: ConversationShape, conversations: int, *, start_ms: float,
                 end_ms: float) -> None:
        self._shape = shape
        self._end_ms = end_ms
        # (due, conversation, turn, chunk index, turn start): the start travels with the entry
        # so every slot of a turn names the same turn id, whatever float rounding does to due.
        self._heap: list[tuple[float, int, int, int, float]] = []
        for conv in range(conversations):
            offset = start_ms + conv * _SPREAD_MS / max(conversations, 1)
            heapq.heappush(self._heap, (offset, conv, 0, 0, offset))

    @property
    def finished(self) -> bool:
        return not self._heap

    def next_due_ms(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now_ms: float) -> Iterator[Slot]:
        shape, heap = self._shape, self._heap
        ended: set[int] = set()
        deferred: list[tuple[float, int, int, int, float]] = []
        while heap and heap[0][0] <= now_ms:
            item = heapq.heappop(heap)
            due, conv, turn, index, start = item
            if conv in ended:
                # A late caller must finish a turn before it opens the conversation's next one.
                deferred.append(item)
                continue
            yield Slot(conv, turn, index, int(start), due)
            if index + 1 == shape.chunks:
                ended.add(conv)
            if index + 1 < shape.chunks:
                nxt = (start + (index + 1) * CHUNK_MS, conv, turn, index + 1, start)
            else:
                following = start + shape.period_ms
                nxt = (following, conv, turn + 1, 0, following)
            if nxt[0] < self._end_ms:
                heapq.heappush(heap, nxt)
        for item in deferred:
            heapq.heappush(heap, item)

    def is_last(self, slot: Slot) -> bool:
        return slot.index == self._shape.chunks - 1


# Never sleep shorter than this between due slots: the loop must not spin.
TICK_S = 0.005

SlotHandler = Callable[[list[Slot], Timeline, float], Awaitable[None]]


async def drive(shape: ConversationShape, conversations: int, duration_s: float,
                link: Any, handle: SlotHandler) -> float:
    """Run a paced schedule: announce its start to the parent, hand every due batch of slots to
    ``handle`` (with the current time in ms), and return the wall time it ended."""
    start = time.time() * 1000 + 200
    timeline = Timeline(shape, conversations, start_ms=start, end_ms=start + duration_s * 1000)
    link.emit("started", t0=start / 1000)
    while not timeline.finished:
        due = timeline.next_due_ms() or 0.0
        await asyncio.sleep(max((due - time.time() * 1000) / 1000, TICK_S))
        now = time.time() * 1000
        await handle(list(timeline.pop_due(now)), timeline, now)
    return time.time()
