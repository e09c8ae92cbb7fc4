"""Edges on real sockets against a real Redis: ordering, join mid-turn, resume, auth, bad input."""

from __future__ import annotations

import asyncio

import aiohttp
import msgpack
import pytest

from relay import wire
from relay.client import RelayClient, RelayClientError
from relay.streams import ConversationLog, read_after
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import collect, running_edge


@pytest.fixture
async def edges(settings):
    async with running_edge(settings, "edge-a") as a, running_edge(settings, "edge-b") as b:
        yield a, b


@pytest.fixture
def log(redis_client, keys):
    return ConversationLog(redis_client, keys, maxlen=10_000, ttl_s=300)


def token(conversation_id: str) -> str:
    return mint_token(TEST_SECRET, conversation_id, ttl_s=300)


async def write_turn(log, conv, turn, chunks, *, frames_every=3):
    await log.open_turn(conv, turn, sample_rate=16000, owner="test")
    frames_seq = 0
    for seq, chunk in enumerate(chunks):
        await log.append(conv, turn, wire.audio(turn, seq, chunk, end=False))
        if seq % frames_every == frames_every - 1:
            await log.append(conv, turn, wire.frames(turn, frames_seq, b"env%d" % seq, last=False))
            frames_seq += 1
    await log.append(conv, turn, wire.audio(turn, len(chunks), b"", end=True))
    await log.append(conv, turn, wire.frames(turn, frames_seq, b"final", last=True))
    await log.end_turn(conv, turn, status=wire.STATUS_COMPLETE)


def is_turn_end(messages):
    return bool(messages) and messages[-1].kind == "turn_end"


async def stream_ids(redis_client, keys, conv):
    return [i for i, _ in await read_after(redis_client, keys, conv, "0-0", count=100_000)]


async def wait_joined(client: RelayClient) -> None:
    for _ in range(200):
        if client.welcomes:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("client never got a welcome")


async def test_live_delivery_in_order_to_clients_on_both_edges(edges, log, redis_client, keys):
    conv = "conv-live"
    clients = [RelayClient(edges[i % 2], conv, token(conv)) for i in range(4)]
    tasks = [asyncio.create_task(collect(c, is_turn_end)) for c in clients]
    for c in clients:
        await wait_joined(c)
    chunks = [bytes([i]) * 1280 for i in range(40)]
    await write_turn(log, conv, "t1", chunks)
    results = await asyncio.gather(*tasks)
    expected = await stream_ids(redis_client, keys, conv)
    for client, received in zip(clients, results, strict=True):
        assert [m.id for m in received] == expected
        audio = b"".join(m.get("data") for m in received if m.kind == "audio")
        assert audio == b"".join(chunks)
        assert client.welcomes[0].get("start") == "live"
        await client.close()


async def test_join_mid_turn_starts_at_turn_start(edges, log, redis_client, keys):
    conv = "conv-mid"
    await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
    for seq in range(5):
        await log.append(conv, "t1", wire.audio("t1", seq, b"a" * 64, end=False))
    client = RelayClient(edges[0], conv, token(conv))
    task = asyncio.create_task(collect(client, is_turn_end))
    await wait_joined(client)
    await log.append(conv, "t1", wire.audio("t1", 5, b"", end=True))
    await log.end_turn(conv, "t1", status=wire.STATUS_COMPLETE)
    received = await task
    assert received[0].kind == "turn_start"
    assert [m.id for m in received] == await stream_ids(redis_client, keys, conv)
    assert client.welcomes[0].get("start") == "turn"
    await client.close()


async def test_resume_on_other_edge_loses_and_repeats_nothing(edges, log, redis_client, keys):
    conv = "conv-resume"
    client = RelayClient([edges[0], edges[1]], conv, token(conv), max_backoff_s=0.1)
    received = []
    first_half = asyncio.Event()
    dropped = False

    async def run():
        nonlocal dropped
        async for m in client.messages():
            if m.kind == "welcome":
                continue
            received.append(m)
            if len(received) == 20 and not dropped:
                dropped = True
                client.drop_connection()
                first_half.set()
            if m.kind == "turn_end":
                return

    task = asyncio.create_task(asyncio.wait_for(run(), 15))
    await wait_joined(client)
    chunks = [bytes([i]) * 320 for i in range(120)]
    writer = asyncio.create_task(write_turn(log, conv, "t1", chunks))
    await asyncio.gather(task, writer)
    ids = [m.id for m in received]
    assert ids == await stream_ids(redis_client, keys, conv)
    assert client.connections >= 2
    resumed = [w for w in client.welcomes if w.get("start") == "resume"]
    assert resumed and resumed[0].get("recovered") is True
    assert {w.get("edge") for w in client.welcomes} == {"edge-a", "edge-b"}
    await client.close()


