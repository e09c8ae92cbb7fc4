"""Per-request buffering: keyframes made from a req_id's audio, cut into animation batches."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from relay.dev.motion_sim.animation import Keyframe, KeyframeGenerator


@dataclass(frozen=True)
class Outbound:
    payload: bytes
    req_id: str | None = None  # set for animation messages only
    keyframes: int = 0
    end: bool = False


class RequestBuffer:
    """One req_id: its audio, made into keyframes as the writer takes them."""

    def __init__(self, req_id: str, sample_rate: int, started_at: float) -> None:
        self.req_id = req_id
        self.started_at = started_at
        self.first_batch_sent = False
        self.ended = False
        self.taken = 0
        self.changed = asyncio.Event()
        self.emitter: asyncio.Task[None] | None = None
        self._generator = KeyframeGenerator(sample_rate)

    @property
    def pending(self) -> int:
        """Keyframes the request's audio makes that were not taken yet."""
        return self._generator.available

    def feed(self, audio: bytes, end: bool) -> None:
        self._generator.push(audio)
        if end:
            self._generator.end()
            self.ended = True
        self.changed.set()

    def ready(self, batch: int) -> bool:
        # Until the request ends the newest keyframe is held back, so the end=true message
        # always carries at least one keyframe when the request had audio.
        return self.ended or self.pending > batch

    def take(self, batch: int) -> tuple[list[Keyframe], bool]:
        final = self.ended and self.pending <= batch
        keyframes = self._generator.take(self.pending if final else batch)
        self.taken += len(keyframes)
        return keyframes, final
