"""Producer against a real Redis and the Motion Server simulator, through the unmodified SDK."""

from __future__ import annotations

import asyncio

import pytest

from relay import wire
from relay.dev.motion_sim import (
    SimConfig,
    decode_animation,
    encode_animation,
)
from relay.streams import ConversationLog
from tests.helpers.producer import (
    RATE,
    assert_audio_only,
    assert_complete,
    assert_interrupted,
    of_turn,
    stream_messages,
    tone,
)
from workers.speech.endpoints import MotionEndpoints
from workers.speech.leases import ConversationBusy, ConversationLeases, SessionLeases
from workers.speech.producer import FramesPipe, PipeOutcome, Producer, ProducerError
from workers.speech.session import MotionSession


async def test_clip_turn_writes_audio_before_frames(make_producer, redis_client, keys, sim):
    producer = await make_producer()
    clip = tone(0.6)
    result = await producer.speak("conv-clip", clip)
    assert result.status == wire.STATUS_COMPLETE and result.error is None
    assert result.audio_bytes == len(clip) and result.frames_messages >= 2
    messages = await stream_messages(redis_client, keys, "conv-clip")
    assert messages[0].id == result.start_id
    assert_complete(messages, result.turn_id, clip)


async def test_streamed_turn(make_producer, redis_client, keys):
    producer = await make_producer()
    clip = tone(0.5, freq=330.0, rate=24000)
    async with await producer.open_turn("conv-stream", sample_rate=24000) as turn:
        for start in range(0, len(clip), 1000):
            assert await turn.send(clip[start : start + 1000])
            await asyncio.sleep(0)
    result = await turn.end()  # already ended by the block; the result is kept
    assert result.status == wire.STATUS_COMPLETE
    messages = await stream_messages(redis_client, keys, "conv-stream")
    assert_complete(messages, turn.turn_id, clip, rate=24000)


async def test_streamed_turn_in_batches(make_producer, redis_client, keys, monkeypatch):
    """send_many: one fenced append per batch (split at AUDIO_BATCH_MAX), frames waiting in the
    pipe ride along ahead of the audio; the turn's seqs stay contiguous and audio leads frames."""
    import workers.speech.turn as turn_module

    monkeypatch.setattr(turn_module, "AUDIO_BATCH_MAX", 3)
    producer = await make_producer()
    clip = tone(0.8, freq=300.0)
    chunks = [clip[start : start + 1280] for start in range(0, len(clip), 1280)]
    async with await producer.open_turn("conv-batches") as turn:
        for start in range(0, len(chunks), 7):
            assert await turn.send_many(chunks[start : start + 7])
            await asyncio.sleep(0.05)  # let the server answer: frames wait in the pipe
    result = await turn.end()
    assert result.status == wire.STATUS_COMPLETE
    messages = await stream_messages(redis_client, keys, "conv-batches")
    assert_complete(messages, turn.turn_id, clip)


async def test_tts_pause_is_not_a_stall(make_producer, redis_client, keys):
    producer = await make_producer(frames_timeout_s=0.4)
    clip = tone(0.6, freq=260.0)
    turn = await producer.open_turn("conv-pause")
    assert await turn.send(clip[:9600])  # 0.3 s: the server answers part, holds back the rest
    await asyncio.sleep(1.0)  # TTS is slow; the server owes nothing for held-back audio
    assert await turn.send(clip[9600:])
    assert (await turn.end()).status == wire.STATUS_COMPLETE
    assert_complete(await stream_messages(redis_client, keys, "conv-pause"), turn.turn_id, clip)


async def test_streamed_turn_validates_chunks(make_producer):
    producer = await make_producer()
    turn = await producer.open_turn("conv-bad-chunk")
    with pytest.raises(ValueError, match="even number"):
        await turn.send(b"\x00\x01\x02")
    with pytest.raises(TypeError):
        await turn.send("not bytes")  # type: ignore[arg-type]
    await turn.send(tone(0.1))
    assert (await turn.end()).status == wire.STATUS_COMPLETE
    with pytest.raises(ProducerError):
        await turn.send(b"\x00\x00")
    with pytest.raises(ValueError):
        await producer.speak("conv-bad-chunk", b"")
    with pytest.raises(ValueError):
        await producer.speak("bad conversation id", tone(0.1))
    with pytest.raises(ValueError):
        await producer.speak("conv-bad-chunk", tone(0.1), sample_rate=12345)


