"""What an operator sees, on the real role processes (``python -m relay``): every role's /metrics
parsed with prometheus_client's parser and moving with traffic, a slow client's disconnect in the
metrics and the logs, the dashboard and alert rules querying only metrics that exist, and every
line each role wrote parsing as JSON."""

from __future__ import annotations

import asyncio
import json
import re
from importlib import metadata
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import wire
from relay.client import RelayClient
from relay.dev.demo import speech_like_pcm
from relay.dev.stack import LocalStack, child_env
from relay.streams import ConversationLog
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import Listener, RawWebSocket

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
_METRIC_NAME = re.compile(r"\brelay_[a-z_]+\b")


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200, url
        text = await response.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(figures, name: str, **labels: str) -> float:
    return figures.get((name, frozenset(labels.items())), 0.0)


def queried_metrics() -> set[str]:
    """Every relay_* name the dashboard and the alert rules query."""
    dashboard = json.loads((ROOT / "deploy/grafana/relay-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    rules = (ROOT / "deploy/prometheus/relay-alerts.yml").read_text()
    return {name for text in [*exprs, rules] for name in _METRIC_NAME.findall(text)}


async def flood(log: ConversationLog, conv: str, turn: str, entries: int, size: int) -> None:
    await log.open_turn(conv, turn, sample_rate=16000, owner="flood")
    chunk = b"\x01" * size
    for start in range(0, entries, 200):
        await log.append(conv, turn, *[wire.audio(turn, seq, chunk, end=False)
                                       for seq in range(start, min(start + 200, entries))])
    await log.end_turn(conv, turn, status=wire.STATUS_COMPLETE)


async def test_every_role_reports_traffic_slow_clients_and_logs_only_json(
        settings, redis_client, keys, queue, tmp_path) -> None:
    env = child_env(settings, settings.redis_url, TEST_SECRET)
    env.update({"RELAY_CLIENT_QUEUE_MESSAGES": "256", "RELAY_CLIENT_QUEUE_BYTES": str(512 * 1024),
                "RELAY_MAX_SDK_SESSIONS": "4"})
    log_dir = tmp_path / "logs"
    stack = LocalStack(env, log_dir)
    try:
        await stack.start_sim()
        await stack.start_producer("producer-1")
        _, edge_url = await stack.start_edge("edge-1")
        urls = stack.metrics_urls
        before = await scrape(urls["producer-1"])
        assert value(before, "relay_producer_sdk_session_slots_cap") == 4

        # One real turn through producer, simulator and edge.
        conv = "obs-conv"
        listener = Listener(RelayClient(edge_url, conv, mint_token(TEST_SECRET, conv, ttl_s=300)))
        await listener.joined()
        await queue.submit_clip(conv, speech_like_pcm(1.0, 16000, seed=1), sample_rate=16000)
        got = await listener.wait_for(lambda ms: any(m.kind == "turn_end" for m in ms), 60)
        audio = sum(1 for m in got if m.kind == "audio")

        edge = await scrape(urls["edge-1"])
        assert value(edge, "relay_edge_clients") == 1
        assert value(edge, "relay_edge_joins_total", start="live") == 1
        assert value(edge, "relay_edge_messages_delivered_total", kind="audio",
                     source="live") == audio
        assert value(edge, "relay_edge_messages_delivered_total", kind="turn_end",
                     source="live") == 1
        assert value(edge, "relay_edge_delivery_lag_seconds_count") >= 1
        producer = await scrape(urls["producer-1"])
        assert value(producer, "relay_producer_turns_total", outcome="complete") == 1
        assert value(producer, "relay_producer_turn_duration_seconds_count",
                     outcome="complete") == 1
        # The turn's first audio reached the Motion Server once, after its start.
        assert value(producer, "relay_producer_motion_start_seconds_count") == 1
        assert value(producer, "relay_producer_motion_start_seconds_sum") > 0
        assert value(producer, "relay_producer_concurrency") == settings.producer_concurrency
        assert ("relay_producer_doorbells_pending", frozenset()) in producer
        assert value(producer, "relay_producer_metrics_sample_errors_total") == 0
        # Which release each process runs: one constant sample per process, labels bounded.
        for figures, role in ((edge, "edge"), (producer, "producer")):
            builds = [dict(labels) for (name, labels), v in figures.items()
                      if name == "relay_build_info" and v == 1]
            assert len(builds) == 1 and builds[0]["role"] == role
            assert builds[0]["version"] == metadata.version("avatar-relay")
        assert builds[0]["spatius"] == metadata.version("spatius")
        sim = await scrape(urls["motion-sim"])
        assert value(sim, "relay_sim_sessions_opened_total") >= 1
        assert value(sim, "relay_sim_audio_received_bytes_total") > 0

        # A client that stops reading while a burst arrives is cut off with 4429; it shows in
        # the edge's metrics and in its log with code, reason, conversation and peer.
        slow_conv = "obs-slow"
        token = mint_token(TEST_SECRET, slow_conv, ttl_s=300)
        slow = await RawWebSocket.connect(
            f"{edge_url}/v1/conversations/{slow_conv}/ws?token={token}")
        log = ConversationLog(redis_client, keys, maxlen=100_000, ttl_s=300)
        await flood(log, slow_conv, "t-flood", entries=4000, size=1280)
        for _ in range(200):
            edge = await scrape(urls["edge-1"])
            if value(edge, "relay_edge_disconnects_total", code="4429"):
                break
            await asyncio.sleep(0.05)
        slow.close()  # and the client dies
        assert value(edge, "relay_edge_disconnects_total", code="4429") == 1

        # The dashboard and the alert rules query nothing that the roles do not export.
        exported = {name for scraped in (edge, producer, sim) for name, _ in scraped}
        queried = queried_metrics()
        assert len(queried) > 30
        assert sorted(queried - exported) == []
        # ...and every metric a role exports is documented (docs/operations.md, Metrics).
        docs = (ROOT / "docs/operations.md").read_text()
        families = {re.sub(r"_(total|bucket|count|sum|created)$", "", name) for name in exported}
        assert sorted(f for f in families if f not in docs) == []
        await listener.close()
    finally:
        await stack.stop()

    lines = {path.name: path.read_text().splitlines() for path in sorted(log_dir.glob("*.log"))}
    assert set(lines) == {"motion-sim.log", "producer-1.log", "edge-1.log"}
    for name, text in lines.items():
        assert text, name
        for line in text:
            assert isinstance(json.loads(line), dict), f"{name}: {line[:200]}"
    left = [json.loads(line) for line in lines["edge-1.log"]
            if '"client_left"' in line and slow_conv in line]
    assert len(left) == 1
    assert left[0]["code"] == 4429 and left[0]["reason"] == "slow_consumer"
    assert left[0]["peer"] == "127.0.0.1"
