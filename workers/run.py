"""``relay producer``: one producer process, from start-up to a bounded graceful stop.

The health server comes first (liveness from process start, readiness false until the job loop
runs); then the process waits for Redis as long as it takes, or until told to stop. The job loop
is the process's reason to live: if it ends on its own, the process logs why and exits non-zero
so the orchestrator replaces it.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from redis.exceptions import RedisError

from relay.errors import ListenError
from relay.redis_conn import RedisClient, client_for
from relay.settings import Settings
from workers.health import start_health_server
from workers.metrics import ProducerMetrics
from workers.queue.worker import ProducerWorker
from workers.speech.endpoints import MotionEndpoints
from workers.speech.producer import Producer

log = structlog.get_logger(__name__)

_REDIS_RETRY_MAX_S = 2.0


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
    jobs: list[asyncio.Task[None]] = []
    try:
        health = await start_health_server(
            settings, client, lambda: not stop.is_set(), metrics=metrics,
            job_loop_alive=lambda: bool(jobs) and not jobs[0].done())
    except OSError as exc:
        await client.aclose()
        raise ListenError("producer health server", settings.producer_health_host,
                          settings.producer_health_port, "RELAY_PRODUCER_HEALTH_PORT",
                          exc) from exc
    try:
        if not await _wait_for_redis(client, stop):
            return 0
        async with Producer(settings, client, metrics=metrics) as producer:
            worker = ProducerWorker(settings, client, producer)
            jobs.append(asyncio.create_task(worker.run(), name="jobs-loop"))
            return await _serve(worker, jobs[0], stop)
    finally:
        if health is not None:
            await health.cleanup()
        await client.aclose()
        log.info("producer_stopped")


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


async def _serve(worker: ProducerWorker, loop_task: asyncio.Task[None],
                 stop: asyncio.Event) -> int:
    stopper = asyncio.create_task(stop.wait(), name="stop-signal")
    await asyncio.wait({loop_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("producer_stopping", running_turns=worker.running_turns)
    await worker.stop()
    stopper.cancel()
    if loop_task.done() and not stop.is_set():
        # The loop ended on its own: a half-dead producer must not linger.
        error = None if loop_task.cancelled() else loop_task.exception()
        log.error("jobs_loop_ended_unexpectedly", error=repr(error), exc_info=error)
        return 1
    await loop_task
    return 0