async def test_turns_reuse_one_session(make_producer, redis_client, keys, sim):
    producer = await make_producer()
    clips = [tone(0.4, freq=200.0), tone(0.4, freq=500.0)]
    results = [await producer.speak("conv-reuse", clip) for clip in clips]
    messages = await stream_messages(redis_client, keys, "conv-reuse")
    for result, clip in zip(results, clips, strict=True):
        assert_complete(messages, result.turn_id, clip)
    assert sim.sim.stats.sessions_opened == 1


async def test_per_turn_sessions(make_producer, sim):
    producer = await make_producer(per_turn_sessions=True)
    for freq in (200.0, 500.0):
        assert (await producer.speak("conv-per-turn", tone(0.3, freq=freq))).status == "complete"
    assert sim.sim.stats.sessions_opened == 2
    assert producer.motion_sessions == 0


async def test_many_concurrent_conversations(make_producer, redis_client, keys, sim):
    producer = await make_producer(max_sdk_sessions=20)

    async def converse(n: int) -> None:
        for turn in range(2):
            clip = tone(0.3, freq=150.0 + 20 * n + 7 * turn)
            result = await producer.speak(f"conv-many-{n}", clip)
            messages = await stream_messages(redis_client, keys, f"conv-many-{n}")
            assert_complete(messages, result.turn_id, clip)

    await asyncio.gather(*(converse(n) for n in range(20)))
    assert sim.sim.stats.sessions_opened == 20


async def test_idle_session_is_closed(make_producer, sim):
    producer = await make_producer(session_idle_s=0.2)
    await producer.speak("conv-idle", tone(0.2))
    async with asyncio.timeout(5):
        while producer.motion_sessions or sim.sim.stats.sessions_open:
            await asyncio.sleep(0.05)


async def test_turns_of_a_conversation_queue_up(make_producer, redis_client, keys):
    producer = await make_producer()
    clips = [tone(0.3, freq=200.0 + 100 * i) for i in range(3)]
    results = await asyncio.gather(*(producer.speak("conv-queue", clip) for clip in clips))
    messages = await stream_messages(redis_client, keys, "conv-queue")
    for result, clip in zip(results, clips, strict=True):
        assert_complete(messages, result.turn_id, clip)  # also checks that turns did not interleave


# --- interrupts ----------------------------------------------------------------------------------


async def test_interrupt_from_another_process_while_waiting_for_frames(
    make_producer, start_sim, redis_client, keys
):
    paced = await start_sim(SimConfig(max_concurrent_sessions=0, realtime=True))
    producer = await make_producer(at=paced)
    other_process = ConversationLog(redis_client, keys, maxlen=1000, ttl_s=60)
    c = "conv-int"
    speaking = asyncio.create_task(producer.speak(c, tone(2.0)))
    async with asyncio.timeout(5):  # wait for the first frames of the paced turn
        while wire.FRAMES not in {m.kind for m in await stream_messages(redis_client, keys, c)}:
            await asyncio.sleep(0.02)
    turn_id = await other_process.interrupt("conv-int", reason="barge_in")
    result = await asyncio.wait_for(speaking, 2)  # stopped by the control channel, not a timeout
    assert result.status == wire.STATUS_INTERRUPTED and result.turn_id == turn_id
    await asyncio.sleep(0.3)  # late frames of the interrupted request must not be written
    messages = await stream_messages(redis_client, keys, "conv-int")
    assert_interrupted(messages, turn_id)
    assert paced.sim.stats.interrupts == 1

    clip = tone(0.3, freq=440.0)
    after = await producer.speak("conv-int", clip)
    messages = await stream_messages(redis_client, keys, "conv-int")
    assert_complete(messages, after.turn_id, clip)  # no keyframes of the old request leaked in
    assert paced.sim.stats.sessions_opened == 1


