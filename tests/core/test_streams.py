"""Fenced turn writes against a real server: the contract between producers and edges."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff

from relay import wire
from relay.dev.embedded import EmbeddedServer
from relay.errors import LockHeld, TurnFenced
from relay.streams import (
    ACTIVE,
    ConversationLog,
    Guard,
    Lock,
    read_after,
    read_turn,
    stream_info,
)


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


async def test_append_run_twice_appends_once(log, redis_client, keys):
    """What a client retry does when the first attempt reached Redis: the script runs again."""
    await log.open_turn("c6", "t1", sample_rate=16000, owner="p1")
    batch = [wire.audio("t1", 0, b"a0", end=False), wire.frames("t1", 0, b"f0", last=False)]
    first = await log.append("c6", "t1", *batch)
    assert await log.append("c6", "t1", *batch) == first
    # A batch overlapping the last one: only its new entries go in.
    await log.append("c6", "t1", wire.frames("t1", 0, b"f0", last=False),
                     wire.audio("t1", 1, b"a1", end=True), wire.frames("t1", 1, b"f1", last=True))
    end = await log.end_turn("c6", "t1", status=wire.STATUS_COMPLETE)
    assert await log.end_turn("c6", "t1", status=wire.STATUS_COMPLETE) == end  # retried end
    with pytest.raises(TurnFenced):  # but nothing new goes into an ended turn
        await log.append("c6", "t1", wire.audio("t1", 2, b"late", end=False))
    rows = await read_after(redis_client, keys, "c6", "0-0", count=100)
    seen = [(m.kind, m.get("seq")) for m in (wire.decode_server(wire.delivery(*r)) for r in rows)]
    assert seen == [("turn_start", None), ("audio", 0), ("frames", 0), ("audio", 1),
                    ("frames", 1), ("turn_end", None)]


async def test_audio_only_marker_written_once(log, redis_client, keys):
    await log.open_turn("c7", "t1", sample_rate=16000, owner="p1")
    marker = wire.audio_only("t1", reason="stall")
    assert await log.append("c7", "t1", marker) == await log.append("c7", "t1", marker)
    assert await redis_client.xlen(keys.stream("c7")) == 2


async def test_append_across_a_redis_stall_longer_than_the_socket_timeout(keys):
    """The reported duplicate: Redis frozen past the client's socket timeout while an append is
    in flight; redis-py times out, reconnects and sends the script again, and Redis runs both
    once it resumes. The stream must still hold the entry once."""
    with EmbeddedServer() as server:
        client = redis_asyncio.Redis.from_url(
            server.url, socket_timeout=0.4, retry=Retry(ConstantBackoff(0.05), retries=10),
            retry_on_timeout=True)
        log = ConversationLog(client, keys, maxlen=1000, ttl_s=60)
        await log.open_turn("c8", "t1", sample_rate=16000, owner="p1")
        await log.append("c8", "t1", wire.audio("t1", 0, b"warm", end=False))  # script loaded
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            pending = asyncio.ensure_future(
                log.append("c8", "t1", wire.audio("t1", 1, b"once", end=False)))
            await asyncio.sleep(1.5)  # several timed-out attempts queue up in Redis's buffers
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await pending
        rows = await read_after(client, keys, "c8", "0-0", count=100)
        audio = [m.get("seq") for m in (wire.decode_server(wire.delivery(*r)) for r in rows)
                 if m.kind == "audio"]
        await client.aclose()
    assert audio == [0, 1]


async def test_open_turn_checks_the_callers_guard(log, redis_client, keys):
    """The fence is the caller's: a hash field that must hold a value when the turn opens."""
    guard_key = keys.queue_state("c-guard")  # any hash of the conversation's bucket
    guard = Guard(guard_key, "allowed", "t1/1")
    with pytest.raises(TurnFenced):
        await log.open_turn("c-guard", "t1", sample_rate=16000, owner="p1", epoch=1, guard=guard)
    assert await read_turn(redis_client, keys, "c-guard") is None  # nothing was written
    await redis_client.hset(guard_key, "allowed", "t1/1")
    start = await log.open_turn("c-guard", "t1", sample_rate=16000, owner="p1", epoch=1,
                                guard=guard)
    state = await read_turn(redis_client, keys, "c-guard")
    assert state is not None and state.start_id == start and state.epoch == 1


async def test_open_turn_takes_the_callers_lock_in_the_same_step(log, redis_client, keys):
    lock_key = keys.conversation_lock("c-lock")
    await redis_client.set(lock_key, "p2", px=60_000)
    with pytest.raises(LockHeld) as held:
        await log.open_turn("c-lock", "t1", sample_rate=16000, owner="p1",
                            lock=Lock(lock_key, "p1", 5000))
    assert held.value.holder == "p2"
    assert await read_turn(redis_client, keys, "c-lock") is None  # nothing was written
    assert await redis_client.xlen(keys.stream("c-lock")) == 0
    assert await redis_client.get(lock_key) == b"p2"
    # A holder the caller may take over (a fenced previous owner) does not stop it.
    lock = Lock(lock_key, "p1", 5000, previous="p2")
    start = await log.open_turn("c-lock", "t1", sample_rate=16000, owner="p1", lock=lock)
    assert await redis_client.get(lock_key) == b"p1"
    assert 0 < await redis_client.pttl(lock_key) <= 5000
    # Run again (a retry): the same start, the lock still the caller's, nothing written twice.
    assert await log.open_turn("c-lock", "t1", sample_rate=16000, owner="p1", lock=lock) == start
    assert await redis_client.get(lock_key) == b"p1"
    assert await redis_client.xlen(keys.stream("c-lock")) == 1


