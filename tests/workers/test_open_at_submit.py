"""A clip turn of an idle conversation is opened by its own submit (``OPEN_AT_SUBMIT``): its start
and first audio are in the stream before any worker read its doorbell, and a worker then continues
it after what clients have, so every guarantee of a queued turn still holds. Real Redis, the real
worker and the unmodified SDK against the simulator."""

from __future__ import annotations

import pytest

from relay import wire
from relay.streams import ConversationLog, read_turn
from tests.helpers.jobs import assert_played_once, split_turns
from tests.helpers.polling import eventually
from tests.helpers.producer import (
    RATE,
    assert_complete,
    of_turn,
    stream_messages,
    tone,
    wait_turn_end,
)
from workers.queue.deadletters import DeadLetters
from workers.queue.doorbells import _doorbell
from workers.queue.records import SUBMIT_OWNER, ClaimKind, Enqueued, JobStore
from workers.queue.submit import TurnQueue
from workers.speech.pcm import FIRST_AUDIO_S, chunk_size
from workers.speech.resume import read_delivered

FIRST_BYTES = chunk_size(RATE, 40) * round(FIRST_AUDIO_S * 1000 / 40)


async def test_an_idle_conversations_turn_starts_in_its_submit(redis_client, keys, queue,
                                                               run_worker):
    clip = tone(1.0)
    turn_id = await queue.submit_clip("conv-os", clip, sample_rate=RATE)
    # No worker runs yet: what clients can already play came with the submit.
    early = await stream_messages(redis_client, keys, "conv-os")
    assert [m.kind for m in early] == [wire.TURN_START] + [wire.AUDIO] * 5
    assert b"".join(m.get("data") for m in early[1:]) == clip[:FIRST_BYTES]
    assert not any(m.get("end") for m in early)
    record = await read_turn(redis_client, keys, "conv-os")
    assert (record.turn_id, record.status, record.owner) == (turn_id, "active", SUBMIT_OWNER)

    await run_worker()
    messages = await wait_turn_end(redis_client, keys, "conv-os", turn_id)
    assert_complete(messages, turn_id, clip)  # every byte once, in order, with its frames
    assert messages[: len(early)] == early
    # The submit's epoch, then one claim of the worker (an attempt of its own, counted once).
    assert (await read_turn(redis_client, keys, "conv-os")).epoch == 2
    assert not await DeadLetters(redis_client, keys, maxlen=10).count()


async def test_a_clip_shorter_than_the_first_audio_ends_its_audio_in_the_submit(
        redis_client, keys, queue, run_worker):
    clip = tone(0.1)
    turn_id = await queue.submit_clip("conv-short", clip, sample_rate=RATE)
    early = await stream_messages(redis_client, keys, "conv-short")
    assert early[-1].kind == wire.AUDIO and early[-1].get("end") is True
    await run_worker()
    messages = await wait_turn_end(redis_client, keys, "conv-short", turn_id)
    assert_played_once(of_turn(messages, turn_id), clip)


async def test_only_an_idle_conversation_is_opened_at_submit(redis_client, keys, queue,
                                                             run_worker):
    first, second, third = tone(0.3), tone(0.3, freq=330.0), tone(0.3, freq=440.0)
    one = await queue.submit_clip("conv-busy", first, sample_rate=RATE)
    # A turn is queued (and active) already: this one waits for it, as every queued turn does.
    two = await queue.submit_clip("conv-busy", second, sample_rate=RATE)
    # A deadline: a worker opens it, so a turn no worker takes in time plays none of its audio.
    three = await queue.submit_clip("conv-busy", third, sample_rate=RATE, deadline_s=30)
    assert {m.turn for m in await stream_messages(redis_client, keys, "conv-busy")} == {one}
    await run_worker()
    messages = await wait_turn_end(redis_client, keys, "conv-busy", three)
    turns = split_turns(messages)
    assert list(turns) == [one, two, three]
    for turn_id, clip in ((one, first), (two, second), (three, third)):
        assert_played_once(turns[turn_id], clip)