async def test_interrupt_streamed_turn(make_producer, redis_client, keys):
    producer = await make_producer()
    turn = await producer.open_turn("conv-int-stream")
    assert await turn.send(tone(0.2))
    assert await producer.interrupt("conv-int-stream") == turn.turn_id
    assert turn.interrupted
    assert not await turn.send(tone(0.2))
    result = await turn.end()
    assert result.status == wire.STATUS_INTERRUPTED
    assert_interrupted(await stream_messages(redis_client, keys, "conv-int-stream"), turn.turn_id)
    assert await producer.interrupt("conv-int-stream") is None


async def test_abort_on_error_in_block(make_producer, redis_client, keys):
    producer = await make_producer()
    with pytest.raises(RuntimeError):
        async with await producer.open_turn("conv-abort") as turn:
            await turn.send(tone(0.1))
            raise RuntimeError("tts failed")
    messages = await stream_messages(redis_client, keys, "conv-abort")
    assert_interrupted(messages, turn.turn_id)
    assert messages[-1].get("reason") == "aborted"
    assert (await producer.speak("conv-abort", tone(0.1))).status == wire.STATUS_COMPLETE


# --- Motion Server failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"kind": "server_error", "after_keyframes": 5}, "motion_error"),
        ({"kind": "drop", "after_keyframes": 5}, "motion_closed"),
        ({"kind": "close", "after_keyframes": 5}, "motion_closed"),
        ({"kind": "stall", "after_keyframes": 5}, "stall"),
        ({"kind": "token_error"}, "motion_error"),
        ({"kind": "reject_upgrade"}, "motion_error"),
        ({"kind": "handshake_silence"}, "motion_error"),
    ],
)
async def test_motion_failure_falls_back_to_audio_only(
    make_producer, redis_client, keys, sim, fault, reason
):
    producer = await make_producer(frames_timeout_s=0.5)
    sim.fault(**fault)
    clip = tone(1.0)
    result = await producer.speak("conv-fail", clip)
    assert result.status == wire.STATUS_AUDIO_ONLY and result.error.startswith(reason)
    messages = await stream_messages(redis_client, keys, "conv-fail")
    assert_audio_only(messages, result.turn_id, clip, reason)

    clip = tone(0.3, freq=500.0)  # the broken session is gone; the next turn gets a new one
    result = await producer.speak("conv-fail", clip)
    assert_complete(await stream_messages(redis_client, keys, "conv-fail"), result.turn_id, clip)


async def test_capacity_falls_back_to_audio_only(make_producer, redis_client, keys, sim):
    producer = await make_producer(max_sdk_sessions=1, sdk_wait_s=0.3)
    await producer.speak("conv-holder", tone(0.2))  # keeps the only slot while idle
    clip = tone(0.4)
    result = await producer.speak("conv-waiter", clip)
    assert result.status == wire.STATUS_AUDIO_ONLY and result.error.startswith("capacity")
    messages = await stream_messages(redis_client, keys, "conv-waiter")
    assert_audio_only(messages, result.turn_id, clip, "capacity")
    kinds = [m.kind for m in of_turn(messages, result.turn_id)]
    # The audio did not wait for the slot: all of it went out during the 0.3 s wait.
    assert kinds.index(wire.AUDIO_ONLY) > max(i for i, k in enumerate(kinds) if k == wire.AUDIO)


async def test_an_idle_kept_session_counts_as_room_for_its_producer_only(make_producer, sim):
    # A worker reads as many doorbells as its producer can give sessions to: an idle session it
    # keeps serves its conversation's next turn (or closes for another's), so at the cap the
    # holder still has room for one turn while any other producer has none.
    holder = await make_producer(max_sdk_sessions=1, session_idle_s=60.0)
    other = await make_producer(max_sdk_sessions=1)
    assert await holder.session_room() == 1 and await other.session_room() == 1
    await holder.speak("conv-kept", tone(0.2))
    assert holder.motion_sessions == 1
    assert await holder.session_room() == 1  # no slot is free, but its idle session is its own
    result = await holder.speak("conv-kept", tone(0.2))  # the kept session serves it
    assert result.status == wire.STATUS_COMPLETE
    assert sim.sim.stats.sessions_opened == 1
    # Asked last: at 0 a producer counts as waiting, and idle sessions close for waiters.
    assert await other.session_room() == 0


