"""Health that tells the truth: an edge on a Redis Cluster whose nodes all die for a few seconds
stays alive, says it is not ready while they are gone, and recovers by itself (its hub handles
the outage; the supervisor never has to restart it)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import wire
from relay.client import RelayClient
from relay.dev.embedded import EmbeddedCluster
from relay.redis_conn import client_for
from relay.streams import ConversationLog
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import Listener, running_edge

pytestmark = pytest.mark.slow


async def status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as response:
        return response.status


async def metric(http: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


async def until_status(http: aiohttp.ClientSession, url: str, wanted: int,
                       timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await status(http, url) != wanted:
        assert loop.time() < deadline, f"{url} never answered {wanted}"
        await asyncio.sleep(0.2)


async def test_edge_recovers_when_every_cluster_node_dies_for_seconds(settings) -> None:
    with EmbeddedCluster(masters=3) as cluster:
        local = settings.with_overrides(redis_url=cluster.url, redis_cluster=True,
                                        redis_unavailable_s=1.0)  # rediscovery after 1 s
        writer = client_for(local)
        log = ConversationLog(writer, local_keys(local), maxlen=1000, ttl_s=300)
        conv = "outage-conv"
        async with running_edge(local, "edge-outage") as url, aiohttp.ClientSession() as http:
            base = url.replace("ws://", "http://")
            await until_status(http, f"{base}/readyz", 200, 20)
            listener = Listener(RelayClient(url, conv, mint_token(TEST_SECRET, conv, ttl_s=300),
                                            max_backoff_s=0.2))
            await listener.joined()
            await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
            await log.append(conv, "t1", wire.audio("t1", 0, b"before", end=False))
            await listener.wait_for(lambda ms: len(ms) == 2)

            for node in cluster.nodes:
                node.crash()
            await until_status(http, f"{base}/readyz", 503, 10)
            await asyncio.sleep(3)  # discovery fails over and over meanwhile
            assert await status(http, f"{base}/healthz") == 200
            assert await status(http, f"{base}/readyz") == 503
            for node in cluster.nodes:
                node.start()
            cluster.wait_ok()

            await until_status(http, f"{base}/readyz", 200, 30)
            await log.open_turn(conv, "t2", sample_rate=16000, owner="test")
            await log.append(conv, "t2", wire.audio("t2", 0, b"after", end=True))
            received = await listener.wait_for(
                lambda ms: any(m.turn == "t2" and m.kind == "audio" for m in ms), timeout=30)
            assert [m.get("data") for m in received if m.kind == "audio"][-1] == b"after"
            assert await metric(http, base, "relay_edge_hub_restarts_total") == 0
            assert await metric(http, base, "relay_edge_read_errors_total", error="cluster") > 0
            await listener.close()
        await writer.aclose()


def local_keys(settings):
    from relay.keys import Keys

    return Keys.of(settings)
