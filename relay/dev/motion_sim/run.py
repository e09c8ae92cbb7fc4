"""``relay motion-sim``: the simulator as its own process, configured from Settings."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from relay.dev.motion_sim.server import SimConfig, run_forever
from relay.settings import Settings


def sim_config(settings: Settings) -> SimConfig:
    return SimConfig(
        max_concurrent_sessions=settings.sim_max_sessions,
        batch_keyframes=settings.sim_batch_keyframes,
        realtime=settings.sim_realtime,
        first_batch_delay_ms=settings.sim_first_batch_delay_ms,
        handshake_delay_ms=settings.sim_handshake_delay_ms,
    )


async def run_sim(settings: Settings) -> int:
    serving = run_forever(sim_config(settings), settings.sim_host, settings.sim_port)
    task = asyncio.create_task(serving)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return 0
