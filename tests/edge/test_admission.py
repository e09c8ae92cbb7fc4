"""Who may connect, on real sockets: Origin, connection caps, conversation ids, frame errors,
request hygiene, and token expiry on a live connection with a client that refreshes."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from urllib.parse import urlsplit

import aiohttp
import pytest

from relay import wire
from relay.client import RelayClient
from relay.streams import ConversationLog, read_after
from relay.tokens import mint_token
from tests.conftest import TEST_SECRET
from tests.helpers.edge import Listener, running_edge


def token(conv: str, ttl_s: int = 300) -> str:
    return mint_token(TEST_SECRET, conv, ttl_s=ttl_s)


@pytest.fixture
def log(redis_client, keys):
    return ConversationLog(redis_client, keys, maxlen=10_000, ttl_s=300)


async def raw_request(url: str, request: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send bytes on a fresh TCP connection; return what came back until the edge closed the
    connection or sent a WebSocket close frame."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    data = b""
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(read_timeout):
            while chunk := await reader.read(65536):
                data += chunk
                if b" 101 " in data[:20] and b"\r\n\r\n" in data and any(
                        op == 8 for op, _ in server_frames(data)):
                    break
        return data
    finally:
        writer.close()


def upgrade(path: str, host: str, *extra: str) -> bytes:
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(payload: bytes, *, opcode: int = 2, rsv1: bool = False) -> bytes:
    """A masked client frame (RFC 6455 5.2), optionally with RSV1 set."""
    first = 0x80 | (0x40 if rsv1 else 0) | opcode
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split the bytes after a 101 response into (opcode, payload) server frames."""
    frames, rest = [], data.split(b"\r\n\r\n", 1)[1]
    while len(rest) >= 2:
        opcode, length, offset = rest[0] & 0x0F, rest[1] & 0x7F, 2
        if length == 126 and len(rest) >= 4:
            length, offset = struct.unpack("!H", rest[2:4])[0], 4
        elif length == 127 and len(rest) >= 10:
            length, offset = struct.unpack("!Q", rest[2:10])[0], 10
        if len(rest) < offset + length:
            break
        frames.append((opcode, rest[offset:offset + length]))
        rest = rest[offset + length:]
    return frames


def errors_and_close(frames: list[tuple[int, bytes]]) -> tuple[list[str], int | None, bytes]:
    codes = [wire.decode_server(p).get("code") for op, p in frames
             if op == 2 and wire.decode_server(p).kind == "error"]
    closes = [p for op, p in frames if op == 8]
    if not closes:
        return codes, None, b""
    return codes, struct.unpack("!H", closes[0][:2])[0], closes[0][2:]


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
