"""``relay producer``: one producer process, from start-up to a bounded graceful stop."""

from __future__ import annotations

import asyncio
import os
import signal
from contextlib import suppress

import structlog

from relay.errors import ListenError
from relay.redis_conn import RedisClient, client_for, wait_until_ready
from relay.settings import Settings
from workers.health import start_health_server
from workers.queue.worker import HAND_BACK_S, ProducerWorker
from workers.speech.endpoints import MotionEndpoints
from workers.speech.producer import Producer

log = structlog.get_logger(__name__)

# A producer exits within RELAY_PRODUCER_STOP_S + STOP_MARGIN_S of SIGTERM whatever its turns
# are doing and whether Redis answers or not (docs/operations.md "Graceful stop"): the margin
# covers the hand-back (HAND_BACK_S) and closing sessions and leases.
STOP_MARGIN_S = HAND_BACK_S + 5.0
_CANCEL_GRACE_S = 2.0


async def run_producer(settings: Settings) -> int:
    MotionEndpoints.from_settings(settings)  # fail fast on missing credentials or endpoints
    # Streamed turns each hold a connection for their blocking input read, plus the job read
    # and the control subscription.
    client = client_for(settings, block_ms=settings.jobs_block_ms,
                        max_connections=max(settings.redis_pool_size,
                                            2 * settings.producer_concurrency + 16))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await wait_until_ready(client)
        main = asyncio.create_task(_serve(settings, client, stop), name="producer-main")
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
            return 1
        main.result()  # surface why it ended, if it failed
    finally:
        with suppress(Exception):
            await asyncio.wait_for(client.aclose(), _CANCEL_GRACE_S)
    log.info("producer_stopped")
    return 0


async def _serve(settings: Settings, client: RedisClient, stop: asyncio.Event) -> None:
    async with Producer(settings, client) as producer:
        worker = ProducerWorker(settings, client, producer)
        try:
            health = await start_health_server(settings, client, lambda: not stop.is_set(),
                                               worker.blocked)
        except OSError as exc:
            raise ListenError("producer health server", settings.producer_health_host,
                              settings.producer_health_port, "RELAY_PRODUCER_HEALTH_PORT",
                              exc) from exc
        loop_task = asyncio.create_task(worker.run(), name="jobs-loop")
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({loop_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        log.info("producer_stopping", running_turns=worker.running_turns)
        await worker.stop()
        if health is not None:
            await health.cleanup()
        if loop_task.done() and not stop.is_set():
            loop_task.result()  # the loop ended on its own: surface why
        else:
            loop_task.cancel()  # stop() waited for it within its bound; it writes nothing more
            with suppress(asyncio.CancelledError):
                await loop_task