async def test_not_opened_while_a_worker_a_producer_or_the_session_cap_holds_it(
        redis_client, keys, settings):
    queue = TurnQueue.from_settings(settings.with_overrides(max_sdk_sessions=2), redis_client)
    held = {
        "conv-runner": (keys.queue_runner("conv-runner"), "worker-1|0-1"),
        "conv-lock": (keys.conversation_lock("conv-lock"), "producer-1"),
    }
    for key, value in held.values():
        await redis_client.set(key, value, px=60_000)
    log = ConversationLog(redis_client, keys, maxlen=100, ttl_s=60)
    await log.open_turn("conv-active", "spoken", sample_rate=RATE, owner="producer-1")
    for conv in (*held, "conv-active"):
        turn_id = await queue.submit_clip(conv, tone(0.3), sample_rate=RATE)
        assert turn_id not in {m.turn for m in await stream_messages(redis_client, keys, conv)}
    # Every session slot held (kept sessions count): the turn waits for a worker too.
    await redis_client.zadd(keys.sdk_sessions(), {"a": 1, "b": 2})
    await queue.submit_clip("conv-cap", tone(0.3), sample_rate=RATE)
    assert not await stream_messages(redis_client, keys, "conv-cap")
    await redis_client.zrem(keys.sdk_sessions(), "b")
    await queue.submit_clip("conv-room", tone(0.3), sample_rate=RATE)
    assert len(await stream_messages(redis_client, keys, "conv-room")) == 6


async def test_the_setting_off_and_a_retried_submit_open_nothing(redis_client, keys, settings):
    off = TurnQueue.from_settings(settings.with_overrides(queue_open_at_submit=False),
                                  redis_client)
    await off.submit_clip("conv-off", tone(0.3), sample_rate=RATE)
    assert not await stream_messages(redis_client, keys, "conv-off")

    queue = TurnQueue.from_settings(settings, redis_client)
    clip = tone(0.3)
    first = await queue.offer_clip("conv-twice", clip, sample_rate=RATE, turn_id="t1")
    again = await queue.offer_clip("conv-twice", clip, sample_rate=RATE, turn_id="t1")
    assert (first.state, again.state) == ("queued", "already_queued")
    messages = await stream_messages(redis_client, keys, "conv-twice")
    assert [m.kind for m in messages].count(wire.TURN_START) == 1
    assert len(messages) == 6
    # The script itself, run twice with the same arguments (a client library's retry).
    store = JobStore(redis_client, keys, ttl_s=60, lease_s=1.0)
    assert await store.enqueue("conv-twice", "t1", b"job") == Enqueued.ALREADY_QUEUED


async def test_interrupted_before_a_worker_took_it(redis_client, keys, queue, run_worker):
    clip = tone(0.5)
    turn_id = await queue.submit_clip("conv-int", clip, sample_rate=RATE)
    assert await queue.interrupt("conv-int", drop_queued=False) == turn_id
    after = await queue.submit_clip("conv-int", tone(0.3, freq=500.0), sample_rate=RATE)
    await run_worker()
    messages = await wait_turn_end(redis_client, keys, "conv-int", after)
    cut = of_turn(messages, turn_id)
    # Clients have its start, its first audio and the interrupt, and nothing of it after that.
    assert [m.kind for m in cut][-1] == wire.INTERRUPT
    assert sum(1 for m in cut if m.kind == wire.AUDIO) == 5
    assert list(split_turns(messages)) == [turn_id, after]
    assert not await DeadLetters(redis_client, keys, maxlen=10).count()


@pytest.mark.parametrize(("seconds", "ended"), [(1.0, False), (0.1, True)])
async def test_the_first_claim_says_what_the_submit_appended(redis_client, keys, queue,
                                                             seconds, ended):
    """The worker continues a turn opened at submit from what its claim reports, without reading
    the stream back: that report must be exactly what the stream holds. A later claim (the first
    worker died) reports nothing, as only the stream knows what that worker appended."""
    clip = tone(seconds)
    turn_id = await queue.submit_clip("conv-claim", clip, sample_rate=RATE)
    store = JobStore(redis_client, keys, ttl_s=60, lease_s=60)
    head = await store.head("conv-claim")
    claim = await store.claim("conv-claim", head, owner="worker-1")
    assert claim.kind is ClaimKind.RESUME and claim.previous_owner == SUBMIT_OWNER
    stream = await read_delivered(redis_client, keys, "conv-claim", turn_id, claim.start_id)
    assert stream is not None and claim.submitted is not None
    assert (claim.submitted.entries, claim.submitted.audio_bytes, claim.submitted.ended) == (
        stream.next_seq, stream.audio_bytes, stream.audio_ended)
    assert stream.audio_ended is ended
    assert stream.audio_bytes == min(len(clip), FIRST_BYTES)
    again = await store.claim("conv-claim", head, owner="worker-2")
    assert (again.kind, again.previous_owner, again.submitted) == (
        ClaimKind.RESUME, "worker-1", None)


