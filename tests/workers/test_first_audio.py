"""First audio never waits for the Motion Server: a turn's audio is in the stream while its SDK
session is still being opened (simulator with a slow or failing handshake), and every protocol
rule still holds (audio before frames, one request per turn, the audio-only rules)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as redis
from redis.asyncio.connection import Connection

from relay import wire
from relay.dev.motion_sim import SimConfig
from relay.keys import Keys
from tests.helpers.polling import eventually
from tests.helpers.producer import (
    RATE,
    SimHandle,
    assert_audio_only,
    assert_complete,
    assert_interrupted,
    of_turn,
    stream_messages,
    tone,
    wait_turn_end,
)
from workers.queue.submit import TurnQueue
from workers.speech import turn as turn_module
from workers.speech.pcm import AUDIO_BATCH_MAX, chunk_size
from workers.speech.producer import Attempt
from workers.speech.resume import Delivered
from workers.speech.turn import FirstAudio

CHUNK = 1280  # 40 ms at 16 kHz, the default chunk_ms


@pytest.fixture
async def slow_sim(start_sim: Any) -> SimHandle:
    """A Motion Server whose handshake takes far longer than appending a turn's audio."""
    return await start_sim(SimConfig(max_concurrent_sessions=0, handshake_delay_ms=800))


async def audio_entries(client: redis.Redis, keys: Keys, conversation_id: str) -> int:
    return [m.kind for m in await stream_messages(client, keys, conversation_id)].count(wire.AUDIO)


async def test_audio_is_in_the_stream_before_the_session_is_ready(
    make_producer, redis_client, keys, slow_sim
):
    producer = await make_producer(at=slow_sim)
    clip = tone(0.4)
    turn = await producer.open_turn("conv-early")
    for start in range(0, len(clip), CHUNK):
        assert await turn.send(clip[start : start + CHUNK])
    assert await audio_entries(redis_client, keys, "conv-early") == len(clip) // CHUNK
    assert slow_sim.sim.stats.sessions_opened == 0  # the handshake is still going on
    result = await turn.end()
    assert result.status == wire.STATUS_COMPLETE
    # All of the backlog went to one session as one request, animated whole.
    assert_complete(await stream_messages(redis_client, keys, "conv-early"), result.turn_id, clip)
    assert slow_sim.sim.stats.sessions_opened == 1


async def test_clip_audio_ends_before_the_handshake(make_producer, redis_client, keys, slow_sim):
    producer = await make_producer(at=slow_sim)
    clip = tone(0.5, freq=300.0)
    result = await producer.speak("conv-clip-early", clip)
    messages = await stream_messages(redis_client, keys, "conv-clip-early")
    assert_complete(messages, result.turn_id, clip)
    kinds = [m.kind for m in of_turn(messages, result.turn_id)]
    last_audio = max(i for i, k in enumerate(kinds) if k == wire.AUDIO)
    assert last_audio < kinds.index(wire.FRAMES)  # the whole clip went out during the handshake


async def test_handshake_that_never_answers_leaves_the_turn_audio_only(
    make_producer, redis_client, keys, start_sim
):
    silent = await start_sim(SimConfig(max_concurrent_sessions=0))
    silent.fault("handshake_silence")
    producer = await make_producer(at=silent, frames_timeout_s=0.5)  # also the open timeout
    clip = tone(1.0)
    result = await producer.speak("conv-silent", clip)
    assert result.status == wire.STATUS_AUDIO_ONLY and result.error.startswith("motion_error")
    messages = await stream_messages(redis_client, keys, "conv-silent")
    assert_audio_only(messages, result.turn_id, clip, "motion_error")  # no frames, marker once
    kinds = [m.kind for m in of_turn(messages, result.turn_id)]
    assert kinds.index(wire.AUDIO) < kinds.index(wire.AUDIO_ONLY)  # audio did not wait


