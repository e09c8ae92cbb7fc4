"""A protocol-faithful local stand-in for the Spatius Motion Server, for the unmodified SDK.

Point the SDK at it with explicit endpoints (which skips region bootstrap):
``console_endpoint_url=http://HOST:PORT/v1/console`` and
``ingress_endpoint_url=ws://HOST:PORT/v2/driveningress``.

Endpoints, each documented in the module that serves it
  ``POST /v1/console/session-tokens``                 ``console``
  ``GET /v2/driveningress/websocket?id=<avatar_id>``  ``ingress`` (handshake) and ``session``
  ``POST|GET|DELETE /_sim/faults``, ``GET /_sim/stats``  ``control``; fault rules in ``faults``
  ``GET /_sim/first-batches``                         ``control``
  ``GET /metrics``                                    ``metrics`` (Prometheus)

Deliberate simplifications: PCM only (Ogg Opus is refused), session tokens are reusable until they
expire (the SDK's prewarm cache relies on that), and a request id that ended, failed or was
interrupted is never reopened (its late audio is ignored).

This module wires the application and runs it. The names it re-exports were defined here before
the simulator was split into modules, and callers still import them from here.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from relay.dev.motion_sim.console import MAX_TOKEN_TTL_S, handle_session_token
from relay.dev.motion_sim.control import (
    handle_add_faults,
    handle_clear_faults,
    handle_first_batches,
    handle_list_faults,
    handle_stats,
)
from relay.dev.motion_sim.faults import FaultKind, FaultRule
from relay.dev.motion_sim.ingress import HANDSHAKE_TIMEOUT_S, SAMPLE_RATES, handle_ingress
from relay.dev.motion_sim.messages import MAX_CLOSE_REASON_BYTES, new_id
from relay.dev.motion_sim.metrics import install as install_metrics
from relay.dev.motion_sim.session import (
    MAX_ACTIVE_REQUESTS,
    MAX_PENDING_KEYFRAMES,
    OUTBOUND_QUEUE_SIZE,
    RETIRED_REQUEST_IDS,
)
from relay.dev.motion_sim.sim import SIM_KEY, MotionSim, SimConfig, SimStats
from relay.errors import ListenError

__all__ = [
    "HANDSHAKE_TIMEOUT_S",
    "MAX_ACTIVE_REQUESTS",
    "MAX_CLOSE_REASON_BYTES",
    "MAX_PENDING_KEYFRAMES",
    "MAX_TOKEN_TTL_S",
    "OUTBOUND_QUEUE_SIZE",
    "RETIRED_REQUEST_IDS",
    "SAMPLE_RATES",
    "SIM_KEY",
    "FaultKind",
    "FaultRule",
    "MotionSim",
    "SimConfig",
    "SimStats",
    "bound_port",
    "create_app",
    "handle_add_faults",
    "handle_clear_faults",
    "handle_ingress",
    "handle_list_faults",
    "handle_session_token",
    "handle_stats",
    "new_id",
    "run_forever",
    "serve",
]

log = structlog.get_logger(__name__)


def create_app(config: SimConfig) -> web.Application:
    app = web.Application()
    app[SIM_KEY] = MotionSim(config)
    app.router.add_post("/v1/console/session-tokens", handle_session_token)
    app.router.add_get("/v2/driveningress/websocket", handle_ingress)
    app.router.add_post("/_sim/faults", handle_add_faults)
    app.router.add_get("/_sim/faults", handle_list_faults)
    app.router.add_delete("/_sim/faults", handle_clear_faults)
    app.router.add_get("/_sim/stats", handle_stats)
    app.router.add_get("/_sim/first-batches", handle_first_batches)
    install_metrics(app)  # GET /metrics
    app.on_shutdown.append(_close_sockets)
    return app


async def _close_sockets(app: web.Application) -> None:
    await app[SIM_KEY].close_all()


async def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> web.AppRunner:
    """Start the simulator; port 0 binds a free port (see ``bound_port``). Call ``cleanup()``."""
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError("motion server simulator", host, port, "RELAY_SIM_PORT or --port",
                          exc) from exc
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port a runner from ``serve`` listens on."""
    port: int = runner.addresses[0][1]
    return port


async def run_forever(config: SimConfig, host: str, port: int) -> None:
    """Serve until cancelled, then shut down cleanly."""
    runner = await serve(config, host, port)
    log.info("motion server simulator listening", host=host, port=bound_port(runner))
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