async def test_idle_sessions_yield_to_waiting_turns(make_producer, redis_client, keys, sim):
    # The holder keeps its session for the next turn (idle 60 s), but a turn waiting on another
    # producer needs the only slot: the holder must close its idle session for it.
    holder = await make_producer(max_sdk_sessions=1, session_idle_s=60.0)
    waiter = await make_producer(max_sdk_sessions=1, sdk_wait_s=10.0)
    await holder.speak("conv-idle-holder", tone(0.2))
    assert holder.motion_sessions == 1
    clip = tone(0.4, freq=330.0)
    result = await waiter.speak("conv-needs-slot", clip)
    assert result.status == wire.STATUS_COMPLETE
    messages = await stream_messages(redis_client, keys, "conv-needs-slot")
    assert_complete(messages, result.turn_id, clip)
    assert holder.motion_sessions == 0
    assert sim.sim.stats.sessions_peak == 1


async def test_two_producers_share_the_session_cap(make_producer, redis_client, keys, sim):
    options = {"max_sdk_sessions": 2, "per_turn_sessions": True, "sdk_wait_s": 10.0}
    producers = [await make_producer(**options), await make_producer(**options)]

    async def speak(producer: Producer, n: int) -> None:
        clip = tone(0.3, freq=200.0 + 30 * n)
        result = await producer.speak(f"conv-cap-{n}", clip)
        messages = await stream_messages(redis_client, keys, f"conv-cap-{n}")
        assert_complete(messages, result.turn_id, clip)

    await asyncio.gather(*(speak(producers[n % 2], n) for n in range(6)))
    assert sim.sim.stats.sessions_opened == 6
    assert sim.sim.stats.sessions_peak <= 2


async def test_frames_backlog_policy(redis_client, keys):
    log = ConversationLog(redis_client, keys, maxlen=1000, ttl_s=60)
    await log.open_turn("conv-backlog", "t1", sample_rate=RATE, owner="test")
    pipe = FramesPipe(log, "conv-backlog", "t1", stall_s=5.0, capacity=2)
    for _ in range(3):  # one more than the writer may fall behind
        pipe.offer(b"envelope", False)
    pipe.start()
    assert await pipe.wait() is PipeOutcome.AUDIO_ONLY
    await pipe.close()
    messages = await stream_messages(redis_client, keys, "conv-backlog")
    assert [m.kind for m in messages] == [wire.TURN_START, wire.AUDIO_ONLY]
    assert messages[-1].get("reason") == "frames_backlog"


async def test_envelopes_of_other_requests_are_dropped(settings, sim):
    endpoints = MotionEndpoints.from_settings(
        settings, console_url=sim.console_url, ingress_url=sim.ingress_url
    )
    session = MotionSession(endpoints, conversation_id="c", avatar_id="a", sample_rate=RATE,
                            lease_id="l")
    received: list[str] = []

    class Sink:
        def offer(self, envelope: bytes, is_last: bool) -> None:
            received.append(decode_animation(envelope).req_id)

        def fail(self, reason: str, detail: str = "") -> None:
            raise AssertionError(reason)

    def envelope(req_id: str, end: bool = False) -> bytes:
        return encode_animation("conn", req_id, end=end, keyframes=[[0.0] * 120])

    session.attach(Sink())
    session._on_frames(envelope("req-1"), False)  # first envelope of the turn: adopted
    session._on_frames(envelope("req-1"), False)
    session.detach()  # turn over (e.g. interrupted): req-1 is retired
    session._on_frames(envelope("req-1"), False)  # late: nobody attached
    session.attach(Sink())
    session._on_frames(envelope("req-1", end=True), True)  # late: must not reach the new turn
    session._on_frames(envelope("req-2"), False)
    session._on_frames(envelope("req-3"), False)  # not the attached request either
    assert received == ["req-1", "req-1", "req-2"]
    assert session.dropped_envelopes == 3


# --- leases --------------------------------------------------------------------------------------


