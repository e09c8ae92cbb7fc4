"""Fenced turn writes against a real server: the contract between producers and edges."""

from __future__ import annotations

import pytest

from relay import wire
from relay.errors import TurnFenced
from relay.streams import ACTIVE, ConversationLog, read_after, read_turn, stream_info


@pytest.fixture
def log(redis_client, keys):
    return ConversationLog(redis_client, keys, maxlen=1000, ttl_s=60)


def kinds(rows):
    return [
        (wire.decode_server(wire.delivery(i, d)).kind, wire.decode_server(wire.delivery(i, d)).turn)
        for i, d in rows
    ]


async def test_turn_lifecycle_writes_in_order(log, redis_client, keys):
    start = await log.open_turn("c1", "t1", sample_rate=16000, owner="p1")
    await log.append("c1", "t1", wire.audio("t1", 0, b"ab", end=False))
    await log.append(
        "c1", "t1", wire.audio("t1", 1, b"", end=True), wire.frames("t1", 0, b"env", last=True)
    )
    await log.end_turn("c1", "t1", status=wire.STATUS_COMPLETE)
    rows = await read_after(redis_client, keys, "c1", "0-0", count=100)
    assert rows[0][0] == start
    assert kinds(rows) == [
        ("turn_start", "t1"),
        ("audio", "t1"),
        ("audio", "t1"),
        ("frames", "t1"),
        ("turn_end", "t1"),
    ]
    state = await read_turn(redis_client, keys, "c1")
    assert state is not None and state.status == "ended" and state.start_id == start


async def test_interrupt_fences_late_writes(log, redis_client, keys):
    await log.open_turn("c2", "t1", sample_rate=16000, owner="p1")
    assert await log.interrupt("c2", reason="user_barge_in") == "t1"
    with pytest.raises(TurnFenced):
        await log.append("c2", "t1", wire.audio("t1", 0, b"late", end=False))
    with pytest.raises(TurnFenced):
        await log.end_turn("c2", "t1", status=wire.STATUS_COMPLETE)
    assert await log.interrupt("c2") is None  # nothing active any more
    rows = await read_after(redis_client, keys, "c2", "0-0", count=100)
    assert kinds(rows) == [("turn_start", "t1"), ("interrupt", "t1")]
    assert wire.decode_server(wire.delivery(*rows[-1])).get("reason") == "user_barge_in"


async def test_new_turn_supersedes_active_turn(log, redis_client, keys):
    await log.open_turn("c3", "t1", sample_rate=16000, owner="p1")
    await log.open_turn("c3", "t2", sample_rate=16000, owner="p2")
    with pytest.raises(TurnFenced):
        await log.append("c3", "t1", wire.audio("t1", 0, b"x", end=False))
    await log.append("c3", "t2", wire.audio("t2", 0, b"y", end=False))
    rows = await read_after(redis_client, keys, "c3", "0-0", count=100)
    assert kinds(rows) == [
        ("turn_start", "t1"),
        ("interrupt", "t1"),
        ("turn_start", "t2"),
        ("audio", "t2"),
    ]
    state = await read_turn(redis_client, keys, "c3")
    assert state.turn_id == "t2" and state.status == ACTIVE


async def test_reopen_same_turn_is_idempotent(log):
    first = await log.open_turn("c4", "t1", sample_rate=16000, owner="p1")
    assert await log.open_turn("c4", "t1", sample_rate=16000, owner="p1") == first


async def test_retention_trims_and_expires(redis_client, keys):
    log = ConversationLog(redis_client, keys, maxlen=10, ttl_s=60)
    first_start = await log.open_turn("c5", "t1", sample_rate=16000, owner="p1")
    for seq in range(300):
        await log.append("c5", "t1", wire.audio("t1", seq, b"x" * 10, end=False))
    assert await redis_client.xlen(keys.stream("c5")) < 300
    info = await stream_info(redis_client, keys, "c5")
    assert info.exists and info.first_id is not None
    assert not info.can_resume_after(first_start)  # trimmed away: the client must be told
    assert info.can_resume_after(info.first_id)
    assert info.can_resume_after(info.last_id)
    ttl = await redis_client.pttl(keys.stream("c5"))
    assert 0 < ttl <= 60_000


async def test_resume_check_for_missing_stream(redis_client, keys):
    info = await stream_info(redis_client, keys, "never-written")
    assert not info.exists and not info.can_resume_after("1-0")
