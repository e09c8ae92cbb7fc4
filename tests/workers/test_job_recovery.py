"""Crash recovery of queued turns, in-process: an attempt that died at a known point, taken over.

Each test builds the exact state a producer leaves when it is killed (its doorbell pending in the
group, its runner lease and conversation lock still held, some entries written at its epoch), then
starts a real worker against the simulator and checks what clients end up with.
"""

from __future__ import annotations

import asyncio

import pytest

from relay import wire
from relay.dev.motion_sim import encode_animation, keyframes_for_audio
from relay.errors import TurnFenced
from relay.streams import ConversationLog, read_turn
from tests.helpers.jobs import assert_played_once, request_ids, split_turns
from tests.helpers.producer import (
    RATE,
    assert_audio_only,
    assert_complete,
    of_turn,
    stream_messages,
    tone,
    wait_turn_end,
)
from workers.queue.deadletters import DeadLetters
from workers.queue.doorbells import Doorbells
from workers.queue.records import JobStore

FAST_CLAIM = {"job_claim_idle_s": 0.3}
DEAD = "dead-producer:0"


async def crash_mid_turn(redis_client, keys, queue, conv, clip, *, audio_bytes, frames=0,
                         audio_end=False, frames_last=False, ended=False, streamed=False):
    """Submit a turn and leave it as a producer killed mid-turn would; returns (turn id, epoch)."""
    if streamed:
        feed = await queue.open_streamed(conv, sample_rate=RATE)
        for start in range(0, len(clip), 3200):
            await feed.send(clip[start:start + 3200])
        await feed.end()
        turn_id = feed.turn_id
    else:
        turn_id = await queue.submit_clip(conv, clip, sample_rate=RATE)
    bells = Doorbells(redis_client, keys, consumer=DEAD)
    await bells.ensure_group()
    [bell] = await bells.read(1, 100)
    store = JobStore(redis_client, keys, ttl_s=60, lease_s=60)  # outlives the test: no expiry help
    await store.take(conv, owner=DEAD, doorbell=bell.entry_id)
    claim = await store.claim(conv, await store.head(conv), owner=DEAD)
    await redis_client.set(keys.conversation_lock(conv), DEAD, px=60_000)
    log = ConversationLog(redis_client, keys, maxlen=10_000, ttl_s=60)
    await log.open_turn(conv, turn_id, sample_rate=RATE, owner=DEAD, epoch=claim.epoch,
                        guard=store.run_guard(conv, turn_id, claim.epoch))
    chunks = [clip[i:i + 1280] for i in range(0, audio_bytes, 1280)]
    for seq, chunk in enumerate(chunks):
        last = audio_end and seq == len(chunks) - 1
        entry = wire.audio(turn_id, seq, chunk, end=last)
        await log.append(conv, turn_id, entry, epoch=claim.epoch)
    keyframes = keyframes_for_audio(clip, RATE)
    for seq in range(frames):
        last = frames_last and seq == frames - 1
        envelope = encode_animation("dead-conn", "dead-request", end=last,
                                    keyframes=keyframes[seq * 5:seq * 5 + 5])
        await log.append(conv, turn_id, wire.frames(turn_id, seq, envelope, last=last),
                         epoch=claim.epoch)
    if ended:
        await log.end_turn(conv, turn_id, status=wire.STATUS_COMPLETE, epoch=claim.epoch)
    return turn_id, claim.epoch


async def test_claim_fences_the_previous_attempt(redis_client, keys, queue):
    clip = tone(0.2)
    turn_id, epoch = await crash_mid_turn(redis_client, keys, queue, "conv-fence", clip,
                                          audio_bytes=2560)
    store = JobStore(redis_client, keys, ttl_s=60, lease_s=60)
    claim = await store.claim("conv-fence", await store.head("conv-fence"), owner="new")
    assert claim.kind == "resume" and claim.epoch == epoch + 1 and claim.previous_owner == DEAD
    log = ConversationLog(redis_client, keys, maxlen=1000, ttl_s=60)
    with pytest.raises(TurnFenced):  # the paused attempt wakes up: it can write nothing more
        await log.append("conv-fence", turn_id, wire.audio(turn_id, 2, b"zz", end=False),
                         epoch=epoch)
    with pytest.raises(TurnFenced):
        await log.open_turn("conv-fence", turn_id, sample_rate=RATE, owner=DEAD, epoch=epoch,
                            guard=store.run_guard("conv-fence", turn_id, epoch))
    await log.append("conv-fence", turn_id, wire.audio(turn_id, 2, b"ok", end=False),
                     epoch=claim.epoch)