async def test_crashed_session_lease_expires(redis_client, keys):
    # Every producer shares RELAY_SDK_LEASE_S: the scripts judge how long a member went
    # unrenewed from its expiry and the caller's lease.
    crashed = SessionLeases(redis_client, keys, cap=1, lease_s=0.3, wait_s=0, owner="crashed")
    assert await crashed.acquire() is not None  # never renewed: its process "died"
    other = SessionLeases(redis_client, keys, cap=1, lease_s=0.3, wait_s=0, owner="other")
    assert await other.acquire() is None  # full, and no waiting
    other_waiting = SessionLeases(redis_client, keys, cap=1, lease_s=0.3, wait_s=2, owner="other")
    assert await other_waiting.acquire() is not None  # admitted once the crashed lease expired


async def test_live_session_lease_is_renewed(redis_client, keys):
    live = SessionLeases(redis_client, keys, cap=1, lease_s=0.3, wait_s=0, owner="live")
    live.start()
    try:
        lease = await live.acquire()
        assert lease is not None
        waiter = SessionLeases(redis_client, keys, cap=1, lease_s=0.3, wait_s=0.8,
                               owner="waiter")
        assert await waiter.acquire() is None  # renewed past several lease lengths
        await live.release(lease)
        assert await waiter.acquire() is not None
    finally:
        await live.close()


async def test_a_turn_opening_takes_the_conversation_lock_and_a_second_producer_waits(
        make_producer, redis_client, keys):
    first, second = await make_producer(), await make_producer()
    lock = keys.conversation_lock("conv-two")
    turn = await first.open_turn("conv-two")
    assert await redis_client.get(lock) == first.owner.encode()  # taken by the opening itself
    clip = tone(0.3)
    waiting = asyncio.create_task(second.speak("conv-two", clip))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # the lock is first's: nothing of second's turn was written
    assert [m.turn for m in await stream_messages(redis_client, keys, "conv-two")] \
        == [turn.turn_id]
    assert await turn.send(tone(0.2))
    first_result = await turn.end()
    result = await asyncio.wait_for(waiting, 10)
    assert first_result.status == result.status == wire.STATUS_COMPLETE
    messages = await stream_messages(redis_client, keys, "conv-two")
    assert_complete(messages, result.turn_id, clip)
    assert await redis_client.exists(lock) == 0  # released after second's turn


async def test_conversation_lease(redis_client, keys):
    crashed = ConversationLeases(redis_client, keys, owner="crashed", lease_s=0.3)
    await crashed.acquire("conv-lock", wait_s=0)
    other = ConversationLeases(redis_client, keys, owner="other", lease_s=5)
    with pytest.raises(ConversationBusy):
        await other.acquire("conv-lock", wait_s=0.1)
    await other.acquire("conv-lock", wait_s=2)  # the crashed holder's lease expired
    await crashed.release("conv-lock")  # not the owner any more: must not delete other's lock
    assert await redis_client.get(keys.conversation_lock("conv-lock")) == b"other"


async def test_motion_stopping_mid_turn_goes_audio_only_after_the_frames_timeout(
        make_producer, redis_client, keys, sim):
    """RELAY_FRAMES_TIMEOUT_S is the documented bound: audio goes on at real time while the
    Motion Server stops answering; audio_only{stall} follows the last frames after about the
    timeout (it was twice that: first the timeout's worth of unanswered audio, then the wait)."""
    timeout_s = 1.0
    producer = await make_producer(frames_timeout_s=timeout_s)
    sim.fault(kind="stall", after_keyframes=5)
    clip = tone(3.0, freq=240.0)
    turn = await producer.open_turn("conv-stall-bound")
    for start in range(0, len(clip), 1280):  # a TTS engine at real time
        assert await turn.send(clip[start:start + 1280])
        await asyncio.sleep(0.04)
    result = await turn.end()
    assert result.status == wire.STATUS_AUDIO_ONLY and result.error.startswith("stall")
    mine = of_turn(await stream_messages(redis_client, keys, "conv-stall-bound"), turn.turn_id)
    last_frames = max(int(m.id.split("-")[0]) for m in mine if m.kind == wire.FRAMES)
    marker = next(int(m.id.split("-")[0]) for m in mine if m.kind == wire.AUDIO_ONLY)
    waited_s = (marker - last_frames) / 1000
    print(f"audio_only {waited_s:.2f} s after the last frames (timeout {timeout_s} s)")
    assert timeout_s - 0.1 <= waited_s <= timeout_s + 0.5
