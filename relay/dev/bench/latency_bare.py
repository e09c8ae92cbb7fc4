"""The latency baseline's forwarder: one blocked XREAD, each entry sent over one WebSocket.

Run as ``python -m relay.dev.bench.latency_bare``. Config: ``redis_url``, ``stream``. It serves
one WebSocket on a free loopback port (event ``ready`` with ``port``); for the connected client
it blocks in XREAD on the stream and sends every entry's ``d`` field as one binary frame, with no
decoding, fencing, routing or buffering: the least any relay must do to carry one appended entry
from Redis to a client on this machine. It stops when the parent closes its stdin.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as redis
from aiohttp import web

from relay.dev.bench.child import ParentLink
from relay.dev.motion_sim import bound_port


async def _forward(request: web.Request) -> web.WebSocketResponse:
    config: dict[str, Any] = request.app["config"]
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    client = redis.Redis.from_url(config["redis_url"])
    last = "$"
    try:
        while not ws.closed:
            reply = await client.xread({config["stream"]: last}, block=0)
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    await ws.send_bytes(fields[b"d"])
    except (ConnectionError, OSError):
        pass  # the client went away
    finally:
        await client.aclose()
    return ws


async def _main() -> None:
    link = await ParentLink.open()
    config = await link.receive()
    if config is None:
        return
    app = web.Application()
    app["config"] = config
    app.router.add_get("/ws", _forward)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    link.emit("ready", port=bound_port(runner))
    await link.receive()  # until the parent closes stdin; asyncio.run cancels the forwarder


if __name__ == "__main__":
    asyncio.run(_main())