async def test_backlog_bound_makes_the_audio_wait(
    make_producer, redis_client, keys, slow_sim, monkeypatch
):
    # Policy "motion_backlog": past the bound, appends wait for the session instead of holding
    # more audio for it.
    monkeypatch.setattr(turn_module, "MOTION_BACKLOG_MAX_BYTES", 2 * CHUNK)
    producer = await make_producer(at=slow_sim)
    clip = tone(0.4, freq=350.0)
    turn = await producer.open_turn("conv-bound")

    async def feed() -> None:
        for start in range(0, len(clip), CHUNK):
            await turn.send(clip[start : start + CHUNK])

    feeding = asyncio.create_task(feed())
    async with asyncio.timeout(5):
        while await audio_entries(redis_client, keys, "conv-bound") < 3:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the third chunk went over the bound: nothing more goes out
    assert await audio_entries(redis_client, keys, "conv-bound") == 3
    assert slow_sim.sim.stats.sessions_opened == 0 and not feeding.done()
    await feeding
    result = await turn.end()
    assert_complete(await stream_messages(redis_client, keys, "conv-bound"), result.turn_id, clip)


async def test_interrupt_while_the_session_opens_frees_the_slot(
    make_producer, redis_client, keys, slow_sim
):
    producer = await make_producer(at=slow_sim, max_sdk_sessions=1)
    turn = await producer.open_turn("conv-cut")
    assert await turn.send(tone(0.2))
    assert await producer.interrupt("conv-cut") == turn.turn_id
    result = await turn.end()
    assert result.status == wire.STATUS_INTERRUPTED
    assert_interrupted(await stream_messages(redis_client, keys, "conv-cut"), turn.turn_id)
    assert wire.FRAMES not in [m.kind for m in await stream_messages(redis_client, keys,
                                                                     "conv-cut")]
    assert await producer.session_room() == 1  # the half-open session gave its slot back
    assert producer.motion_sessions == 0


# --- first audio in the turn_start write ---------------------------------------------------------


@asynccontextmanager
async def live_pushes(client: redis.Redis, keys: Keys, conversation_id: str
                      ) -> AsyncIterator[Callable[[], Awaitable[list[wire.Message]]]]:
    """Subscribed to the conversation's live channel; yields a reader of the next push's entries
    (one push = one script call's appends)."""
    listener = Connection(**client.connection_pool.connection_kwargs)
    await listener.connect()
    await listener.send_command("SSUBSCRIBE", keys.live_channel(conversation_id))
    assert (await listener.read_response())[0] == b"ssubscribe"

    async def next_push() -> list[wire.Message]:
        kind, _, data = await asyncio.wait_for(listener.read_response(), 5)
        assert kind == b"smessage"
        head, _, body = data.partition(b"\n")
        fields = head.decode().split(" ")
        entries, offset = [], 0
        for entry_id, size in zip(fields[1::2], fields[2::2], strict=True):
            entries.append(wire.decode_server(wire.delivery(entry_id,
                                                            body[offset:offset + int(size)])))
            offset += int(size)
        return entries

    try:
        yield next_push
    finally:
        await listener.disconnect()


def lead_kinds(push: list[wire.Message]) -> list[tuple[str, object, object]]:
    return [(m.kind, m.get("seq"), m.get("end")) for m in push]


async def test_queued_clip_first_audio_is_written_with_its_start(
    queue, run_worker, redis_client, keys, sim
):
    """One fenced write carries turn_start and the clip's first 200 ms (5 chunks of 40 ms): the
    client's first sound waits for no append call of its own. The rest follows in order."""
    await run_worker()
    clip = tone(0.6, freq=270.0)
    async with live_pushes(redis_client, keys, "conv-lead") as next_push:
        turn_id = await queue.submit_clip("conv-lead", clip, sample_rate=RATE)
        first = await next_push()
    assert lead_kinds(first) == [(wire.TURN_START, None, None)] + [
        (wire.AUDIO, seq, False) for seq in range(5)]
    assert b"".join(m.get("data") for m in first[1:]) == clip[: 5 * CHUNK]
    assert_complete(await wait_turn_end(redis_client, keys, "conv-lead", turn_id), turn_id, clip)


