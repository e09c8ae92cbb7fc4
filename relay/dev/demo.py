"""Demo conversations pushed through a running stack, and the delivery check that grades them.

The truth is the conversation stream in Redis. Every client must have received exactly the
stream's entries, once each, in order; each turn's audio must equal the clip that was submitted,
its frames must follow its first audio, and (with the simulator) its keyframes must equal the
ones the simulator derives from that audio.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
from dataclasses import dataclass, field
from typing import Protocol

from relay import wire
from relay.client import RelayClient
from relay.dev.motion_sim import decode_animation, keyframes_for_audio
from relay.keys import Keys
from relay.redis_conn import RedisClient
from relay.streams import read_after
from relay.tokens import mint_token


class SubmitClip(Protocol):
    """Puts one clip turn on the job queue and returns its turn id."""

    async def __call__(self, conversation_id: str, pcm: bytes, sample_rate: int) -> str: ...


def speech_like_pcm(seconds: float, sample_rate: int, seed: int) -> bytes:
    """PCM16 mono with syllable-like bursts (a few voiced harmonics under a 4 Hz envelope)."""
    rng = random.Random(seed)
    pitch = rng.uniform(110, 220)
    count = int(seconds * sample_rate)
    samples = []
    for n in range(count):
        t = n / sample_rate
        envelope = max(0.0, math.sin(math.pi * 4 * t + seed)) ** 2
        voice = sum(math.sin(2 * math.pi * pitch * k * t) / k for k in (1, 2, 3))
        samples.append(int(9000 * envelope * voice / 1.8))
    return struct.pack(f"<{count}h", *samples)


@dataclass
class ClientCheck:
    conversation_id: str
    edge: str
    received: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class DemoReport:
    conversations: int
    turns: int
    clients: list[ClientCheck]
    stream_entries: int
    audio_bytes: int
    frames_messages: int
    keyframes: int
    seconds: float

    @property
    def ok(self) -> bool:
        return all(not c.problems for c in self.clients) and self.stream_entries > 0

    def render(self) -> str:
        lines = [
            f"delivery report: {self.conversations} conversations x {self.turns} turns, "
            f"{len(self.clients)} clients, {self.seconds:.1f} s",
            f"  stream entries {self.stream_entries}, audio {self.audio_bytes} B, "
            f"frames messages {self.frames_messages}, keyframes {self.keyframes}",
        ]
        for check in self.clients:
            verdict = "ok" if not check.problems else "; ".join(check.problems[:3])
            lines.append(f"  {check.conversation_id:<12} via {check.edge:<28} "
                         f"{check.received:>6} messages  {verdict}")
        lines.append("RESULT: every message arrived exactly once and in order" if self.ok
                     else "RESULT: FAILED")
        return "\n".join(lines)


def check_turn(messages: list[wire.Message], clip: bytes, sample_rate: int,
               simulated: bool) -> tuple[list[str], int, int]:
    """Problems with one turn as a client saw it, plus its frames-message and keyframe counts."""
    problems: list[str] = []
    kinds = [m.kind for m in messages]
    audio = b"".join(m.get("data", b"") for m in messages if m.kind == wire.AUDIO)
    frames = [m for m in messages if m.kind == wire.FRAMES]
    if audio != clip:
        problems.append(f"audio differs ({len(audio)} of {len(clip)} bytes)")
    if frames and kinds.index(wire.FRAMES) < kinds.index(wire.AUDIO):
        problems.append("frames before the turn's first audio")
    if sum(1 for m in frames if m.get("last")) != 1:
        problems.append("not exactly one last frames message")
    last = messages[-1] if messages else None
    if last is None or last.kind != wire.TURN_END or last.get("status") != "complete":
        problems.append("turn did not end complete")
    keyframes = [kf for m in frames for kf in decode_animation(m.get("data")).keyframes]
    if simulated and keyframes != keyframes_for_audio(clip, sample_rate):
        problems.append("keyframes differ from the simulator's reference")
    return problems, len(frames), len(keyframes)


class _Watcher:
    """One demo client: collects what it receives and signals each turn end."""

    def __init__(self, client: RelayClient, edge: str) -> None:
        self.client = client
        self.check = ClientCheck(client.conversation_id, edge)
        self.messages: list[wire.Message] = []
        self.turn_ended = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        async for message in self.client.messages():
            if message.kind == wire.WELCOME:
                continue
            self.messages.append(message)
            if message.kind in (wire.TURN_END, wire.INTERRUPT):
                self.turn_ended.set()

    async def joined(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.client.welcomes:
            if loop.time() > deadline:
                raise TimeoutError(f"client of {self.client.conversation_id} was never welcomed")
            await asyncio.sleep(0.02)


async def run_demo(
    client: RedisClient, keys: Keys, secret: str, edges: list[str], submit: SubmitClip, *,
    conversations: int, turns: int, sample_rate: int, simulated: bool, turn_timeout_s: float = 60.0,
) -> DemoReport:
    """Two clients per conversation (on different edges); turns spoken one after another."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    watchers: list[_Watcher] = []
    clips: dict[str, list[bytes]] = {}
    try:
        for index in range(conversations):
            conversation_id = f"demo-{index + 1}"
            token = mint_token(secret, conversation_id, ttl_s=3600)
            for offset in range(2 if len(edges) > 1 else 1):
                first = (index + offset) % len(edges)
                order = edges[first:] + edges[:first]
                watcher = _Watcher(RelayClient(order, conversation_id, token), order[0])
                watcher.task = asyncio.create_task(watcher.run())
                watchers.append(watcher)
        await asyncio.gather(*(w.joined(30.0) for w in watchers))
        await asyncio.gather(*(
            _speak_turns(submit, f"demo-{i + 1}", turns, sample_rate, clips, watchers,
                         turn_timeout_s) for i in range(conversations)
        ))
    finally:
        for watcher in watchers:
            await watcher.client.close()
            if watcher.task is not None:
                watcher.task.cancel()
                await asyncio.gather(watcher.task, return_exceptions=True)
    return await _grade(client, keys, watchers, clips, sample_rate, simulated, conversations,
                        turns, loop.time() - started)


