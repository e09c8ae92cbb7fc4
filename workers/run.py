"""``relay producer``: one producer process, from start-up to a bounded graceful stop.

The health server comes first (liveness from process start, readiness false until the job loop
runs); then the process waits for Redis as long as it takes, or until told to stop. The job loop
is the process's reason to live: if it ends on its own, the process logs why and exits non-zero
so the orchestrator replaces it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from contextlib import suppress

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from relay.errors import ListenError
from relay.redis_conn import RedisClient, client_for
from relay.settings import Settings
from workers.health import start_health_server
from workers.metrics import ProducerMetrics
from workers.queue.worker import HAND_BACK_S, ProducerWorker
from workers.speech.endpoints import MotionEndpoints
from workers.speech.producer import Producer

log = structlog.get_logger(__name__)

# A producer exits within RELAY_PRODUCER_STOP_S + STOP_MARGIN_S of SIGTERM whatever its turns
# are doing and whether Redis answers or not (docs/operations.md "Graceful stop"): the margin
# covers the hand-back (HAND_BACK_S) and closing sessions and leases.
STOP_MARGIN_S = HAND_BACK_S + 6.0  # then at most ~4 s to close sessions and leases
_CANCEL_GRACE_S = 2.0
_REDIS_RETRY_MAX_S = 2.0


class _Liveness:
    """What the health server reports before and after the worker exists."""

    def __init__(self) -> None:
        self.worker: ProducerWorker | None = None
        self.loop_task: asyncio.Task[None] | None = None

    def job_loop_alive(self) -> bool:
        return self.loop_task is not None and not self.loop_task.done()

    def blocked(self) -> str | None:
        return self.worker.blocked() if self.worker is not None else None


async def run_producer(settings: Settings) -> int:
    MotionEndpoints.from_settings(settings)  # fail fast on missing credentials or endpoints
    # Streamed turns each hold a connection for their blocking input read, plus the job read
    # and the control subscription.
    client = client_for(settings, block_ms=settings.jobs_block_ms,
                        max_connections=max(settings.redis_pool_size,
                                            2 * settings.producer_concurrency + 16))
    metrics = ProducerMetrics()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    state = _Liveness()
    health: web.AppRunner | None = None
    try:
        health = await _start_health(settings, client, stop, state, metrics)
        if not await _wait_for_redis(client, stop):
            return 0
        main = asyncio.create_task(_serve(settings, client, stop, state, metrics),
                                   name="producer-main")
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        stop.set()
        bound = settings.producer_stop_s + STOP_MARGIN_S
        done, _ = await asyncio.wait({main}, timeout=bound)
        if not done:
            log.error("producer_stop_bound_exceeded", bound_s=bound)
            main.cancel()
            done, _ = await asyncio.wait({main}, timeout=_CANCEL_GRACE_S)
            if not done:
                os._exit(1)  # something swallows cancellation: the bound is a promise
            await _drop_leftovers(1)
            return 1
        main.result()  # surface why it ended, if it failed
    finally:
        if health is not None:
            with suppress(Exception):
                await asyncio.wait_for(health.cleanup(), _CANCEL_GRACE_S)
        with suppress(Exception):
            await asyncio.wait_for(client.aclose(), _CANCEL_GRACE_S)
    log.info("producer_stopped")
    await _drop_leftovers(0)
    return 0


async def _drop_leftovers(code: int) -> None:
    """Tasks still running once the producer is closed (a hand-back shielded from cancellation,
    waiting on a Redis that does not answer) must not keep the process past its stop bound:
    they get a moment to end, then the process exits without them."""
    current = asyncio.current_task()
    rest = [task for task in asyncio.all_tasks() if task is not current]
    for task in rest:
        task.cancel()
    if not rest:
        return
    _, pending = await asyncio.wait(rest, timeout=_CANCEL_GRACE_S)
    if pending:
        log.warning("producer_exit_abandoned_tasks", tasks=len(pending))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


async def _start_health(settings: Settings, client: RedisClient, stop: asyncio.Event,
                        state: _Liveness, metrics: ProducerMetrics) -> web.AppRunner | None:
    try:
        return await start_health_server(settings, client, lambda: not stop.is_set(),
                                         state.blocked, job_loop_alive=state.job_loop_alive,
                                         metrics=metrics)
    except OSError as exc:
        raise ListenError("producer health server", settings.producer_health_host,
                          settings.producer_health_port, "RELAY_PRODUCER_HEALTH_PORT",
                          exc) from exc


async def _wait_for_redis(client: RedisClient, stop: asyncio.Event) -> bool:
    """PING until Redis answers (True) or the process is told to stop (False)."""
    delay = 0.05
    while not stop.is_set():
        try:
            await client.ping()
            return True
        except (RedisError, OSError) as exc:
            log.warning("redis_not_ready", error=str(exc), retry_in_s=round(delay, 2))
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            delay = min(delay * 2, _REDIS_RETRY_MAX_S)
    return False


async def _serve(settings: Settings, client: RedisClient, stop: asyncio.Event,
                 state: _Liveness, metrics: ProducerMetrics) -> None:
    async with Producer(settings, client, metrics=metrics) as producer:
        worker = ProducerWorker(settings, client, producer)
        state.worker = worker
        loop_task = asyncio.create_task(worker.run(), name="jobs-loop")
        state.loop_task = loop_task
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({loop_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        log.info("producer_stopping", running_turns=worker.running_turns)
        await worker.stop()
        if loop_task.done() and not stop.is_set():
            # The loop ended on its own: a half-dead producer must not linger (exit 1).
            error = None if loop_task.cancelled() else loop_task.exception()
            log.error("jobs_loop_ended_unexpectedly", error=repr(error))
            raise RuntimeError("the job loop ended on its own") from error
        loop_task.cancel()  # stop() waited for it within its bound; it writes nothing more
        with suppress(asyncio.CancelledError):
            await loop_task
