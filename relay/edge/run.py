"""Run one edge process; on SIGTERM/SIGINT drain it: not ready, clients told to move, exit.

Drain order: /readyz answers 503 at once (load balancers stop sending new clients), after
``drain_delay_s`` the listening socket closes and every client gets close code 1012 (reconnect
elsewhere with last_id), and the process waits up to ``drain_timeout_s`` for them to go.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from aiohttp import web

from relay.edge.admission import EdgeRunner
from relay.edge.app import DRAINING, SESSIONS, create_app, runner_options
from relay.errors import ListenError
from relay.settings import Settings

log = structlog.get_logger(__name__)


async def serve_edge(settings: Settings) -> None:
    app = create_app(settings)
    runner = EdgeRunner(app, shutdown_timeout=settings.drain_timeout_s, handle_signals=False,
                           **runner_options(settings))
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, settings.edge_host, settings.edge_port).start()
        except OSError as exc:
            raise ListenError("edge", settings.edge_host, settings.edge_port,
                              "RELAY_EDGE_PORT or --port", exc) from exc
        # The bound port, which differs from the setting when it is 0 (any free port).
        log.info("edge_listening", host=settings.edge_host, port=runner.addresses[0][1])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        app[DRAINING].set()
        log.info("edge_draining", clients=len(app[SESSIONS]), delay_s=settings.drain_delay_s)
        await asyncio.sleep(settings.drain_delay_s)
    finally:
        await runner.cleanup()
    log.info("edge_stopped")


def run_edge(settings: Settings) -> None:
    asyncio.run(serve_edge(settings))