async def test_resume_outside_retention_says_so(settings, redis_client, keys):
    log = ConversationLog(redis_client, keys, maxlen=10, ttl_s=300)
    conv = "conv-trimmed"
    first = await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
    for seq in range(300):
        await log.append(conv, "t1", wire.audio("t1", seq, b"x", end=False))
    async with running_edge(settings, "edge-c") as url:
        client = RelayClient(url, conv, token(conv), last_id=first)
        task = asyncio.create_task(collect(client, lambda ms: any(
            m.turn == "t2" and m.kind == "turn_end" for m in ms)))
        await wait_joined(client)
        welcome = client.welcomes[0]
        assert welcome.get("recovered") is False
        # t1's turn_start was trimmed too: nothing of t1, delivery starts at the next turn.
        assert welcome.get("start") == "next_turn"
        await log.end_turn(conv, "t1", status=wire.STATUS_COMPLETE)
        await write_turn(log, conv, "t2", [b"y" * 10])
        received = await task
        assert received[0].kind == "turn_start" and {m.turn for m in received} == {"t2"}
        await client.close()


@pytest.mark.parametrize(
    "make_token, code",
    [
        (lambda conv: None, wire.CloseCode.TOKEN_INVALID),
        (lambda conv: "v1.garbage.sig", wire.CloseCode.TOKEN_INVALID),
        (
            lambda conv: mint_token("another-secret-0123456789-abcdefgh", conv),
            wire.CloseCode.TOKEN_INVALID,
        ),
        (
            lambda conv: mint_token(TEST_SECRET, conv, ttl_s=1, now=1_000),
            wire.CloseCode.TOKEN_EXPIRED,
        ),
        (
            lambda conv: mint_token(TEST_SECRET, "someone-else"),
            wire.CloseCode.TOKEN_WRONG_CONVERSATION,
        ),
    ],
)
async def test_bad_tokens_are_refused_with_no_data(edges, log, make_token, code):
    conv = "conv-auth"
    await log.open_turn(conv, "t1", sample_rate=16000, owner="test")
    tok = make_token(conv)
    url = f"{edges[0]}/v1/conversations/{conv}/ws" + (f"?token={tok}" if tok else "")
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == code


async def test_client_api_raises_on_fatal_close(edges):
    client = RelayClient(edges[0], "conv-x", mint_token(TEST_SECRET, "conv-y"))
    with pytest.raises(RelayClientError) as info:
        async for _ in client.messages():
            pass
    assert info.value.close_code == wire.CloseCode.TOKEN_WRONG_CONVERSATION
    await client.close()


@pytest.mark.parametrize(
    "send, code, error_code",
    [
        (lambda ws: ws.send_str("hello"), wire.CloseCode.BAD_REQUEST, "bad_message"),
        (lambda ws: ws.send_bytes(b"\xc1\xff"), wire.CloseCode.BAD_REQUEST, "bad_message"),
        (
            lambda ws: ws.send_bytes(msgpack.packb([1, 2])),
            wire.CloseCode.BAD_REQUEST,
            "bad_message",
        ),
        (
            lambda ws: ws.send_bytes(msgpack.packb({"v": 1, "kind": "subscribe"})),
            wire.CloseCode.BAD_REQUEST,
            "bad_message",
        ),
        (
            lambda ws: ws.send_bytes(msgpack.packb({"v": 9, "kind": "ping"})),
            wire.CloseCode.BAD_REQUEST,
            "bad_message",
        ),
        (lambda ws: ws.send_bytes(b"\x00" * 10_000), wire.CloseCode.TOO_BIG, "message_too_big"),
    ],
)
async def test_bad_client_input_gets_error_and_close(
    edges, log, redis_client, keys, send, code, error_code
):
    conv = "conv-bad-input"
    bystander = RelayClient(edges[0], conv, token(conv))
    watch = asyncio.create_task(collect(bystander, is_turn_end))
    await wait_joined(bystander)
    url = f"{edges[0]}/v1/conversations/{conv}/ws?token={token(conv)}"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        welcome = wire.decode_server((await ws.receive(timeout=5)).data)
        assert welcome.kind == "welcome"
        await send(ws)
        error = wire.decode_server((await ws.receive(timeout=5)).data)
        assert error.kind == "error" and error.get("code") == error_code
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == code
    # The edge and the other client carry on.
    await write_turn(log, conv, "t1", [b"z" * 100] * 3)
    received = await watch
    assert [m.id for m in received] == await stream_ids(redis_client, keys, conv)
    await bystander.close()


async def test_ping_pong_and_bad_last_id(edges):
    conv = "conv-ping"
    url = f"{edges[1]}/v1/conversations/{conv}/ws?token={token(conv)}"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url) as ws:
            assert wire.decode_server((await ws.receive(timeout=5)).data).kind == "welcome"
            await ws.send_bytes(wire.ping(7))
            pong = wire.decode_server((await ws.receive(timeout=5)).data)
            assert pong.kind == "pong" and pong.get("nonce") == 7
        async with http.ws_connect(url + "&last_id=not-an-id") as ws:
            error = wire.decode_server((await ws.receive(timeout=5)).data)
            assert error.get("code") == "bad_last_id"
            assert (await ws.receive(timeout=5)).data == wire.CloseCode.BAD_REQUEST


