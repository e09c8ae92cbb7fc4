"""The producer side against Redis faults, in-process: a Valkey of its own that the tests restart
(with AOF: nothing lost), flush (everything lost) or stop, while a real worker speaks turns
through the simulator.

Each test reproduces one fault deterministically and checks that the worker comes back: turns
finish, the conversation takes its next turn, nothing stays locked, the worker reads the jobs
group again and says when it cannot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis
from redis.exceptions import RedisError
from structlog.testing import capture_logs

from relay.dev.embedded import EmbeddedServer
from relay.keys import Keys
from relay.streams import read_turn
from tests.helpers.jobs import assert_played_once
from tests.helpers.producer import RATE, of_turn, tone, wait_turn_end
from workers.queue.submit import TurnQueue
from workers.speech.leases import SessionLeases

FAST_CLAIM = {"job_claim_idle_s": 1.0, "conversation_lease_s": 3.0, "jobs_block_ms": 200}


class RestartableValkey:
    """A Valkey whose data directory outlives its process: ``restart`` keeps the data (AOF,
    fsync on every write), ``restart(empty=True)`` comes back with nothing."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir
        self.server = EmbeddedServer(extra_args=self._args())

    def _args(self) -> list[str]:
        return ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self._dir)]

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def restart(self, *, empty: bool = False, down_s: float = 0.0) -> None:
        self.server.stop()
        if empty:
            for path in self._dir.iterdir():
                if path.is_dir():
                    for inner in path.iterdir():
                        inner.unlink()
                    path.rmdir()
                else:
                    path.unlink()
        if down_s:
            time.sleep(down_s)
        self.server.start()

    async def restart_async(self, *, empty: bool = False, down_s: float = 0.0) -> None:
        """``restart`` off the event loop: the clients see Redis gone for ``down_s``, longer than
        their own retries (3, backing off from 50 ms) cover."""
        await asyncio.to_thread(self.restart, empty=empty, down_s=down_s)


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableValkey]:
    server = RestartableValkey(tmp_path_factory.mktemp("valkey-aof"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_url(valkey: RestartableValkey) -> str:  # the suite's fixtures use this server
    return valkey.url


async def until(predicate, timeout_s: float = 10.0, every_s: float = 0.05) -> None:
    """Poll an async predicate through Redis faults (errors count as not yet)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                if await predicate():
                    return
            except (RedisError, OSError):
                pass
            await asyncio.sleep(every_s)


async def retrying(step, timeout_s: float = 10.0):
    """Run a client-side step (a feeder's write), retrying while Redis is coming back."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                return await step()
            except (RedisError, OSError):
                await asyncio.sleep(0.05)


async def turn_active(client: redis.Redis, keys: Keys, conv: str, turn_id: str) -> bool:
    state = await read_turn(client, keys, conv)
    return state is not None and state.turn_id == turn_id and state.status == "active"


async def test_redis_restart_while_a_streamed_turn_waits_for_input(
        valkey, queue: TurnQueue, run_worker, redis_client, keys):
    # The reproduction of the stalled conversations: the worker's pump is blocked reading the
    # turn's input when Redis restarts. The turn must let go of its lock, lease and session, be
    # retried, play once; and the conversation must take its next turn.
    worker = await run_worker(turn_input_timeout_s=10, **FAST_CLAIM)
    conv = "conv-restart-pump"
    clip = tone(0.8)
    feed = await queue.open_streamed(conv, sample_rate=RATE)
    await feed.send(clip[:6400])
    await until(lambda: turn_active(redis_client, keys, conv, feed.turn_id))
    await asyncio.sleep(0.3)  # the pump sent what came and blocks in its next input read
    await valkey.restart_async(down_s=1.5)
    for start in range(6400, len(clip), 3200):
        await retrying(lambda s=start: feed.send(clip[s:s + 3200]))
    await retrying(feed.end)
    messages = await wait_turn_end(redis_client, keys, conv, feed.turn_id, timeout_s=20)
    assert_played_once(of_turn(messages, feed.turn_id), clip)

    after = tone(0.3, freq=400.0)  # the conversation is not stalled
    turn_id = await queue.submit_clip(conv, after, sample_rate=RATE)
    messages = await wait_turn_end(redis_client, keys, conv, turn_id, timeout_s=15)
    assert_played_once(of_turn(messages, turn_id), after)
    await until(lambda: _idle(worker))


async def _idle(worker) -> bool:
    producer = worker._producer
    return (worker.running_turns == 0 and producer.active_turns == 0
            and not producer._locks._locks)


async def test_worker_takes_work_again_after_redis_comes_back_empty(
        valkey, queue: TurnQueue, run_worker, redis_client, keys):
    # With a claim idle below the backoff cap the reclaim (XAUTOCLAIM) is due on every round;
    # when it failed with NOGROUP the read that recreated the group was never reached.
    worker = await run_worker(**{**FAST_CLAIM, "job_claim_idle_s": 0.5})
    first = tone(0.2)
    turn_id = await queue.submit_clip("conv-empty-a", first, sample_rate=RATE)
    await wait_turn_end(redis_client, keys, "conv-empty-a", turn_id)
    with capture_logs() as logs:
        valkey.restart(empty=True)
        await until(lambda: _blocked_cleared(worker), timeout_s=10)
        clip = tone(0.3, freq=330.0)
        turn_id = await retrying(lambda: queue.submit_clip("conv-empty-b", clip,
                                                           sample_rate=RATE))
        messages = await wait_turn_end(redis_client, keys, "conv-empty-b", turn_id)
    assert_played_once(of_turn(messages, turn_id), clip)
    assert any(e["event"] == "jobs_group_missing_recreating" for e in logs)


async def _blocked_cleared(worker) -> bool:
    return worker.blocked() is None


async def test_readiness_follows_the_job_loop(valkey, run_worker):
    worker = await run_worker(**FAST_CLAIM)
    await until(lambda: _blocked_cleared(worker))
    valkey.stop()
    try:
        await until(lambda: _blocked(worker), timeout_s=10)
    finally:
        valkey.start()
    await until(lambda: _blocked_cleared(worker), timeout_s=15)


async def _blocked(worker) -> bool:
    return worker.blocked() is not None


async def test_hand_back_of_a_streamed_turn_is_not_a_failed_attempt(
        queue: TurnQueue, run_worker, redis_client, keys):
    worker = await run_worker(turn_input_timeout_s=30, **FAST_CLAIM)
    conv = "conv-handback"
    clip = tone(2.0)
    feed = await queue.open_streamed(conv, sample_rate=RATE)
    await feed.send(clip[:6400])
    await until(lambda: turn_active(redis_client, keys, conv, feed.turn_id))
    feeding = asyncio.create_task(_feed_slowly(feed, clip[6400:38400]))
    with capture_logs() as logs:
        await worker.stop(timeout_s=0.2)  # audio keeps arriving while the turn is abandoned
    assert not feeding.done()
    await feeding
    events = [e["event"] for e in logs]
    assert "job_attempt_failed" not in events
    assert "conversation_handed_back" in events
    state = await redis_client.hget(keys.queue_state(conv), f"a:{feed.turn_id}")
    assert state == b"0"  # the hand-back uncounted the attempt

    await run_worker(**FAST_CLAIM)
    await feed.send(clip[38400:])
    await feed.end()
    messages = await wait_turn_end(redis_client, keys, conv, feed.turn_id)
    assert_played_once(of_turn(messages, feed.turn_id), clip)


async def _feed_slowly(feed, pcm: bytes) -> None:
    for start in range(0, len(pcm), 640):
        await feed.send(pcm[start:start + 640])
        await asyncio.sleep(0.01)


async def test_no_conversation_lost_in_a_fault_free_run(queue: TurnQueue, run_worker,
                                                        redis_client, keys):
    # The heartbeat lands right after each runner released its lease (the queue was empty) and
    # before it acknowledged its doorbell: a runner letting go of a conversation it finished
    # must never be reported (or stopped) as having lost it.
    worker = await run_worker(conversation_lease_s=3.0, jobs_block_ms=100)
    store = worker._store
    release = store.release_if_empty
    beats = 0

    async def release_then_beat(*args, **kwargs):
        nonlocal beats
        released = await release(*args, **kwargs)
        await worker.heartbeat()
        beats += 1
        return released

    store.release_if_empty = release_then_beat
    with capture_logs() as logs:
        for n in range(4):
            clip = tone(0.05, freq=200.0 + 10 * n)
            turn_id = await queue.submit_clip("conv-race", clip, sample_rate=RATE)
            messages = await wait_turn_end(redis_client, keys, "conv-race", turn_id)
            assert_played_once(of_turn(messages, turn_id), clip)
            await until(lambda: _idle(worker))  # the runner let go of the conversation
    events = [e["event"] for e in logs]
    assert beats >= 4
    assert "conversation_lost" not in events


async def test_a_producer_that_cannot_renew_closes_its_sessions_before_its_lease_ends(
        valkey, make_producer, sim, redis_client, keys):
    # Redis out of reach (a partition; here: stopped): the producer cannot renew its session
    # lease, so it must close the session itself before the slot could go to anyone else.
    lease_s = 1.5
    producer = await make_producer(sdk_lease_s=lease_s, session_idle_s=60.0)
    await producer.speak("conv-fence", tone(0.2))  # the session stays open for the next turn
    assert sim.sim.stats.sessions_open == 1
    loop = asyncio.get_running_loop()
    with capture_logs() as logs:
        valkey.stop()
        stopped = loop.time()
        try:
            await until(lambda: _no_sessions(sim), timeout_s=10)
            took = loop.time() - stopped
        finally:
            valkey.start()
    assert any(e["event"] == "sdk_lease_fenced" for e in logs)
    print(f"session closed {took:.2f}s after Redis went away (lease {lease_s}s)")
    assert took < lease_s  # the last renewal came at most a third of a lease before the stop
    assert producer.motion_sessions == 0


async def _no_sessions(sim) -> bool:
    return sim.sim.stats.sessions_open == 0


async def test_the_slots_of_a_producer_that_may_be_paused_stay_counted(redis_client, keys):
    # A producer still connected to Redis (subscribed to its alive channel) that stops renewing
    # may be frozen with its Motion Server sessions open: its slot must not be handed out when
    # its lease expires, only once its process is gone (or after the hold).
    def leases(owner: str, wait_s: float) -> SessionLeases:
        return SessionLeases(redis_client, keys, cap=1, lease_s=0.3, wait_s=wait_s, owner=owner,
                             hold_s=30.0)

    alive = redis_client.pubsub()
    await alive.subscribe(keys.producer_alive("frozen"))
    try:
        assert await leases("frozen", 0).acquire() is not None  # and never renewed
        assert await leases("other", 1.0).acquire() is None  # expired, still counted
    finally:
        await alive.aclose()  # the frozen process dies: its connections close with it
    assert await leases("other", 1.0).acquire() is not None
