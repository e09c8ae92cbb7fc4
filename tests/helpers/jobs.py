"""Assertions for turns that may have been retried: each one played exactly once, whole."""

from __future__ import annotations

import redis.asyncio as redis
from spatius.proto.generated import message_pb2

from relay import wire
from relay.keys import Keys


def request_ids(frames: list[wire.Message]) -> set[str]:
    """The Motion Server requests a turn's frames came from (decoded with the SDK's schema)."""
    ids = set()
    for message in frames:
        envelope = message_pb2.Message()
        envelope.ParseFromString(message.get("data"))
        ids.add(envelope.server_response_animation.req_id)
    return ids


def split_turns(messages: list[wire.Message]) -> dict[str, list[wire.Message]]:
    """Stream messages by turn, asserting that turns never interleave."""
    turns: dict[str, list[wire.Message]] = {}
    order: list[str] = []
    for message in messages:
        if message.turn is None:
            continue
        if not order or order[-1] != message.turn:
            assert message.turn not in turns, f"turn {message.turn} interleaved with another"
            order.append(message.turn)
        turns.setdefault(message.turn, []).append(message)
    return turns


def assert_played_once(mine: list[wire.Message], clip: bytes) -> str:
    """One turn's messages as a client got them: its audio is the clip exactly once, in seq
    order; its frames come from one Motion Server request and never follow an audio_only
    marker; it starts once and ends once. Returns the turn's final status."""
    kinds = [m.kind for m in mine]
    assert kinds[0] == wire.TURN_START and kinds.count(wire.TURN_START) == 1
    audio = [m for m in mine if m.kind == wire.AUDIO]
    assert [m.get("seq") for m in audio] == list(range(len(audio))), "audio seq gap or repeat"
    assert b"".join(m.get("data") for m in audio) == clip, "audio not the clip exactly once"
    assert audio[-1].get("end") is True and not any(m.get("end") for m in audio[:-1])
    frames = [m for m in mine if m.kind == wire.FRAMES]
    assert len(request_ids(frames)) <= 1, "frames of two Motion Server requests mixed"
    assert [m.get("seq") for m in frames] == list(range(len(frames)))
    assert all(m.get("data") for m in frames)
    if wire.AUDIO_ONLY in kinds:
        assert kinds.count(wire.AUDIO_ONLY) == 1
        assert wire.FRAMES not in kinds[kinds.index(wire.AUDIO_ONLY):], "frames after audio_only"
    else:
        assert [m.get("last") for m in frames].count(True) == 1 and frames[-1].get("last")
    assert kinds[-1] == wire.TURN_END and kinds.count(wire.TURN_END) == 1
    assert wire.INTERRUPT not in kinds
    status: str = mine[-1].get("status")
    assert status == (wire.STATUS_AUDIO_ONLY if wire.AUDIO_ONLY in kinds else wire.STATUS_COMPLETE)
    return status


async def pending_jobs(client: redis.Redis, keys: Keys) -> int:
    summary = await client.xpending(keys.jobs(), keys.jobs_group())
    return int(summary["pending"])
