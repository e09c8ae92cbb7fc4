"""Every queue script run twice with the same arguments, as a redis-py retry does when the first
attempt reached Redis but its reply did not come back: the second run changes nothing and answers
as the first did (each script's header states it)."""

from __future__ import annotations

import uuid

import pytest

from relay.lua import text
from workers.queue.deadletters import DeadLetters
from workers.queue.records import ClaimKind, JobStore, QueuedTurn, RunnerTake


@pytest.fixture
def store(redis_client, keys):
    return JobStore(redis_client, keys, ttl_s=60, lease_s=60, max_attempts=2)


async def queued(store: JobStore, conv: str, turn: str) -> QueuedTurn:
    assert await store.enqueue(conv, turn, b"job") == 1
    assert await store.enqueue(conv, turn, b"job") == 0  # a retried submit queues nothing
    head = await store.head(conv)
    assert head is not None
    return head


async def claim_twice(store: JobStore, keys, conv: str, head: QueuedTurn):
    keys_ = [keys.queue_state(conv), keys.turn(conv), keys.queue(conv)]
    args = [head.turn_id, "w1", 2, 60_000, 0, uuid.uuid4().hex]
    first = await store._claim(keys=keys_, args=args)
    second = await store._claim(keys=keys_, args=args)
    return [text(x) for x in first], [text(x) for x in second]


async def test_claim_run_twice_counts_one_attempt(store, keys):
    head = await queued(store, "c1", "t1")
    first, second = await claim_twice(store, keys, "c1", head)
    assert first == second and first[0] == ClaimKind.FRESH
    assert await store.attempts("c1") == {"t1": 1}
    assert await store.still_running("c1", "t1", int(first[1]))
    # A new claim (another call) still counts: two attempts allowed, the third is dead.
    again = await store.claim("c1", head, owner="w2")
    assert (again.kind, again.attempts) == (ClaimKind.FRESH, 2)


async def test_step_back_run_twice_hands_back_once(store, keys):
    head = await queued(store, "c2", "t1")
    claim = await store.claim("c2", head, owner="w1")
    assert await store.hand_back("c2", "t1", claim.epoch)
    assert await store.hand_back("c2", "t1", claim.epoch)  # the retry answers as the first did
    assert await store.attempts("c2") == {"t1": 0}  # not -1: the attempt was uncounted once


async def test_finish_release_and_take_run_twice(store, keys):
    head = await queued(store, "c3", "t1")
    taken = await store.take("c3", owner="w1", doorbell="1-1")
    assert taken == await store.take("c3", owner="w1", doorbell="1-1")  # not "taken over"
    assert taken.kind is RunnerTake.TAKEN and taken.head == head  # the head came with it
    claim = await store.claim("c3", head, owner="w1")
    assert int(await store.finish("c3", head, claim.epoch)) == 1
    assert int(await store.finish("c3", head, claim.epoch)) == 0  # left the queue either way
    assert await store.enqueue("c3", "t1", b"job") == 2  # done: not queued again
    first = await store.release_if_empty("c3", owner="w1", doorbell="1-1")
    assert first == await store.release_if_empty("c3", owner="w1", doorbell="1-1")
    assert int(first) == 1


async def test_take_brings_the_head_to_the_runner_only(store, keys):
    empty = await store.take("c4", owner="w1", doorbell="1-1")
    assert (empty.kind, empty.head) == (RunnerTake.TAKEN, None)  # nothing queued
    head = await queued(store, "c4", "t1")
    await queued(store, "c4", "t2")
    assert (await store.take("c4", owner="w1", doorbell="1-1")).head == head  # oldest first
    busy = await store.take("c4", owner="w2", doorbell="2-1")
    assert (busy.kind, busy.holder, busy.head) == (RunnerTake.BUSY, "w1", None)
    mine = await store.take("c4", owner="w1", doorbell="3-1")
    assert (mine.kind, mine.head) == (RunnerTake.MINE, None)
    over = await store.take("c4", owner="w2", doorbell="1-1")  # w2 now owns w1's doorbell
    assert (over.kind, over.holder, over.head) == (RunnerTake.TAKEN_OVER, "w1", head)


async def test_take_with_claim_run_twice_counts_one_attempt(store, keys, monkeypatch):
    head = await queued(store, "c5", "t1")
    monkeypatch.setattr("workers.queue.records.uuid.uuid4", lambda: uuid.UUID(int=7))
    first = await store.take("c5", owner="w1", doorbell="1-1", claim=True)
    second = await store.take("c5", owner="w1", doorbell="1-1", claim=True)  # a retry
    assert first == second and first.head == head
    assert first.claim is not None and first.claim.kind is ClaimKind.FRESH
    assert await store.attempts("c5") == {"t1": 1}
    assert await store.still_running("c5", "t1", first.claim.epoch)
    # Not taken: nothing is claimed.
    busy = await store.take("c5", owner="w2", doorbell="2-1", claim=True)
    assert (busy.kind, busy.claim) == (RunnerTake.BUSY, None)
    assert await store.attempts("c5") == {"t1": 1}


async def test_a_turn_is_dead_lettered_once(redis_client, keys):
    """The known duplicate: a worker dies after burying a turn and before removing it from its
    queue; the next worker buries it again. Now the second burial writes nothing."""
    dead = DeadLetters(redis_client, keys, maxlen=10)
    first = await dead.bury(conversation_id="c4", turn_id="t1", reason="max_attempts",
                            attempts=3, job=b"pcm")
    assert first
    assert await dead.bury(conversation_id="c4", turn_id="t1", reason="max_attempts",
                           attempts=4, job=b"pcm") == ""
    await dead.bury(conversation_id="c4", turn_id="t2", reason="deadline")
    assert [d.turn_id for d in await dead.list()] == ["t1", "t2"]
    await dead.bury(conversation_id="", turn_id="", reason="malformed")
    await dead.bury(conversation_id="", turn_id="", reason="malformed")
    assert await dead.count() == 4  # malformed doorbells name no turn: each is kept


def test_dead_letters_and_their_index_share_a_cluster_slot(keys):
    from redis.crc import key_slot

    assert key_slot(keys.dead_letters().encode()) == key_slot(keys.dead_letters_index().encode())
