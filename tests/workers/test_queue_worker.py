"""Turn queue and producer worker: jobs through Redis, turns through the simulator."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from relay.errors import InvalidConversationId
from relay.streams import read_turn
from tests.helpers.jobs import assert_played_once, pending_jobs
from tests.helpers.polling import eventually
from tests.helpers.producer import (
    RATE,
    assert_complete,
    assert_interrupted,
    of_turn,
    tone,
    wait_turn_end,
)
from workers.errors import MalformedJob, QueueFull
from workers.queue.jobs import JOB_FIELD, decode_job
from workers.queue.submit import TurnQueue


async def test_clip_job_is_spoken(queue, run_worker, redis_client, keys):
    await run_worker()
    clip = tone(0.5)
    turn_id = await queue.submit_clip("conv-q", clip, sample_rate=RATE)
    messages = await wait_turn_end(redis_client, keys, "conv-q", turn_id)
    assert_complete(messages, turn_id, clip)
    async def settled() -> bool:  # acknowledged and deleted once the turn finished
        return not (await redis_client.xlen(keys.jobs()) or await pending_jobs(redis_client, keys))

    await eventually(settled, timeout_s=2, what="jobs acknowledged")


async def played_and_released(queue, redis_client, keys, conv: str) -> int:
    """Play one turn of ``conv`` through the queue and wait until its runner acknowledged the
    doorbell and let the lease go (the next job's doorbell then finds no runner); the epoch
    that turn was claimed at."""
    turn_id = await queue.submit_clip(conv, tone(0.2), sample_rate=RATE)
    await wait_turn_end(redis_client, keys, conv, turn_id)

    async def released() -> bool:
        return not await pending_jobs(redis_client, keys)

    await eventually(released, timeout_s=2, what="runner released")
    return (await read_turn(redis_client, keys, conv)).epoch


async def test_at_the_cap_a_kept_session_serves_its_conversations_next_job(
        queue, run_worker, redis_client, keys, sim):
    # The only slot is held by the session kept for conv-kept. Its next job needs no new slot:
    # the worker must take it at once, not wait for room and close that session for it.
    await run_worker(max_sdk_sessions=1, session_idle_s=60.0)
    first_epoch = await played_and_released(queue, redis_client, keys, "conv-kept")
    await asyncio.sleep(1.2)  # idle past the reaper's spare time: closable for a waiter now
    clip = tone(0.3)
    second = await queue.submit_clip("conv-kept", clip, sample_rate=RATE)
    messages = await wait_turn_end(redis_client, keys, "conv-kept", second)
    assert_complete(messages, second, clip)
    assert sim.sim.stats.sessions_opened == 1
    # Opened at its submit although the only slot is held: by this conversation's own kept
    # session (one epoch); then one claim, made with its runner lease: no wait for room, no
    # hand-back.
    assert (await read_turn(redis_client, keys, "conv-kept")).epoch == first_epoch + 2


async def test_a_job_the_kept_session_cannot_serve_gets_a_session_of_its_own(
        queue, run_worker, redis_client, keys, sim):
    # Its head is claimed with the runner lease (a session is kept for the conversation), but
    # at another sample rate that session cannot serve it: the claim is given back uncounted and
    # the turn takes a slot of its own, plays once, and is counted as one attempt.
    await run_worker(max_sdk_sessions=4, session_idle_s=60.0)
    first_epoch = await played_and_released(queue, redis_client, keys, "conv-rate")
    clip = tone(0.3, rate=24000)
    second = await queue.submit_clip("conv-rate", clip, sample_rate=24000)
    messages = await wait_turn_end(redis_client, keys, "conv-rate", second)
    assert_complete(messages, second, clip, rate=24000)
    # Opened at its submit; the claim made with the lease was given back; the attempt that
    # ran claimed after it.
    assert (await read_turn(redis_client, keys, "conv-rate")).epoch == first_epoch + 3
    assert sim.sim.stats.sessions_opened == 2
    assert not await redis_client.xlen(keys.dead_letters())


async def test_streamed_job(queue, run_worker, redis_client, keys):
    await run_worker()
    clip = tone(0.6, freq=300.0)
    async with await queue.open_streamed("conv-qs", sample_rate=RATE) as feed:
        for start in range(0, len(clip), 1600):
            await feed.send(clip[start : start + 1600])
            await asyncio.sleep(0.01)  # audio arriving while the turn already runs
    messages = await wait_turn_end(redis_client, keys, "conv-qs", feed.turn_id)
    assert_complete(messages, feed.turn_id, clip)
    async def settled() -> bool:  # the input stream is dropped with the job
        return not (await redis_client.exists(keys.turn_input("conv-qs", feed.turn_id)))

    await eventually(settled, timeout_s=2, what="jobs acknowledged")


async def test_streamed_job_without_end_marker_times_out(queue, run_worker, redis_client, keys):
    await run_worker(turn_input_timeout_s=0.4)
    clip = tone(0.3)
    feed = await queue.open_streamed("conv-qt", sample_rate=RATE)
    await feed.send(clip)  # and the caller never calls end()
    messages = await wait_turn_end(redis_client, keys, "conv-qt", feed.turn_id)
    assert_complete(messages, feed.turn_id, clip)  # ended with what arrived


async def test_interrupt_through_the_queue(queue, run_worker, redis_client, keys):
    await run_worker()
    feed = await queue.open_streamed("conv-qi", sample_rate=RATE)
    await feed.send(tone(0.2))
    async with asyncio.timeout(5):
        # An interrupt before the turn opens would drop it from the queue (the default).
        while getattr(await read_turn(redis_client, keys, "conv-qi"), "turn_id", None) is None:
            await asyncio.sleep(0.02)  # until the worker has opened the turn
    assert await queue.interrupt("conv-qi") == feed.turn_id
    messages = await wait_turn_end(redis_client, keys, "conv-qi", feed.turn_id)
    assert_interrupted(messages, feed.turn_id)
    clip = tone(0.3, freq=500.0)
    turn_id = await queue.submit_clip("conv-qi", clip, sample_rate=RATE)
    assert_complete(await wait_turn_end(redis_client, keys, "conv-qi", turn_id), turn_id, clip)


async def test_malformed_job_is_acked_and_skipped(queue, run_worker, redis_client, keys):
    await redis_client.xadd(keys.jobs(), {JOB_FIELD: b"\xc1 not msgpack"})
    bad_version = msgpack.packb({"v": 99, "kind": "clip"})
    await redis_client.xadd(keys.jobs(), {JOB_FIELD: bad_version})
    await redis_client.xadd(keys.jobs(), {b"other": b"field"})
    await run_worker()
    clip = tone(0.3)
    turn_id = await queue.submit_clip("conv-qm", clip, sample_rate=RATE)
    assert_complete(await wait_turn_end(redis_client, keys, "conv-qm", turn_id), turn_id, clip)
    async def settled() -> bool:
        return not (await redis_client.xlen(keys.jobs()) or await pending_jobs(redis_client, keys))

    await eventually(settled, timeout_s=2, what="jobs acknowledged")


async def test_worker_stop_is_bounded_and_hands_turns_back(queue, run_worker, redis_client, keys):
    worker = await run_worker(turn_input_timeout_s=60, job_claim_idle_s=1.0)
    clip = tone(0.6)
    feed = await queue.open_streamed("conv-qstop", sample_rate=RATE)
    await feed.send(clip[:6400])  # a turn that would wait a minute for more input
    async with asyncio.timeout(5):
        while getattr(await read_turn(redis_client, keys, "conv-qstop"), "status", "") != "active":
            await asyncio.sleep(0.02)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await worker.stop(timeout_s=0.3)
    assert loop.time() - started < 2.0
    assert worker.running_turns == 0
    # Handed back, not interrupted: nothing was written for it, and its job waits for a worker.
    assert (await read_turn(redis_client, keys, "conv-qstop")).status == "active"
    assert await pending_jobs(redis_client, keys) == 1
    [entry] = await redis_client.xpending_range(keys.jobs(), keys.jobs_group(), "-", "+", 1)
    assert entry["time_since_delivered"] >= 1000  # claimable by any worker at once

    await run_worker(job_claim_idle_s=1.0)
    await feed.send(clip[6400:])
    await feed.end()
    messages = await wait_turn_end(redis_client, keys, "conv-qstop", feed.turn_id)
    assert_played_once(of_turn(messages, feed.turn_id), clip)


async def test_worker_limits_concurrent_turns(queue, run_worker, redis_client, keys):
    worker = await run_worker(producer_concurrency=2, turn_input_timeout_s=60)
    feeds = [await queue.open_streamed(f"conv-qc-{n}", sample_rate=RATE) for n in range(4)]
    for feed in feeds:
        await feed.send(tone(0.1))
    async def at_the_limit() -> bool:  # two running, the other two wait in Redis, unread
        return worker.running_turns == 2 and await pending_jobs(redis_client, keys) == 2

    await eventually(at_the_limit, what="two turns running, two waiting")
    assert worker.running_turns == 2
    for feed in feeds:
        await feed.end()
    for feed in feeds:
        await wait_turn_end(redis_client, keys, feed.conversation_id, feed.turn_id)


async def test_queue_validation(queue, settings, redis_client, keys):
    with pytest.raises(ValueError, match="even"):
        await queue.submit_clip("c", b"\x00\x01\x02", sample_rate=RATE)
    with pytest.raises(ValueError, match="empty"):
        await queue.submit_clip("c", b"", sample_rate=RATE)
    with pytest.raises(ValueError, match="sample_rate"):
        await queue.submit_clip("c", tone(0.1), sample_rate=11025)
    with pytest.raises(InvalidConversationId):
        await queue.submit_clip("no spaces", tone(0.1), sample_rate=RATE)
    with pytest.raises(TypeError):
        await queue.submit_clip("c", "text", sample_rate=RATE)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await queue.open_streamed("c", sample_rate=RATE, turn_id="bad turn")
    feed = await queue.open_streamed("c", sample_rate=RATE)
    with pytest.raises(ValueError):
        await feed.send(b"\x00")
    assert await redis_client.xlen(keys.jobs()) == 1  # only the valid streamed job


async def test_queue_full(settings, redis_client, keys):
    small = TurnQueue(redis_client, keys, input_ttl_s=60, max_jobs=1)
    await small.submit_clip("c", tone(0.1), sample_rate=RATE)
    with pytest.raises(QueueFull):
        await small.submit_clip("c", tone(0.1), sample_rate=RATE)


async def test_job_round_trip(queue, redis_client, keys):
    turn_id = await queue.submit_clip(
        "c", tone(0.1), sample_rate=24000, avatar_id="av", turn_id="t-1"
    )
    [(_, fields)] = await redis_client.xrange(keys.queue("c"))  # the conversation's FIFO
    job = decode_job(fields)
    [(_, bell)] = await redis_client.xrange(keys.jobs())  # and one doorbell for the workers
    assert bell[b"conv"] == b"c" and bell[b"turn"] == turn_id.encode()
    assert (job.kind, job.conversation_id, job.turn_id, job.sample_rate, job.avatar_id) == (
        "clip", "c", turn_id, 24000, "av"
    )
    assert job.pcm == tone(0.1)  # a small clip travels inside its job
    large = tone(2.5)  # over INLINE_CLIP_MAX: it waits beside the entry; no script carries it
    await queue.submit_clip("c", large, sample_rate=24000, turn_id="t-2")
    _, (_, fields) = await redis_client.xrange(keys.queue("c"))
    assert b"pcm" not in msgpack.unpackb(fields[JOB_FIELD]) and decode_job(fields).pcm is None
    stored = await redis_client.get(keys.queued_audio("c", "t-2"))
    assert stored == large and decode_job(fields, audio=stored).pcm == large
    # The upload key of the call is gone (renamed into place), and the clip expires with the queue.
    assert await redis_client.keys(keys.queued_audio_upload("c", "x")[:-1] + "*") == []
    assert 0 < await redis_client.pttl(keys.queued_audio("c", "t-2")) <= 86_400_000
    with pytest.raises(MalformedJob):
        decode_job({JOB_FIELD: msgpack.packb({"v": 1, "kind": "clip", "conv": "c", "turn": "t",
                                              "rate": RATE, "pcm": b"\x00"})})


async def test_every_path_through_a_dispatch_releases_its_first_audio_ticket(
    queue, run_worker, redis_client, keys,
):
    # Each doorbell read counts its turn as waiting for first audio until the turn has begun;
    # a ticket left behind would make every later turn's session open and bulk audio wait out
    # the grace. Paths: clip turns, a second doorbell for a conversation already running (the
    # take says busy), a streamed turn whose input never comes, and an already-played turn id.
    worker = await run_worker(turn_input_timeout_s=0.3)
    producer = worker._producer  # noqa: SLF001 - the gate's count is the producer's own state
    clips = {f"conv-qg-{n}": tone(0.3, freq=200.0 + 50 * n) for n in range(3)}
    turns = {conv: await queue.submit_clip(conv, clip, sample_rate=RATE)
             for conv, clip in clips.items()}
    second = await queue.submit_clip("conv-qg-0", tone(0.2), sample_rate=RATE)
    silent = await queue.open_streamed("conv-qg-silent", sample_rate=RATE)
    for conv, turn_id in turns.items():
        assert_complete(await wait_turn_end(redis_client, keys, conv, turn_id), turn_id,
                        clips[conv])
    await wait_turn_end(redis_client, keys, "conv-qg-0", second)
    assert await queue.submit_clip("conv-qg-1", clips["conv-qg-1"], sample_rate=RATE,
                                   turn_id=turns["conv-qg-1"]) == turns["conv-qg-1"]

    async def settled() -> bool:
        return (producer.awaiting_first_audio == 0 and worker.running_turns == 0
                and not await pending_jobs(redis_client, keys))

    await eventually(settled, timeout_s=5, what="every ticket released, every doorbell settled")
    assert (await read_turn(redis_client, keys, "conv-qg-silent")) is None  # nothing to play
    assert silent.turn_id


@pytest.mark.parametrize("server", ["single", "cluster"])
async def test_a_submit_writes_its_turn_and_doorbell_or_nothing(server, request, key_prefix):
    # A single server takes the turn, the back-pressure check and the doorbell in one script
    # call; a cluster in three calls (the jobs stream is in another slot). Both leave the same
    # records: one queued turn, a doorbell per accepted submit, nothing for a refused one.
    from relay.keys import Keys
    from relay.redis_conn import create_client
    from workers.queue.records import Enqueued, JobStore

    url = request.getfixturevalue("redis_url" if server == "single" else "cluster_url")
    client = create_client(url, cluster=server == "cluster")
    keys = Keys(key_prefix)
    small = TurnQueue(client, keys, input_ttl_s=60, max_jobs=2, queue_max=1)
    try:
        first = await small.offer_clip("c-one", tone(2.5), sample_rate=RATE, turn_id="t-1")
        again = await small.offer_clip("c-one", tone(2.5, freq=300.0), sample_rate=RATE,
                                       turn_id="t-1")
        assert (first.state, again.state) == ("queued", "already_queued")
        assert await client.xlen(keys.queue("c-one")) == 1
        assert await client.xlen(keys.jobs()) == 2  # the second submit rang again
        with pytest.raises(QueueFull, match="already waiting"):  # two doorbells wait
            await small.submit_clip("c-two", tone(2.5), sample_rate=RATE, turn_id="t-2")
        assert await client.xlen(keys.queue("c-two")) == 0
        assert await client.xlen(keys.jobs()) == 2
        await client.delete(keys.jobs())
        with pytest.raises(QueueFull, match="maximum of turns"):  # c-one holds queue_max
            await small.submit_clip("c-one", tone(2.5), sample_rate=RATE, turn_id="t-3")
        assert await client.xlen(keys.jobs()) == 0
        assert await client.xlen(keys.queue("c-one")) == 1
        # Only the queued turn's clip is kept (the refused submits' uploads were deleted).
        assert await client.get(keys.queued_audio("c-one", "t-1")) == tone(2.5)  # the first
        assert not await client.exists(keys.queued_audio("c-two", "t-2"))
        assert not await client.exists(keys.queued_audio("c-one", "t-3"))
        if server == "single":
            assert await client.keys(keys.queued_audio_upload("c-one", "x")[:-1] + "*") == []
            # The one-step script run twice (a retried call): the turn is queued once, and the
            # second run rings once more, like a caller's second submit.
            store = JobStore(client, keys, ttl_s=60, lease_s=1.0)
            bell = small._doorbells.write_for("c-three", "t-4", max_waiting=10)  # noqa: SLF001
            runs = [await store.enqueue("c-three", "t-4", b"job", doorbell=bell) for _ in "ab"]
            assert runs == [Enqueued.QUEUED, Enqueued.ALREADY_QUEUED]
            assert await client.xlen(keys.queue("c-three")) == 1
            assert await client.xlen(keys.jobs()) == 2
    finally:
        await client.aclose()


async def test_a_running_conversations_own_doorbell_coming_back_leaves_no_ticket(
    queue, run_worker, redis_client, keys,
):
    # The worker's reclaim can hand it back its own running doorbell (when its heartbeat was
    # late): the dispatch finds it running here, starts nothing, and must not keep its ticket.
    # A late heartbeat cannot be forced from outside, so the doorbell is dispatched directly.
    from workers.queue.doorbells import Doorbell

    worker = await run_worker(turn_input_timeout_s=10)
    producer = worker._producer  # noqa: SLF001 - the gate's count is the producer's own state
    feed = await queue.open_streamed("conv-qown", sample_rate=RATE)
    clip = tone(0.4)
    await feed.send(clip[:3200])
    await eventually(lambda: worker.running_turns == 1 and producer.awaiting_first_audio == 0,
                     timeout_s=5, what="the turn running, its first audio out")
    [entry] = await redis_client.xpending_range(keys.jobs(), keys.jobs_group(), "-", "+", 1)
    bell = Doorbell(entry_id=entry["message_id"].decode(), conversation_id="conv-qown",
                    turn_id=feed.turn_id, fields={})
    worker._dispatching += 1  # noqa: SLF001 - as the read loop counts it before dispatching
    await worker._dispatch_counted(bell)  # noqa: SLF001 - what the reclaim path calls
    assert worker.running_turns == 1 and producer.awaiting_first_audio == 0
    await feed.send(clip[3200:])
    await feed.end()
    assert_complete(await wait_turn_end(redis_client, keys, "conv-qown", feed.turn_id),
                    feed.turn_id, clip)


async def test_a_backend_opens_its_connections_before_its_first_submits(
    redis_url, redis_client, keys,
):
    from relay.redis_conn import create_client

    async def connected() -> int:
        return int((await redis_client.info("clients"))["connected_clients"])

    client = create_client(redis_url, max_connections=6)
    queue = TurnQueue(client, keys, input_ttl_s=60)
    try:
        before = await connected()
        assert await queue.open_connections(10) == 6  # at most the pool's bound
        assert await connected() - before >= 6
        with pytest.raises(ValueError):
            await queue.open_connections(0)
        # A burst of submits then runs on those connections: none is opened for it.
        opened = await connected()
        await asyncio.gather(*(queue.submit_clip(f"c-open-{n}", tone(0.1), sample_rate=RATE)
                               for n in range(6)))
        assert await connected() <= opened
    finally:
        await client.aclose()
