"""The edge's /metrics on a real socket: parsed with prometheus_client's own text parser, figures
moving as a real client joins, receives a turn, resumes, is refused and leaves."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import wire
from relay.client import RelayClient
from relay.edge.metrics import entry_kind
from relay.streams import ConversationLog
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import collect, running_edge


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(figures, name: str, **labels: str) -> float:
    return figures.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(base: str) -> dict:
    url = base.replace("ws://", "http://") + "/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples(await response.text())


def test_entry_kind_reads_every_stored_kind_without_decoding() -> None:
    assert entry_kind(wire.audio("t", 3, b"x" * 900, end=False)) == "audio"
    assert entry_kind(wire.frames("t", 0, b"env", last=True)) == "frames"
    assert entry_kind(wire.turn_start("t", sample_rate=16000)) == "turn_start"
    assert entry_kind(wire.turn_end("t", status="complete")) == "turn_end"
    assert entry_kind(wire.interrupt("t", reason="x")) == "interrupt"
    assert entry_kind(wire.audio_only("t", reason="capacity")) == "audio_only"
    assert entry_kind(b"\x81\xa1k\xa1v") == "other"


async def test_edge_metrics_follow_clients_deliveries_resumes_and_refusals(
        settings, redis_client, keys) -> None:
    log = ConversationLog(redis_client, keys, maxlen=10_000, ttl_s=300)
    conv = "conv-metrics"
    token = mint_token(TEST_SECRET, conv, ttl_s=300)
    async with running_edge(settings, "edge-m") as base:
        before = await scrape(base)
        assert value(before, "relay_edge_clients") == 0
        client = RelayClient(base, conv, token)
        task = asyncio.create_task(collect(client, lambda ms: ms and ms[-1].kind == "turn_end"))
        for _ in range(200):
            if client.welcomes:
                break
            await asyncio.sleep(0.01)
        joined = await scrape(base)
        assert value(joined, "relay_edge_clients") == 1
        assert value(joined, "relay_edge_conversations") == 1
        assert value(joined, "relay_edge_joins_total", start="live") == 1

        await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
        for seq in range(5):
            await log.append(conv, "t1", wire.audio("t1", seq, b"a" * 640, end=seq == 4))
        await log.append(conv, "t1", wire.frames("t1", 0, b"env", last=True))
        await log.end_turn(conv, "t1", status=wire.STATUS_COMPLETE)
        received = await task
        last_id = received[-1].id
        await client.close()

        for _ in range(100):  # the edge notices the close on its side
            after = await scrape(base)
            if value(after, "relay_edge_clients") == 0:
                break
            await asyncio.sleep(0.02)
        live = {"source": "live"}
        assert value(after, "relay_edge_messages_delivered_total", kind="audio", **live) == 5
        assert value(after, "relay_edge_messages_delivered_total", kind="frames", **live) == 1
        assert value(after, "relay_edge_messages_delivered_total", kind="turn_end", **live) == 1
        assert value(after, "relay_edge_bytes_delivered_total", kind="audio", **live) > 5 * 640
        assert value(after, "relay_edge_delivery_lag_seconds_count") >= 1
        assert value(after, "relay_edge_read_batch_entries_count") >= 1
        assert value(after, "relay_edge_disconnects_total", code="1000") == 1
        assert value(after, "relay_edge_read_loops_ready") == 1

        # A resume from the first entry gets the rest from history, and counts as recovered.
        first_id = received[0].id
        again = RelayClient(base, conv, token, last_id=first_id)
        replay = await collect(again, lambda ms: ms and ms[-1].id == last_id)
        await again.close()
        assert len(replay) == len(received) - 1
        resumed = await scrape(base)
        assert value(resumed, "relay_edge_resumes_total", outcome="recovered") == 1
        assert value(resumed, "relay_edge_joins_total", start="resume") == 1
        assert value(resumed, "relay_edge_messages_delivered_total", kind="audio",
                     source="history") == 5  # after turn_start

        url = f"{base}/v1/conversations/{conv}/ws?token=not-a-token"
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            await ws.receive()
            assert ws.close_code == wire.CloseCode.TOKEN_INVALID
        refused = await scrape(base)
        assert value(refused, "relay_edge_connections_refused_total", code="4401") == 1


async def test_refusals_before_the_upgrade_are_counted_by_http_status(settings) -> None:
    allowed = settings.with_overrides(edge_allowed_origins="https://app.example.com")
    async with running_edge(allowed, "edge-http-refusals") as url, \
            aiohttp.ClientSession() as http:
        before = await scrape(url)
        assert ("relay_edge_connections_refused_total", (("code", "403"),)) in before  # at 0
        ws_url = f"{url}/v1/conversations/c-h/ws?token={mint_token(TEST_SECRET, 'c-h')}"
        for _ in range(2):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(ws_url, origin="https://evil.example.com")
            assert refused.value.status == 403
        async with http.get(ws_url.replace("ws://", "http://")) as plain:  # no upgrade asked
            assert plain.status == 400
        after = await scrape(url)
    refused = {code: value(after, "relay_edge_connections_refused_total", code=code)
               - value(before, "relay_edge_connections_refused_total", code=code)
               for code in ("403", "400", "other")}
    assert refused == {"403": 2, "400": 1, "other": 0}
