"""Helpers for tests that run edges in-process on real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from relay.client import RelayClient
from relay.edge import create_app
from relay.edge.admission import EdgeRunner
from relay.edge.app import runner_options
from relay.settings import Settings
from relay.wire import Message


@asynccontextmanager
async def running_edge(settings: Settings, node_id: str) -> AsyncIterator[str]:
    settings = settings.with_overrides(node_id=node_id)
    runner = EdgeRunner(create_app(settings), shutdown_timeout=2.0, **runner_options(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"ws://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def collect(client: RelayClient, until, timeout: float = 10.0) -> list[Message]:
    """Read messages until ``until(messages)`` is true (welcomes excluded from the list)."""
    received: list[Message] = []

    async def run() -> None:
        async for message in client.messages():
            if message.kind == "welcome":
                continue
            received.append(message)
            if until(received):
                return

    await asyncio.wait_for(run(), timeout)
    return received


class Listener:
    """Consumes a client in the background; tests wait on conditions over what arrived."""

    def __init__(self, client: RelayClient) -> None:
        self.client = client
        self.messages: list[Message] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for message in self.client.messages():
            if message.kind != "welcome":
                self.messages.append(message)
            self._changed.set()

    async def wait_for(self, predicate, timeout: float = 30.0) -> list[Message]:
        async def poll() -> None:
            while not predicate(self.messages):
                self._changed.clear()
                if self._task.done():
                    self._task.result()
                    raise AssertionError("client stopped before the condition held")
                await self._changed.wait()

        await asyncio.wait_for(poll(), timeout)
        return self.messages

    async def joined(self, timeout: float = 10.0) -> None:
        await self.wait_for(lambda _: bool(self.client.welcomes), timeout)

    async def close(self) -> None:
        await self.client.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class RawWebSocket:
    """A bare WebSocket client on asyncio streams that reads only when told to.

    aiohttp's client keeps reading the socket into memory; this one stops at the stream's small
    buffer, so the edge sees real TCP backpressure, as from a stalled phone.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str) -> RawWebSocket:
        import base64
        import os
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((parts.hostname, parts.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + ("?" + parts.query if parts.query else "")
        writer.write((f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise AssertionError(f"upgrade refused: {head[:80]!r}")
        return cls(reader, writer)

    async def frame(self) -> tuple[int, bytes]:
        """Next frame as (opcode, payload); close frames give opcode 8 and code+reason."""
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        return first & 0x0F, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()
