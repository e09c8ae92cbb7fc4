"""The latency bench's burst floor forwarder: pushes from Redis written to WebSockets as they are.

Run as ``python -m relay.dev.bench.latency_floor``. Config: ``redis_url``, ``channels`` (one
pub/sub channel per conversation, each also the ``c`` query parameter of that conversation's
WebSocket). It serves ``/ws?c=<channel>`` on a free loopback port, sends each client a
``welcome``, and holds one subscriber connection to Redis. Every message published on a channel
is complete WebSocket frames, built by the publisher; it is written to that channel's client in
one transport write, with no parsing, checks, routing or buffering: what carrying a pushed burst
to its clients costs this machine before any relay code runs. It says ``ready`` (with ``port``)
once Redis confirmed every subscription, and stops when the parent closes its stdin.

Hand-written on a bare asyncio protocol and hiredis rather than redis-py's pub/sub: the floor
must cost no more than the least a forwarder has to do, and redis-py's reader adds a coroutine,
a future and a timeout per message.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import hiredis
from aiohttp import web

from relay import wire
from relay.dev.bench.child import ParentLink
from relay.dev.motion_sim import bound_port
from relay.edge.framing import binary_frame


class _Pushes(asyncio.Protocol):
    """The subscriber connection: each published message goes to its channel's client."""

    def __init__(self, clients: dict[bytes, asyncio.WriteTransport], channels: int) -> None:
        self._clients = clients
        self._reader = hiredis.Reader()
        self._pending = channels
        self.subscribed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if reply[0] == b"message":
                client = self._clients.get(reply[1])
                if client is not None and not client.is_closing():
                    client.write(reply[2])
            elif reply[0] == b"subscribe":
                self._pending -= 1
                if self._pending == 0 and not self.subscribed.done():
                    self.subscribed.set_result(None)


def _client_route(clients: dict[bytes, asyncio.WriteTransport]) -> Any:
    welcome = binary_frame(wire.welcome(conversation="floor", edge="floor", start="live",
                                        recovered=None, position=None))

    async def serve(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        writer = ws._writer  # noqa: SLF001 - its transport, as relay.edge.framing writes frames
        if writer is None:
            return ws
        channel = request.query.get("c", "").encode()
        clients[channel] = writer.transport
        writer.transport.write(welcome)
        async for _ in ws:  # until the client leaves; it sends nothing
            pass
        clients.pop(channel, None)
        return ws

    return serve


async def _main() -> None:
    link = await ParentLink.open()
    config = await link.receive()
    if config is None:
        return
    clients: dict[bytes, asyncio.WriteTransport] = {}
    channels = [str(c).encode() for c in config["channels"]]
    address = urlsplit(config["redis_url"])
    transport, pushes = await asyncio.get_running_loop().create_connection(
        lambda: _Pushes(clients, len(channels)), address.hostname or "127.0.0.1",
        address.port or 6379)
    command: tuple[Any, ...] = ("SUBSCRIBE", *channels)
    transport.write(hiredis.pack_command(command))
    await asyncio.wait_for(pushes.subscribed, 30)
    app = web.Application()
    app.router.add_get("/ws", _client_route(clients))
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    link.emit("ready", port=bound_port(runner))
    await link.receive()  # until the parent closes stdin
    transport.close()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(_main())