async def test_no_frames_yet_continues_with_one_fresh_request(redis_client, keys, queue,
                                                              run_worker):
    clip = tone(0.8)
    turn_id, _ = await crash_mid_turn(redis_client, keys, queue, "conv-r1", clip,
                                      audio_bytes=12_800)
    await run_worker(**FAST_CLAIM)
    messages = await wait_turn_end(redis_client, keys, "conv-r1", turn_id)
    # Audio exactly once, and the whole animation from the new request: it heard every byte.
    assert_complete(messages, turn_id, clip)


async def test_frames_delivered_continues_audio_only(redis_client, keys, queue, run_worker):
    clip = tone(0.8)
    turn_id, _ = await crash_mid_turn(redis_client, keys, queue, "conv-r2", clip,
                                      audio_bytes=12_800, frames=2)
    await run_worker(**FAST_CLAIM)
    messages = await wait_turn_end(redis_client, keys, "conv-r2", turn_id)
    assert_audio_only(messages, turn_id, clip, reason="producer_failover")
    frames = [m for m in of_turn(messages, turn_id) if m.kind == wire.FRAMES]
    assert request_ids(frames) == {"dead-request"}  # never mixed with a new request's frames


async def test_only_turn_end_missing(redis_client, keys, queue, run_worker):
    clip = tone(0.4)
    turn_id, _ = await crash_mid_turn(redis_client, keys, queue, "conv-r3", clip,
                                      audio_bytes=len(clip), audio_end=True, frames=2,
                                      frames_last=True)
    before = len(await stream_messages(redis_client, keys, "conv-r3"))
    await run_worker(**FAST_CLAIM)
    messages = await wait_turn_end(redis_client, keys, "conv-r3", turn_id)
    assert [m.kind for m in messages[before:]] == [wire.TURN_END]
    assert messages[-1].get("status") == wire.STATUS_COMPLETE


async def test_finished_turn_is_not_played_again(redis_client, keys, queue, run_worker):
    first = tone(0.3)
    turn_id, _ = await crash_mid_turn(redis_client, keys, queue, "conv-r4", first,
                                      audio_bytes=len(first), audio_end=True, ended=True)
    later = tone(0.3, freq=400.0)
    next_id = await queue.submit_clip("conv-r4", later, sample_rate=RATE)
    await run_worker(**FAST_CLAIM)
    messages = await wait_turn_end(redis_client, keys, "conv-r4", next_id)
    turns = split_turns(messages)
    assert list(turns) == [turn_id, next_id]
    assert [m.kind for m in turns[turn_id]].count(wire.TURN_END) == 1
    assert_complete(messages, next_id, later)
    async with asyncio.timeout(2):  # removed from the queue just after its turn_end
        while await redis_client.xlen(keys.queue("conv-r4")):
            await asyncio.sleep(0.02)


async def test_streamed_turn_reads_its_input_again(redis_client, keys, queue, run_worker):
    clip = tone(0.7, freq=300.0)
    turn_id, _ = await crash_mid_turn(redis_client, keys, queue, "conv-r5", clip,
                                      audio_bytes=5120, streamed=True)
    await run_worker(**FAST_CLAIM)
    messages = await wait_turn_end(redis_client, keys, "conv-r5", turn_id)
    assert_played_once(of_turn(messages, turn_id), clip)
    async with asyncio.timeout(2):  # the input goes with the job, once the turn is over
        while await redis_client.exists(keys.turn_input("conv-r5", turn_id)):
            await asyncio.sleep(0.02)


async def test_earlier_turn_retried_before_later_ones(redis_client, keys, queue, run_worker):
    clips = [tone(0.5), tone(0.3, freq=350.0), tone(0.3, freq=450.0)]
    first, _ = await crash_mid_turn(redis_client, keys, queue, "conv-r6", clips[0],
                                    audio_bytes=6400)
    later = [await queue.submit_clip("conv-r6", c, sample_rate=RATE) for c in clips[1:]]
    for _ in range(2):
        await run_worker(**FAST_CLAIM)  # two workers race for the conversation
    messages = await wait_turn_end(redis_client, keys, "conv-r6", later[-1])
    turns = split_turns(messages)
    assert list(turns) == [first, *later]
    for turn_id, clip in zip(turns, clips, strict=True):
        assert_played_once(turns[turn_id], clip)


async def test_poison_turn_goes_to_dead_letters(redis_client, keys, queue, run_worker):
    feed = await queue.open_streamed("conv-poison", sample_rate=RATE)
    # Its input is not a stream: every attempt fails reading it (WRONGTYPE).
    await redis_client.set(keys.turn_input("conv-poison", feed.turn_id), b"not a stream")
    clip = tone(0.3)
    next_id = await queue.submit_clip("conv-poison", clip, sample_rate=RATE)
    await run_worker(job_max_attempts=2)
    messages = await wait_turn_end(redis_client, keys, "conv-poison", next_id)
    assert list(split_turns(messages)) == [next_id]  # the poison turn never reached clients
    assert_complete(messages, next_id, clip)
    [letter] = await DeadLetters(redis_client, keys, maxlen=10).list()
    assert (letter.turn_id, letter.reason, letter.attempts) == (feed.turn_id, "max_attempts", 2)
    assert "WRONGTYPE" in letter.error


