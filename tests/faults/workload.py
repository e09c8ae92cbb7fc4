"""Turns submitted to the job queue the way a careful backend would: fixed turn ids, and every
write retried until it succeeds, which the relay makes safe (each one is idempotent)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError

from relay.dev.demo import speech_like_pcm
from relay.keys import Keys
from workers.queue.input import StreamedInput
from workers.queue.submit import TurnQueue

log = structlog.get_logger(__name__)

RATE = 16000
CHUNK = 1280  # 40 ms of PCM16 at 16 kHz


@dataclass(frozen=True)
class PlannedTurn:
    conversation_id: str
    turn_id: str
    kind: str  # "clip" | "stream"
    pcm: bytes


@dataclass
class Workload:
    """Per conversation, ``turns`` turns (clips and streamed turns alternating) of 1.5-3.5 s."""

    turns: list[PlannedTurn] = field(default_factory=list)

    @classmethod
    def plan(cls, conversations: list[str], turns: int, rng: random.Random,
             round_: int = 0) -> Workload:
        """``round_`` > 0: a later round of turns for the same conversations (other turn ids)."""
        planned = []
        tag = f"-r{round_}" if round_ else ""
        for c, conv in enumerate(conversations):
            for n in range(turns):
                kind = "stream" if (c + n) % 2 else "clip"
                pcm = speech_like_pcm(rng.uniform(1.5, 3.5), RATE, seed=rng.randrange(1 << 30))
                planned.append(PlannedTurn(conv, f"{conv}{tag}-t{n}", kind, pcm))
        return cls(planned)

    def clips(self) -> dict[str, bytes]:
        return {t.turn_id: t.pcm for t in self.turns}

    def order(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for t in self.turns:
            out.setdefault(t.conversation_id, []).append(t.turn_id)
        return out


async def _retry(what: str, step, deadline_s: float = 120.0):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        try:
            return await step()
        except (RedisError, OSError) as exc:
            if loop.time() > end:
                raise
            log.debug("workload_retry", what=what, error=str(exc))
            await asyncio.sleep(0.2)


async def _feed(feed: StreamedInput, pcm: bytes) -> None:
    """A TTS engine feeding at about real time. A chunk whose send raised is kept by the feed:
    it is retried with flush(), never sent again (that would be a second chunk; see
    StreamedInput)."""
    for start in range(0, len(pcm), CHUNK):
        try:
            await feed.send(pcm[start:start + CHUNK])
        except (RedisError, OSError):
            await _retry("flush", feed.flush)
        await asyncio.sleep(0.035)
    await _retry("end", feed.end)


async def submit_all(client: redis.Redis, keys: Keys,
                     workload: Workload) -> list[asyncio.Task[None]]:
    """Submit every turn (a conversation's in order); returns the feeders of streamed turns."""
    queue = TurnQueue(client, keys, input_ttl_s=600)
    feeders = []
    for turn in workload.turns:
        if turn.kind == "clip":
            await _retry("submit", lambda t=turn: queue.submit_clip(
                t.conversation_id, t.pcm, sample_rate=RATE, turn_id=t.turn_id))
        else:
            feed = await _retry("open", lambda t=turn: queue.open_streamed(
                t.conversation_id, sample_rate=RATE, turn_id=t.turn_id))
            feeders.append(asyncio.create_task(_feed(feed, turn.pcm), name=f"feed-{turn.turn_id}"))
    return feeders
