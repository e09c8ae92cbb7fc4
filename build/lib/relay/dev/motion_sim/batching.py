"""Per-request buffering: keyframes made from a req_id's audio, cut into animation batches."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from relay.dev.motion_sim.animation import Keyframe, KeyframeGenerator


@dataclass(frozen=True)
class Outbound:
    payload: bytes
    req_id: str | None = None  # set for animation messages only
    keyframes: int = 0
    end: bool = False


class RequestBuffer:
    """One req_id: keyframes made from its audio that were not yet handed to the writer."""

    def __init__(self, req_id: str, sample_rate: int, started_at: float) -> None:
        self.req_id = req_id
        self.started_at = started_at
        self.pending: deque[Keyframe] = deque()
        self.ended = False
        self.taken = 0
        self.changed = asyncio.Event()
        self.emitter: asyncio.Task[None] | None = None
        self._generator = KeyframeGenerator(sample_rate)

    def feed(self, audio: bytes, end: bool) -> None:
        self.pending.extend(self._generator.feed(audio))
        if end:
            self.pending.extend(self._generator.finish())
            self.ended = True
        self.changed.set()

    def ready(self, batch: int) -> bool:
        # Until the request ends the newest keyframe is held back, so the end=true message
        # always carries at least one keyframe when the request had audio.
        return self.ended or len(self.pending) > batch

    def take(self, batch: int) -> tuple[list[Keyframe], bool]:
        final = self.ended and len(self.pending) <= batch
        count = len(self.pending) if final else batch
        keyframes = [self.pending.popleft() for _ in range(count)]
        self.taken += count
        return keyframes, final