async def test_health_and_readiness(edges):
    base = edges[0].replace("ws://", "http://")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
        for _ in range(100):
            async with http.get(f"{base}/readyz") as r:
                if r.status == 200:
                    assert (await r.json())["status"] == "ready"
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("edge never became ready")


# Each of these passed the old check (Python's int() takes spaces, "_", non-ASCII digits and an
# empty sequence) and then failed inside XRANGE, which the client saw as Redis being down.
BAD_POSITIONS = ["{tip} ", " 1-0", "1-", "-1", "1796_113742569-0", "١٢٣-0", "1-0-0", "1",
                 "18446744073709551616-0", "1-18446744073709551616", "+1-0", "0x1-0", "1-0\n"]


@pytest.mark.parametrize("position", BAD_POSITIONS)
async def test_malformed_last_id_is_refused_before_redis(edges, log, redis_client, keys,
                                                        position):
    conv = "conv-badpos"
    await write_turn(log, conv, "t1", [b"a" * 10])
    tip = (await stream_ids(redis_client, keys, conv))[-1]
    position = position.format(tip=tip)
    url = f"{edges[0]}/v1/conversations/{conv}/ws?token={token(conv)}"
    async with aiohttp.ClientSession() as http, http.ws_connect(
            url, params={"last_id": position}) as ws:
        first = wire.decode_server((await ws.receive(timeout=5)).data)
        assert (first.kind, first.get("code")) == ("error", "bad_last_id")
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4400


async def test_largest_valid_last_id_is_accepted(edges, log):
    conv = "conv-maxpos"
    await write_turn(log, conv, "t1", [b"a" * 10])
    url = f"{edges[0]}/v1/conversations/{conv}/ws?token={token(conv)}"
    top = f"{2**64 - 1}-{2**64 - 1}"
    async with aiohttp.ClientSession() as http, http.ws_connect(
            url, params={"last_id": top}) as ws:
        welcome = wire.decode_server((await ws.receive(timeout=5)).data)
        # Beyond the stream's tip: a position this stream never reached (recreated after a loss).
        assert (welcome.kind, welcome.get("recovered")) == ("welcome", False)


async def test_late_join_after_the_turn_start_was_trimmed_starts_at_the_next_turn(
        edges, redis_client, keys):
    """A turn longer than the retained history: a client joining mid-turn is told
    ``start: next_turn`` and gets nothing of that turn (no frames before audio, no turn without
    its start), then the next turn whole."""
    short = ConversationLog(redis_client, keys, maxlen=50, ttl_s=300)
    conv = "conv-longturn"
    await short.open_turn(conv, "long", sample_rate=16000, owner="test")
    for seq in range(0, 400, 40):  # frames last in every batch: the oldest kept may be frames
        await short.append(conv, "long", *[wire.audio("long", s, b"x" * 20, end=False)
                                           for s in range(seq, seq + 40)],
                           wire.frames("long", seq // 40, b"env", last=False))
    rows = await read_after(redis_client, keys, conv, "0-0", count=1000)
    assert wire.stored_kind(rows[0][1])[0] != "turn_start"  # the start is gone
    client = RelayClient(edges[0], conv, token(conv))
    watch = asyncio.ensure_future(collect(client, lambda ms: any(
        m.turn == "next" and m.kind == "turn_end" for m in ms)))
    await wait_joined(client)
    assert client.welcomes[0].get("start") == "next_turn"
    await short.append(conv, "long", wire.audio("long", 400, b"y", end=True),
                       wire.frames("long", 10, b"env", last=True))
    await short.end_turn(conv, "long", status=wire.STATUS_COMPLETE)
    await write_turn(short, conv, "next", [b"z" * 20] * 4)
    received = await watch
    assert {m.turn for m in received} == {"next"}
    assert received[0].kind == "turn_start"
    await client.close()


def test_only_outages_are_reported_as_redis_unavailable():
    from redis.exceptions import BusyLoadingError, ReadOnlyError, ResponseError
    from redis.exceptions import ConnectionError as RedisConnectionError

    from relay.edge.app import _means_unavailable

    assert _means_unavailable(RedisConnectionError("refused"))
    assert _means_unavailable(BusyLoadingError("loading the dataset"))
    assert _means_unavailable(ReadOnlyError("replica"))
    assert _means_unavailable(ResponseError("BUSY Redis is busy running a script"))
    # A command Redis refuses is the relay's fault (or, before strict parsing, the client's):
    # never sent to another edge as an outage.
    assert not _means_unavailable(ResponseError("ERR Invalid stream ID specified as stream"))
    assert not _means_unavailable(ResponseError("WRONGTYPE Operation against a key"))
