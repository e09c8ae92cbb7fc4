"""Server-to-client WebSocket frames built once and written many per system call.

aiohttp writes each message with its own ``transport.write``, and a socket that is writable turns
every such write into a ``send()`` system call: at tens of thousands of messages a second that
is the edge's largest single cost. The hub builds each entry's complete frame once (header plus
payload, shared by every client of the conversation) and a session writes whatever is queued in
one call, waiting for the socket only when the transport's buffer is above its high-water mark.
"""

from __future__ import annotations

import asyncio
import struct

from aiohttp import web

from relay import wire

_BINARY_FIN = 0x80 | 0x2
_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def _header(size: int) -> bytes:
    if size < 126:
        return _SHORT.pack(_BINARY_FIN, size)
    if size < 65536:
        return _MEDIUM.pack(_BINARY_FIN, 126, size)
    return _LONG.pack(_BINARY_FIN, 127, size)


def binary_frame(payload: bytes) -> bytes:
    """An unmasked, final, binary frame (RFC 6455 section 5.2): what a server sends."""
    return _header(len(payload)) + payload


def delivery_frame(entry_id: bytes, stored: bytes | memoryview) -> bytes:
    """The complete frame of a stream entry, built in one copy of the stored bytes (which may be
    a slice of a larger live push): WebSocket header, ``wire.delivery_head``, the stored pairs."""
    head = wire.delivery_head(entry_id, stored[0])
    body = memoryview(stored)[1:]
    return b"".join((_header(len(head) + len(body)), head, body))


def frame_payload(frame: bytes) -> bytes:
    """The payload of a frame made by ``binary_frame``."""
    size = frame[1] & 0x7F
    return frame[2 if size < 126 else 4 if size == 126 else 10:]


class FrameWriter:
    """Writes pre-built frames to one prepared WebSocketResponse's transport."""

    def __init__(self, ws: web.WebSocketResponse, timeout_s: float) -> None:
        # aiohttp keeps its frame writer private; its transport and flow-control protocol are
        # exactly what its own send_bytes uses, so frames written here interleave safely with
        # the welcome, pong and close frames aiohttp sends (all are written whole, in order).
        writer = ws._writer  # noqa: SLF001
        if writer is None:
            raise ConnectionResetError("websocket is not prepared")
        self._transport = writer.transport
        self._protocol = writer.protocol
        self._timeout_s = timeout_s

    def writable(self) -> bool:
        """True when a write would go out without waiting: the transport is open and below its
        high-water mark."""
        return not (self._protocol._paused or self._transport.is_closing())  # noqa: SLF001

    def write_now(self, frames: list[bytes]) -> None:
        """One transport write of ``frames``; only after ``writable()`` said so."""
        self._transport.write(b"".join(frames) if len(frames) > 1 else frames[0])

    async def write(self, frames: list[bytes]) -> None:
        if self._transport.is_closing():
            raise ConnectionResetError("client connection is closing")
        self._transport.write(b"".join(frames) if len(frames) > 1 else frames[0])
        if self._protocol._paused:  # noqa: SLF001 - set by the transport above its high-water mark
            async with asyncio.timeout(self._timeout_s):
                await self._protocol._drain_helper()  # noqa: SLF001
