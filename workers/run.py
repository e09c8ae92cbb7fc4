"""``relay producer``: one producer process, from start-up to a bounded graceful stop."""

from __future__ import annotations

import asyncio
import signal

import structlog

from relay.errors import ListenError
from relay.redis_conn import client_for, wait_until_ready
from relay.settings import Settings
from workers.health import start_health_server
from workers.queue.worker import ProducerWorker
from workers.speech.endpoints import MotionEndpoints
from workers.speech.producer import Producer

log = structlog.get_logger(__name__)


async def run_producer(settings: Settings) -> int:
    MotionEndpoints.from_settings(settings)  # fail fast on missing credentials or endpoints
    # Streamed turns each hold a connection for their blocking input read, plus the job read
    # and the control subscription.
    client = client_for(settings, block_ms=settings.jobs_block_ms,
                        max_connections=max(settings.redis_pool_size,
                                            2 * settings.producer_concurrency + 16))
    try:
        await wait_until_ready(client)
        async with Producer(settings, client) as producer:
            worker = ProducerWorker(settings, client, producer)
            stop = asyncio.Event()
            try:
                health = await start_health_server(settings, client, lambda: not stop.is_set())
            except OSError as exc:
                raise ListenError("producer health server", settings.producer_health_host,
                                  settings.producer_health_port, "RELAY_PRODUCER_HEALTH_PORT",
                                  exc) from exc
            loop_task = asyncio.create_task(worker.run(), name="jobs-loop")
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({loop_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            log.info("producer_stopping", running_turns=worker.running_turns)
            await worker.stop()
            stopper.cancel()
            if health is not None:
                await health.cleanup()
            if loop_task.done() and not stop.is_set():
                loop_task.result()  # the loop ended on its own: surface why
            else:
                await loop_task
    finally:
        await client.aclose()
    log.info("producer_stopped")
    return 0