async def test_a_clip_shorter_than_the_first_audio_ends_in_the_start_write(
    make_producer, redis_client, keys, sim
):
    producer = await make_producer()
    clip = tone(0.1, freq=310.0)  # 2.5 chunks: all of it goes with the start, the end marked
    async with live_pushes(redis_client, keys, "conv-short") as next_push:
        speaking = asyncio.create_task(producer.speak("conv-short", clip))
        first = await next_push()
        result = await speaking
    assert lead_kinds(first) == [(wire.TURN_START, None, None), (wire.AUDIO, 0, False),
                                 (wire.AUDIO, 1, False), (wire.AUDIO, 2, True)]
    assert result.status == wire.STATUS_COMPLETE and result.audio_bytes == len(clip)
    assert_complete(await stream_messages(redis_client, keys, "conv-short"), result.turn_id, clip)


async def test_streamed_turn_goes_on_after_its_first_audio(make_producer, redis_client, keys, sim):
    producer = await make_producer()
    clip = tone(0.4, freq=330.0)
    first = FirstAudio((clip[:CHUNK], clip[CHUNK : 2 * CHUNK]))
    async with live_pushes(redis_client, keys, "conv-streamed-lead") as next_push:
        turn = await producer.open_turn("conv-streamed-lead", first_audio=first)
        assert lead_kinds(await next_push()) == [(wire.TURN_START, None, None),
                                                 (wire.AUDIO, 0, False), (wire.AUDIO, 1, False)]
    for start in range(2 * CHUNK, len(clip), CHUNK):
        assert await turn.send(clip[start : start + CHUNK])
    result = await turn.end()
    assert result.status == wire.STATUS_COMPLETE and result.audio_bytes == len(clip)
    messages = await stream_messages(redis_client, keys, "conv-streamed-lead")
    mine = of_turn(messages, result.turn_id)
    audio = [m for m in mine if m.kind == wire.AUDIO]
    assert [m.get("seq") for m in audio] == list(range(len(audio)))
    assert b"".join(m.get("data") for m in audio) == clip
    assert audio[-1].get("end") and not audio[-1].get("data")  # a streamed turn's end marker
    frames = [m for m in mine if m.kind == wire.FRAMES]
    assert frames and frames[-1].get("last")


@pytest.mark.parametrize(("chunks", "error"), [
    ((), "at least one chunk"),
    ((b"odd",), "even number of bytes"),
    (tuple(b"\0\0" for _ in range(33)), "at most 32 chunks"),
])
def test_first_audio_refuses_what_one_append_could_not_take(chunks, error):
    with pytest.raises(ValueError, match=error):
        FirstAudio(chunks)


async def test_open_turn_refuses_first_audio_for_a_continued_attempt(make_producer):
    producer = await make_producer()
    delivered = Delivered(start_id="1-0", next_seq=1, audio_bytes=2)
    with pytest.raises(ValueError, match="continued"):
        await producer.open_turn("conv-continued", first_audio=FirstAudio((b"\0\0",)),
                                 attempt=Attempt(epoch=2, delivered=delivered))


# --- through the job queue -----------------------------------------------------------------------


async def test_queued_first_turn_audio_before_the_session(
    queue, run_worker, redis_client, keys, slow_sim
):
    await run_worker(at=slow_sim)
    clip = tone(0.6, freq=260.0)
    turn_id = await queue.submit_clip("conv-queued-early", clip, sample_rate=RATE)
    async with asyncio.timeout(5):
        while not await audio_entries(redis_client, keys, "conv-queued-early"):
            await asyncio.sleep(0.005)
    assert slow_sim.sim.stats.sessions_opened == 0
    messages = await wait_turn_end(redis_client, keys, "conv-queued-early", turn_id)
    assert_complete(messages, turn_id, clip)


