"""The machine's floor for an edge: the step's pushes forwarded with nothing else, for comparison.

Run as ``python -m relay.dev.bench.floor``. The edge's CPU per delivered message is mostly what
the kernel and the event loop charge for moving a message on this machine: waking up for the
push, reading it, and one ``send()`` per push to a client socket, which on a loopback VM also
pays for waking the reading process. This process measures that floor at each edge step, in
the same run and with the same schedule: the writer (mode ``floor``) sends each 40 ms slot's
entries as one push over one TCP connection, as Redis sends a live push over the edge's
subscriber connection, and a plain asyncio process writes each push, as it came, to its
conversation's client socket. No Redis, no WebSocket framing, no sessions, no checks: whatever
the relay's edge spends above this figure is its own.

Config ``role``:

* ``forwarder``: ``conversations`` (count). Listens for clients (each connection first sends its
  conversation index, 4 bytes big-endian) and for one upstream connection; a push is
  ``[u32 conversation][u16 entries][u32 length][payload]``. Events: ``ready`` with
  ``client_port`` and ``upstream_port``, ``routed`` once every conversation has its client,
  then ``report`` (``messages``, ``writes``, ``unrouted``) once the upstream closed. Exits when
  the parent closes stdin.
* ``clients``: ``port`` and ``indices``. Connects one socket per index and reads them to the end.
  Events: ``ready`` with ``connected``, then ``report`` with ``bytes`` when the parent closes
  stdin.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from relay.dev.bench.child import ParentLink

PUSH_HEAD = struct.Struct("!IHI")  # conversation index, entries, payload length
_INDEX = struct.Struct("!I")


def push(conversation: int, entries: list[bytes]) -> bytes:
    """One push of the floor's upstream protocol."""
    payload = b"".join(entries)
    return PUSH_HEAD.pack(conversation, len(entries), len(payload)) + payload


class _Upstream(asyncio.Protocol):
    """Reads pushes and writes each one, whole, to its conversation's client."""

    def __init__(self, outs: dict[int, asyncio.WriteTransport], closed: asyncio.Event) -> None:
        self._outs = outs
        self._closed = closed
        self._buffer = bytearray()
        self.messages = 0
        self.writes = 0
        self.unrouted = 0

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, size, head = 0, len(buffer), PUSH_HEAD.size
        while size - offset >= head:
            conversation, entries, length = PUSH_HEAD.unpack_from(buffer, offset)
            if size - offset - head < length:
                break
            start = offset + head
            out = self._outs.get(conversation)
            if out is None:
                self.unrouted += entries
            else:
                out.write(bytes(buffer[start:start + length]))
                self.messages += entries
                self.writes += 1
            offset = start + length
        del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed.set()


async def _forward(config: dict[str, Any], link: ParentLink) -> None:
    loop = asyncio.get_running_loop()
    outs: dict[int, asyncio.WriteTransport] = {}
    closed = asyncio.Event()
    upstream = _Upstream(outs, closed)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (index,) = _INDEX.unpack(await reader.readexactly(_INDEX.size))
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as aiohttp sets it
        outs[index] = writer.transport
        if len(outs) == int(config["conversations"]):
            link.emit("routed")
        await reader.read()  # the client never writes more; returns when it leaves

    clients = await asyncio.start_server(client, "127.0.0.1", 0, backlog=4096)
    pushes = await loop.create_server(lambda: upstream, "127.0.0.1", 0)
    link.emit("ready", client_port=_port(clients), upstream_port=_port(pushes))
    await closed.wait()
    link.emit("report", messages=upstream.messages, writes=upstream.writes,
              unrouted=upstream.unrouted, clients=len(outs))
    await link.receive()  # until the parent closes stdin
    clients.close()
    pushes.close()


async def _clients(config: dict[str, Any], link: ParentLink) -> None:
    received = 0

    async def read(reader: asyncio.StreamReader) -> None:
        nonlocal received
        while chunk := await reader.read(65536):
            received += len(chunk)

    tasks: list[asyncio.Task[None]] = []
    for index in config["indices"]:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(config["port"]))
        writer.write(_INDEX.pack(int(index)))
        await writer.drain()
        tasks.append(asyncio.create_task(read(reader)))
    link.emit("ready", connected=len(tasks))
    await link.receive()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    link.emit("report", bytes=received)


def _port(server: asyncio.Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


async def _main() -> None:
    link = await ParentLink.open()
    config = await link.receive()
    if config is None:
        return
    role = config.get("role")
    if role == "forwarder":
        await _forward(config, link)
    elif role == "clients":
        await _clients(config, link)
    else:
        raise SystemExit(f"unknown floor role {role!r}")


if __name__ == "__main__":
    asyncio.run(_main())
