"""A queued clip over ``INLINE_CLIP_MAX`` waits beside its queue entry (``Keys.queued_audio``) and
never passes through a script: it is uploaded by a plain SET, renamed into place by the submit
script, read by a plain GET, and removed with its turn. Smaller clips travel inside the job."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis

from relay.redis_conn import in_order
from relay.streams import ConversationLog
from tests.helpers.polling import eventually
from tests.helpers.producer import RATE, assert_complete, tone, wait_turn_end
from workers.errors import QueueFull
from workers.queue.deadletters import REASON_MALFORMED, DeadLetters
from workers.queue.doorbells import AUDIO_FIELD
from workers.queue.jobs import INLINE_CLIP_MAX, JOB_FIELD, KIND_CLIP, TurnJob, decode_job
from workers.queue.records import Enqueued, JobStore
from workers.queue.submit import TurnQueue


@pytest.fixture
def store(redis_client, keys):
    return JobStore(redis_client, keys, ttl_s=60, lease_s=60, max_attempts=2, queue_max=2)


def big(seconds: float = 2.5, freq: float = 220.0) -> bytes:
    clip = tone(seconds, freq=freq)
    assert len(clip) > INLINE_CLIP_MAX
    return clip


async def uploads(redis_client, keys, conv: str) -> list[bytes]:
    return await redis_client.keys(keys.queued_audio_upload(conv, "x")[:-1] + "*")


async def test_no_script_carries_a_clip(redis_url, redis_client, keys, store):
    clip = big(3.0)  # 96 KB: any command that carried it would be longer than this
    queue = TurnQueue(redis_client, keys, input_ttl_s=60)
    await queue.submit_clip("c-warm", tone(0.1), sample_rate=RATE)  # scripts loaded
    await store.take("c-warm", owner="w1", doorbell="1-0", claim=True)
    seen: list[dict] = []
    watcher = redis.Redis.from_url(redis_url)
    async with watcher.monitor() as monitor:

        async def collect() -> None:
            while True:
                command = await monitor.next_command()
                seen.append(command)
                if "stop-watching" in command["command"]:
                    return

        task = asyncio.create_task(collect())
        await asyncio.sleep(0.1)
        turn_id = await queue.submit_clip("c-mon", clip, sample_rate=RATE)
        take = await store.take("c-mon", owner="w1", doorbell="1-1", claim=True)
        assert await store.audio_of("c-mon", turn_id) == clip
        assert take.head is not None and take.claim is not None
        await store.finish("c-mon", take.head, take.claim.epoch)
        await redis_client.echo("stop-watching")
        await asyncio.wait_for(task, 10)
    await watcher.aclose()
    scripted = [c for c in seen if c.get("client_type") == "lua"
                or c["command"].upper().startswith(("EVALSHA", "EVAL "))]
    assert scripted, "the submit, take and finish ran as scripts"
    assert max(len(c["command"]) for c in scripted) < len(clip) // 4
    carriers = [c["command"].split(" ", 1)[0].upper() for c in seen
                if len(c["command"]) >= len(clip)]
    assert carriers == ["SET"]  # the upload, once; read back by GET, whose reply MONITOR omits
    assert not await redis_client.exists(keys.queued_audio("c-mon", turn_id))  # gone with it


async def test_a_small_clip_travels_inside_its_job_and_a_large_one_beside_it(
    redis_client, keys,
):
    queue = TurnQueue(redis_client, keys, input_ttl_s=60)
    small, large = tone(0.5), big()
    await queue.submit_clip("c-s", small, sample_rate=RATE, turn_id="small")
    await queue.submit_clip("c-s", large, sample_rate=RATE, turn_id="large")
    (_, first), (_, second) = await redis_client.xrange(keys.queue("c-s"))
    assert decode_job(first).pcm == small  # version 1: the clip inside
    assert not await redis_client.exists(keys.queued_audio("c-s", "small"))
    assert decode_job(second).pcm is None and JOB_FIELD in second
    assert await redis_client.get(keys.queued_audio("c-s", "large")) == large
    # The doorbell says which, so a worker reads a stored clip with its take, and only then.
    bells = [fields for _, fields in await redis_client.xrange(keys.jobs())]
    assert [b.get(AUDIO_FIELD) for b in bells] == [None, b"1"]


async def test_a_clip_is_its_turns_only_through_the_call_that_queued_it(
    redis_client, keys, store,
):
    queue = TurnQueue(redis_client, keys, input_ttl_s=60, queue_max=2)
    first, other = big(), big(freq=330.0)
    await queue.submit_clip("c-a", first, sample_rate=RATE, turn_id="t1")
    # Submitted again under its id with other audio: nothing changes, the upload is dropped.
    again = await queue.offer_clip("c-a", other, sample_rate=RATE, turn_id="t1")
    assert again.state == "already_queued"
    assert await store.audio_of("c-a", "t1") == first
    await queue.submit_clip("c-a", first, sample_rate=RATE, turn_id="t2")
    with pytest.raises(QueueFull):  # the conversation holds queue_max turns
        await queue.submit_clip("c-a", other, sample_rate=RATE, turn_id="t3")
    assert not await redis_client.exists(keys.queued_audio("c-a", "t3"))
    assert await uploads(redis_client, keys, "c-a") == []

    # The upload and the script sent twice with the same nonce, as a retried batch is: one
    # turn, its first clip, and no upload left behind.
    job = TurnJob(kind=KIND_CLIP, conversation_id="c-b", turn_id="t1", sample_rate=RATE,
                  avatar_id=None, submitted_ms=0)
    qkeys = [keys.queue("c-b"), keys.queue_state("c-b"), keys.turns_done("c-b"),
             keys.queued_audio_upload("c-b", "n1"), keys.queued_audio("c-b", "t1")]
    args = ["t1", job.encode(), 0, 2, 60_000, 0]  # 0: not opened at submit
    commands = [("SET", qkeys[3], first, "PX", 60_000),
                ("EVALSHA", store._submit.sha, len(qkeys), *qkeys, *args)]  # noqa: SLF001
    await redis_client.script_load(store._submit.script)  # noqa: SLF001
    replies = [await in_order(redis_client, commands) for _ in "ab"]
    assert [int(r[1][0]) for r in replies] == [Enqueued.QUEUED, Enqueued.ALREADY_QUEUED]
    assert await redis_client.xlen(keys.queue("c-b")) == 1
    assert await store.audio_of("c-b", "t1") == first
    assert await uploads(redis_client, keys, "c-b") == []

    # Without its upload (the SET failed) the script writes nothing and says so.
    missing = [("EVALSHA", store._submit.sha, len(qkeys), *qkeys[:3],  # noqa: SLF001
                keys.queued_audio_upload("c-b", "n2"), keys.queued_audio("c-b", "t9"),
                "t9", job.encode(), 0, 2, 60_000, 0)]
    [reply] = await in_order(redis_client, missing)
    assert int(reply[0]) == -3
    assert await redis_client.xlen(keys.queue("c-b")) == 1


async def test_dropped_turns_take_their_clips_with_them(redis_client, keys, store):
    queue = TurnQueue(redis_client, keys, input_ttl_s=60)
    log = ConversationLog(redis_client, keys, maxlen=100, ttl_s=60)
    for turn in ("t1", "t2"):
        await queue.submit_clip("c-d", big(), sample_rate=RATE, turn_id=turn)
        assert await redis_client.exists(keys.queued_audio("c-d", turn))
    outcome = await log.interrupt_with("c-d", extension=store.drop_queued("c-d"))
    assert outcome.extra and int(outcome.extra[0]) == 2
    for turn in ("t1", "t2"):
        assert not await redis_client.exists(keys.queued_audio("c-d", turn))


async def test_worker_plays_an_inline_job_and_buries_one_whose_audio_is_gone(
    queue, run_worker, redis_client, keys, settings,
):
    store = JobStore(redis_client, keys, ttl_s=60, lease_s=1.0)
    # An older submitter's job, its clip inline (version 1), queued and rung by hand.
    clip = tone(0.3)
    old = TurnJob(kind=KIND_CLIP, conversation_id="c-v1", turn_id="t-old", sample_rate=RATE,
                  avatar_id=None, submitted_ms=0, pcm=clip)
    assert await store.enqueue("c-v1", "t-old", old.encode(inline=True)) == Enqueued.QUEUED
    await queue._doorbells.ring("c-v1", "t-old")  # noqa: SLF001
    # A version 2 job whose stored clip was lost (deleted here, as an expiry would).
    lost = await queue.submit_clip("c-gone", big(), sample_rate=RATE, turn_id="t-lost")
    await redis_client.delete(keys.queued_audio("c-gone", lost))
    await run_worker()
    assert_complete(await wait_turn_end(redis_client, keys, "c-v1", "t-old"), "t-old", clip)
    dead = DeadLetters(redis_client, keys, maxlen=100)

    async def buried() -> bool:
        return bool(await dead.count())

    await eventually(buried, timeout_s=5, what="the turn without audio dead-lettered")
    [letter] = await dead.list()
    assert (letter.turn_id, letter.reason) == ("t-lost", REASON_MALFORMED)
    assert "audio is gone" in letter.error
