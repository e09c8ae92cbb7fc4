"""Who may connect, on real sockets: Origin, connection caps, conversation ids, frame errors,
request hygiene, and token expiry on a live connection with a client that refreshes."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import aiohttp
import pytest

from relay import wire
from relay.client import RelayClient
from relay.edge.admission import AdmitRate
from relay.streams import ConversationLog, read_after
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import Listener, running_edge
from tests.helpers.raw import client_frame, errors_and_close, raw_request, server_frames, upgrade


def token(conv: str, ttl_s: int = 300) -> str:
    return mint_token(TEST_SECRET, conv, ttl_s=ttl_s)


@pytest.fixture
def log(redis_client, keys):
    return ConversationLog(redis_client, keys, maxlen=10_000, ttl_s=300)


@pytest.mark.parametrize("conv", ["%7Bconv%7D", "{conv}", "a%2Fb", "%2E", "%2E%2E", "x" * 129,
                                  "bad%20id"])
async def test_every_refused_id_gets_the_documented_error(settings, conv):
    async with running_edge(settings, "edge-ids") as url:
        host = urlsplit(url).netloc
        path = f"/v1/conversations/{conv}/ws?token={token('c')}"
        frames = server_frames(await raw_request(url, upgrade(path, host)))
    codes, close, reason = errors_and_close(frames)
    assert codes == ["bad_conversation_id"]
    assert (close, reason) == (wire.CloseCode.BAD_REQUEST, b"bad_conversation_id")


async def test_origin_allow_list(settings):
    allowed = settings.with_overrides(edge_allowed_origins="https://app.example.com")
    async with running_edge(allowed, "edge-origin") as url, aiohttp.ClientSession() as http:
        ws_url = f"{url}/v1/conversations/c-o/ws?token={token('c-o')}"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(ws_url, origin="https://evil.example.com")
        assert refused.value.status == 403
        for origin in ("https://APP.example.com/", None):  # listed (normalised), or no browser
            async with http.ws_connect(ws_url, origin=origin) as ws:
                assert wire.decode_server((await ws.receive(timeout=5)).data).kind == "welcome"


@pytest.mark.parametrize("scope", ["conversation", "address"])
async def test_connection_caps(settings, scope):
    limit = {"edge_max_per_conversation" if scope == "conversation" else "edge_max_per_address": 2}
    async with running_edge(settings.with_overrides(**limit), "edge-cap") as url, \
            aiohttp.ClientSession() as http:
        convs = ["c-cap"] * 3 if scope == "conversation" else ["c-a1", "c-a2", "c-a3"]
        held = []
        for conv in convs[:2]:
            ws = await http.ws_connect(f"{url}/v1/conversations/{conv}/ws?token={token(conv)}")
            assert wire.decode_server((await ws.receive(timeout=5)).data).kind == "welcome"
            held.append(ws)
        conv = convs[2]
        async with http.ws_connect(f"{url}/v1/conversations/{conv}/ws?token={token(conv)}") as ws:
            error = wire.decode_server((await ws.receive(timeout=5)).data)
            assert error.kind == "error" and error.get("code") == "too_many_connections"
            closing = await ws.receive(timeout=5)
            assert closing.data == wire.CloseCode.TOO_MANY_CONNECTIONS
        await held[0].close()
        await asyncio.sleep(0.1)  # the edge sees the close, the slot is free again
        async with http.ws_connect(f"{url}/v1/conversations/{conv}/ws?token={token(conv)}") as ws:
            assert wire.decode_server((await ws.receive(timeout=5)).data).kind == "welcome"
        for ws in held[1:]:
            await ws.close()


async def test_admission_rate_spreads_a_reconnect_storm(settings):
    # 2 per second: a burst of 8 at once gets 2 in, the rest refused at once with 4430 (before
    # any token check or Redis read); a second later there is room again.
    async with running_edge(settings.with_overrides(edge_admit_rate=2), "edge-rate") as url, \
            aiohttp.ClientSession() as http:
        async def attempt(n: int) -> str:
            conv = f"c-rate-{n}"
            ws = await http.ws_connect(f"{url}/v1/conversations/{conv}/ws?token={token(conv)}")
            first = wire.decode_server((await ws.receive(timeout=5)).data)
            if first.kind == "welcome":
                held.append(ws)
                return "welcome"
            assert first.kind == "error" and first.get("code") == "too_many_connections"
            assert (await ws.receive(timeout=5)).data == wire.CloseCode.TOO_MANY_CONNECTIONS
            await ws.close()
            return "refused"

        held: list[aiohttp.ClientWebSocketResponse] = []
        outcomes = await asyncio.gather(*(attempt(n) for n in range(8)))
        assert sorted(outcomes) == ["refused"] * 6 + ["welcome"] * 2
        await asyncio.sleep(1.1)  # a second's worth again (the bucket holds no more than that)
        assert sorted(await asyncio.gather(*(attempt(n) for n in range(8, 12)))) == [
            "refused", "refused", "welcome", "welcome"]
        for ws in held:
            await ws.close()


def test_admission_rate_refills_by_the_second():
    now = [0.0]
    rate = AdmitRate(2, clock=lambda: now[0])
    assert [rate.take() for _ in range(3)] == [True, True, False]  # the burst: one second's worth
    now[0] = 0.25
    assert not rate.take()  # half a token
    now[0] = 0.5
    assert rate.take() and not rate.take()
    now[0] = 100.0
    assert [rate.take() for _ in range(3)] == [True, True, False]  # never more than the burst
    assert all(AdmitRate(0).take() for _ in range(10_000))  # 0: no limit


@pytest.mark.parametrize("frame, error_code, close_code", [
    (client_frame(b"\x00" * 70_000), "message_too_big", 1009),
    (client_frame(wire.ping(1), rsv1=True), "bad_frame", 1002),
    (client_frame(b"x", opcode=3), "bad_frame", 1002),
    (client_frame(b"\x00" * 5000), "message_too_big", 1009),
])
async def test_frame_errors_get_an_error_first(settings, frame, error_code, close_code):
    async with running_edge(settings, "edge-frames") as url:
        host = urlsplit(url).netloc
        path = f"/v1/conversations/c-f/ws?token={token('c-f')}"
        frames = server_frames(await raw_request(url, upgrade(path, host) + frame))
    assert wire.decode_server(frames[0][1]).kind == "welcome"
    codes, close, _ = errors_and_close(frames)
    assert (codes, close) == ([error_code], close_code)


async def test_slow_and_oversized_requests(settings):
    quick = settings.with_overrides(edge_handshake_timeout_s=0.5)
    async with running_edge(quick, "edge-slow") as url:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        started = time.monotonic()
        writer.write(b"GET /v1/conversa")
        for _ in range(20):  # a byte every 0.1 s does not keep the connection
            if reader.at_eof():
                break
            writer.write(b"t")
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert time.monotonic() - started < 1.5
        writer.close()
        long_line = f"/v1/conversations/c/ws?token={'x' * 9000}"
        answer = await raw_request(url, upgrade(long_line, parts.netloc))
        assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request")
        big_header = upgrade("/healthz", parts.netloc, "X-Big: " + "y" * 9000)
        assert (await raw_request(url, big_header)).split(b"\r\n")[0].endswith(b" 400 Bad Request")


async def test_live_connection_ends_at_exp_and_the_client_resumes(settings, log, redis_client,
                                                                  keys):
    conv = "c-expiry"
    edge_settings = settings.with_overrides(token_leeway_s=0)
    minted: list[str] = []

    def fresh() -> str:
        minted.append(mint_token(TEST_SECRET, conv, ttl_s=2))
        return minted[-1]

    async with running_edge(edge_settings, "edge-exp") as url:
        client = RelayClient(url, conv, fresh(), refresh_token=fresh, max_backoff_s=0.1)
        listener = Listener(client)
        await listener.joined()
        await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
        deadline = time.monotonic() + 5  # two expiries at least while the turn streams
        seq = 0
        while time.monotonic() < deadline:
            await log.append(conv, "t1", wire.audio("t1", seq, b"a" * 32, end=False))
            seq += 1
            await asyncio.sleep(0.02)
        await log.end_turn(conv, "t1", status=wire.STATUS_COMPLETE)
        received = await listener.wait_for(lambda ms: ms and ms[-1].kind == "turn_end")
        truth = [i for i, _ in await read_after(redis_client, keys, conv, "0-0", count=10_000)]
        assert [m.id for m in received if m.id is not None] == truth
        expired = [m for m in received if m.kind == "error"]
        assert expired and {m.get("code") for m in expired} == {"token_expired"}
        assert client.close_codes.count(wire.CloseCode.TOKEN_EXPIRED) >= 2
        assert client.token_refreshes >= 2 and len(minted) == client.token_refreshes + 1
        assert all(w.get("start") == "resume" for w in client.welcomes[1:])
        await listener.close()


async def test_refresh_is_tried_once_then_the_error_surfaces(settings):
    from relay.client import RelayClientError

    conv = "c-refresh"
    fetched: list[str] = []

    async def stale() -> str:  # a backend that keeps handing out expired tokens
        fetched.append(mint_token(TEST_SECRET, conv, ttl_s=60, now=time.time() - 3600))
        return fetched[-1]

    async with running_edge(settings, "edge-refresh") as url:
        client = RelayClient(url, conv, stale, max_backoff_s=0.05)
        with pytest.raises(RelayClientError) as caught:
            async for _ in client.messages():
                pass
        await client.close()
    assert caught.value.close_code == wire.CloseCode.TOKEN_EXPIRED
    assert len(fetched) == 2 and client.token_refreshes == 1


async def test_client_backs_off_for_seconds_after_4430(settings):
    conv = "c-crowded"
    capped = settings.with_overrides(edge_max_per_conversation=1)
    async with running_edge(capped, "edge-crowded") as url, aiohttp.ClientSession() as http:
        holder = await http.ws_connect(f"{url}/v1/conversations/{conv}/ws?token={token(conv)}")
        assert wire.decode_server((await holder.receive(timeout=5)).data).kind == "welcome"
        client = RelayClient(url, conv, token(conv), max_backoff_s=0.1)
        listener = Listener(client)
        await asyncio.sleep(0.5)  # refused once, now waiting its 2 s
        assert client.close_codes == [wire.CloseCode.TOO_MANY_CONNECTIONS]
        await holder.close()
        await listener.joined(timeout=5)  # the retry after the wait gets in
        assert client.connections == 2
        await listener.close()