@pytest.mark.parametrize("open_at_submit", [True, False])
async def test_short_chunks_cap_the_first_write_at_one_append(
    settings, redis_client, keys, run_worker, open_at_submit
):
    """At 5 ms chunks 200 ms would be 40 chunks, more than one append call takes: the first
    write (the submit's or the worker's) carries 32, and the rest of the clip follows."""
    chunk_settings = settings.with_overrides(chunk_ms=5, queue_open_at_submit=open_at_submit)
    queue = TurnQueue.from_settings(chunk_settings, redis_client)
    clip = tone(0.5, freq=290.0)
    if not open_at_submit:
        await run_worker(chunk_ms=5)
    async with live_pushes(redis_client, keys, "conv-5ms") as next_push:
        turn_id = await queue.submit_clip("conv-5ms", clip, sample_rate=RATE)
        first = await next_push()
    size = chunk_size(RATE, 5)
    assert lead_kinds(first) == [(wire.TURN_START, None, None)] + [
        (wire.AUDIO, seq, False) for seq in range(AUDIO_BATCH_MAX)]
    assert b"".join(m.get("data") for m in first[1:]) == clip[: AUDIO_BATCH_MAX * size]
    if open_at_submit:
        await run_worker(chunk_ms=5)
    messages = await wait_turn_end(redis_client, keys, "conv-5ms", turn_id)
    assert_complete(messages, turn_id, clip)


# --- session tokens fetched ahead -----------------------------------------------------------------


async def test_sessions_use_stocked_tokens_once_each(make_producer, redis_client, keys, sim):
    producer = await make_producer(sdk_token_stock=2)

    async def stocked() -> bool:
        return sim.sim.stats.tokens_issued == 2  # fetched at start, before any turn

    await eventually(stocked, timeout_s=5, what="the token stock filled")
    results = [await producer.speak(f"conv-token-{n}", tone(0.2, freq=200.0 + 40 * n))
               for n in range(4)]
    assert [r.status for r in results] == [wire.STATUS_COMPLETE] * 4
    stats = sim.sim.stats
    assert stats.sessions_opened == 4
    assert stats.token_reuses == 0  # the docs call tokens single-use: none backed two sessions

    async def refilled() -> bool:
        return stats.tokens_issued == 4 + 2  # one per session, and the stock topped up again

    await eventually(refilled, timeout_s=5, what="the token stock refilled")
    await asyncio.sleep(0.3)
    assert stats.tokens_issued == 6  # no session fetched a token of its own


async def test_without_a_stock_each_session_fetches_its_own(make_producer, sim):
    producer = await make_producer(sdk_token_stock=0)
    for n in range(2):
        assert (await producer.speak(f"conv-own-{n}", tone(0.2))).status == wire.STATUS_COMPLETE
    assert sim.sim.stats.tokens_issued == 2 and sim.sim.stats.token_reuses == 0


async def test_session_opens_for_a_turn_still_waiting_for_audio(make_producer, redis_client,
                                                                 keys, sim):
    # The open waits for the first audio (of this turn and of the producer's other turns) only
    # for MOTION_OPEN_GRACE_S; a turn whose TTS is slow gets its session meanwhile, and another
    # turn that never sends audio does not hold the open back either.
    producer = await make_producer()
    idle = await producer.open_turn("conv-no-audio-yet")
    waiting = await producer.open_turn("conv-slow-tts")

    async def opened() -> bool:
        return sim.sim.stats.sessions_opened == 2

    await eventually(opened, timeout_s=5, what="both sessions opened before any audio")
    clip = tone(0.3, freq=410.0)
    assert await waiting.send(clip)
    result = await waiting.end()
    assert_complete(await stream_messages(redis_client, keys, "conv-slow-tts"), result.turn_id,
                    clip)
    await idle.abort()
