"""Clients that record everything they receive, on a WebSocket client of their own.

They share no code with ``relay.client``: the checker must not trust the library it checks. A
``RecordingClient`` resumes like the protocol says (reconnect with ``last_id`` to the next edge,
capped backoff, stop on a fatal close code), but keeps duplicates and out-of-order messages in
its record instead of dropping them, so the checker sees exactly what the edges sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from relay import wire
from relay.streams import parse_id
from relay.tokens import mint_token

# Close codes after which reconnecting cannot help (docs/protocol.md).
FATAL = {1009, 4400, 4401, 4402, 4403}


@dataclass
class Event:
    t: float  # time.time()
    kind: str  # "welcome" | "message" | "close" | "drop"
    message: wire.Message | None = None
    code: int | None = None
    connection: int = 0


@dataclass
class Record:
    conversation_id: str
    slow: bool = False
    events: list[Event] = field(default_factory=list)
    fatal: int | None = None

    @property
    def messages(self) -> list[wire.Message]:
        return [e.message for e in self.events if e.kind == "message" and e.message is not None]

    @property
    def welcomes(self) -> list[wire.Message]:
        return [e.message for e in self.events if e.kind == "welcome" and e.message is not None]

    def resume_latencies(self) -> list[float]:
        """Seconds from each lost connection (drop or close) to the next welcome."""
        out, lost_at = [], None
        for event in self.events:
            if event.kind in ("drop", "close") and lost_at is None:
                lost_at = event.t
            elif event.kind == "welcome" and lost_at is not None:
                out.append(event.t - lost_at)
                lost_at = None
        return out


class _Socket:
    """A minimal RFC 6455 client: masked frames out, pings answered, frames in whole."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, url: str, *, rcvbuf: int | None) -> _Socket:
        parts = urlsplit(url)
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (parts.hostname, parts.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf or 2**20)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + ("?" + parts.query if parts.query else "")
        writer.write((f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0]:
            writer.close()
            raise ConnectionError(f"upgrade refused: {head[:60]!r}")
        return cls(reader, writer)

    async def frame(self) -> tuple[int, bytes]:
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        payload = await self.reader.readexactly(length)
        if not first & 0x80:
            raise ConnectionError("fragmented frames are not expected from the edge")
        return first & 0x0F, payload

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        size = len(payload)
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | size) if size < 126 else \
            struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        self.writer.write(header + mask + masked)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (a phone losing its network)."""
        self.writer.transport.abort()


class RecordingClient:
    """One client of a conversation; ``run`` until ``stop``; everything lands in ``record``.

    ``slow``: a small socket buffer and a pause after every message, so the edge sees real
    backpressure (its queue overflows and it sends 4429, or its send times out).
    ``idle_timeout_s``: no frame at all (the edges ping every few seconds) for this long means
    the edge is frozen: drop the connection and go elsewhere.
    """

    def __init__(self, edges: list[str], conversation_id: str, secret: str, *,
                 slow: bool = False, idle_timeout_s: float = 6.0, first_edge: int = 0) -> None:
        self.edges = edges
        self.conversation_id = conversation_id
        self._secret = secret
        self._edge = first_edge % len(edges)
        self.record = Record(conversation_id, slow=slow)
        self.last_id: str | None = None
        self._slow = slow
        self._idle_timeout_s = idle_timeout_s
        self._socket: _Socket | None = None
        self._stopping = False
        self._connection = 0
        self.joined = asyncio.Event()

    def drop(self) -> bool:
        if self._socket is None:
            return False
        self.record.events.append(Event(time.time(), "drop", connection=self._connection))
        self._socket.abort()
        return True

    def stop(self) -> None:
        self._stopping = True
        if self._socket is not None:
            self._socket.abort()

    async def run(self) -> None:
        failures = 0
        while not self._stopping and self.record.fatal is None:
            try:
                await self._connection_once()
                failures = 0
            except (OSError, asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                failures += 1
            finally:
                self._socket = None
            if self._stopping or self.record.fatal is not None:
                return
            self._edge = (self._edge + 1) % len(self.edges)
            await asyncio.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)) * random.uniform(0.5, 1))

    async def _connection_once(self) -> None:
        token = mint_token(self._secret, self.conversation_id)
        url = (f"{self.edges[self._edge]}/v1/conversations/{quote(self.conversation_id)}/ws"
               f"?token={quote(token)}")
        if self.last_id:
            url += f"&last_id={quote(self.last_id)}"
        self._socket = await asyncio.wait_for(
            _Socket.connect(url, rcvbuf=8192 if self._slow else None), 5.0)
        self._connection += 1
        while True:
            opcode, payload = await asyncio.wait_for(self._socket.frame(), self._idle_timeout_s)
            if opcode == 0x9:
                self._socket.send(0xA, payload)
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self._closed(code)
                return
            elif opcode == 0x2:
                self._received(wire.decode_server(payload))
                if self._slow:
                    await asyncio.sleep(0.05)  # 20 messages/s: a turn sends ~30

    def _received(self, message: wire.Message) -> None:
        kind = "welcome" if message.kind == wire.WELCOME else "message"
        if kind == "message" and message.id is None:
            return  # pong, error: not part of the delivery record
        self.record.events.append(Event(time.time(), kind, message, connection=self._connection))
        if kind == "welcome":
            self.joined.set()
        elif self.last_id is None or parse_id(message.id or "0-0") > parse_id(self.last_id):
            self.last_id = message.id

    def _closed(self, code: int) -> None:
        self.record.events.append(Event(time.time(), "close", code=code,
                                        connection=self._connection))
        with contextlib.suppress(Exception):
            self._socket.send(0x8, struct.pack("!H", 1000)) if self._socket else None
        if code in FATAL:
            self.record.fatal = code


class Fleet:
    """Every conversation's clients, plus the socket dropper."""

    def __init__(self, edges: list[str], conversations: list[str], secret: str, *,
                 slow_clients: int = 1, rng: random.Random) -> None:
        self.clients = [RecordingClient(edges, conv, secret, first_edge=i)
                        for i, conv in enumerate(conversations)]
        self.clients += [RecordingClient(edges, conversations[i % len(conversations)], secret,
                                         slow=True, first_edge=i + 1)
                         for i in range(slow_clients)]
        self._rng = rng
        self._tasks: list[asyncio.Task[None]] = []
        self.drops = 0

    async def start(self, timeout_s: float = 20.0) -> None:
        self._tasks = [asyncio.create_task(c.run(), name=f"client-{c.conversation_id}")
                       for c in self.clients]
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(c.joined.wait() for c in self.clients))

    async def drop_sockets(self, every_s: float) -> None:
        """Abort one random client's connection about every ``every_s`` seconds, forever."""
        while True:
            await asyncio.sleep(self._rng.uniform(0.5, 1.5) * every_s)
            if self._rng.choice(self.clients).drop():
                self.drops += 1

    async def stop(self) -> None:
        for client in self.clients:
            client.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def records(self) -> list[Record]:
        return [c.record for c in self.clients]

    def positions(self) -> dict[int, Any]:
        return {i: c.last_id for i, c in enumerate(self.clients)}
