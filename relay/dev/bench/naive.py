"""A naive edge, for comparison only: one blocking XREAD per connected client.

Run as ``python -m relay.dev.bench.naive``. Config: ``redis_url``, ``prefix``. It serves the
relay's WebSocket URL shape (``/v1/conversations/<id>/ws``, tokens ignored) and wire format (the
same bench clients read it), and gives every client its own loop of
``XREAD BLOCK 1000 COUNT 512`` on its conversation's stream, from the stream's tip at connect
(or the client's ``last_id``), each over a connection of its own. This is what an edge written
without a hub looks like; nothing else (no sessions, queues, frame reuse, fencing). Events:
``ready`` with the port it listens on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as redis
from aiohttp import web

from relay import wire
from relay.dev.bench.child import ParentLink
from relay.keys import Keys

_CONNECTIONS = 10_000  # one per client; the pool only bounds them against a runaway


async def _serve(request: web.Request) -> web.StreamResponse:
    app = request.app
    client: redis.Redis = app["redis"]
    keys: Keys = app["keys"]
    conversation = request.match_info["conversation_id"]
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    key = keys.stream(conversation)
    position = request.query.get("last_id")
    if not position:
        tip = await client.xrevrange(key, count=1)
        position = tip[0][0].decode() if tip else "0-0"
    await ws.send_bytes(wire.welcome(conversation=conversation, edge="naive", start="live",
                                     recovered=None, position=position))
    reader = asyncio.create_task(_drain_client(ws))
    try:
        while not ws.closed and not reader.done():
            reply = await client.xread({key: position}, count=512, block=1000)
            for _, entries in reply or ():
                for raw_id, fields in entries:
                    await ws.send_bytes(wire.delivery(raw_id, fields[b"d"]))
                position = entries[-1][0].decode()
    except (ConnectionError, RuntimeError, redis.RedisError):
        pass  # the client left
    finally:
        reader.cancel()
    return ws


async def _drain_client(ws: web.WebSocketResponse) -> None:
    async for _ in ws:
        pass


async def _main() -> None:
    link = await ParentLink.open()
    config: dict[str, Any] | None = await link.receive()
    if config is None:
        return
    app = web.Application()
    app["redis"] = redis.Redis.from_url(config["redis_url"], max_connections=_CONNECTIONS,
                                        socket_timeout=None)
    app["keys"] = Keys(config["prefix"])
    app.router.add_get("/v1/conversations/{conversation_id}/ws", _serve)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
    link.emit("ready", port=port)
    await link.receive()  # until the parent closes stdin
    await runner.cleanup()
    await app["redis"].aclose()


if __name__ == "__main__":
    asyncio.run(_main())
