"""The simulator handle, test clips and checks of what a producer wrote to a stream."""

from __future__ import annotations

import asyncio
import math
from array import array
from dataclasses import dataclass

import redis.asyncio as redis
from aiohttp import web
from spatius.proto.generated import message_pb2

from relay import wire
from relay.dev.motion_sim import (
    SIM_KEY,
    FaultKind,
    FaultRule,
    MotionSim,
    decode_animation,
    keyframes_for_audio,
)
from relay.keys import Keys
from relay.streams import read_after

RATE = 16000
FAST = {"frames_timeout_s": 3.0, "sdk_wait_s": 2.0, "conversation_wait_s": 5.0}


def tone(seconds: float, *, freq: float = 220.0, rate: int = RATE) -> bytes:
    """A PCM16 sine clip; different frequencies give different keyframes."""
    count = int(seconds * rate)
    samples = (int(9000 * math.sin(math.tau * freq * i / rate)) for i in range(count))
    return array("h", samples).tobytes()


@dataclass
class SimHandle:
    runner: web.AppRunner
    port: int

    @property
    def sim(self) -> MotionSim:
        return self.runner.app[SIM_KEY]

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/console"

    @property
    def ingress_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v2/driveningress"

    def fault(self, kind: str, **options: object) -> None:
        self.sim.add_fault(FaultRule(kind=FaultKind(kind), **options))  # type: ignore[arg-type]


async def stream_messages(
    client: redis.Redis, keys: Keys, conversation_id: str
) -> list[wire.Message]:
    rows = await read_after(client, keys, conversation_id, "0-0", count=100_000)
    return [wire.decode_server(wire.delivery(entry_id, data)) for entry_id, data in rows]


async def wait_turn_end(
    client: redis.Redis, keys: Keys, conversation_id: str, turn_id: str, timeout_s: float = 10.0
) -> list[wire.Message]:
    """Block on the conversation stream until ``turn_id`` ends (turn_end or interrupt)."""
    key, last = keys.stream(conversation_id), "0-0"
    async with asyncio.timeout(timeout_s):
        while True:
            reply = await client.xread({key: last}, block=200)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    kind, turn = wire.stored_kind(fields[b"d"])
                    if turn == turn_id and kind in (wire.TURN_END, wire.INTERRUPT):
                        return await stream_messages(client, keys, conversation_id)


def of_turn(messages: list[wire.Message], turn_id: str) -> list[wire.Message]:
    mine = [i for i, m in enumerate(messages) if m.turn == turn_id]
    assert mine == list(range(mine[0], mine[-1] + 1)), "turns of one conversation interleaved"
    return [messages[i] for i in mine]


def check_audio(mine: list[wire.Message], clip: bytes) -> None:
    audio = [m for m in mine if m.kind == wire.AUDIO]
    assert [m.get("seq") for m in audio] == list(range(len(audio)))
    assert b"".join(m.get("data") for m in audio) == clip
    assert audio[-1].get("end") is True
    assert not any(m.get("end") for m in audio[:-1])


def check_frames(mine: list[wire.Message]) -> list[wire.Message]:
    frames = [m for m in mine if m.kind == wire.FRAMES]
    assert [m.get("seq") for m in frames] == list(range(len(frames)))
    for message in frames:
        envelope = message_pb2.Message()
        envelope.ParseFromString(message.get("data"))  # the SDK's own schema reads every entry
        assert envelope.type == message_pb2.MESSAGE_SERVER_RESPONSE_ANIMATION
        assert message.get("data"), "empty frames message"
    return frames


def assert_complete(
    messages: list[wire.Message], turn_id: str, clip: bytes, rate: int = RATE
) -> None:
    mine = of_turn(messages, turn_id)
    kinds = [m.kind for m in mine]
    assert kinds[0] == wire.TURN_START and mine[0].get("sample_rate") == rate
    assert kinds[-1] == wire.TURN_END and mine[-1].get("status") == wire.STATUS_COMPLETE
    assert wire.AUDIO_ONLY not in kinds and wire.INTERRUPT not in kinds
    check_audio(mine, clip)
    frames = check_frames(mine)
    assert kinds.index(wire.FRAMES) > kinds.index(wire.AUDIO)
    assert [m.get("last") for m in frames].count(True) == 1 and frames[-1].get("last")
    batches = [decode_animation(m.get("data")) for m in frames]
    assert len({b.req_id for b in batches}) == 1
    keyframes = [k for batch in batches for k in batch.keyframes]
    assert keyframes == keyframes_for_audio(clip, rate)


def assert_audio_only(
    messages: list[wire.Message], turn_id: str, clip: bytes, reason: str | None = None
) -> None:
    mine = of_turn(messages, turn_id)
    kinds = [m.kind for m in mine]
    assert kinds.count(wire.AUDIO_ONLY) == 1
    marker = kinds.index(wire.AUDIO_ONLY)
    assert wire.FRAMES not in kinds[marker:]
    if reason is not None:
        assert mine[marker].get("reason") == reason
    check_audio(mine, clip)
    check_frames(mine)
    assert kinds[-1] == wire.TURN_END and mine[-1].get("status") == wire.STATUS_AUDIO_ONLY


def assert_interrupted(messages: list[wire.Message], turn_id: str) -> None:
    mine = of_turn(messages, turn_id)
    assert mine[-1].kind == wire.INTERRUPT
    assert [m.kind for m in mine].count(wire.INTERRUPT) == 1
    assert wire.TURN_END not in [m.kind for m in mine]


# --- turns ---------------------------------------------------------------------------------------