async def test_the_cap_checked_is_the_one_the_producers_publish(redis_client, keys, settings,
                                                                make_producer):
    """A backend configured with the default cap (here 2) and producers running with another:
    the submit checks the producers' (published at start, with an expiry), and its own only
    while none is published."""
    queue = TurnQueue.from_settings(settings.with_overrides(max_sdk_sessions=2), redis_client)
    await redis_client.zadd(keys.sdk_sessions(), {"a": 1, "b": 2})  # two slots held
    producer = await make_producer(max_sdk_sessions=5, sdk_lease_s=0.6)  # renewals every 0.2 s
    assert await redis_client.get(keys.sdk_session_cap()) == b"5"
    assert 0 < await redis_client.pttl(keys.sdk_session_cap()) <= 1800  # 3 x the lease
    await redis_client.delete(keys.sdk_session_cap())
    await eventually(lambda: redis_client.get(keys.sdk_session_cap()),
                     what="the cap published again by a renewal")
    await queue.submit_clip("conv-published", tone(0.3), sample_rate=RATE)
    assert len(await stream_messages(redis_client, keys, "conv-published")) == 6  # 2 < 5: opened
    await producer.close()  # publishes no more
    await redis_client.set(keys.sdk_session_cap(), 2)  # as a producer with a cap of 2 says
    await queue.submit_clip("conv-at-cap", tone(0.3), sample_rate=RATE)
    assert not await stream_messages(redis_client, keys, "conv-at-cap")
    await redis_client.delete(keys.sdk_session_cap())  # none published: the backend's own 2
    await queue.submit_clip("conv-own-cap", tone(0.3), sample_rate=RATE)
    assert not await stream_messages(redis_client, keys, "conv-own-cap")


async def test_at_the_cap_only_the_conversations_own_kept_session_lets_it_open(
        redis_client, keys, settings):
    """Every slot held: a turn is still opened at submit when one of them is the session kept
    for its own conversation (a worker starts it at once on that session), not when the mark
    names another conversation's or a lease no longer in the set (a producer that crashed)."""
    queue = TurnQueue.from_settings(settings.with_overrides(max_sdk_sessions=2), redis_client)
    await redis_client.zadd(keys.sdk_sessions(), {"p:live-1": 1, "p:live-2": 2})
    await redis_client.hset(keys.sdk_kept(), mapping={
        "conv-own": "p:live-1", "conv-other": "p:live-2", "conv-stale": "p:gone"})
    for conv, opened in (("conv-own", True), ("conv-stale", False), ("conv-none", False)):
        await queue.submit_clip(conv, tone(0.3), sample_rate=RATE)
        assert bool(await stream_messages(redis_client, keys, conv)) is opened, conv


async def test_a_kept_session_is_marked_while_it_lives(redis_client, keys, make_producer):
    producer = await make_producer()
    await producer.speak("conv-marked", tone(0.2))
    lease = await redis_client.hget(keys.sdk_kept(), "conv-marked")
    assert lease is not None and await redis_client.zscore(keys.sdk_sessions(), lease) is not None
    await producer.close()  # closes the session: its slot and its mark go
    assert await redis_client.hget(keys.sdk_kept(), "conv-marked") is None
    assert await redis_client.zscore(keys.sdk_sessions(), lease) is None


async def test_the_doorbell_says_when_its_submit_opened_the_turn(redis_client, keys, queue):
    """A turn opened at submit needs no worker to write its first audio, and its doorbell says
    so: its worker's producer then holds no other turn's session back for it."""
    opened = await queue.submit_clip("conv-bell", tone(0.3), sample_rate=RATE)
    queued = await queue.submit_clip("conv-bell", tone(0.3), sample_rate=RATE)  # one is active
    await queue.submit_clip("conv-bell", tone(0.3), sample_rate=RATE, turn_id=opened)  # a retry
    bells = [_doorbell(entry_id, fields)
             for entry_id, fields in await redis_client.xrange(keys.jobs())]
    assert [(b.turn_id, b.opened_at_submit) for b in bells] == [
        (opened, True), (queued, False), (opened, False)]  # a retry opens nothing again