async def test_every_push_names_the_true_predecessor_and_carries_each_entry_once(
        log, redis_url, redis_client, keys):
    # The live push contract edges rely on (docs/architecture.md "Live delivery"): pushes,
    # concatenated, are the stream; each names as predecessor the entry just before its first.
    from redis.asyncio.connection import Connection

    conv = "push-contract"
    listener = Connection(**redis_client.connection_pool.connection_kwargs)
    await listener.connect()
    await listener.send_command("SSUBSCRIBE", keys.live_channel(conv))
    assert (await listener.read_response())[0] == b"ssubscribe"
    await log.open_turn(conv, "t1", sample_rate=16000, owner="p")
    batch = [wire.audio("t1", seq, b"a", end=False) for seq in range(3)]
    await log.append(conv, "t1", *batch)
    await log.append(conv, "t1", *batch)  # a retry: appends and pushes nothing
    await log.append(conv, "t1", wire.frames("t1", 0, b"env", last=False))
    await log.open_turn(conv, "t2", sample_rate=16000, owner="p")  # supersedes t1: 2 entries
    await log.append(conv, "t2", wire.audio("t2", 0, b"b", end=False))
    await log.interrupt(conv, reason="barge_in")
    await log.open_turn(conv, "t3", sample_rate=16000, owner="p",  # start and audio: 1 push
                        first_audio=[wire.audio("t3", 0, b"c", end=True)])
    await log.end_turn(conv, "t3", status=wire.STATUS_COMPLETE)  # after the audio, by `last`
    rows = await read_after(redis_client, keys, conv, "0-0", count=100)

    pushed: list[tuple[str, bytes]] = []
    pushes = 0
    while len(pushed) < len(rows):
        kind, _, data = await asyncio.wait_for(listener.read_response(), 5)
        assert kind == b"smessage"
        pushes += 1
        head, _, body = data.partition(b"\n")
        fields = head.decode().split(" ")
        assert fields[0] == (pushed[-1][0] if pushed else "0-0")
        offset = 0
        for entry_id, size in zip(fields[1::2], fields[2::2], strict=True):
            pushed.append((entry_id, body[offset:offset + int(size)]))
            offset += int(size)
        assert offset == len(body)
    assert pushed == rows
    assert pushes == 8  # one per script call that appended; the retry pushed nothing
    await listener.disconnect()


async def test_open_turn_appends_the_first_audio_in_the_same_step(log, redis_client, keys):
    """``first_audio`` goes in right after turn_start, atomically, and the turn goes on from it:
    a retried open or a retried append of those seqs adds nothing, the next seq goes in."""
    conv = "c-first"
    first = [wire.audio("t1", seq, b"a%d" % seq, end=False) for seq in range(3)]
    start = await log.open_turn(conv, "t1", sample_rate=16000, owner="p1", first_audio=first)
    assert await log.open_turn(conv, "t1", sample_rate=16000, owner="p1",
                               first_audio=first) == start  # a retry: the same start, no audio
    await log.append(conv, "t1", first[2])  # already in: skipped by the watermark
    await log.append(conv, "t1", wire.audio("t1", 3, b"a3", end=True))
    rows = await read_after(redis_client, keys, conv, "0-0", count=100)
    assert rows[0][0] == start
    seen = [(m.kind, m.get("seq")) for m in (wire.decode_server(wire.delivery(*r)) for r in rows)]
    assert seen == [("turn_start", None), ("audio", 0), ("audio", 1), ("audio", 2), ("audio", 3)]
    record = await redis_client.hgetall(keys.turn(conv))
    assert record[b"na"] == b"4" and record[b"last"].decode() == rows[-1][0]


@pytest.mark.parametrize("entries", [
    [wire.audio("t1", 1, b"a", end=False)],  # does not start at seq 0
    [wire.audio("t1", 0, b"a", end=False), wire.audio("t1", 2, b"a", end=False)],  # a gap
    [wire.audio("other", 0, b"a", end=False)],  # another turn's
    [wire.frames("t1", 0, b"env", last=False)],  # not audio
])
async def test_open_turn_refuses_first_audio_it_cannot_count(log, redis_client, keys, entries):
    with pytest.raises(ValueError, match="first_audio"):
        await log.open_turn("c-bad-first", "t1", sample_rate=16000, owner="p1",
                            first_audio=entries)
    assert await redis_client.exists(keys.stream("c-bad-first"), keys.turn("c-bad-first")) == 0