async def test_deadline_passed_before_pickup(redis_client, keys, queue, run_worker):
    late = await queue.submit_clip("conv-dl", tone(0.3), sample_rate=RATE, deadline_s=0.1)
    clip = tone(0.3, freq=500.0)
    on_time = await queue.submit_clip("conv-dl", clip, sample_rate=RATE, deadline_s=30)
    await asyncio.sleep(0.3)
    await run_worker()
    messages = await wait_turn_end(redis_client, keys, "conv-dl", on_time)
    assert list(split_turns(messages)) == [on_time]
    assert_complete(messages, on_time, clip)
    [letter] = await DeadLetters(redis_client, keys, maxlen=10).list()
    assert (letter.turn_id, letter.reason) == (late, "deadline")


@pytest.mark.parametrize("drop", [True, False])
async def test_interrupt_and_turns_queued_before_it(redis_client, keys, queue, run_worker, drop):
    conv = f"conv-drop-{drop}"
    await run_worker()
    feed = await queue.open_streamed(conv, sample_rate=RATE)
    await feed.send(tone(0.2))  # playing, and waiting for more input
    queued = [await queue.submit_clip(conv, tone(0.2, freq=f), sample_rate=RATE)
              for f in (300.0, 400.0)]
    async with asyncio.timeout(5):
        while getattr(await read_turn(redis_client, keys, conv), "status", "") != "active":
            await asyncio.sleep(0.02)
    outcome = await queue.interrupt_detail(conv, drop_queued=drop)
    assert outcome.turn_id == feed.turn_id and outcome.dropped == (3 if drop else 0)
    clip = tone(0.3, freq=600.0)
    after = await queue.submit_clip(conv, clip, sample_rate=RATE)
    messages = await wait_turn_end(redis_client, keys, conv, after)
    played = list(split_turns(messages))
    assert played == ([feed.turn_id, after] if drop else [feed.turn_id, *queued, after])
    assert_complete(messages, after, clip)  # the turn after the interrupt starts clean


async def test_waits_for_a_session_slot_instead_of_going_audio_only(redis_client, keys, queue,
                                                                    run_worker, start_sim):
    from relay.dev.motion_sim import SimConfig

    slow = await start_sim(SimConfig(max_concurrent_sessions=0, realtime=True))
    # One attempt only: a turn that finds no slot free after its claim hands the claim back
    # uncounted (a counted one would send the turn to the dead letters here).
    options = {"max_sdk_sessions": 1, "sdk_wait_s": 0.2, "per_turn_sessions": True,
               "job_max_attempts": 1}
    for _ in range(2):
        await run_worker(at=slow, **options)
    clips = {f"conv-cap-{n}": tone(0.4, freq=200.0 + 50 * n) for n in range(3)}
    turns = {c: await queue.submit_clip(c, clip, sample_rate=RATE) for c, clip in clips.items()}
    for conv, clip in clips.items():
        # Each turn takes about 0.4 s of real-time animation with the only slot, far longer than
        # sdk_wait_s: without the gate the later ones would fall back to audio-only.
        assert_complete(await wait_turn_end(redis_client, keys, conv, turns[conv], 15), turns[conv],
                        clip)


async def test_malformed_input_mid_turn_ends_the_turn_for_clients(redis_client, keys, queue,
                                                                   run_worker):
    # TurnQueue checks PCM itself; a writer that bypasses it can still put an odd-length chunk
    # in a turn's input after good audio went out. The turn is dead-lettered as malformed, and
    # clients that heard part of it get interrupt{failed}: the turn never stays open for them.
    conv = "conv-bad-input"
    await run_worker()
    feed = await queue.open_streamed(conv, sample_rate=RATE)
    await feed.send(tone(0.2))
    async with asyncio.timeout(10):
        while not [m for m in await stream_messages(redis_client, keys, conv)
                   if m.kind == wire.AUDIO]:
            await asyncio.sleep(0.01)
    await redis_client.xadd(keys.turn_input(conv, feed.turn_id), {b"a": b"odd"})
    messages = await wait_turn_end(redis_client, keys, conv, feed.turn_id)
    mine = of_turn(messages, feed.turn_id)
    assert mine[-1].kind == wire.INTERRUPT and mine[-1].get("reason") == "failed"
    [letter] = await DeadLetters(redis_client, keys, maxlen=10).list()
    assert (letter.turn_id, letter.reason) == (feed.turn_id, "malformed")
    assert "even number of bytes" in letter.error
