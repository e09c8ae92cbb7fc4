"""Run one edge process until SIGINT/SIGTERM; clients are told to reconnect elsewhere (1012)."""

from __future__ import annotations

from aiohttp import web

from relay.edge.app import create_app
from relay.settings import Settings


def run_edge(settings: Settings) -> None:
    web.run_app(
        create_app(settings),
        host=settings.edge_host,
        port=settings.edge_port,
        access_log=None,
        shutdown_timeout=5.0,
        print=None,
    )
