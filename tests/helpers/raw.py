"""Raw HTTP and WebSocket bytes on loopback sockets: for requests and frames no well-behaved
client library would send."""

from __future__ import annotations

import asyncio
import os
import struct
from urllib.parse import urlsplit

from relay import wire


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
