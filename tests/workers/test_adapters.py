"""arq, Celery and RQ run turns end to end: a real worker of each library takes the job, the
relay's producer speaks the turn, a client on an edge plays it once. Brokers are the test Redis."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
import redis as sync_redis

from relay import wire
from relay.client import RelayClient
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import Listener, running_edge
from tests.helpers.jobs import assert_played_once, split_turns
from tests.helpers.producer import (
    RATE,
    tone,
)
from workers.adapters.common import turn_id_for

WAIT_S = 20.0


@pytest.fixture
def relay_env(settings, monkeypatch):
    """The adapters read the relay's settings from the environment, like a deployed worker."""
    env = {"REDIS_URL": settings.redis_url, "RELAY_KEY_PREFIX": settings.key_prefix}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
async def listener(settings, run_worker):
    """A producer worker, an edge and a client of conversation ``conv-<system>``."""
    await run_worker()
    listeners = []

    async def listen(conversation_id: str) -> Listener:
        listener = Listener(RelayClient(url, conversation_id,
                                        mint_token(TEST_SECRET, conversation_id)))
        await listener.joined()
        listeners.append(listener)
        return listener

    async with running_edge(settings, "edge-adapters") as url:
        yield listen
        for item in listeners:
            await item.close()


def played(listener: Listener, turn_id: str, clip: bytes) -> None:
    turns = split_turns(listener.messages)
    assert list(turns) == [turn_id]
    assert_played_once(turns[turn_id], clip)


async def test_arq_job(settings, relay_env, listener):
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker

    from workers.adapters import arq_adapter

    client = await listener("conv-arq")
    redis_settings = RedisSettings.from_dsn(settings.redis_url)
    queue_name = f"{settings.key_prefix}:arq"
    pool = await create_pool(redis_settings, default_queue_name=queue_name)
    clip = tone(0.5)
    job = await pool.enqueue_job("speak_turn", "conv-arq", clip, RATE, wait_s=WAIT_S)
    worker = Worker(functions=[arq_adapter.speak_turn], on_startup=arq_adapter.startup,
                    on_shutdown=arq_adapter.shutdown, redis_settings=redis_settings,
                    queue_name=queue_name, burst=True, poll_delay=0.05, handle_signals=False)
    await worker.main()  # burst: returns once the job (which waits for the turn's end) is done
    await worker.close()
    outcome = await job.result(timeout=5)
    assert outcome == {"turn_id": turn_id_for("arq", job.job_id), "submitted": "queued",
                       "status": wire.STATUS_COMPLETE}
    await client.wait_for(lambda ms: any(m.kind == wire.TURN_END for m in ms))

    # The same job run again (arq retries a job whose worker died): nothing plays twice.
    ctx = {"job_id": job.job_id, "job_try": 2}
    await arq_adapter.startup(ctx)
    again = await arq_adapter.speak_turn(ctx, "conv-arq", clip, RATE, wait_s=WAIT_S)
    await arq_adapter.shutdown(ctx)
    assert again["submitted"] in ("already_done", "already_queued")
    await asyncio.sleep(0.3)
    await pool.aclose()
    played(client, outcome["turn_id"], clip)


async def test_celery_task(settings, relay_env, listener):
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    from workers.adapters.celery_adapter import register

    client = await listener("conv-celery")
    app = Celery("relay-test", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.task_default_queue = f"{settings.key_prefix}-celery"
    app.conf.broker_transport_options = {"visibility_timeout": 60}
    speak_turn = register(app)
    clip = tone(0.5, freq=300.0)
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=5):
        result = speak_turn.delay("conv-celery", clip, RATE, wait_s=WAIT_S)
        outcome = await asyncio.to_thread(result.get, timeout=WAIT_S + 10)
    assert outcome == {"turn_id": turn_id_for("celery", result.id), "submitted": "queued",
                       "status": wire.STATUS_COMPLETE}
    # The task delivered again under its id (a redelivery after a lost worker): nothing new plays.
    again = await asyncio.to_thread(speak_turn.apply, ("conv-celery", clip, RATE),
                                    task_id=result.id)
    assert again.get()["submitted"] in ("already_done", "already_queued")
    await asyncio.sleep(0.3)
    played(client, outcome["turn_id"], clip)


async def test_rq_job(settings, relay_env, listener):
    from rq import Queue

    from workers.adapters.rq_adapter import enqueue_turn

    client = await listener("conv-rq")
    connection = sync_redis.Redis.from_url(settings.redis_url)
    queue = Queue(f"{settings.key_prefix}-rq", connection=connection)
    clip = tone(0.5, freq=350.0)
    job = enqueue_turn(queue, "conv-rq", clip, RATE, wait_s=WAIT_S)
    rq = os.path.join(os.path.dirname(sys.executable), "rq")
    worker = await asyncio.create_subprocess_exec(
        rq, "worker", "--burst", "--url", settings.redis_url, queue.name,
        env={**os.environ, **relay_env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(worker.communicate(), WAIT_S + 20)
    assert worker.returncode == 0, output.decode()
    job.refresh()
    outcome = job.return_value()
    assert outcome == {"turn_id": turn_id_for("rq", job.id), "submitted": "queued",
                       "status": wire.STATUS_COMPLETE}, output.decode()[-2000:]
    played(client, outcome["turn_id"], clip)
    connection.close()
