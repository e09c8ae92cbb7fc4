"""The simulator's Prometheus metrics, read from its ``SimStats`` at scrape time.

The simulator already counts everything in ``SimStats`` (also served as JSON at ``/_sim/stats``);
a custom collector turns those counters into metric families when Prometheus asks, so the
simulator's hot path gains no second set of counters to keep in step.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.dev.motion_sim.sim import SIM_KEY, SimStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REGISTRY_KEY = web.AppKey("sim_registry", CollectorRegistry)

# SimStats field -> (metric name without _total, help); counters only ever grow.
_COUNTERS = {
    "tokens_issued": ("relay_sim_session_tokens_issued", "Session tokens the console issued."),
    "sessions_opened": ("relay_sim_sessions_opened", "Ingress sessions that completed the "
                        "handshake."),
    "audio_bytes": ("relay_sim_audio_received_bytes", "PCM audio bytes received."),
    "keyframes_sent": ("relay_sim_keyframes_sent", "Animation keyframes sent."),
    "messages_sent": ("relay_sim_messages_sent", "Animation messages sent."),
    "requests_ended": ("relay_sim_requests_ended", "Requests whose animation ended."),
    "interrupts": ("relay_sim_interrupts", "Interrupts received."),
    "faults_fired": ("relay_sim_faults_fired", "Injected faults that fired."),
}
_GAUGES = {
    "sessions_open": ("relay_sim_sessions_open", "Ingress sessions open now."),
    "sessions_peak": ("relay_sim_sessions_peak", "Most ingress sessions open at once."),
}


class _StatsCollector(Collector):
    def __init__(self, stats: SimStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        for field, (name, text) in _COUNTERS.items():
            yield CounterMetricFamily(name, text, value=getattr(self._stats, field))
        for field, (name, text) in _GAUGES.items():
            yield GaugeMetricFamily(name, text, value=getattr(self._stats, field))


def install(app: web.Application) -> None:
    """Serve ``GET /metrics`` for the simulator of ``app`` (its own registry)."""
    registry = CollectorRegistry()
    registry.register(_StatsCollector(app[SIM_KEY].stats))
    app[REGISTRY_KEY] = registry
    app.router.add_get("/metrics", _metrics)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[REGISTRY_KEY]),
                        headers={"Content-Type": CONTENT_TYPE})
