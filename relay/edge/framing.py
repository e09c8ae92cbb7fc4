"""Server-to-client WebSocket frames built once and written many per system call.

aiohttp writes each message with its own ``transport.write``, and a socket that is writable turns
every such write into a ``send()`` system call: at tens of thousands of messages a second that
is the edge's largest single cost. The hub builds each entry's complete frame once (header plus
payload, shared by every client of the conversation) and a session writes whatever is queued in
one call, waiting for the socket only when the transport's buffer is above its high-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

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


class SlowClient(Exception):
    """The client did not read what was written to it within the send timeout."""


class FrameWriter:
    """Writes pre-built frames to one prepared WebSocketResponse's transport.

    What the client has not read yet is bounded twice: the kernel's send buffer (SO_SNDBUF) and
    the transport's own buffer (its high-water mark) each hold at most ``buffer_bytes``, so a
    backlog waits in the session's bounded queue, where it counts, and everything the edge wrote
    reaches a reading client within seconds, a 4429 close frame included. Above the high-water
    mark a write waits for the client, at most ``timeout_s`` (then SlowClient), or until
    ``interrupt`` is set (the session is closing).
    """

    def __init__(self, ws: web.WebSocketResponse, timeout_s: float, *,
                 buffer_bytes: int | None = None) -> None:
        # aiohttp keeps its frame writer private; its transport and flow-control protocol are
        # exactly what its own send_bytes uses, so frames written here interleave safely with
        # the welcome, pong and close frames aiohttp sends (all are written whole, in order).
        writer = ws._writer  # noqa: SLF001
        if writer is None:
            raise ConnectionResetError("websocket is not prepared")
        self._transport = writer.transport
        self._protocol = writer.protocol
        self._timeout_s = timeout_s
        if buffer_bytes is not None:
            bound_buffers(self._transport, buffer_bytes)

    @property
    def unsent_bytes(self) -> int:
        """Bytes written here that are still in the transport's buffer."""
        return self._transport.get_write_buffer_size()

    def abort(self) -> None:
        """Drop the connection now, whatever it still holds (a client that stopped reading);
        a no-op once the connection is gone."""
        if self._protocol.transport is not None:
            self._transport.abort()

    def writable(self) -> bool:
        """True when a write would go out without waiting: the transport is open and below its
        high-water mark."""
        return not (self._protocol._paused or self._transport.is_closing())  # noqa: SLF001

    def write_now(self, frames: list[bytes]) -> None:
        """One transport write of ``frames``; only after ``writable()`` said so."""
        self._transport.write(b"".join(frames) if len(frames) > 1 else frames[0])

    async def write(self, frames: list[bytes], interrupt: asyncio.Event | None = None) -> None:
        if self._transport.is_closing():
            raise ConnectionResetError("client connection is closing")
        self._transport.write(b"".join(frames) if len(frames) > 1 else frames[0])
        if self._protocol._paused:  # noqa: SLF001 - set by the transport above its high-water mark
            await self._wait_for_client(interrupt)

    async def _wait_for_client(self, interrupt: asyncio.Event | None) -> None:
        drained = asyncio.ensure_future(self._protocol._drain_helper())  # noqa: SLF001
        waiters: set[asyncio.Future[Any]] = {drained}
        stop = asyncio.ensure_future(interrupt.wait()) if interrupt is not None else None
        if stop is not None:
            waiters.add(stop)
        try:
            done, _ = await asyncio.wait(waiters, timeout=self._timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if drained in done:
            drained.result()  # ConnectionResetError when the client went away meanwhile
        elif not done:
            raise SlowClient(f"the client read nothing for {self._timeout_s:g}s")


def bound_buffers(transport: asyncio.BaseTransport, buffer_bytes: int) -> None:
    """Bound the kernel send buffer and the transport's buffer of one client connection."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # not a TCP socket: nothing to bound there
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
    if isinstance(transport, asyncio.WriteTransport):
        transport.set_write_buffer_limits(high=buffer_bytes)