async def _speak_turns(submit: SubmitClip, conversation_id: str, turns: int, sample_rate: int,
                       clips: dict[str, list[bytes]], watchers: list[_Watcher],
                       timeout_s: float) -> None:
    mine = [w for w in watchers if w.client.conversation_id == conversation_id]
    clips[conversation_id] = []
    for turn in range(turns):
        seed = hash((conversation_id, turn)) % 997
        clip = speech_like_pcm(1.2 + 0.4 * turn, sample_rate, seed=seed)
        clips[conversation_id].append(clip)
        for watcher in mine:
            watcher.turn_ended.clear()
        await submit(conversation_id, clip, sample_rate)
        await asyncio.wait_for(asyncio.gather(*(w.turn_ended.wait() for w in mine)), timeout_s)


async def _grade(client: RedisClient, keys: Keys, watchers: list[_Watcher],
                 clips: dict[str, list[bytes]], sample_rate: int, simulated: bool,
                 conversations: int, turns: int, seconds: float) -> DemoReport:
    totals = {"entries": 0, "audio": 0, "frames": 0, "keyframes": 0}
    truth: dict[str, list[str]] = {}
    for conversation_id, conversation_clips in clips.items():
        rows = await read_after(client, keys, conversation_id, "0-0", count=1_000_000)
        truth[conversation_id] = [entry_id for entry_id, _ in rows]
        totals["entries"] += len(rows)
        totals["audio"] += sum(len(c) for c in conversation_clips)
    counted: set[str] = set()
    for watcher in watchers:
        _grade_client(watcher, truth[watcher.check.conversation_id],
                      clips[watcher.check.conversation_id], sample_rate, simulated, totals,
                      count=watcher.check.conversation_id not in counted)
        counted.add(watcher.check.conversation_id)
    return DemoReport(conversations, turns, [w.check for w in watchers], totals["entries"],
                      totals["audio"], totals["frames"], totals["keyframes"], seconds)


def _grade_client(watcher: _Watcher, truth: list[str], clips: list[bytes], sample_rate: int,
                  simulated: bool, totals: dict[str, int], *, count: bool) -> None:
    check = watcher.check
    check.received = len(watcher.messages)
    ids = [m.id for m in watcher.messages]
    if len(set(ids)) != len(ids):
        check.problems.append("duplicates")
    if ids != truth:
        check.problems.append(f"received {len(ids)} messages, stream holds {len(truth)}")
    by_turn: dict[str, list[wire.Message]] = {}
    for message in watcher.messages:
        by_turn.setdefault(str(message.turn), []).append(message)
    if len(by_turn) != len(clips):
        check.problems.append(f"saw {len(by_turn)} turns, spoke {len(clips)}")
    for messages, clip in zip(by_turn.values(), clips, strict=False):  # mismatch reported above
        problems, frames, keyframes = check_turn(messages, clip, sample_rate, simulated)
        check.problems.extend(problems)
        if count:
            totals["frames"] += frames
            totals["keyframes"] += keyframes
